//! `zdt-ctl upgrade [PORT]`: after a new zdt-ctl is installed, swap its program in on an
//! attached port, keeping the pinned maps (roles, active set, rollback target, counters).
use crate::{error::require_root, program, sockets, state::State};

#[derive(Debug, serde::Serialize)]
pub struct UpgradeReport {
    pub port: u16,
    /// The pinned program's tag before and after.
    pub from_tag: String,
    pub to_tag: String,
    /// Sockets the program was attached through (every listener of the port: one per group
    /// would do, all of them repair a group re-created without the program).
    pub sockets: usize,
    /// False when the port already ran this zdt-ctl's program (then it was only re-attached).
    pub upgraded: bool,
}

/// Upgrades `port`, or every attached port of this network namespace.
pub fn upgrade(port: Option<u16>) -> anyhow::Result<Vec<UpgradeReport>> {
    require_root()?;
    let ports = match port {
        Some(p) => vec![p],
        None => super::status::attached_ports()?,
    };
    if ports.is_empty() {
        return Err(crate::error::err(
            crate::error::Kind::NotAttached,
            "no port is attached in this network namespace: nothing to upgrade",
        ));
    }
    ports.into_iter().map(upgrade_port).collect()
}

fn upgrade_port(port: u16) -> anyhow::Result<UpgradeReport> {
    // Refuses a state whose maps this build cannot read (another layout version, other map
    // shapes, wrong permissions) before anything is loaded or changed.
    let mut state = State::open_for_upgrade(port)?;
    let from = state.program_tag()?;
    let found = sockets::matching_listeners(&state.spec)?;
    let fds: Vec<_> = found.iter().map(|f| &f.fd).collect();
    let upgraded = !program::is_ours(from)?;
    let to = if upgraded {
        state.replace_program(&fds)?
    } else {
        for fd in &fds {
            state.attach_to_group(fd)?;
        }
        from
    };
    tracing::info!(port, from = %format!("{from:016x}"), to = %format!("{to:016x}"), "upgraded");
    Ok(UpgradeReport {
        port,
        from_tag: format!("{from:016x}"),
        to_tag: format!("{to:016x}"),
        sockets: fds.len(),
        upgraded,
    })
}
