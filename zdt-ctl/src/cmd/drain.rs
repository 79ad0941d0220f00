//! `zdt-ctl drain PID [--force] [--stopping]`: take a process's sockets out of the active set.
use crate::addr::Port;
use crate::{error::require_root, plan::sets::DrainOpts, state::State};

/// Take PID's sockets out of the active set.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_parser = super::parse_pid_arg, allow_hyphen_values = true)]
    pub pid: i32,
    /// Drain even if no active socket would remain (new connections then go to the previous
    /// version while it still listens, else to kernel hashing). Refused all the same while
    /// `zdt-ctl hold` runs: its placeholder would take them, to wait for a promote, while PID
    /// still listens.
    #[arg(long)]
    pub force: bool,
    /// PID stops next (a unit's ExecStop=, before systemd sends SIGTERM): drain it even if
    /// `zdt-ctl hold`'s placeholder then takes its family's new connections, which wait there
    /// for the next promote (the previous version takes them first, while it still listens).
    /// Taking PID out before it closes its listener keeps the kernel from resetting a handshake
    /// that completes at the instant the listener closes.
    #[arg(long)]
    pub stopping: bool,
    /// The attached port, `443/udp` for a UDP one (needed only when several are attached).
    #[arg(long, value_parser = super::parse_port_arg)]
    pub port: Option<Port>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let port = super::resolve_port(args.port)?;
    let opts = DrainOpts {
        force: args.force,
        stopping: args.stopping,
    };
    let slots = drain(port, args.pid, opts)?;
    crate::outln!("port {port}: pid {} draining (slots {slots:?})", args.pid);
    Ok(())
}

/// Drains `pid` on `port` ([`crate::plan::sets::drain`] says when it is refused); returns its slots.
pub fn drain(port: Port, pid: i32, opts: DrainOpts) -> anyhow::Result<Vec<u32>> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let snap = state.snapshot()?;
    state.apply(&snap.drain(pid, opts)?)?;
    tracing::info!(%port, pid, "drained");
    Ok(snap
        .slots
        .iter()
        .filter(|s| s.pid() == pid)
        .map(|s| s.index)
        .collect())
}
