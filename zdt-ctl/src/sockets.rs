//! Finding and validating listening sockets: which sockets listen on a port in this network
//! namespace, which processes hold them, and duplicating them into zdt-ctl with pidfd_getfd.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use anyhow::Context as _;
use procfs::process::{FDTarget, Process};
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
use socket2::SockRef;

use crate::{
    addr::{PortSpec, Proto},
    error::{bad_input, err, Kind},
    plan,
};

/// A TCP listener of this network namespace, as the kernel's sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenEntry {
    pub proto: Proto,
    pub inode: u64,
    pub local: SocketAddr,
    pub uid: u32,
    /// IPV6_V6ONLY (false for IPv4 sockets).
    pub v6only: bool,
    /// The socket's cookie (SO_COOKIE), as the socket array reports it for a slot.
    pub cookie: u64,
    /// The interface index it is bound to (SO_BINDTODEVICE, `ip vrf exec`), 0 for none.
    pub device: u32,
    /// Connections in its accept queue, not yet accepted.
    pub queued: u32,
    /// The accept queue's limit (listen()'s backlog, capped by net.core.somaxconn).
    pub backlog: u32,
}

impl ListenEntry {
    /// The kind of reuseport group the listener is in.
    pub fn group_kind(&self) -> plan::GroupKind {
        plan::GroupKind::of(&self.local, self.v6only)
    }
}

/// Every TCP socket of the calling thread's network namespace (/proc/net/tcp and tcp6).
///
/// Kernel contract: /proc/PID/net shows the network namespace of that task, and /proc/net is
/// /proc/self/net, the namespace of the thread-group *leader*. A thread that entered another
/// namespace with setns() must read /proc/thread-self/net to see its own.
pub fn tcp_entries() -> anyhow::Result<Vec<procfs::net::TcpNetEntry>> {
    use procfs::FromReadSI as _;
    let read = |name: &str| {
        procfs::net::TcpNetEntries::from_file(
            format!("/proc/thread-self/net/{name}"),
            procfs::current_system_info(),
        )
        .map(|t| t.0)
    };
    let mut all = read("tcp").context("reading /proc/thread-self/net/tcp")?;
    // An IPv6-disabled kernel has no tcp6 table; that only means there are no IPv6 listeners.
    all.extend(read("tcp6").unwrap_or_default());
    Ok(all)
}

/// Every TCP socket in LISTEN state in the caller's network namespace, by inode. A socket found
/// here is in the same namespace as zdt-ctl (and as the pinned state).
///
/// Asked of the kernel with sock_diag (NETLINK_SOCK_DIAG, inet_diag), for the LISTEN state only.
/// Kernel contract: with a state filter of listeners only, inet_diag_dump_icsk walks the
/// listening hash and skips the established hash altogether, so the cost does not grow with the
/// connections the port serves. /proc/net/tcp lists every socket: with tens of thousands of
/// TIME_WAIT sockets, reading it took seconds and made a promote that slow. A netlink socket
/// belongs to the network namespace of the thread that creates it.
///
/// For UDP, the sockets that can be in a reuseport group: bound and not connected (a connected
/// UDP socket is found by its 4-tuple before any group, and its state is ESTABLISHED); their
/// `queued` is the bytes of datagrams waiting to be read.
pub fn listen_entries(proto: Proto) -> anyhow::Result<BTreeMap<u64, ListenEntry>> {
    let mut out = BTreeMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for e in diag_listeners(family, proto)? {
            out.insert(e.inode, e);
        }
    }
    Ok(out)
}

/// The TCP listeners (or unconnected UDP sockets) of one address family, from one inet_diag
/// dump.
fn diag_listeners(family: u8, proto: Proto) -> anyhow::Result<Vec<ListenEntry>> {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::{
        constants::{IPPROTO_TCP, IPPROTO_UDP},
        inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
        SockDiagMessage,
    };
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

    let (ctx, protocol, states, module) = match proto {
        Proto::Tcp => (
            "asking the kernel for TCP listeners (sock_diag)",
            IPPROTO_TCP,
            StateFlags::LISTEN,
            "tcp_diag",
        ),
        // Kernel contract: an unconnected UDP socket's sk_state is TCP_CLOSE (udp_diag dumps
        // every UDP socket and filters by the same state bits as for TCP).
        Proto::Udp => (
            "asking the kernel for UDP sockets (sock_diag)",
            IPPROTO_UDP,
            StateFlags::CLOSE,
            "udp_diag",
        ),
    };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context(ctx)?;
    socket.bind_auto().context(ctx)?;
    socket.connect(&NlAddr::new(0, 0)).context(ctx)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == libc::AF_INET6 as u8 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context(ctx)?;

    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0).context(ctx)?;
        let mut offset = 0;
        while offset < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..n])
                .map_err(|e| anyhow::anyhow!("{ctx}: undecodable answer: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    // Kernel contract: inet_diag_msg_attrs_fill puts INET_DIAG_SKV6ONLY on every
                    // AF_INET6 socket; idiag_cookie is the cookie as two u32 in host order, low
                    // word first (sock_diag_save_cookie).
                    let c = h.socket_id.cookie;
                    let word = |i: usize| {
                        u64::from(u32::from_ne_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]))
                    };
                    out.push(ListenEntry {
                        proto,
                        inode: u64::from(h.inode),
                        local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                        uid: h.uid,
                        v6only: r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true))),
                        cookie: word(0) | word(4) << 32,
                        // idiag_if: sk_bound_dev_if (inet_diag_msg_common_fill).
                        device: h.socket_id.interface_id,
                        // Kernel contract: for a listener, inet_diag (tcp_diag_get_info) reports
                        // sk_ack_backlog as idiag_rqueue and sk_max_ack_backlog as idiag_wqueue.
                        queued: h.recv_queue,
                        backlog: h.send_queue,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(out),
                // A kernel without IPv6 has no inet6 diag handler: no IPv6 listeners.
                NetlinkPayload::Error(e) if family == libc::AF_INET6 as u8 => {
                    tracing::debug!(error = ?e, "no IPv6 sock_diag");
                    return Ok(out);
                }
                // ENOENT: no handler for the protocol. inet_diag loads tcp_diag (udp_diag) on
                // demand, and most distributions build it as a module: a kernel without its
                // modules has none.
                NetlinkPayload::Error(e) if e.code.map(|c| c.get()) == Some(-libc::ENOENT) => {
                    return Err(crate::error::err(
                        crate::error::Kind::Refused,
                        format!(
                            "{ctx}: the kernel has no {} sock_diag ({module}, a module in most \
                             distributions' kernels): run `modprobe {module}`, or install the \
                             running kernel's modules; nothing was changed",
                            proto.name()
                        ),
                    ));
                }
                NetlinkPayload::Error(e) => {
                    let why = e.code.map_or("an error".to_string(), |c| {
                        std::io::Error::from_raw_os_error(-c.get()).to_string()
                    });
                    anyhow::bail!("{ctx}: {why}")
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Socket inodes among `pid`'s open files, with one fd number for each.
fn socket_fds(pid: i32) -> anyhow::Result<BTreeMap<u64, i32>> {
    let proc = Process::new(pid).map_err(|_| no_such_pid(pid))?;
    let fds = proc.fd().map_err(|e| {
        if let procfs::ProcError::NotFound(_) = e {
            no_such_pid(pid)
        } else {
            anyhow::Error::new(e).context(format!("reading /proc/{pid}/fd"))
        }
    })?;
    let mut out = BTreeMap::new();
    for fd in fds.flatten() {
        if let FDTarget::Socket(inode) = fd.target {
            out.entry(inode).or_insert(fd.fd);
        }
    }
    Ok(out)
}

/// The addresses of the TCP listeners `pid` holds on ports other than `port`: where its own
/// admin (readiness) endpoint may be.
pub fn other_listeners(pid: i32, port: u16) -> anyhow::Result<BTreeSet<SocketAddr>> {
    let fds = socket_fds(pid)?;
    Ok(listen_entries(Proto::Tcp)?
        .into_iter()
        .filter(|(inode, e)| fds.contains_key(inode) && e.local.port() != port)
        .map(|(_, e)| e.local)
        .collect())
}

fn no_such_pid(pid: i32) -> anyhow::Error {
    bad_input(format!(
        "pid {pid} does not exist (or has already exited); pass the pid of the running service process"
    ))
}

/// Who holds some sockets, from one pass over /proc: the holders of each socket (lowest pid
/// first, with the fd number each holds it at), and what [`plan`] needs to know of every
/// process (the parent of each, and more of the holders) to tell which holder serves it.
#[derive(Debug, Default)]
pub struct Holders {
    pub by_inode: BTreeMap<u64, Vec<(i32, i32)>>,
    pub procs: plan::Procs,
}

impl Holders {
    /// The pids holding `inode`.
    pub fn pids(&self, inode: u64) -> Vec<i32> {
        self.by_inode
            .get(&inode)
            .map(|v| v.iter().map(|(pid, _)| *pid).collect())
            .unwrap_or_default()
    }
}

/// PF_FORKNOEXEC (include/linux/sched.h): forked and has not exec'd since.
const PF_FORKNOEXEC: u32 = 0x40;
/// PF_KTHREAD.
const PF_KTHREAD: u32 = 0x0020_0000;

/// zdt-ctl's own executable, to know zdt-ctl processes by (besides their command name).
fn own_exe() -> Option<std::path::PathBuf> {
    std::fs::read_link("/proc/self/exe").ok()
}

/// The holders of `inodes`, and the process table around them.
pub fn holders(inodes: &BTreeSet<u64>) -> Holders {
    holders_in(inodes, None)
}

/// [`holders`], looking for holders only among `root` and its descendants (`None`: among all
/// processes). Reading a process's fds (a readlink per fd) is most of a scan's cost, and most
/// questions are about one process's tree: whether a child it started serves its socket.
pub fn holders_in(inodes: &BTreeSet<u64>, root: Option<i32>) -> Holders {
    let mut out = Holders::default();
    let Ok(all) = procfs::process::all_processes() else {
        return out;
    };
    let ours = own_exe();
    // First the parent of every process (one small read each), then the fds of those in scope.
    let mut table: Vec<(Process, procfs::process::Stat)> = all
        .flatten()
        // Processes may exit while we look: skip what vanished.
        .filter_map(|p| p.stat().ok().map(|st| (p, st)))
        .filter(|(_, st)| st.flags & PF_KTHREAD == 0)
        .collect();
    table.sort_unstable_by_key(|(p, _)| p.pid);
    for (p, stat) in &table {
        out.procs.insert(
            p.pid,
            plan::ProcInfo {
                ppid: stat.ppid,
                ..Default::default()
            },
        );
    }
    for (p, stat) in &table {
        if root.is_some_and(|r| p.pid != r && !plan::descends(p.pid, r, &out.procs)) {
            continue;
        }
        let Ok(fds) = socket_fds(p.pid) else { continue };
        let mut holds = false;
        for (inode, fd) in fds.iter().filter(|(i, _)| inodes.contains(i)) {
            out.by_inode.entry(*inode).or_default().push((p.pid, *fd));
            holds = true;
        }
        if holds {
            let exe = p.exe().ok();
            let info = out.procs.entry(p.pid).or_default();
            info.zdt = stat.comm == "zdt-ctl" || (exe.is_some() && exe == ours);
            info.exe = exe.map(|e| e.to_string_lossy().into_owned());
            info.execed = stat.flags & PF_FORKNOEXEC == 0;
            info.listen_fds = p
                .environ()
                .is_ok_and(|env| env.contains_key(std::ffi::OsStr::new("LISTEN_FDS")));
        }
    }
    out
}

/// A listening socket of another process, duplicated into zdt-ctl. Dropping it closes the
/// duplicate. Kernel contract: a duplicate keeps the listener alive (close() stops listening only
/// on the last reference), so these must never outlive the command.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub inode: u64,
    pub local: SocketAddr,
    pub cookie: u64,
    /// Owner uid of the socket (the kernel groups only sockets of one uid).
    pub uid: u32,
    /// IPV6_V6ONLY (false for IPv4 sockets).
    pub v6only: bool,
    /// The interface index it is bound to, 0 for none.
    pub device: u32,
}

impl Listener {
    pub fn family(&self) -> u32 {
        family_of(&self.local)
    }

    /// The listener as a plan sees it, served by `member`.
    pub fn listen(&self, member: Option<plan::sets::Process>) -> plan::snapshot::Listen {
        plan::snapshot::Listen {
            cookie: self.cookie,
            local: self.local,
            v6only: self.v6only,
            uid: self.uid,
            device: self.device,
            member,
        }
    }
}

/// The effective gid of `pid`, None once it has exited.
pub fn egid(pid: i32) -> Option<u32> {
    Some(Process::new(pid).ok()?.status().ok()?.egid)
}

/// The name of interface `index` (as `ip link` shows it), or its number if it has none now.
pub fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return index.to_string();
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The address family of a socket address, as the kernel and [`zdt_common::SlotMeta`] name it.
pub fn family_of(addr: &SocketAddr) -> u32 {
    if addr.is_ipv4() {
        zdt_common::AF_INET
    } else {
        zdt_common::AF_INET6
    }
}

/// An open pidfd: refers to one process for its whole life, whatever happens to its pid number.
pub struct PidFd {
    pub pid: i32,
    pub fd: OwnedFd,
    /// Process start time (clock ticks since boot), to tell this process from a later one that
    /// reuses the pid.
    pub start: u64,
}

impl PidFd {
    pub fn open(pid: i32) -> anyhow::Result<Self> {
        let p = Pid::from_raw(pid).ok_or_else(|| no_such_pid(pid))?;
        let fd = pidfd_open(p, PidfdFlags::empty()).map_err(|e| match e {
            rustix::io::Errno::SRCH => no_such_pid(pid),
            e => anyhow::Error::new(e).context(format!("pidfd_open({pid})")),
        })?;
        let stat = Process::new(pid)
            .and_then(|p| p.stat())
            .map_err(|_| no_such_pid(pid))?;
        if stat.state == 'Z' {
            return Err(bad_input(format!(
                "pid {pid} is a zombie (it has exited); pass the pid of a running service process"
            )));
        }
        if stat.flags & 0x0020_0000 != 0 {
            // PF_KTHREAD
            return Err(bad_input(format!(
                "pid {pid} ({}) is a kernel thread, not a service process",
                stat.comm
            )));
        }
        Ok(PidFd {
            pid,
            fd,
            start: stat.starttime,
        })
    }

    /// Whether the process is still running. Kernel contract: a pidfd becomes readable when its
    /// process exits (pidfd_open(2)), so a zero-timeout poll tells without any race on the pid.
    pub fn alive(&self) -> bool {
        !wait_readable(self.fd.as_fd(), 0)
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub fn wait_exit(&self, timeout: std::time::Duration) -> bool {
        wait_readable(
            self.fd.as_fd(),
            i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX),
        )
    }

    /// Sends `sig` through the pidfd, so it can only reach this very process.
    pub fn signal(&self, sig: rustix::process::Signal) -> anyhow::Result<()> {
        rustix::process::pidfd_send_signal(self.fd.as_fd(), sig)
            .with_context(|| format!("sending {sig:?} to pid {}", self.pid))
    }
}

fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
}

/// Start time of `pid`, or None if it has exited. A zombie has exited: the kernel closed its
/// fds, sockets included, in do_exit before it became one; only its parent's wait is missing,
/// and a parent that never waits (a container's pid 1 that is the app, an init that does not
/// reap) keeps it a zombie for good. Counted as running, it kept its slots' role from the
/// process that inherited its sockets (nginx's binary upgrade under such a parent).
pub fn start_time(pid: i32) -> Option<u64> {
    Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .filter(|s| !matches!(s.state, 'Z' | 'X'))
        .map(|s| s.starttime)
}

/// Command name of `pid` (`/proc/PID/comm`).
pub fn comm(pid: i32) -> Option<String> {
    Process::new(pid)
        .and_then(|p| p.stat())
        .ok()
        .map(|s| s.comm)
}

/// Duplicates fd `target_fd` of the process behind `pidfd` into zdt-ctl (pidfd_getfd(2),
/// kernel >= 5.6; needs ptrace access to the process, which root has).
fn dup_from(pidfd: &PidFd, target_fd: i32) -> anyhow::Result<OwnedFd> {
    pidfd_getfd(pidfd.fd.as_fd(), target_fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        rustix::io::Errno::SRCH | rustix::io::Errno::BADF => err(
            Kind::ProcessDied,
            format!(
                "pid {} exited (or closed its socket) while zdt was reading it",
                pidfd.pid
            ),
        ),
        // Kernel contract: pidfd_getfd needs PTRACE_MODE_ATTACH_REALCREDS; with Yama's
        // ptrace_scope at 3 that is denied to every process, root included, until reboot.
        rustix::io::Errno::PERM
            if std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .is_ok_and(|v| v.trim() == "3") =>
        {
            err(
                Kind::Refused,
                format!(
                    "cannot take the socket of pid {}: kernel.yama.ptrace_scope is 3, which denies \
                     pidfd_getfd to every process, root included, and cannot be lowered until \
                     reboot. zdt needs it at 2 or less (set it at boot, e.g. in \
                     /etc/sysctl.d/); nothing was changed",
                    pidfd.pid
                ),
            )
        }
        e => anyhow::Error::new(e).context(format!(
            "pidfd_getfd(pid {}, fd {target_fd}): cannot take the socket",
            pidfd.pid
        )),
    })
}

/// A u64 socket option of SOL_SOCKET (SO_COOKIE, SO_NETNS_COOKIE).
fn getsockopt_u64(fd: BorrowedFd<'_>, opt: libc::c_int, what: &str) -> anyhow::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(value)
}

pub fn socket_cookie(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    getsockopt_u64(fd, libc::SO_COOKIE, "getsockopt(SO_COOKIE)")
}

/// Whether a socket has SO_REUSEPORT (so it is in a reuseport group, if it listens).
pub fn reuseport(fd: &OwnedFd) -> anyhow::Result<bool> {
    SockRef::from(fd)
        .reuse_port()
        .context("getsockopt(SO_REUSEPORT)")
}

/// Checks that a duplicated socket can join zdt's group: a TCP listener (or a UDP socket, for
/// `proto`) with SO_REUSEPORT. The kernel only puts a socket into a reuseport group if
/// SO_REUSEPORT was set before bind(), and the socket array accepts only sockets that are in a
/// group (reuseport_array.c).
fn validate(pid: i32, fd: &OwnedFd, local: SocketAddr, proto: Proto) -> anyhow::Result<()> {
    let sock = SockRef::from(fd);
    let what = match proto {
        Proto::Tcp => format!("the socket of pid {pid} listening on {local}"),
        Proto::Udp => format!("the socket of pid {pid} bound to {local}/udp"),
    };
    let kind = sock.r#type().context("getsockopt(SO_TYPE)")?;
    match proto {
        Proto::Tcp if kind != socket2::Type::STREAM => {
            return Err(bad_input(format!("{what} is not a TCP socket")));
        }
        Proto::Udp if kind != socket2::Type::DGRAM => {
            return Err(bad_input(format!("{what} is not a UDP socket")));
        }
        Proto::Tcp if !sock.is_listener().context("getsockopt(SO_ACCEPTCONN)")? => {
            return Err(bad_input(format!("{what} is not listening")));
        }
        _ => {}
    }
    if !reuseport(fd)? {
        return Err(bad_input(format!(
            "{what} has no SO_REUSEPORT: the service must set SO_REUSEPORT before bind() \
             (nginx: `listen {}{} reuseport;`) so that old and new processes can share the port",
            local.port(),
            if proto == Proto::Udp { " quic" } else { "" }
        )));
    }
    Ok(())
}

/// The listening sockets of `pid` that `spec` names, duplicated and validated; `Ok(None)` while
/// it has none yet (it may still be starting up: loading its configuration, binding its admin
/// port first).
///
/// Errors are for what waiting cannot fix, each naming the pid and what is wrong: a listener
/// on the port bound to another address than `spec`'s, a listener without SO_REUSEPORT.
pub fn find_listeners(pidfd: &PidFd, spec: &PortSpec) -> anyhow::Result<Option<Vec<Listener>>> {
    let pid = pidfd.pid;
    let fds = socket_fds(pid)?;
    let table = listen_entries(spec.proto)?;
    let on_port: Vec<(&ListenEntry, i32)> = fds
        .iter()
        .filter_map(|(inode, fd)| table.get(inode).map(|e| (e, *fd)))
        .filter(|(e, _)| e.local.port() == spec.port)
        .collect();
    let (matching, other): (Vec<_>, Vec<_>) =
        on_port.iter().partition(|(e, _)| spec.matches(&e.local));
    if matching.is_empty() {
        if other.is_empty() {
            return Ok(None);
        }
        let addrs: Vec<String> = other.iter().map(|(e, _)| e.local.to_string()).collect();
        return Err(bad_input(format!(
            "pid {pid} listens on {}, not on {spec}: a listener bound to an address takes that \
             address's connections before the wildcard's, beside zdt's group. Make the service \
             listen on {spec}, or attach the address it uses (`zdt-ctl detach {spec}`, then \
             `zdt-ctl attach {}`)",
            addrs.join(", "),
            addrs[0]
        )));
    }
    // Between the read of /proc above and the duplication below, the process may close an fd
    // and reuse its number: the fault tests swap one here.
    crate::failpoint(crate::Step::FdsRead);
    let mut out = Vec::new();
    for (entry, fd) in matching {
        out.push(listener_from(
            pid,
            dup_checked(pidfd, fd, entry.inode)?,
            entry,
        )?);
    }
    Ok(Some(out))
}

/// [`find_listeners`], for a process that must listen already: no listener is an error that
/// says what PID does listen on.
pub fn fetch_listeners(pidfd: &PidFd, spec: &PortSpec) -> anyhow::Result<Vec<Listener>> {
    match find_listeners(pidfd, spec)? {
        Some(l) => Ok(l),
        None => Err(bad_input(not_listening(pidfd.pid, spec))),
    }
}

/// "pid N has no listening TCP socket on SPEC", and what it has instead.
pub fn not_listening(pid: i32, spec: &PortSpec) -> String {
    let mut why = format!("pid {pid} has no listening TCP socket on {spec}");
    let fds = socket_fds(pid).unwrap_or_default();
    let ports: BTreeSet<u16> = listen_entries(spec.proto)
        .unwrap_or_default()
        .values()
        .filter(|e| fds.contains_key(&e.inode))
        .map(|e| e.local.port())
        .collect();
    if let Some(udp) = udp_on_port(&fds, spec.port) {
        why += &format!(" (it has a UDP socket on {udp}; zdt steers TCP listeners)");
    } else if !ports.is_empty() {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        why += &format!(" (it listens on port {} only)", ports.join(", "));
    } else {
        why += "; is it the service process, and has it bound the port yet?";
    }
    why
}

/// How long a `zdt-ctl exec` given as PID may take to become its app.
const EXEC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses a pid that can never be a member, whatever it binds: init, zdt-ctl itself, a process
/// of another network namespace.
pub fn refuse_non_app(pidfd: &PidFd) -> anyhow::Result<()> {
    let pid = pidfd.pid;
    if pid == 1 {
        return Err(bad_input(
            "pid 1 is the init process (systemd holds the sockets of socket-activated services \
             but does not serve them): pass the service's own pid (`systemctl show -p MainPID \
             --value UNIT`)",
        ));
    }
    let is_zdt = || {
        let exe = Process::new(pid).and_then(|p| p.exe()).ok();
        comm(pid).unwrap_or_default() == "zdt-ctl" || (exe.is_some() && exe == own_exe())
    };
    // `zdt-ctl exec -- APP & zdt-ctl promote $!`: for a moment the pid is still zdt-ctl, making
    // the app's sockets; it becomes APP under the same pid (execve keeps it). Wait for that.
    let execing = || {
        Process::new(pid)
            .and_then(|p| p.cmdline())
            .is_ok_and(|c| c.get(1).is_some_and(|a| a == "exec"))
    };
    let deadline = std::time::Instant::now() + EXEC_WAIT;
    while is_zdt() && execing() && pidfd.alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if is_zdt() {
        return Err(bad_input(format!(
            "pid {pid} is zdt-ctl itself (a `zdt-ctl hold` placeholder, say), not a service \
             process: pass the pid of the service"
        )));
    }
    if other_netns(pid) {
        return Err(bad_input(format!(
            "pid {pid} is in another network namespace: its sockets are not this namespace's \
             port; run zdt-ctl inside that namespace (nsenter --net=/proc/{pid}/ns/net)"
        )));
    }
    Ok(())
}

/// Refuses `pid` as the member for `listeners` if it only keeps a copy of a socket that a
/// program it started serves (a supervisor handing sockets over the systemd way).
pub fn check_serves(pid: i32, listeners: &[Listener]) -> anyhow::Result<()> {
    let inodes: BTreeSet<u64> = listeners.iter().map(|l| l.inode).collect();
    // A supervisor is told by a descendant that holds the socket too: PID's tree is enough.
    let h = holders_in(&inodes, Some(pid));
    for l in listeners {
        if let Some(plan::NotServing::Supervisor { child }) =
            plan::not_serving(pid, &h.pids(l.inode), &h.procs)
        {
            return Err(bad_input(format!(
                "pid {pid} ({}) keeps a copy of the socket on {} that it handed to pid {child} \
                 ({}), which serves it: pass pid {child}. (Signalling pid {pid} would stop the \
                 supervisor, not the service.)",
                comm(pid).unwrap_or_default(),
                l.local,
                comm(child).unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// A descendant of `pid` that listens on `spec` while `pid` itself does not (a start script
/// that runs the service as its child instead of exec'ing it): (its pid, its command name).
pub fn listening_descendant(pid: i32, spec: &PortSpec) -> Option<(i32, String)> {
    let inodes: BTreeSet<u64> = listen_entries(spec.proto)
        .ok()?
        .values()
        .filter(|e| spec.matches(&e.local))
        .map(|e| e.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let h = holders_in(&inodes, Some(pid));
    let pids: Vec<i32> = h.by_inode.values().flatten().map(|(p, _)| *p).collect();
    let child = plan::listening_child(pid, &pids, &h.procs)?;
    Some((child, comm(child).unwrap_or_default()))
}

/// A process closed an fd and reused its number between zdt's read of /proc/PID/fd and the
/// duplication of that fd (exit code 1, internal). A process that is still setting up does this
/// (Go's `net.FileListener` duplicates a passed socket, then the app closes the passed fd and
/// the next socket takes its number): the wait for a process to listen reads it again.
#[derive(Debug)]
pub struct FdChanged {
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub found: u64,
}

impl std::fmt::Display for FdChanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fd {} of pid {} changed while zdt read it (socket {} became {}); run the command \
             again",
            self.fd, self.pid, self.inode, self.found
        )
    }
}

impl std::error::Error for FdChanged {}

/// Duplicates fd `fd` of a process and checks that it still is socket `inode`: between reading
/// /proc/PID/fd and the duplication, the process may have closed that fd and reused its number
/// ([`FdChanged`]).
fn dup_checked(pidfd: &PidFd, fd: i32, inode: u64) -> anyhow::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt as _;
    let dup = dup_from(pidfd, fd)?;
    let found = std::fs::File::from(dup.try_clone()?).metadata()?.ino();
    if found != inode {
        return Err(FdChanged {
            pid: pidfd.pid,
            fd,
            inode,
            found,
        }
        .into());
    }
    Ok(dup)
}

/// A listener of a spec's port, duplicated.
pub struct Found {
    pub entry: ListenEntry,
    pub fd: OwnedFd,
}

/// Listeners of a spec's port, from one read: one sock_diag dump per family, then one scan of
/// /proc for the holders of those that need them.
pub struct PortRead {
    /// What a plan decides from ([`plan::port`], [`plan::snapshot`]).
    pub seen: Vec<plan::port::OnPort>,
    /// The kernel's entry of each listener in `seen`, by cookie.
    entries: BTreeMap<u64, ListenEntry>,
    holders: Holders,
}

impl PortRead {
    /// Every listener on the spec's port, each with its holders.
    pub fn read(spec: &PortSpec) -> anyhow::Result<Self> {
        Self::read_where(spec, |_| true, |_| true)
    }

    /// The listeners on the spec's port that `keep` keeps; their holders are looked for only
    /// where `look` says (reading every process's fds is most of a read's cost): the member,
    /// the pid to name and the duplicates of the others are None.
    pub fn read_where(
        spec: &PortSpec,
        keep: impl Fn(&ListenEntry) -> bool,
        look: impl Fn(&ListenEntry) -> bool,
    ) -> anyhow::Result<Self> {
        let entries: BTreeMap<u64, ListenEntry> = (listen_entries(spec.proto)?.into_values())
            .filter(|e| e.local.port() == spec.port && keep(e))
            .map(|e| (e.cookie, e))
            .collect();
        let inodes: BTreeSet<u64> = (entries.values().filter(|e| look(e)))
            .map(|e| e.inode)
            .collect();
        let holders = if inodes.is_empty() {
            Holders::default()
        } else {
            holders(&inodes)
        };
        let seen = (entries.values())
            .map(|e| {
                let pids = holders.pids(e.inode);
                let member = plan::member(&pids, &holders.procs);
                let listen = plan::snapshot::Listen {
                    cookie: e.cookie,
                    local: e.local,
                    v6only: e.v6only,
                    uid: e.uid,
                    device: e.device,
                    member: member.and_then(|pid| {
                        Some(plan::sets::Process {
                            pid,
                            start: start_time(pid)?,
                        })
                    }),
                };
                plan::port::OnPort {
                    listen,
                    named: spec.matches(&e.local),
                    pid: member.or(pids.first().copied()),
                }
            })
            .collect();
        Ok(PortRead {
            seen,
            entries,
            holders,
        })
    }

    /// Duplicates the listener `cookie` from one of its holders (the member's own copy first),
    /// with its entry; None when every holder closed it meanwhile.
    pub fn dup(&self, cookie: u64) -> Option<Found> {
        let entry = *self.entries.get(&cookie)?;
        let held = self.holders.by_inode.get(&entry.inode)?;
        let member = (self.seen.iter().find(|o| o.listen.cookie == cookie))
            .and_then(|o| o.listen.member)
            .map(|p| p.pid);
        let mut order = held.clone();
        order.sort_by_key(|(p, _)| Some(*p) != member);
        let fd = order.iter().find_map(|(pid, fd)| {
            PidFd::open(*pid)
                .ok()
                .and_then(|p| dup_checked(&p, *fd, entry.inode).ok())
        })?;
        Some(Found { entry, fd })
    }

    /// Every listener the spec names, duplicated.
    pub fn named(&self) -> Vec<Found> {
        (self.seen.iter().filter(|o| o.named))
            .filter_map(|o| self.dup(o.listen.cookie))
            .collect()
    }
}

/// Every listener that `spec` names, whoever holds it, duplicated: [`PortRead::named`]. A
/// listener whose holders vanished while we looked is left out: it is gone.
pub fn matching_listeners(spec: &PortSpec) -> anyhow::Result<Vec<Found>> {
    let named = |e: &ListenEntry| spec.matches(&e.local);
    Ok(PortRead::read_where(spec, named, named)?.named())
}

/// Validates a socket found by inode (attach takes over existing listeners).
pub fn listener_from(pid: i32, fd: OwnedFd, entry: &ListenEntry) -> anyhow::Result<Listener> {
    validate(pid, &fd, entry.local, entry.proto)?;
    let cookie = socket_cookie(fd.as_fd())?;
    Ok(Listener {
        fd,
        inode: entry.inode,
        local: entry.local,
        cookie,
        uid: entry.uid,
        v6only: entry.v6only,
        device: entry.device,
    })
}

/// The local address of a UDP socket among `fds` bound to `port`, if any.
fn udp_on_port(fds: &BTreeMap<u64, i32>, port: u16) -> Option<SocketAddr> {
    use procfs::FromReadSI as _;
    ["udp", "udp6"].iter().find_map(|name| {
        procfs::net::UdpNetEntries::from_file(
            format!("/proc/thread-self/net/{name}"),
            procfs::current_system_info(),
        )
        .ok()?
        .0
        .into_iter()
        .find(|e| e.local_address.port() == port && fds.contains_key(&e.inode))
        .map(|e| e.local_address)
    })
}

/// Checks that every listener of this network namespace that a readiness probe can reach (one
/// that can take a connection to one of `addrs`, the addresses the probes of `url` connect to)
/// is served by `pidfd`'s process, or by a process it started (nginx's workers): a switch must
/// follow the readiness of the process it switches to, not of whichever process answers on that
/// port. Refused: an address served by another process (another instance, or a process that
/// took over a reused pid number), alone or beside PID's own socket (an admin port shared with
/// SO_REUSEPORT, where the kernel picks the instance that answers). Addresses that nothing
/// listens on are fine: the wait reports them. Run before the wait, at every probe and again
/// at the switch, since another process can start listening at any time.
/// The listeners a readiness URL's owner check last passed with (their inodes): a poll that
/// finds the same listeners skips the scan. A socket that changes hands between processes keeps
/// its inode, so the check at the switch, under the lock, is always made in full.
#[derive(Debug, Default)]
pub struct OwnerCache(std::cell::RefCell<Option<BTreeSet<u64>>>);

pub fn check_url_owner(
    pidfd: &PidFd,
    url: &reqwest::Url,
    addrs: &[SocketAddr],
    cache: Option<&OwnerCache>,
) -> anyhow::Result<()> {
    let pid = pidfd.pid;
    // A readiness URL is HTTP: TCP, whatever the port's protocol.
    let table = listen_entries(Proto::Tcp)?;
    let serving: BTreeSet<u64> = table
        .values()
        .filter(|e| addrs.iter().any(|a| plan::serves(&e.local, e.v6only, a)))
        .map(|e| e.inode)
        .collect();
    // The same listeners as at the last check that passed: the same verdict, without reading
    // PID's fd table (a process with 19,000 fds made every 50 ms poll cost a third of a core).
    if cache.is_some_and(|c| c.0.borrow().as_ref() == Some(&serving)) {
        return Ok(());
    }
    let passed = |serving: BTreeSet<u64>| {
        if let Some(c) = cache {
            *c.0.borrow_mut() = Some(serving);
        }
        Ok(())
    };
    let mine = socket_fds(pid)?;
    // The common case, without a scan of every process: PID holds every socket there.
    if serving.iter().all(|i| mine.contains_key(i)) {
        return passed(serving);
    }
    let h = holders(&serving);
    let mut ours = false;
    let mut others: BTreeMap<i32, BTreeSet<SocketAddr>> = BTreeMap::new();
    for inode in &serving {
        let pids = h.pids(*inode);
        if mine.contains_key(inode) {
            ours = true;
            continue;
        }
        // The process that serves the socket (plan::member): a master before the workers it
        // forked, never systemd or zdt-ctl while another holder serves it.
        let member = plan::member(&pids, &h.procs);
        if member.is_some_and(|m| m == pid || plan::descends(m, pid, &h.procs)) {
            ours = true;
            continue;
        }
        let local = table.get(inode).map(|e| e.local);
        for p in member.map_or(pids, |m| vec![m]) {
            others.entry(p).or_default().extend(local);
        }
    }
    if others.is_empty() {
        return passed(serving);
    }
    let pids: Vec<String> = others.keys().map(i32::to_string).collect();
    let pids = pids.join(", pid ");
    let named: Vec<String> = others
        .iter()
        .map(|(p, at)| {
            let at: Vec<String> = at.iter().map(SocketAddr::to_string).collect();
            format!(
                "pid {p} ({}) listens on {}",
                comm(*p).unwrap_or_default(),
                at.join(", ")
            )
        })
        .collect();
    let named = named.join("; ");
    if ours {
        return Err(bad_input(format!(
            "readiness URL {url} is served by more than one process: by pid {pid} and by pid \
             {pids} ({named}). A probe may reach any of them, so a 200 would not say that pid \
             {pid} is ready. Give each instance an admin port of its own (without SO_REUSEPORT), \
             or check readiness through the public port with --probe PATH; nothing was changed"
        )));
    }
    Err(bad_input(format!(
        "readiness URL {url} is served by pid {pids}, not by pid {pid} ({named}): pass the \
         readiness URL of the process being promoted; nothing was changed"
    )))
}

/// Kernel contract: /proc/thread-self/ns/net is the calling thread's namespace, which a thread
/// may have entered with setns() (/proc/self is the thread-group leader's).
fn other_netns(pid: i32) -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    match (
        ino(&format!("/proc/{pid}/ns/net")),
        ino("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// The counters in the text of /proc/net/netstat or /proc/net/snmp (or both, one after the
/// other), as (group, name, value): each group is a line of names, then a line of values, both
/// prefixed with `GROUP:`. A value stays text: a few are negative (Tcp MaxConn is -1).
pub fn netstat_entries(text: &str) -> Vec<(&str, &str, &str)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        let [head, vals] = pair else { continue };
        let (Some((group, names)), Some((again, values))) =
            (head.split_once(':'), vals.split_once(':'))
        else {
            continue;
        };
        if group != again {
            continue;
        }
        let entries = names.split_whitespace().zip(values.split_whitespace());
        out.extend(entries.map(|(n, v)| (group, n, v)));
    }
    out
}

/// Cookie of the caller's network namespace (SO_NETNS_COOKIE, kernel >= 5.14). Unlike the
/// namespace's inode number, a cookie is never reused during a boot, so state pinned for a
/// namespace that is gone can never be mistaken for the state of a new one.
pub fn netns_cookie() -> anyhow::Result<u64> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)
        .context("creating a socket to read the network namespace cookie")?;
    getsockopt_u64(
        s.as_fd(),
        libc::SO_NETNS_COOKIE,
        "getsockopt(SO_NETNS_COOKIE): zdt needs kernel >= 5.14",
    )
}

/// The cookies of every network namespace this host can see alive: those of every thread of
/// every process (`/proc/PID/task/TID/ns/net`: setns is per thread), of every namespace file a
/// process holds open (`/proc/PID/fd/N` -> `net:[...]`), and of every namespace file mounted
/// in zdt-ctl's and init's mount namespaces (`ip netns add` bind-mounts one under /run/netns).
/// Each distinct namespace is entered on a thread of its own, which reads its cookie
/// (SO_NETNS_COOKIE on a socket made there) and exits. A namespace held only by a socket
/// passed out of it is not seen: callers must not take a namespace missing here for dead on
/// this alone.
pub fn live_netns_cookies() -> anyhow::Result<BTreeSet<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let proc_dirs = |dir: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for proc_dir in proc_dirs("/proc") {
        for task in proc_dirs(&proc_dir.join("task").to_string_lossy()) {
            files.push(task.join("ns/net"));
        }
        if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
            for fd in fds.flatten() {
                if std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with("net:["))
                {
                    files.push(fd.path());
                }
            }
        }
    }
    for mountinfo in ["/proc/self/mountinfo", "/proc/1/mountinfo"] {
        let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
        for line in text.lines() {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ..."
            let fields: Vec<&str> = line.split(' ').collect();
            let fstype = fields
                .iter()
                .position(|f| *f == "-")
                .and_then(|i| fields.get(i + 1));
            if fstype == Some(&"nsfs") {
                if let Some(mp) = fields.get(4) {
                    files.push(unescape_mountinfo(mp).into());
                }
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut cookies = BTreeSet::new();
    for f in files {
        // A process or fd may be gone by now: skip what cannot be opened.
        let Ok(file) = std::fs::File::open(&f) else {
            continue;
        };
        let Ok(m) = file.metadata() else { continue };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        let cookie = std::thread::spawn(move || -> anyhow::Result<u64> {
            // Fails with EINVAL for a namespace file of another type (a mounted mount or uts
            // namespace): not a network namespace, skipped.
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            netns_cookie()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?;
        if let Ok(c) = cookie {
            cookies.insert(c);
        }
    }
    Ok(cookies)
}

/// A mount point as /proc/PID/mountinfo writes it: space, tab, newline and backslash as octal
/// escapes.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A named counter from /proc/net/netstat or /proc/net/snmp (pairs of header/value lines) of the
/// calling thread's namespace (thread-self: /proc/net is the thread-group leader's view).
pub fn netstat_counter(group: &str, name: &str) -> anyhow::Result<u64> {
    for file in [
        "/proc/thread-self/net/netstat",
        "/proc/thread-self/net/snmp",
    ] {
        let text = std::fs::read_to_string(file)?;
        if let Some((_, _, v)) = netstat_entries(&text)
            .into_iter()
            .find(|(g, n, _)| *g == group && *n == name)
        {
            return Ok(v.parse()?);
        }
    }
    anyhow::bail!("counter {group}:{name} not found")
}

#[cfg(test)]
mod tests {
    use super::netstat_entries;

    #[test]
    fn netstat_entries_pair_each_group_names_with_its_values() {
        let text = "Tcp: RtoAlgorithm MaxConn OutRsts\nTcp: 1 -1 7\n\
                    TcpExt: SyncookiesSent PAWSEstab\nTcpExt: 0 3\n";
        assert_eq!(
            netstat_entries(text),
            [
                ("Tcp", "RtoAlgorithm", "1"),
                ("Tcp", "MaxConn", "-1"),
                ("Tcp", "OutRsts", "7"),
                ("TcpExt", "SyncookiesSent", "0"),
                ("TcpExt", "PAWSEstab", "3"),
            ]
        );
        // Lines out of pairs (a values line of another group) give nothing.
        assert!(netstat_entries("Tcp: OutRsts\nUdp: 1\n").is_empty());
    }
}
