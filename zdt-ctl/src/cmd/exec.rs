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

use crate::{addr::PortSpec, error::bad_input};

/// How to make listeners: split (an IPv4 and an IPv6-only socket for `:PORT`) or one dual-stack
/// socket, and whose they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketPlan {
    /// One `[::]` socket with IPV6_V6ONLY=0 for `:PORT` (and for `[::]:PORT`).
    pub dual_stack: bool,
    /// The owner uid of the sockets; None: zdt-ctl's own.
    pub uid: Option<u32>,
    /// Families (IPv4, IPv6) to make no socket for: another user's listener has the address.
    pub foreign: [bool; 2],
}

/// The addresses `spec` names: its address, or both wildcards for `:PORT` (only `[::]` for a
/// dual-stack plan).
fn addresses(spec: &PortSpec, plan: SocketPlan) -> Vec<SocketAddr> {
    match spec.addr {
        Some(a) => vec![SocketAddr::new(a, spec.port)],
        None if plan.dual_stack => vec![SocketAddr::new(
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
fn socket_as(domain: socket2::Domain, uid: Option<u32>) -> std::io::Result<socket2::Socket> {
    use socket2::{Socket, Type};
    use std::os::unix::fs::MetadataExt as _;
    let Some(uid) = uid else {
        return Socket::new(domain, Type::STREAM, None);
    };
    // SAFETY: setfsuid takes no pointers; it returns the previous fsuid.
    let before = unsafe { libc::setfsuid(uid) };
    let s = Socket::new(domain, Type::STREAM, None);
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

fn bind(addr: SocketAddr, plan: SocketPlan) -> anyhow::Result<Option<socket2::Socket>> {
    use socket2::Domain;
    let s = match socket_as(Domain::for_address(addr), plan.uid) {
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
        s.set_only_v6(!plan.dual_stack)?;
    }
    s.bind(&addr.into())
        .map_err(|e| bad_input(format!("cannot listen on {addr}: {e}")))?;
    Ok(Some(s))
}

/// SO_REUSEPORT sockets bound to every address of `specs`, not listening yet: a bound socket is
/// in no reuseport group and in no listener table until listen() (the group forms in
/// inet_csk_listen_start), so binding checks the addresses and changes nothing else.
pub fn bound(specs: &[PortSpec], plan: SocketPlan) -> anyhow::Result<Vec<socket2::Socket>> {
    let mut sockets = Vec::new();
    for spec in specs {
        for addr in addresses(spec, plan) {
            if plan.foreign[usize::from(addr.is_ipv6())] {
                continue;
            }
            sockets.extend(bind(addr, plan)?);
        }
    }
    Ok(sockets)
}

/// SO_REUSEPORT listeners for every address of `specs`.
pub fn listeners(specs: &[PortSpec], backlog: i32) -> anyhow::Result<Vec<socket2::Socket>> {
    let sockets = bound(specs, SocketPlan::default())?;
    for s in &sockets {
        s.listen(backlog).context("listen()")?;
    }
    Ok(sockets)
}

/// Run CMD with SO_REUSEPORT listeners handed over the systemd way (LISTEN_FDS).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  zdt-ctl exec --listen :80 -- /usr/bin/myapp --socket-activation"
)]
pub struct Args {
    /// [ADDR]:PORT to listen on (`:80` = 0.0.0.0:80 and [::]:80); may repeat.
    #[arg(long = "listen", required = true, value_parser = super::parse_spec)]
    pub listen: Vec<PortSpec>,
    #[arg(long, default_value_t = 4096)]
    pub backlog: i32,
    /// The name passed in LISTEN_FDNAMES.
    #[arg(long, default_value = "zdt")]
    pub name: String,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Returns only on an error: otherwise the process becomes CMD.
pub fn execute(args: Args) -> anyhow::Result<()> {
    match exec(&args.listen, args.backlog, &args.name, &args.command)? {}
}

pub fn exec(
    specs: &[PortSpec],
    backlog: i32,
    name: &str,
    command: &[String],
) -> anyhow::Result<Infallible> {
    let Some((program, args)) = command.split_first() else {
        return Err(bad_input(
            "no command given: zdt-ctl exec --listen :80 -- CMD ARGS...",
        ));
    };
    let sockets = listeners(specs, backlog)?;
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
    let err = std::process::Command::new(program)
        .args(args)
        .env("LISTEN_FDS", n.to_string())
        // exec keeps our pid: the program is the process LISTEN_PID names.
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDNAMES", names)
        .exec();
    Err(bad_input(format!("cannot run {program:?}: {err}")))
}
