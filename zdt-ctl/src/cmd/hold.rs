//! `zdt-ctl hold [ADDR]:PORT`: keep a placeholder listener in the port's group, so the group and
//! its program survive when no app process is alive (a crash, or a restart without overlap), and
//! new connections wait instead of being refused.
//!
//! The placeholder never accepts. The program parks a new connection on it only when no active
//! member can take it. As soon as a member is active again, the hold process shuts the
//! placeholder down for reading: the kernel then migrates its whole queue through the program to
//! the active member (SELECT_OR_MIGRATE). It listens again on the same socket at once, which puts
//! it back into the group, and registers it again.
use std::{
    convert::Infallible,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Duration,
};

use anyhow::Context as _;

use crate::{addr::PortSpec, cmd::exec::listeners, error::require_root, sockets, state::State};

/// How often the hold process looks at its queue (a read of /proc/net/tcp); the active set is
/// read only when something is waiting.
const POLL: Duration = Duration::from_millis(50);

/// The placeholder's socket inode and accept-queue length (rx_queue of a LISTEN socket).
fn queue(fd: &OwnedFd) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
    let len = sockets::tcp_entries()?
        .iter()
        .find(|e| e.inode == inode)
        .map_or(0, |e| u64::from(e.rx_queue));
    Ok((inode, len))
}

/// Puts the placeholders into the socket array and makes them the hold lists.
fn register(spec: &PortSpec, fds: &[OwnedFd]) -> anyhow::Result<()> {
    let pid = std::process::id() as i32;
    let table = sockets::listen_entries()?;
    let mut listeners = Vec::new();
    for fd in fds {
        let (inode, _) = queue(fd)?;
        let entry = table
            .get(&inode)
            .context("the placeholder is not listening")?;
        listeners.push(sockets::listener_from(pid, fd.try_clone()?, entry)?);
    }
    let mut state = State::open_locked(spec.port)?;
    for l in &listeners {
        state.attach_to_group(&l.fd)?;
    }
    let start = sockets::start_time(pid).unwrap_or(0);
    let slots_new = state.insert(pid, start, &listeners)?;
    let slots = state.slots()?;
    state.set_hold(&slots, &slots_new)?;
    Ok(())
}

/// Whether a member that is not a placeholder is active and listening.
fn member_active(port: u16) -> anyhow::Result<bool> {
    let Some(state) = State::open_read(port)? else {
        return Ok(false);
    };
    Ok(state.slots()?.iter().any(|s| s.active))
}

pub fn hold(spec: PortSpec, backlog: i32) -> anyhow::Result<Infallible> {
    require_root()?;
    // Under zdt's control first (idempotent): a placeholder that existed at attach time would be
    // adopted as an active member.
    crate::cmd::attach::attach(spec)?;
    let fds: Vec<OwnedFd> = listeners(&[spec], backlog)?
        .into_iter()
        .map(OwnedFd::from)
        .collect();
    register(&spec, &fds)?;
    tracing::info!(port = spec.port, "holding");
    eprintln!("zdt-ctl hold: placeholder on {spec} registered; waiting connections go to the next active member");
    loop {
        std::thread::sleep(POLL);
        let mut moved = false;
        for fd in &fds {
            let (_, queued) = queue(fd)?;
            if queued > 0 && member_active(spec.port)? {
                // Kernel contract: shutdown(SHUT_RD) stops a listener at once and migrates its
                // accept queue through the group's program (net/ipv4/inet_connection_sock.c,
                // inet_csk_listen_stop); listen() on the same socket puts it back in the group.
                nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)
                    .context("shutting the placeholder down")?;
                nix::sys::socket::listen(&fd.as_fd(), nix::sys::socket::Backlog::new(backlog)?)
                    .context("listening again on the placeholder")?;
                tracing::info!(port = spec.port, queued, "moved waiting connections");
                moved = true;
            }
        }
        if moved {
            register(&spec, &fds)?;
        }
    }
}
