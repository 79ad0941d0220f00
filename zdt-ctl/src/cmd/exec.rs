//! `zdt-ctl exec --listen [ADDR]:PORT -- CMD ARGS...`: create SO_REUSEPORT listeners and run CMD
//! with them, handed over the systemd way (sd_listen_fds(3): fds from 3 on, LISTEN_FDS,
//! LISTEN_PID, LISTEN_FDNAMES). An app that supports socket activation then joins the port's
//! reuseport group without a line of code changed.
use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
};

use anyhow::Context as _;

use crate::{
    addr::{PortSpec, Proto},
    error::bad_input,
    plan::{GroupKind, Layout},
    sockets,
    state::State,
};

/// The layout chosen for new sockets of a port, and what it was chosen from.
pub struct Chosen {
    pub layout: Layout,
    /// The port's listeners of that layout on the spec's addresses (the active members' when
    /// the port has some): the sockets new ones must join.
    pub listeners: Vec<sockets::ListenEntry>,
    /// Every listener on the port.
    pub all: Vec<sockets::ListenEntry>,
}

/// The layout in which new sockets for `spec` join the port's groups: `requested`, which must
/// match the layout of the listeners the port serves with (a socket of another layout forms a
/// group of its own, which the kernel prefers for its addresses); without a request that
/// layout, or `nothing` when the port has no listener.
pub fn layout(
    spec: PortSpec,
    requested: Option<Layout>,
    nothing: Layout,
) -> anyhow::Result<Chosen> {
    let all: Vec<sockets::ListenEntry> = sockets::listen_entries(spec.proto)?
        .into_values()
        .filter(|e| e.local.port() == spec.port)
        .collect();
    let mut on_port = all.clone();
    // The app's sockets are the active members' when the port has some: a new version still
    // warming up beside them (perhaps laid out otherwise) is not what the port serves with.
    let members = State::open_read(spec.key())?
        .map(|s| s.serving_cookies())
        .transpose()?
        .unwrap_or_default();
    if on_port.iter().any(|e| members.contains(&e.cookie)) {
        on_port.retain(|e| members.contains(&e.cookie));
    }
    let (dual, split): (Vec<sockets::ListenEntry>, Vec<sockets::ListenEntry>) = on_port
        .into_iter()
        .filter(|e| e.group_kind() == GroupKind::DualStack || spec.matches(&e.local))
        .partition(|e| e.group_kind() == GroupKind::DualStack);
    // A one-socket layout: only `:PORT` and `[::]:PORT` can be dual-stack.
    let wildcard6 = spec.addr.is_none_or(|a| a.is_ipv6() && a.is_unspecified());
    let dual_stack = match requested {
        Some(Layout::DualStack) if !wildcard6 => {
            return Err(bad_input(format!(
                "--dual-stack makes one [::]:{port} socket for both families, which {spec} does \
                 not name: use :{port} or [::]:{port}, or leave --dual-stack out",
                port = spec.port
            )))
        }
        Some(Layout::DualStack) if !split.is_empty() => {
            return Err(bad_input(format!(
                "--dual-stack: the port's listeners are split ({}): a dual-stack socket would be in a group of its own; leave --dual-stack out",
                split.iter().map(|e| e.local.to_string()).collect::<Vec<_>>().join(", ")
            )))
        }
        Some(Layout::Split) if !dual.is_empty() => {
            return Err(bad_input(format!(
                "--split: the port's listener on {} is dual-stack (IPV6_V6ONLY=0): split sockets would be in groups of their own, and the IPv4 one would take every IPv4 client; leave --split out",
                dual[0].local
            )))
        }
        Some(l) => l == Layout::DualStack,
        None if !dual.is_empty() => true,
        None if !split.is_empty() => false,
        None => nothing == Layout::DualStack && wildcard6,
    };
    if dual_stack && !wildcard6 {
        return Err(bad_input(format!(
            "{spec}: the app listens dual-stack on [::]:{port}; a socket on {spec} would form a \
             group of its own and take its clients. Use :{port} instead",
            port = spec.port
        )));
    }
    Ok(Chosen {
        layout: if dual_stack {
            Layout::DualStack
        } else {
            Layout::Split
        },
        listeners: if dual_stack { dual } else { split },
        all,
    })
}

/// How to make listeners: split (an IPv4 and an IPv6-only socket for `:PORT`) or one dual-stack
/// socket, and whose they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewSockets {
    /// Dual-stack: one `[::]` socket with IPV6_V6ONLY=0 for `:PORT` (and for `[::]:PORT`).
    pub layout: Layout,
    /// The owner uid of the sockets; None: zdt-ctl's own.
    pub uid: Option<u32>,
    /// Families (IPv4, IPv6) to make no socket for: another user's listener has the address.
    pub foreign: [bool; 2],
}

/// The addresses `spec` names: its address, or both wildcards for `:PORT` (only `[::]` for a
/// dual-stack plan).
fn addresses(spec: &PortSpec, plan: NewSockets) -> Vec<SocketAddr> {
    match spec.addr {
        Some(a) => vec![SocketAddr::new(a, spec.port)],
        None if plan.layout == Layout::DualStack => vec![SocketAddr::new(
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            spec.port,
        )],
        None => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), spec.port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), spec.port),
        ],
    }
}

/// socket() owned by `uid`. Kernel contract: a socket's owner is the fsuid of the process that
/// created it (sock_alloc sets the inode's uid, sock_init_data copies it to sk_uid), and only
/// sockets of one owner share a SO_REUSEPORT port (inet_csk_bind_conflict, reuseport groups).
/// setfsuid changes only the calling thread's fsuid; it is put back at once.
fn socket_as(
    domain: socket2::Domain,
    uid: Option<u32>,
    proto: Proto,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Socket, Type};
    use std::os::unix::fs::MetadataExt as _;
    let kind = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let Some(uid) = uid else {
        return Socket::new(domain, kind, None);
    };
    // SAFETY: setfsuid takes no pointers; it returns the previous fsuid.
    let before = unsafe { libc::setfsuid(uid) };
    let s = Socket::new(domain, kind, None);
    // SAFETY: as above.
    unsafe { libc::setfsuid(before as libc::uid_t) };
    let s = s?;
    // setfsuid reports no error: read the owner back (fstat of a socket gives its inode's uid).
    let owner = std::fs::File::from(std::os::fd::OwnedFd::from(s.try_clone()?))
        .metadata()?
        .uid();
    if owner != uid {
        return Err(std::io::Error::other(format!(
            "the socket is owned by uid {owner}, not {uid}"
        )));
    }
    Ok(s)
}

/// A socket of `proto` bound to `addr`. Kernel contract: a UDP socket joins the port's
/// reuseport group at bind() (udp_lib_get_port), a TCP one only at listen().
fn bind(
    addr: SocketAddr,
    plan: NewSockets,
    proto: Proto,
) -> anyhow::Result<Option<socket2::Socket>> {
    use socket2::Domain;
    let s = match socket_as(Domain::for_address(addr), plan.uid, proto) {
        Ok(s) => s,
        // A wildcard spec on a host without IPv6: the IPv4 socket is enough.
        Err(e) if addr.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return Ok(None)
        }
        Err(e) => return Err(e).context("socket()"),
    };
    s.set_reuse_address(true)?;
    // Kernel contract: SO_REUSEPORT must be set before bind() for the socket to join the
    // port's reuseport group (and zdt's program).
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // Split: its own IPv6 group, IPv4 has its own socket. Dual-stack: one socket, one group
        // for both families (IPv4 clients arrive as ::ffff:a.b.c.d).
        s.set_only_v6(plan.layout != Layout::DualStack)?;
    }
    s.bind(&addr.into())
        .map_err(|e| bad_input(format!("cannot listen on {addr}: {e}")))?;
    Ok(Some(s))
}

/// SO_REUSEPORT sockets bound to every address of `specs`, not listening yet: a bound socket is
/// in no reuseport group and in no listener table until listen() (the group forms in
/// inet_csk_listen_start), so binding checks the addresses and changes nothing else.
pub fn bound(specs: &[PortSpec], plan: NewSockets) -> anyhow::Result<Vec<socket2::Socket>> {
    let mut sockets = Vec::new();
    for spec in specs {
        for addr in addresses(spec, plan) {
            if plan.foreign[usize::from(addr.is_ipv6())] {
                continue;
            }
            sockets.extend(bind(addr, plan, spec.proto)?);
        }
    }
    Ok(sockets)
}

/// Two specs that would make sockets on one address (`:80` twice, or `:80` and `0.0.0.0:80`):
/// the app would get each address's socket twice.
fn overlapping(specs: &[PortSpec]) -> Option<(PortSpec, PortSpec)> {
    let wide = |s: &PortSpec| s.addr.is_none_or(|a| a.is_unspecified());
    specs.iter().enumerate().find_map(|(i, a)| {
        specs[i + 1..]
            .iter()
            .find(|b| {
                a.port == b.port && a.proto == b.proto && (a.addr == b.addr || wide(a) || wide(b))
            })
            .map(|b| (*a, *b))
    })
}

/// A name LISTEN_FDNAMES can carry: sd_listen_fds_with_names(3) splits the list at ':', and
/// systemd takes at most 255 printable ASCII characters per name.
fn check_fd_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 255
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    {
        return Err(bad_input(format!(
            "--name {name:?}: a socket name is 1 to 255 printable ASCII characters without ':' \
             (LISTEN_FDNAMES separates names with ':'), e.g. --name http"
        )));
    }
    Ok(())
}

/// Run CMD with SO_REUSEPORT listeners handed over the systemd way (LISTEN_FDS).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Sockets, from fd 3 on, in the order of --listen: `:PORT` is one \
                        dual-stack [::]:PORT socket (IPV6_V6ONLY=0), as systemd's \
                        ListenStream=PORT, unless the port's listeners are split; --split \
                        makes an IPv4 socket and an IPv6-only one (two fds). An app that takes \
                        only the first fd (uvicorn --fd 3) must get one socket: with two, the \
                        second's clients wait in a queue nothing accepts from (status warns).\n\n\
                        Example:\n  zdt-ctl exec --listen :80 -- /usr/bin/myapp --socket-activation"
)]
pub struct Args {
    /// [ADDR]:PORT to listen on, [ADDR]:PORT/udp for a UDP socket (HTTP/3: hypercorn's
    /// --quic-bind fd://N, Caddy's fdgram/N); may repeat for other ports or addresses.
    #[arg(long = "listen", required = true, value_parser = super::parse_spec)]
    pub listen: Vec<PortSpec>,
    /// Accept-queue limit of each socket (also capped by net.core.somaxconn).
    #[arg(long, default_value_t = 4096, value_parser = super::parse_backlog, allow_hyphen_values = true)]
    pub backlog: i32,
    /// The name passed in LISTEN_FDNAMES for every socket.
    #[arg(long, default_value = "zdt")]
    pub name: String,
    /// One [::] socket with IPV6_V6ONLY=0 for `:PORT` (the default, unless the port's
    /// listeners are split).
    #[arg(long, conflicts_with = "split")]
    pub dual_stack: bool,
    /// An IPv4 socket and an IPv6-only one for `:PORT` (the default when the port's listeners
    /// are split).
    #[arg(long)]
    pub split: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Listening SO_REUSEPORT sockets for `specs`, in their order, laid out as `layout` (see
/// [`layout`]; without one, as the port serves, or dual-stack on a port with no listener).
pub fn listeners(
    specs: &[PortSpec],
    layout: Option<Layout>,
    backlog: i32,
) -> anyhow::Result<Vec<socket2::Socket>> {
    if let Some((a, b)) = overlapping(specs) {
        return Err(bad_input(format!(
            "--listen {a} and --listen {b} name the same address: give each address once"
        )));
    }
    let mut sockets = Vec::new();
    for spec in specs {
        let plan = NewSockets {
            layout: self::layout(*spec, layout, Layout::DualStack)?.layout,
            ..NewSockets::default()
        };
        sockets.extend(bound(&[*spec], plan)?);
    }
    for s in &sockets {
        if s.r#type().context("getsockopt(SO_TYPE)")? == socket2::Type::STREAM {
            s.listen(backlog).context("listen()")?;
        }
    }
    Ok(sockets)
}

/// Returns only on an error: otherwise the process becomes CMD.
pub fn execute(args: Args) -> anyhow::Result<()> {
    let layout = match (args.dual_stack, args.split) {
        (true, _) => Some(Layout::DualStack),
        (_, true) => Some(Layout::Split),
        _ => None,
    };
    match exec(
        &args.listen,
        layout,
        args.backlog,
        &args.name,
        &args.command,
    )? {}
}

pub fn exec(
    specs: &[PortSpec],
    layout: Option<Layout>,
    backlog: i32,
    name: &str,
    command: &[String],
) -> anyhow::Result<Infallible> {
    let Some((program, args)) = command.split_first() else {
        return Err(bad_input(
            "no command given: zdt-ctl exec --listen :80 -- CMD ARGS...",
        ));
    };
    check_fd_name(name)?;
    let sockets = listeners(specs, layout, backlog)?;
    // Move the sockets to fds 3, 4, ... without close-on-exec. First out of the way (above any
    // fd that the targets could collide with), then into place.
    let high: Vec<std::os::fd::OwnedFd> = sockets
        .iter()
        .map(|s| {
            let fd = nix::fcntl::fcntl(s, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                .context("moving a listener out of the way")?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
        })
        .collect::<anyhow::Result<_>>()?;
    drop(sockets);
    for (i, fd) in high.iter().enumerate() {
        // dup2 clears close-on-exec on the new descriptor.
        // SAFETY: plain syscall on fds we own; the target numbers are ours to take.
        if unsafe { libc::dup2(fd.as_raw_fd(), 3 + i as i32) } < 0 {
            return Err(std::io::Error::last_os_error()).context("dup2");
        }
    }
    let n = high.len();
    drop(high);
    let names = vec![name; n].join(":");
    crate::failpoint(crate::Step::ExecListening);
    let err = std::process::Command::new(program)
        .args(args)
        .env("LISTEN_FDS", n.to_string())
        // exec keeps our pid: the program is the process LISTEN_PID names.
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDNAMES", names)
        .exec();
    Err(bad_input(format!("cannot run {program:?}: {err}")))
}
