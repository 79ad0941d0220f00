//! The package's systemd units under a real systemd. A fresh Debian root (the host's release,
//! with systemd) gets the package installed by apt, the demo service as the examples' `myapp`,
//! and zdt-attach.service, zdt-hold.service and app.service enabled, as an operator sets them up;
//! it boots in qemu (TCG) on Debian 12's kernel. Its scenario (tests/fixtures/systemd-vm/
//! scenario.sh) checks the boot, restarts app.service under load, then deploys app@.service's
//! instances twice with deploy.sh under load, then restarts app.service with no promote in its
//! unit, promoted by zdt-watch@80.service, under load; it reports on a serial port, and the
//! assertions are made here, on that report.
//!
//! tests/tests/systemd.rs runs deploy.sh on the host with a stand-in for systemctl: in seconds,
//! with a deploy that fails and one whose app binds late, and on every kernel of
//! `cargo xtask test --kernel`, which this test does not run on (it boots a VM of its own).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use zdt_tests::{
    debian::{self, run, Root},
    harness::bin,
    kernel::debian_12_kernel,
    load::{Outcome, Tally},
};

/// What the root needs besides the apt variant to boot: systemd as init, udev for the devices
/// (the serial ports, the disk), and kmod, whose modprobe loads the modules the kernel asks for
/// (zdt-ctl's first sock_diag request loads tcp_diag).
const SYSTEMD_PACKAGES: [&str; 3] = ["systemd-sysv", "udev", "kmod"];
/// The VM is killed after this: the whole run takes 2-3 minutes under TCG on 2 busy cores.
const LIMIT: Duration = Duration::from_secs(10 * 60);
/// The examples' app command lines, and the demo service that stands for the app in each: the
/// same ports, a warm-up of 1 s, and a version named after the unit, which the load client
/// counts answers by. Its drain grace (how long a stopping app still waits for the requests of
/// connections it accepted) is stretched from 300 ms to 3 s, by the factor the suite's VM runs
/// use (ZDT_TEST_TIME_SCALE=10): under emulation a client's request can come later than 300 ms
/// after its connect, and the app would close that connection unanswered.
const APPS: [(&str, &str, &str); 2] = [
    (
        "app.service",
        "/usr/local/bin/myapp --listen :80 --admin 127.0.0.1:8081",
        "/usr/local/bin/zdt-demo-app --port 80 --admin-port 8081 --version app --warmup 1s \
         --drain-grace 3s",
    ),
    (
        "app@.service",
        "/usr/local/bin/myapp --admin 127.0.0.1:%i",
        "/usr/local/bin/zdt-demo-app --port 80 --admin-port %i --version app@%i --warmup 1s \
         --drain-grace 3s",
    ),
];

/// The counters a failure message shows: who sent RSTs and why (an app that closed a connection
/// with data unread, a migration that found no listener), and queues that overflowed.
const COUNTERS: [&str; 9] = [
    "Tcp:OutRsts",
    "Tcp:EstabResets",
    "Tcp:AttemptFails",
    "TcpExt:TCPAbortOnClose",
    "TcpExt:TCPAbortOnData",
    "TcpExt:TCPMigrateReqSuccess",
    "TcpExt:TCPMigrateReqFailure",
    "TcpExt:ListenOverflows",
    "TcpExt:PAWSEstab",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/systemd-vm")
}

/// The disk the guest boots from, `dir/disk.img`: the root, the package, the kernel's modules,
/// the apps, the units enabled and the scenario.
fn disk(dir: &Path, release: &str) -> anyhow::Result<PathBuf> {
    let root = Root::unpack(&debian::root_tarball(&SYSTEMD_PACKAGES)?, "systemd-vm-root")?;
    root.install_deb(&debian::deb()?)?;
    // The guest runs the host's kernel: its modules go where modprobe looks for them, as the
    // kernel's package puts them on any Debian system.
    let modules = Path::new("/lib/modules").join(release);
    ensure!(
        modules.is_dir(),
        "{} is missing: the kernel's package is not installed whole",
        modules.display()
    );
    std::fs::create_dir_all(root.join("/usr/lib/modules"))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(&modules)
        .arg(root.join("/usr/lib/modules")))?;
    for b in ["zdt-demo-app", "zdt-load"] {
        std::fs::copy(bin(b), root.join("/usr/local/bin").join(b))?;
    }
    // The operator's own units: the package's examples, with the app's command line replaced.
    for (unit, myapp, app) in APPS {
        let example = root.join("/usr/share/doc/zdt/examples").join(unit);
        let text = std::fs::read_to_string(&example)
            .with_context(|| format!("the package has no {}", example.display()))?;
        ensure!(
            text.contains(myapp),
            "{unit}: the example no longer runs `{myapp}`"
        );
        std::fs::write(
            root.join("/etc/systemd/system").join(unit),
            text.replace(myapp, app),
        )?;
    }
    std::fs::copy(
        fixtures().join("zdt-test.service"),
        root.join("/etc/systemd/system/zdt-test.service"),
    )?;
    std::fs::create_dir_all(root.join("/usr/local/lib/zdt-test"))?;
    std::fs::copy(
        fixtures().join("scenario.sh"),
        root.join("/usr/local/lib/zdt-test/scenario.sh"),
    )?;
    run(&mut root.chroot(&[
        "systemctl",
        "enable",
        "zdt-attach",
        "zdt-hold",
        "app",
        "zdt-test",
    ]))?;
    let img = dir.join("disk.img");
    // Sparse: 2 GiB leaves room for the guest's writes; the root takes about 650 MB of it.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "zdt-test", "-d"])
        .arg(root.path())
        .arg(&img)
        .arg("2G"))
    .context("mkfs.ext4 -d (e2fsprogs, from `cargo xtask setup`)")?;
    Ok(img)
}

/// Boots `kernel` from `disk` with no network, the console on the first serial port
/// (`dir/console.log`) and the scenario's report on the second (`dir/report.log`); waits until
/// the guest powers off, within [`LIMIT`]. Returns the report and how long the VM ran.
fn boot(kernel: &Path, dir: &Path, disk: &Path) -> anyhow::Result<(String, Duration)> {
    let initrd = kernel
        .to_string_lossy()
        .replace("/vmlinuz-", "/initrd.img-");
    let (console, report) = (dir.join("console.log"), dir.join("report.log"));
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu
        // TCG: nested KVM hangs on the development machine (see xtask/src/vm.rs).
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1G"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        // The guest powers off at the end; a panic (panic=-1) or a reboot ends the VM too.
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        // tsc=reliable: see xtask/src/vm.rs (without it 6.1 falls back to the emulated HPET).
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 panic=-1 tsc=reliable",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .stdin(Stdio::null());
    let start = Instant::now();
    let mut child = qemu
        .spawn()
        .context("qemu-system-x86_64 (from `cargo xtask setup`)")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM ran longer than {} s and was killed; its report so far:\n{}\nconsole:\n{}",
                LIMIT.as_secs(),
                std::fs::read_to_string(&report).unwrap_or_default(),
                tail(&console)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        status.success(),
        "qemu: {status}\nconsole:\n{}",
        tail(&console)
    );
    // The port's tty turns each newline into CR LF.
    let text = std::fs::read_to_string(&report)?.replace('\r', "");
    Ok((text, start.elapsed()))
}

/// The last lines of the guest's console, for an error message.
fn tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// One section of the report: the guest's uptime when it began, and its lines.
struct Section {
    at: f64,
    body: String,
}

/// The report's sections by name (`@@ NAME UPTIME`, then the section's lines).
fn sections(report: &str) -> BTreeMap<String, Section> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in report.lines() {
        if let Some(head) = line.strip_prefix("@@ ") {
            let (name, at) = head.split_once(' ').unwrap_or((head, ""));
            out.insert(
                name.to_string(),
                Section {
                    at: at.parse().unwrap_or(f64::NAN),
                    body: String::new(),
                },
            );
            current = Some(name.to_string());
        } else if let Some(s) = current.as_ref().and_then(|c| out.get_mut(c)) {
            s.body.push_str(line);
            s.body.push('\n');
        }
    }
    out
}

/// The report, read section by section; a missing section fails the test with the whole
/// report, which says how far the scenario got.
struct Report {
    text: String,
    sections: BTreeMap<String, Section>,
}

impl Report {
    fn section(&self, name: &str) -> &Section {
        self.sections
            .get(name)
            .unwrap_or_else(|| panic!("no section {name} in the report:\n{}", self.text))
    }

    fn body(&self, name: &str) -> &str {
        self.section(name).body.trim()
    }

    /// A unit's state (`systemctl is-active`) as the section `name` lists it.
    fn unit(&self, name: &str, unit: &str) -> &str {
        self.body(name)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{unit} ")))
            .unwrap_or_else(|| panic!("{name} names no {unit}:\n{}", self.text))
    }

    fn pid(&self, name: &str) -> i64 {
        self.body(name)
            .parse()
            .unwrap_or_else(|_| panic!("{name} is no pid:\n{}", self.text))
    }

    fn tally(&self, name: &str) -> Tally {
        serde_json::from_str(self.body(name))
            .unwrap_or_else(|e| panic!("{name}: {e}:\n{}", self.text))
    }

    /// The kernel counters of `/proc/net/snmp` and `/proc/net/netstat` as the section `name`
    /// holds them ("GROUP:NAME" -> value: each group is a line of names, then one of values).
    fn counters(&self, name: &str) -> BTreeMap<String, i64> {
        zdt_ctl::sockets::netstat_entries(self.body(name))
            .into_iter()
            .map(|(group, n, v)| (format!("{group}:{n}"), v.parse().unwrap_or(0)))
            .collect()
    }

    /// What the TCP counters that tell a failed request's cause did between two sections.
    fn counters_between(&self, before: &str, after: &str) -> String {
        let (a, b) = (self.counters(before), self.counters(after));
        COUNTERS
            .iter()
            .map(|k| {
                let d = b.get(*k).copied().unwrap_or(0) - a.get(*k).copied().unwrap_or(0);
                format!("{k} {d}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Port 80's (pid, role) members in `zdt-ctl status --json`, with the port's `attached`.
    fn members(&self, name: &str) -> (bool, Vec<(i64, String)>) {
        let status: Value = serde_json::from_str(self.body(name))
            .unwrap_or_else(|e| panic!("{name}: {e}:\n{}", self.text));
        let port = status
            .as_array()
            .and_then(|ports| ports.iter().find(|p| p["port"] == 80))
            .unwrap_or_else(|| panic!("{name}: port 80 is not attached:\n{}", self.text));
        let members = port["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["pid"].as_i64().unwrap_or(0),
                    m["role"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        (port["attached"] == true, members)
    }

    /// The pid of the one active member, after checking that there is exactly one.
    fn active(&self, name: &str) -> i64 {
        let (attached, members) = self.members(name);
        let active: Vec<i64> = members
            .iter()
            .filter(|(_, role)| role == "active")
            .map(|(pid, _)| *pid)
            .collect();
        assert!(
            attached && active.len() == 1,
            "{name}: want the program attached and one active member, got attached {attached}, \
             {members:?}:\n{}",
            self.text
        );
        active[0]
    }
}

#[test]
fn the_packaged_units_attach_hold_promote_and_deploy_under_systemd() -> anyhow::Result<()> {
    let kernel = debian_12_kernel()?;
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("a kernel image named vmlinuz-RELEASE")?
        .to_string();
    let dir = std::env::temp_dir().join(format!("zdt-systemd-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let disk = disk(&dir, &release)?;
    eprintln!("disk image made in {:.1} s", t.elapsed().as_secs_f64());
    let booted = boot(&kernel, &dir, &disk);
    let _ = std::fs::remove_file(&disk);
    let (text, ran) = booted?;
    let _ = std::fs::remove_dir_all(&dir);
    // The report as messages show it: without the counters' tables, which only their
    // differences (Report::counters_between) make readable.
    let mut shown = String::new();
    let mut counters = false;
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("@@ ") {
            counters = head.starts_with("counters-");
        }
        if !counters {
            shown.push_str(line);
            shown.push('\n');
        }
    }
    let r = Report {
        sections: sections(&text),
        text: shown,
    };
    eprintln!("{}", r.text);
    // The scenario ran to its end.
    r.section("end");
    let multi_user = r.body("boot").parse::<f64>().unwrap_or(f64::NAN) / 1e6;
    let scenario = r.section("end").at - r.section("boot").at;
    eprintln!(
        "VM ran {:.1} s on {release}: multi-user.target after {multi_user:.1} s, the \
         scenario {scenario:.1} s",
        ran.as_secs_f64(),
    );

    // Boot: attach, then hold, then the app, promoted by its ExecStartPost.
    for unit in ["zdt-attach", "zdt-hold", "app"] {
        assert_eq!(r.unit("units-boot", unit), "active", "{}", r.text);
    }
    assert_eq!(r.active("status-boot"), r.pid("pid-boot"), "{}", r.text);
    let (_, members) = r.members("status-boot");
    assert!(
        members.iter().any(|(_, role)| role == "hold"),
        "no hold placeholder among {members:?}"
    );

    // `systemctl restart app`: requests in the gap wait on the placeholder (slow under
    // emulation, which is no failure here) and are answered by the new process.
    let restart = r.tally("load-restart");
    let kernel = r.counters_between("counters-before-restart", "counters-restart");
    eprintln!("restart of app.service under load: {restart:?}\nkernel: {kernel}");
    assert!(restart.requests >= 50, "{restart:?}");
    assert_eq!(
        restart.failures(),
        restart.count(Outcome::Slow),
        "{restart:?}, kernel: {kernel}"
    );
    for unit in ["zdt-attach", "zdt-hold", "app"] {
        assert_eq!(r.unit("units-restart", unit), "active", "{}", r.text);
    }
    assert_ne!(r.pid("pid-restart"), r.pid("pid-boot"), "not restarted");
    assert_eq!(
        r.active("status-restart"),
        r.pid("pid-restart"),
        "{}",
        r.text
    );

    // Two deploys of app@.service with deploy.sh, the first from an instance started by hand.
    for (section, new) in [("deploy-1", "app@8082"), ("deploy-2", "app@8081")] {
        let out = r.body(section);
        assert!(
            out.ends_with("exit 0") && out.contains(&format!("deployed {new} ")),
            "{section}:\n{out}\n{}",
            r.text
        );
    }
    let deploys = r.tally("load-deploy");
    let kernel = r.counters_between("counters-before-deploy", "counters-deploy");
    eprintln!("two deploys of app@.service under load: {deploys:?}\nkernel: {kernel}");
    assert!(deploys.requests >= 50, "{deploys:?}");
    assert_eq!(deploys.failures(), 0, "{deploys:?}, kernel: {kernel}");
    let versions: Vec<&String> = deploys.versions.keys().collect();
    assert_eq!(versions, ["app@8081", "app@8082"], "{deploys:?}");
    assert_eq!(r.unit("units-deploy", "zdt-attach"), "active");
    assert_eq!(r.unit("units-deploy", "app@8081"), "active");
    assert_eq!(r.unit("units-deploy", "app@8082"), "inactive");
    let new = r.pid("pid-deploy");
    assert_ne!(new, r.pid("pid-first"), "app@8081 was not deployed anew");
    assert_eq!(r.active("status-deploy"), new, "{}", r.text);

    // app.service with no promote in its unit, behind hold, promoted by zdt-watch@80 at its
    // start and across `systemctl restart app` under load.
    assert_eq!(
        r.active("status-watch-start"),
        r.pid("pid-watch-start"),
        "{}",
        r.text
    );
    let watched = r.tally("load-watch");
    let kernel = r.counters_between("counters-before-watch", "counters-watch");
    eprintln!(
        "restart of app.service under zdt-watch@80, under load: {watched:?}\nkernel: {kernel}"
    );
    assert!(watched.requests >= 50, "{watched:?}");
    assert_eq!(
        watched.failures(),
        watched.count(Outcome::Slow),
        "{watched:?}, kernel: {kernel}"
    );
    for unit in ["zdt-hold", "zdt-watch@80", "app"] {
        assert_eq!(r.unit("units-watch", unit), "active", "{}", r.text);
    }
    assert_ne!(
        r.pid("pid-watch"),
        r.pid("pid-watch-start"),
        "not restarted"
    );
    assert_eq!(r.active("status-watch"), r.pid("pid-watch"), "{}", r.text);
    Ok(())
}
