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
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{
    addr::PortSpec,
    cmd::exec::{bound, layout, Chosen, NewSockets},
    error::{bad_input, require_root},
    plan::{GroupKind, Layout},
    sockets,
    state::State,
};

/// What `zdt-ctl hold` is asked for.
#[derive(Debug, Clone)]
pub struct HoldOptions {
    pub spec: PortSpec,
    pub backlog: i32,
    pub max_wait: Duration,
    /// The owner of the placeholders: a user name or uid. None: the owner of the port's
    /// listeners, or root when there are none.
    pub user: Option<String>,
    /// None: the layout of the port's listeners, or split when there are none.
    pub layout: Option<Layout>,
}

/// A user name or a numeric uid, as a uid.
pub fn uid_of(user: &str) -> anyhow::Result<u32> {
    if let Ok(uid) = user.parse::<u32>() {
        // (uid_t)-1 means "unchanged" to setfsuid and chown: no user has it.
        if uid == u32::MAX {
            return Err(bad_input(format!(
                "--user {user}: not a uid any user can have (the largest is {})",
                u32::MAX - 1
            )));
        }
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(bad_input(format!(
            "--user {user:?}: no such user (pass a user name from /etc/passwd or a uid)"
        ))),
    }
}

/// How to make the placeholders so that they join the groups of the port's listeners (the app's):
/// the same owner uid, the same layout. The kernel would put a placeholder of another uid or
/// another layout into a group of its own, where it takes connections that nothing moves on.
fn plan_for(o: &HoldOptions) -> anyhow::Result<NewSockets> {
    let spec = o.spec;
    let Chosen {
        layout: chosen,
        listeners: members,
        all,
    } = layout(spec, o.layout, Layout::Split)?;
    let mut uids: Vec<u32> = members.iter().map(|e| e.uid).collect();
    uids.sort_unstable();
    uids.dedup();
    let uid = match (&o.user, uids.as_slice()) {
        (Some(user), found) => {
            let uid = uid_of(user)?;
            if let Some(other) = found.iter().find(|u| **u != uid) {
                return Err(bad_input(format!(
                    "--user {user}: the port's listeners belong to uid {other}; the kernel lets only sockets of one uid share a port, so the placeholder must be theirs (leave --user out, or pass uid {other})"
                )));
            }
            uid
        }
        (None, []) => nix::unistd::geteuid().as_raw(),
        (None, [one]) => *one,
        (None, many) => {
            return Err(bad_input(format!(
                "the port's listeners belong to several uids ({many:?}); pass --user with the app's"
            )))
        }
    };
    // Another user's listener on an address of the spec: the kernel would refuse a placeholder
    // there (EADDRINUSE: only one owner's sockets share an address), and it is not the app's.
    // Its family gets no placeholder, and hold says so.
    let mut foreign = [false; 2];
    for e in all
        .iter()
        .filter(|e| e.uid != uid && spec.matches(&e.local))
    {
        let families: &[usize] = match e.group_kind() {
            GroupKind::V4 => &[0],
            GroupKind::V6Only => &[1],
            GroupKind::DualStack => &[0, 1],
        };
        for &f in families {
            foreign[f] = true;
        }
        eprintln!(
            "zdt-ctl: warning: {} (uid {}) is another user's listener on the port: no \
             placeholder for its family; the kernel gives it that family's connections",
            e.local, e.uid
        );
    }
    if foreign == [true, true] || (spec.addr.is_some() && foreign.contains(&true)) {
        return Err(bad_input(format!(
            "{spec}: every address is taken by another user's listener (not uid {uid}'s): \
             there is nothing a placeholder can hold"
        )));
    }
    Ok(NewSockets {
        layout: chosen,
        uid: Some(uid),
        foreign,
    })
}

/// While connections wait, how often the hold process looks for a ready member (a read of the
/// pinned state): a connection that waited for a promote waits at most this much longer.
const POLL: Duration = Duration::from_millis(10);

/// How often the hold process checks that the port is still attached (a stat of the program pin).
const DETACH_CHECK: Duration = Duration::from_millis(100);

/// How long the program must have parked nothing on a placeholder, with a member ready, before
/// hold stops the placeholder to move its queue; and the longest hold waits for that.
///
/// Kernel contract (net/ipv4/inet_connection_sock.c, inet_csk_reqsk_queue_add): a handshake
/// whose final ACK is being processed while its listener stops finds the listener no longer
/// listening when it queues the new connection, and the kernel resets it (inet_child_forget)
/// instead of migrating it; only connections already queued, and handshakes whose ACK comes
/// after the stop, migrate. The program parks connections on the placeholder until a promote's
/// switch is seen by every CPU, so the last ones parked may still be completing their
/// handshake when hold first sees a ready member. Waiting until the program's `held` count has
/// not moved for SETTLE lets those complete (a loopback or LAN handshake takes far less); a
/// client whose ACK takes longer than that still migrates unless it lands in the instant of
/// the stop itself.
const SETTLE: Duration = Duration::from_millis(20);
const MAX_SETTLE: Duration = Duration::from_millis(200);

/// hold's wait for the program to stop parking connections, while a member is ready.
struct Settle {
    /// The program's `held` count as last read.
    held: u64,
    /// Since when that count has not moved.
    unchanged_since: Instant,
    /// Since when hold has been waiting (bounded by MAX_SETTLE).
    started: Instant,
}

impl Settle {
    fn new(held: u64) -> Self {
        let now = Instant::now();
        Settle {
            held,
            unchanged_since: now,
            started: now,
        }
    }

    /// Takes a new reading of `held`; true once the wait is over: the count has not moved for
    /// SETTLE, or MAX_SETTLE has passed.
    fn over(&mut self, held: u64) -> bool {
        if held != self.held {
            self.held = held;
            self.unchanged_since = Instant::now();
        }
        self.unchanged_since.elapsed() >= SETTLE || self.started.elapsed() >= MAX_SETTLE
    }
}

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

/// Puts the placeholders that are not in the socket array (new, or listening again after a
/// move: the kernel took them out) into it, and makes all of them the hold lists.
fn register(spec: &PortSpec, fds: &[OwnedFd]) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let pid = std::process::id() as i32;
    let mut state = State::open_locked(spec.key())?;
    let live = state.slots()?;
    let table = sockets::listen_entries(spec.proto)?;
    let (mut indices, mut missing) = (Vec::new(), Vec::new());
    for fd in fds {
        let cookie = sockets::socket_cookie(fd.as_fd())?;
        if let Some(slot) = live.iter().find(|s| s.meta.cookie == cookie) {
            indices.push(slot.index);
            continue;
        }
        let inode = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
        let entry = table
            .get(&inode)
            .context("the placeholder is not listening")?;
        missing.push(sockets::listener_from(pid, fd.try_clone()?, entry)?);
    }
    for l in &missing {
        state.attach_to_group(&l.fd)?;
    }
    let start = sockets::start_time(pid).unwrap_or(0);
    // Recorded as hold's from the start: `status` reads without the lock, and must never see a
    // placeholder as a candidate between this write and the plan's.
    indices.extend(state.insert(pid, start, &missing, crate::plan::sets::Role::Hold)?);
    crate::failpoint(crate::Step::HoldInserted);
    let plan = state.snapshot()?.hold(&indices)?;
    state.apply(&plan)?;
    Ok(())
}

/// The address family of a placeholder.
fn family(fd: &OwnedFd) -> anyhow::Result<u32> {
    let addr = socket2::SockRef::from(fd)
        .local_addr()?
        .as_socket()
        .context("the placeholder has no IP address")?;
    Ok(sockets::family_of(&addr))
}

/// The spec to attach with: the port's own if it is attached already and covers `spec`, else
/// `spec`. `:PORT` covers its wildcards (0.0.0.0, [::]) and no other address: a placeholder on
/// 127.0.0.1 would be a group of its own, which the kernel prefers for that address, so it
/// would take every connection to it, and never accept one.
fn attach_spec(spec: PortSpec) -> anyhow::Result<PortSpec> {
    let Some(state) = State::open_read(spec.key())? else {
        return Ok(spec);
    };
    let attached = state.spec;
    let wildcard = spec.addr.is_none_or(|a| a.is_unspecified());
    if attached == spec || (attached.addr.is_none() && wildcard) {
        return Ok(attached);
    }
    Err(crate::error::bad_input(format!(
        "port {} is attached as {attached}, which does not cover {spec}: hold {attached} instead",
        spec.port
    )))
}

/// Keep the port's connections waiting while no promoted process is active (runs until stopped)
///
/// A placeholder listener that never accepts stays in the port's group. While no promoted
/// process can take a connection (a crash, a stop-then-start restart), new connections and
/// a dying member's queue wait on it instead of being refused or reset, and move to the next
/// promoted process. Meant as a systemd service (examples/zdt-hold.service); ends when the
/// port is detached.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The address your app binds, [ADDR]:PORT: `:PORT` holds both wildcards (0.0.0.0 and
    /// [::]); use 0.0.0.0:PORT for an app that serves IPv4 only.
    #[arg(value_parser = super::parse_spec)]
    pub addr: PortSpec,
    /// Accept-queue limit of each placeholder: how many connections can wait at once
    /// (also capped by net.core.somaxconn).
    // allow_hyphen_values: `--backlog -5` reaches the parser, which names it, instead of
    // being taken for an unknown flag.
    #[arg(long, default_value_t = 4096, value_parser = super::parse_backlog, allow_hyphen_values = true)]
    pub backlog: i32,
    /// How long connections may wait for a ready process of their address family; after
    /// that they are reset (a family no process serves must not keep clients forever).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration_arg)]
    pub max_wait: Duration,
    /// Owner of the placeholder (user name or uid): the app's user, e.g. www-data. The
    /// kernel shares a port only between sockets of one uid. Default: the owner of the
    /// port's listeners, or root when there are none.
    #[arg(long, value_name = "NAME|UID")]
    pub user: Option<String>,
    /// One [::] placeholder with IPV6_V6ONLY=0, for an app that listens on one dual-stack
    /// socket (Go, Java and Node do by default). Default: the layout of the port's
    /// listeners, or split when there are none.
    #[arg(long, conflicts_with = "split")]
    pub dual_stack: bool,
    /// An IPv4 and an IPv6-only placeholder (the default when the port has no listener).
    #[arg(long)]
    pub split: bool,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    hold(&HoldOptions {
        spec: args.addr,
        backlog: args.backlog,
        max_wait: args.max_wait,
        user: args.user,
        layout: match (args.dual_stack, args.split) {
            (true, _) => Some(Layout::DualStack),
            (_, true) => Some(Layout::Split),
            _ => None,
        },
    })
}

/// Runs until the port is detached (then returns, and the placeholder closes) or an error.
pub fn hold(o: &HoldOptions) -> anyhow::Result<()> {
    require_root()?;
    let (spec, backlog, max_wait) = (o.spec, o.backlog, o.max_wait);
    if spec.proto == crate::addr::Proto::Udp {
        // Kernel contract: UDP has no migration; a placeholder's queued datagrams would be
        // freed when it closes, not handed to the next process.
        return Err(bad_input(format!(
            "hold {spec}: a UDP socket cannot hold datagrams for the next process (the kernel \
             frees a closing socket's queue; nothing moves it). Start the new version before \
             the old one stops (promote --stop-old, or the watcher); nothing was changed"
        )));
    }
    let plan = plan_for(o)?;
    // Bind first: a bad address fails here, before anything changed.
    let sockets = bound(&[spec], plan)?;
    // Under zdt's control before the placeholder listens (idempotent): listeners already serving
    // become the active set, else new connections would park until the next promote; and a
    // placeholder listening at attach time would be adopted as an active member.
    let user = plan.uid.map(|u| u.to_string());
    crate::cmd::attach::attach_as(attach_spec(spec)?, user.as_deref(), None)?;
    let mut fds = Vec::new();
    for s in sockets {
        s.listen(backlog).context("listen() on the placeholder")?;
        fds.push(OwnedFd::from(s));
    }
    register(&spec, &fds)?;
    tracing::info!(port = spec.port, "holding");
    eprintln!(
        "zdt-ctl hold: placeholder on {spec} ({}, uid {}) registered; while no member is \
         active, new connections wait on it for the next promoted process",
        if plan.layout == Layout::DualStack {
            "one dual-stack socket"
        } else {
            "split IPv4/IPv6 sockets"
        },
        plan.uid.unwrap_or(0)
    );
    let families = fds.iter().map(family).collect::<anyhow::Result<Vec<_>>>()?;
    // Per placeholder: since when its queue has not been empty.
    let mut since: Vec<Option<Instant>> = vec![None; fds.len()];
    let mut waiting_state: Option<State> = None;
    // While a member is ready and connections wait: hold's wait for the program to stop
    // parking them.
    let mut settle: Option<Settle> = None;
    let mut last_check = Instant::now();
    loop {
        // After `zdt-ctl detach` the group has no program, and kernel hashing would give the
        // placeholder, which never accepts, its share of new connections: leave at once.
        if last_check.elapsed() >= DETACH_CHECK {
            last_check = Instant::now();
            if !State::exists(spec.key())? {
                eprintln!(
                    "zdt-ctl hold: port {} was detached; placeholder closed",
                    spec.port
                );
                return Ok(());
            }
        }
        let mut waiting = Vec::new();
        for (k, fd) in fds.iter().enumerate() {
            let n = queued(fd.as_fd())?;
            if n == 0 {
                since[k] = None;
            } else {
                since[k].get_or_insert_with(Instant::now);
                waiting.push((k, n));
            }
        }
        if waiting.is_empty() {
            waiting_state = None;
            settle = None;
            // Sleep until a connection arrives: a listener polls readable when its accept queue
            // is not empty. The timeout only paces the detach check.
            let mut pollfds: Vec<_> = fds
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(
                &mut pollfds,
                PollTimeout::from(DETACH_CHECK.as_millis() as u16),
            ) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll() on the placeholders"),
            }
            // A placeholder shut down by someone else polls as hung up at once. detach does
            // that under the port's lock, before it takes the program away: once the lock is
            // free, either the state is gone (leave) or that detach was killed halfway, and the
            // port, still attached, needs its placeholders back.
            let hung_up: Vec<usize> = (pollfds.iter().enumerate())
                .filter(|(_, p)| p.revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)))
                .map(|(k, _)| k)
                .collect();
            if !hung_up.is_empty() {
                if let Err(e) = State::open_locked(spec.key()) {
                    if crate::error::kind_of(&e) == crate::error::Kind::NotAttached {
                        eprintln!(
                            "zdt-ctl hold: port {} was detached; placeholder closed",
                            spec.port
                        );
                        return Ok(());
                    }
                    return Err(e);
                }
                for k in hung_up {
                    socket2::SockRef::from(&fds[k])
                        .listen(backlog)
                        .context("listening again on a placeholder shut down by another")?;
                }
                register(&spec, &fds)?;
                tracing::info!(
                    port = spec.port,
                    "placeholders back after an unfinished detach"
                );
                eprintln!(
                    "zdt-ctl hold: port {} is still attached after its placeholders were shut \
                     down (a detach that did not finish); placeholders registered again",
                    spec.port
                );
            }
            continue;
        }
        // Opened once per wait, not per look: opening verifies the whole pinned state, and
        // this runs every POLL while connections wait and a new process starts up.
        if waiting_state.is_none() {
            waiting_state = State::open_read(spec.key())?;
        }
        let ready = match &waiting_state {
            Some(state) => state.ready_families()?,
            None => Vec::new(),
        };
        if let Some(state) = &waiting_state {
            if waiting.iter().any(|(k, _)| ready.contains(&families[*k])) {
                let held = state.global_counters()?.held;
                if !settle.get_or_insert_with(|| Settle::new(held)).over(held) {
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        }
        let (mut moved, mut dropped) = (0, 0);
        let mut first_wait = Duration::ZERO;
        for (k, n) in waiting {
            let waited = since[k].map_or(Duration::ZERO, |t| t.elapsed());
            // A placeholder moves its queue once its family has a ready member. Without one,
            // the migration finds no target and the kernel resets what was queued: that is
            // done only once the wait has lasted `max_wait`, so that a family no process serves
            // (an IPv6 placeholder beside an IPv4-only app) does not keep clients forever.
            if ready.contains(&families[k]) {
                moved += n;
            } else if waited >= max_wait {
                dropped += n;
            } else {
                continue;
            }
            first_wait = first_wait.max(waited);
            // Kernel contract: shutdown(SHUT_RD) stops a listener at once, for every holder, and
            // migrates its accept queue through the group's program (inet_shutdown ->
            // tcp_disconnect -> inet_csk_listen_stop); the program then picks an active member.
            // listen() on the same socket puts it back into the group (reuseport_resurrect),
            // but not into the socket array, hence register() below.
            let fd = &fds[k];
            nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)
                .context("shutting the placeholder down")?;
            // With the backlog it was first given, whatever its size: the kernel caps it at
            // net.core.somaxconn by itself (nix's Backlog type refuses more than SOMAXCONN,
            // 4096, with EINVAL, which once ended hold after its first move).
            socket2::SockRef::from(fd)
                .listen(backlog)
                .context("listening again on the placeholder")?;
            since[k] = None;
        }
        if moved + dropped == 0 {
            // Connections wait and no member is ready yet: look again shortly.
            std::thread::sleep(POLL);
            continue;
        }
        waiting_state = None;
        settle = None;
        register(&spec, &fds)?;
        tracing::info!(port = spec.port, moved, dropped, ?first_wait, "queue moved");
        if moved > 0 {
            eprintln!(
                "zdt-ctl hold: moved {moved} waiting connection(s) to the active member(s) \
                 (first waited {} ms)",
                first_wait.as_millis()
            );
        }
        if dropped > 0 {
            eprintln!(
                "zdt-ctl hold: no process of that address family became ready within {}; \
                 reset {dropped} connection(s) that waited",
                crate::addr::fmt_duration(max_wait)
            );
        }
    }
}
