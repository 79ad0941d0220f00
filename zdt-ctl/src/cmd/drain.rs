//! `zdt-ctl drain PID [--force]`: take a process's sockets out of the active set.
use zdt_common::ActiveSet;

use crate::{error::require_root, plan::sets, state::State};

/// Take PID's sockets out of the active set.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_parser = super::parse_pid_arg, allow_hyphen_values = true)]
    pub pid: i32,
    /// Drain even if no active socket would remain (new connections then go to kernel
    /// hashing). Refused all the same while `zdt-ctl hold` runs: its placeholder would take
    /// them, to wait for a promote, while PID still listens.
    #[arg(long)]
    pub force: bool,
    #[arg(long, value_parser = super::parse_port_arg)]
    pub port: Option<u16>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let port = super::resolve_port(args.port)?;
    let slots = drain(port, args.pid, args.force)?;
    println!("port {port}: pid {} draining (slots {slots:?})", args.pid);
    Ok(())
}

/// Drains `pid` on `port` ([`sets::drain`] says when it is refused); returns its slots.
pub fn drain(port: u16, pid: i32, force: bool) -> anyhow::Result<Vec<u32>> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let slots = state.slots()?;
    let live = state.active_set()?.unwrap_or(ActiveSet::EMPTY);
    let plan = sets::drain(&slots, &live, pid, force, port)?;
    state.apply(&plan)?;
    tracing::info!(port, pid, "drained");
    Ok(slots
        .iter()
        .filter(|s| s.pid() == pid)
        .map(|s| s.index)
        .collect())
}
