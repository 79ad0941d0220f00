//! `zdt-ctl hold [ADDR]:PORT`: keep a placeholder listener in the port's group, so the group and
//! its program survive when no app process is alive (a crash, or a restart without overlap), and
//! new connections wait instead of being refused.
//!
//! The placeholder never accepts. The program parks a connection on it only when no active
//! member can take it. As soon as a member is active again, the hold process shuts the
//! placeholder down for reading: the kernel then migrates its whole queue through the program to
//! the active member (SELECT_OR_MIGRATE). It listens again on the same socket at once, which puts
//! it back into the group, and registers it again.
use std::{
    convert::Infallible,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{addr::PortSpec, cmd::exec::bound, error::require_root, sockets, state::State};

/// How often the hold process looks at its queues. One getsockopt per placeholder: a connection
/// that waited for a promote waits at most this much longer after it.
const POLL: Duration = Duration::from_millis(10);

/// Connections waiting in a listener's accept queue. Kernel contract: TCP_INFO on a LISTEN
/// socket reports the accept-queue length in tcpi_unacked (sk_ack_backlog) and its limit in
/// tcpi_sacked (net/ipv4/tcp.c, tcp_get_info). No scan of /proc/net/tcp, which grows with every
/// TIME_WAIT socket of the namespace.
fn queued(fd: BorrowedFd<'_>) -> anyhow::Result<u32> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("TCP_INFO of the placeholder");
    }
    Ok(info.tcpi_unacked)
}

/// Puts the placeholders into the socket array and makes them the hold lists.
fn register(spec: &PortSpec, fds: &[OwnedFd]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let pid = std::process::id() as i32;
    let table = sockets::listen_entries()?;
    let mut listeners = Vec::new();
    for fd in fds {
        let inode = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
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

/// The spec to attach with: the port's own if it is attached already and covers `spec` (`:PORT`
/// covers every address of the port), else `spec`.
fn attach_spec(spec: PortSpec) -> anyhow::Result<PortSpec> {
    let Some(state) = State::open_read(spec.port)? else {
        return Ok(spec);
    };
    let attached = state.spec;
    if attached == spec || attached.addr.is_none() {
        return Ok(attached);
    }
    Err(crate::error::bad_input(format!(
        "port {} is attached as {attached}, which does not cover {spec}: hold {attached} instead",
        spec.port
    )))
}

pub fn hold(spec: PortSpec, backlog: i32) -> anyhow::Result<Infallible> {
    require_root()?;
    // Bind first: a bad address fails here, before anything changed.
    let sockets = bound(&[spec])?;
    // Under zdt's control before the placeholder listens (idempotent): listeners already serving
    // become the active set, else new connections would park until the next promote; and a
    // placeholder listening at attach time would be adopted as an active member.
    crate::cmd::attach::attach(attach_spec(spec)?)?;
    let mut fds = Vec::new();
    for s in sockets {
        s.listen(backlog).context("listen() on the placeholder")?;
        fds.push(OwnedFd::from(s));
    }
    register(&spec, &fds)?;
    tracing::info!(port = spec.port, "holding");
    eprintln!(
        "zdt-ctl hold: placeholder on {spec} registered; while no member is active, new \
         connections wait on it for the next promoted process"
    );
    let mut waiting_since: Option<Instant> = None;
    loop {
        std::thread::sleep(POLL);
        let mut queued_now = 0u32;
        for fd in &fds {
            queued_now += queued(fd.as_fd())?;
        }
        if queued_now == 0 {
            waiting_since = None;
            continue;
        }
        let since = *waiting_since.get_or_insert_with(Instant::now);
        if !member_active(spec.port)? {
            continue;
        }
        for fd in &fds {
            // Kernel contract: shutdown(SHUT_RD) stops a listener at once, for every holder, and
            // migrates its accept queue through the group's program (inet_shutdown ->
            // tcp_disconnect -> inet_csk_listen_stop); the program then picks an active member.
            // listen() on the same socket puts it back into the group (reuseport_resurrect),
            // but not into the socket array, hence register() below.
            nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)
                .context("shutting the placeholder down")?;
            nix::sys::socket::listen(&fd.as_fd(), nix::sys::socket::Backlog::new(backlog)?)
                .context("listening again on the placeholder")?;
        }
        register(&spec, &fds)?;
        let waited = since.elapsed();
        tracing::info!(
            port = spec.port,
            queued = queued_now,
            ?waited,
            "moved waiting connections"
        );
        eprintln!(
            "zdt-ctl hold: moved {queued_now} waiting connection(s) to the active member(s) \
             (first waited {} ms)",
            waited.as_millis()
        );
        waiting_since = None;
    }
}
