//! `zdt-ctl upgrade [PORT]`: after a new zdt-ctl is installed, swap its program in on an
//! attached port, keeping the pinned maps (roles, active set, rollback target, counters).
use crate::addr::{Port, Proto};
use crate::{error::require_root, program, sockets, state::State};

/// After installing a new zdt-ctl: swap its program in, keeping roles, sets and counters.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Every other command refuses a port whose pinned program another zdt-ctl \
                  loaded (exit 7). upgrade loads this zdt-ctl's program against the port's \
                  pinned maps and attaches it to each of the port's SO_REUSEPORT groups, \
                  which the kernel swaps in one step: no connection is refused or reset, \
                  and members, roles, the rollback target and counters stay. It refuses \
                  (exit 7, nothing changed) when the pinned maps have another layout than \
                  this zdt-ctl's, except the layout of the version before, which it converts \
                  in place; then detach with the old zdt-ctl and attach with the new one. \
                  Running it again is harmless.\n\n\
                  Example, in a package's postinst:\n  zdt-ctl upgrade"
)]
pub struct Args {
    /// The port, `443/udp` for a UDP one (default: every attached port of this network namespace).
    #[arg(value_parser = super::parse_port_arg)]
    pub port: Option<Port>,
    #[arg(long)]
    pub json: bool,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let reports = upgrade(args.port)?;
    if args.json {
        crate::outln!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for r in &reports {
        for w in &r.warnings {
            eprintln!("zdt-ctl: warning: port {}: {w}", r.port);
        }
        if r.upgraded {
            crate::outln!(
                "port {}: program upgraded (tag {} -> {}), attached through {} socket(s)",
                Port {
                    number: r.port,
                    proto: r.protocol
                },
                r.from_tag,
                r.to_tag,
                r.sockets
            );
        } else {
            crate::outln!(
                "port {}: already runs this zdt-ctl's program (tag {})",
                Port {
                    number: r.port,
                    proto: r.protocol
                },
                r.to_tag
            );
        }
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct UpgradeReport {
    pub port: u16,
    pub protocol: Proto,
    /// The pinned program's tag before and after.
    pub from_tag: String,
    pub to_tag: String,
    /// Sockets the program was attached through (every listener of the port: one per group
    /// would do, all of them repair a group re-created without the program).
    pub sockets: usize,
    /// False when the port already ran this zdt-ctl's program (then it was only re-attached).
    pub upgraded: bool,
    /// Listeners of the port left alone (another user's, or unusable), said on stderr.
    pub warnings: Vec<String>,
}

/// Upgrades `port`, or every attached port of this network namespace.
pub fn upgrade(port: Option<Port>) -> anyhow::Result<Vec<UpgradeReport>> {
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

fn upgrade_port(port: Port) -> anyhow::Result<UpgradeReport> {
    // Refuses a state whose maps this build cannot read (another layout version, other map
    // shapes, wrong permissions) before anything is loaded or changed.
    let mut state = State::open_for_upgrade(port)?;
    let from = state.program_tag()?;
    // Only the app's listeners (one read, a pure split): another user's, in groups of their
    // own, is not zdt's to steer, and must not make the upgrade fail (every other command
    // refuses until it succeeds).
    let read = sockets::PortRead::read(&state.spec)?;
    let owned = crate::plan::port::upgrade(&read.seen, &state.member_uids()?);
    let mut warnings: Vec<String> = owned.warning().into_iter().collect();
    let mine: Vec<sockets::Found> = (owned.mine.iter())
        .filter_map(|o| read.dup(o.listen.cookie))
        .collect();
    // A listener without SO_REUSEPORT is in no group: there is nothing to attach to.
    let (usable, unusable): (Vec<_>, Vec<_>) = mine
        .into_iter()
        .partition(|f| sockets::reuseport(&f.fd).unwrap_or(false));
    for f in &unusable {
        warnings.push(format!(
            "{} (uid {}) has no SO_REUSEPORT: left alone",
            f.entry.local, f.entry.uid
        ));
    }
    let fds: Vec<_> = usable.iter().map(|f| &f.fd).collect();
    let upgraded = !program::is_ours(port.proto, from)?;
    let to = if upgraded {
        state.replace_program(&fds)?
    } else {
        for fd in &fds {
            state.attach_to_group(fd)?;
        }
        from
    };
    tracing::info!(%port, from = %format!("{from:016x}"), to = %format!("{to:016x}"), "upgraded");
    Ok(UpgradeReport {
        port: port.number,
        protocol: port.proto,
        from_tag: format!("{from:016x}"),
        to_tag: format!("{to:016x}"),
        sockets: fds.len(),
        upgraded,
        warnings,
    })
}
