//! Hosts of a fleet on this machine: Debian roots booted with systemd by systemd-nspawn, each in
//! a network namespace of its own that a veth pair joins to the test's namespace, each with
//! sshd, its own bpffs (its own zdt state) and its own services. tests/tests/fleet.rs deploys to
//! them with Ansible as to remote machines.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    debian::{self, Root},
    harness::exit_within,
    load::scaled,
    netns::Netns,
};

/// What the hosts' image holds besides mmdebstrap's `apt` variant: systemd as init, sshd,
/// Python for Ansible's modules, and python3-apt for its apt module.
pub const IMAGE: [&str; 5] = [
    "systemd-sysv",
    "openssh-server",
    "python3",
    "python3-apt",
    "iproute2",
];

/// One booted host. Dropping it kills the container (SIGKILL to its init: its PID namespace
/// goes with it) and removes its root, bpffs and network namespace.
pub struct Host {
    pub name: String,
    /// Its address on the veth pair, as the test's namespace reaches it.
    pub addr: Ipv4Addr,
    root: Root,
    bpffs: PathBuf,
    /// `sleep` in the host's network namespace: what names it (/proc/PID/ns/net) for nspawn.
    holder: Child,
    nspawn: Child,
    log: PathBuf,
}

impl Host {
    /// Boots host number `n` (1-based) from `image`, reachable from `lab` at 10.77.N.2 (lab's
    /// end: 10.77.N.1), with `pubkey` authorized for root.
    pub fn boot(image: &Path, n: u8, lab: &Netns, pubkey: &str) -> anyhow::Result<Host> {
        let name = format!("zdt-fleet-h{n}");
        let root = Root::unpack(image, &format!("fleet-h{n}"))?;
        let ssh = root.join("root/.ssh");
        std::fs::create_dir_all(&ssh)?;
        std::fs::write(ssh.join("authorized_keys"), pubkey)?;
        debian::run(Command::new("chmod").args(["-R", "go-rwx"]).arg(&ssh))?;
        std::fs::write(root.join("etc/hostname"), format!("h{n}\n"))?;

        let bpffs = root.path().with_extension("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        debian::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;

        let holder = Command::new("unshare")
            .args(["-n", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .context("unshare -n sleep")?;
        let netns = format!("/proc/{}/ns/net", holder.id());
        let addr = Ipv4Addr::new(10, 77, n, 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        // unshare has made the namespace once its child runs `sleep`.
        while std::fs::read_link(&netns)? == std::fs::read_link("/proc/self/ns/net")? {
            if Instant::now() > deadline {
                bail!("unshare -n made no network namespace within 5 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let veth = format!("fleet{n}");
        let ip = |args: &str| -> anyhow::Result<()> {
            let mut c = Command::new("ip");
            c.args(args.split_whitespace());
            lab.command(&mut c);
            debian::run(&mut c).map(drop)
        };
        ip(&format!(
            "link add {veth} type veth peer name eth0 netns {}",
            holder.id()
        ))?;
        ip(&format!("addr add 10.77.{n}.1/24 dev {veth}"))?;
        ip(&format!("link set {veth} up"))?;
        let inside = |args: &str| -> anyhow::Result<()> {
            debian::run(
                Command::new("nsenter")
                    .arg(format!("--net={netns}"))
                    .arg("ip")
                    .args(args.split_whitespace()),
            )
            .map(drop)
        };
        inside(&format!("addr add {addr}/24 dev eth0"))?;
        inside("link set eth0 up")?;
        inside("link set lo up")?;

        let log = root.path().with_extension("log");
        let out = std::fs::File::create(&log)?;
        let nspawn = Command::new("systemd-nspawn")
            .arg("--quiet")
            .arg("--directory")
            .arg(root.path())
            .args(["--machine", &name])
            // No machined or system bus here: the container is neither registered nor given a
            // scope unit of its own.
            .args([
                "--register=no",
                "--keep-unit",
                "--boot",
                "--console=passive",
            ])
            .arg(format!("--network-namespace-path={netns}"))
            // zdt-ctl loads BPF programs, pins maps and takes sockets with pidfd_getfd: root's
            // capabilities, and no seccomp filter (nspawn's own blocks bpf() and pidfd_getfd).
            .arg("--capability=all")
            .env("SYSTEMD_SECCOMP", "0")
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            // On SIGTERM (drop), kill the container's init: its PID namespace, every process of
            // the host, goes with it at once.
            .arg("--kill-signal=SIGKILL")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("systemd-nspawn (from `cargo xtask setup`)")?;
        let mut host = Host {
            name,
            addr,
            root,
            bpffs,
            holder,
            nspawn,
            log,
        };
        host.wait_for_ssh(lab)?;
        Ok(host)
    }

    /// Waits until sshd accepts connections from `lab`.
    fn wait_for_ssh(&mut self, lab: &Netns) -> anyhow::Result<()> {
        let addr = SocketAddr::from((self.addr, 22));
        let deadline = Instant::now() + scaled(Duration::from_secs(90));
        loop {
            let up = lab.run(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            })?;
            if up {
                return Ok(());
            }
            if let Some(status) = self.nspawn.try_wait()? {
                bail!(
                    "{} stopped while booting ({status}): {}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: sshd did not listen on {addr} within 90 s: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of the container's console.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `path` inside the host's root, as a path on this machine.
    pub fn file(&self, path: impl AsRef<Path>) -> PathBuf {
        self.root.join(path)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the child we spawned and still own.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        if !matches!(
            exit_within(&mut self.nspawn, Duration::from_secs(10)),
            Ok(Some(_))
        ) {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_file(&self.log);
    }
}
