//! `zdt-ctl drain PID [--force]`: take a process's sockets out of the active set.
use crate::{error::require_root, state::State};

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
    crate::outln!("port {port}: pid {} draining (slots {slots:?})", args.pid);
    Ok(())
}

/// Drains `pid` on `port` ([`crate::plan::sets::drain`] says when it is refused); returns its slots.
pub fn drain(port: u16, pid: i32, force: bool) -> anyhow::Result<Vec<u32>> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let snap = state.snapshot()?;
    state.apply(&snap.drain(pid, force)?)?;
    tracing::info!(port, pid, "drained");
    Ok(snap
        .slots
        .iter()
        .filter(|s| s.pid() == pid)
        .map(|s| s.index)
        .collect())
}
