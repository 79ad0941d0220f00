//! A fresh network namespace per test: its own loopback, sockets, reuseport groups, kernel
//! counters and zdt state (zdt keys its pinned state by the namespace's cookie).
use std::{
    fs::File,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::Command,
};

use anyhow::Context as _;
use nix::sched::{setns, unshare, CloneFlags};

pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    /// Creates a namespace (unshare(CLONE_NEWNET) on a throwaway thread: a namespace belongs to
    /// the thread that made it, and lives on while we hold its fd) and brings its loopback up.
    pub fn new() -> anyhow::Result<Self> {
        let fd = std::thread::spawn(|| -> anyhow::Result<OwnedFd> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET): run as root")?;
            let f = File::open("/proc/thread-self/ns/net")?;
            Ok(f.into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        let ns = Netns { fd };
        ns.run(loopback_up)??;
        Ok(ns)
    }

    /// The network namespace of process `pid` (a container's, a pod's), its loopback brought
    /// up. zdt's pinned state of it is removed when this is dropped, as for a test's own.
    pub fn of_process(pid: i32) -> anyhow::Result<Self> {
        let f = File::open(format!("/proc/{pid}/ns/net"))
            .with_context(|| format!("the network namespace of pid {pid}"))?;
        let ns = Netns { fd: f.into() };
        ns.run(loopback_up)??;
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace: sockets it creates belong to the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        self.spawn_thread(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))
    }

    /// Like [`Netns::run`], without waiting.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let fd = self.fd.try_clone().expect("dup netns fd");
        std::thread::spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns into test netns");
            f()
        })
    }

    /// Makes `cmd` start inside the namespace.
    pub fn command(&self, cmd: &mut Command) {
        let raw = self.fd.as_raw_fd();
        // SAFETY: setns is a plain syscall, safe between fork and exec. The fd stays open in the
        // parent for as long as self lives, which outlives the spawn call.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
    }

    /// Reads a counter of /proc/net/netstat or /proc/net/snmp (e.g. "TcpExt", "TCPMigrateReqSuccess")
    /// as seen from inside the namespace.
    pub fn counter(&self, group: &str, name: &str) -> anyhow::Result<u64> {
        let (group, name) = (group.to_string(), name.to_string());
        self.run(move || zdt_ctl::sockets::netstat_counter(&group, &name))?
    }
}

impl Netns {
    /// Lets the namespace go without removing zdt's pinned state: once its last process has
    /// exited, nothing holds it, as when a container stops.
    pub fn abandon(self) {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped nor used again; the fd is read out of it once, and
        // closed here.
        drop(unsafe { std::ptr::read(&me.fd) });
    }

    /// The namespace's cookie: the name of its directory of pinned state.
    pub fn cookie(&self) -> anyhow::Result<u64> {
        self.run(zdt_ctl::sockets::netns_cookie)?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Remove zdt's pinned state of this namespace, so no pinned program outlives the test.
        let _ = self.run(|| {
            if let Ok(dir) = zdt_ctl::state::netns_dir() {
                let _ = std::fs::remove_dir_all(dir);
            }
        });
    }
}

fn loopback_up() -> anyhow::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; the ioctls read and write only it.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
        }
    }
    Ok(())
}

/// The kernel's TCP counters of a namespace (/proc/net/snmp, /proc/net/netstat).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub out_rsts: u64,
    pub attempt_fails: u64,
    pub estab_resets: u64,
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub migrate_req_success: u64,
    pub migrate_req_failure: u64,
    /// Segments the kernel rejected as older than one it had already taken (PAWS). Where
    /// loopback delivers two segments of a connection out of order, a closed connection's
    /// late pure ACK reaches the peer's TIME_WAIT socket, whose duplicate ACK then finds no
    /// socket and draws a RST that no request feels: a RST per such segment, at most. Seen
    /// in a VM under emulation, whose vCPUs' backlogs run late (tcpdump: the client's
    /// delayed ACK of the server's FIN arrives after its own FIN); never on the host so far.
    #[serde(default)]
    pub paws_rejected: u64,
    /// Connections a process closed with data it had not read (TcpExt TCPAbortOnClose): each
    /// sends a RST, which the peer feels if it still waits for an answer.
    #[serde(default)]
    pub abort_on_close: u64,
}

impl Counters {
    pub fn read(ns: &Netns) -> anyhow::Result<Self> {
        Ok(Counters {
            out_rsts: ns.counter("Tcp", "OutRsts")?,
            attempt_fails: ns.counter("Tcp", "AttemptFails")?,
            estab_resets: ns.counter("Tcp", "EstabResets")?,
            listen_overflows: ns.counter("TcpExt", "ListenOverflows")?,
            listen_drops: ns.counter("TcpExt", "ListenDrops")?,
            migrate_req_success: ns.counter("TcpExt", "TCPMigrateReqSuccess")?,
            migrate_req_failure: ns.counter("TcpExt", "TCPMigrateReqFailure")?,
            // A TIME_WAIT socket's rejections count in PAWSTimewait since 6.10, in PAWSEstab
            // before.
            paws_rejected: ns.counter("TcpExt", "PAWSEstab")?
                + ns.counter("TcpExt", "PAWSTimewait").unwrap_or(0),
            abort_on_close: ns.counter("TcpExt", "TCPAbortOnClose")?,
        })
    }

    /// `after - before`, counter by counter.
    pub fn delta(after: &Counters, before: &Counters) -> Counters {
        let mut d = Counters::default();
        d.add_delta(after, before);
        d
    }

    /// Adds `after - before` to these counters, counter by counter.
    pub fn add_delta(&mut self, after: &Counters, before: &Counters) {
        self.out_rsts += after.out_rsts - before.out_rsts;
        self.attempt_fails += after.attempt_fails - before.attempt_fails;
        self.estab_resets += after.estab_resets - before.estab_resets;
        self.listen_overflows += after.listen_overflows - before.listen_overflows;
        self.listen_drops += after.listen_drops - before.listen_drops;
        self.migrate_req_success += after.migrate_req_success - before.migrate_req_success;
        self.migrate_req_failure += after.migrate_req_failure - before.migrate_req_failure;
        self.paws_rejected += after.paws_rejected - before.paws_rejected;
        self.abort_on_close += after.abort_on_close - before.abort_on_close;
    }
}
