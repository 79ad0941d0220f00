//! `zdt-ctl rollback [PORT]`: make the active set that was live before the last switch live
//! again, in one update. The fast path back from a deploy: the previous version, drained but not
//! yet stopped, takes all new connections again at once.
use crate::addr::{Port, Proto};
use crate::{error::require_root, plan::sets::pids_where, state::State};

/// Make the active set from before the last switch active again (while its sockets listen).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example, right after a deploy that turns out bad (before --stop-old stopped the old version):\n  zdt-ctl rollback"
)]
pub struct Args {
    /// The port, `443/udp` for a UDP one (needed only when several are attached).
    #[arg(value_parser = super::parse_port_arg)]
    pub port: Option<Port>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let port = super::resolve_port(args.port)?;
    let r = rollback(port)?;
    let canary = if r.canary.is_empty() {
        String::new()
    } else {
        format!(" (pid {} canary again)", super::pid_list(&r.canary))
    };
    crate::outln!(
        "port {port}: pid {} active again{canary}; pid {} draining",
        super::pid_list(&r.restored),
        if r.demoted.is_empty() {
            "-".into()
        } else {
            super::pid_list(&r.demoted)
        }
    );
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct RollbackReport {
    pub port: u16,
    pub protocol: Proto,
    /// Pids active again.
    pub restored: Vec<i32>,
    /// Pids that are the restored set's canary again.
    pub canary: Vec<i32>,
    /// Pids that were active and are draining now.
    pub demoted: Vec<i32>,
}

pub fn rollback(port: Port) -> anyhow::Result<RollbackReport> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let snap = state.snapshot()?;
    let plan = snap.rollback()?;
    state.apply(&plan)?;
    let serving = plan.serving(&snap.slots);
    let restored = pids_where(&snap.slots, |s| {
        plan.set.contains(s.index) && serving.contains(&s.pid())
    });
    let canary: Vec<i32> = serving
        .into_iter()
        .filter(|p| !restored.contains(p))
        .collect();
    let mut demoted: Vec<i32> = plan.drained.iter().map(|p| p.pid).collect();
    demoted.sort_unstable();
    demoted.dedup();
    tracing::info!(%port, ?restored, ?demoted, "rolled back");
    Ok(RollbackReport {
        port: port.number,
        protocol: port.proto,
        restored,
        canary,
        demoted,
    })
}
