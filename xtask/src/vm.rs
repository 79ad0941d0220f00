//! `cargo xtask test --kernel VMLINUZ`: the test suite on another kernel, in a VM.
//!
//! zdt depends on kernel behaviour (the verifier, `bpf_sk_select_reuseport`, migration of a
//! closing listener's queue), and the README promises Linux >= 5.14, while the machine runs a
//! much newer kernel. virtme-ng boots the given kernel in qemu on this machine's root filesystem
//! (read-only, with tmpfs overlays), so the guest runs the test executables the host just built,
//! as root, with no image to maintain. The kernel's modules must be installed on the host
//! (`/lib/modules/RELEASE`): Debian's kernel has the 9p filesystem the guest root comes over as
//! a module. `cargo xtask setup` installs qemu, virtme-ng and Debian 12's 6.1 kernel.
//!
//! Nested KVM hangs on the development machine, so the VM runs under TCG (software emulation):
//! booting takes 25-35 s, and everything in the guest runs several times slower than on the
//! host, which load-based tests feel.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{root, setup, test_bin_dir, test_cargo};

/// Two vCPUs, like the development machine and CI: the tests' timing assumptions were made there.
const CPUS: &str = "2";
/// The guest's root filesystem is the host's (read-only), writes go to tmpfs overlays in guest
/// memory; 4 GiB leaves room for those and the tests' own processes.
const MEMORY: &str = "4G";
/// How much longer the tests may wait under TCG than on the host: a request that takes
/// milliseconds on the host took over a second in the guest (core suite on 6.1), and with this
/// factor the core and upgrade suites' limits hold there.
const TIME_SCALE: u32 = 10;
/// Suites that boot a VM of their own (tests/tests/systemd_vm.rs): in the guest they would run
/// an emulated machine inside an emulated machine, many times slower, so they run on the host
/// only.
const OWN_VM: [&str; 1] = ["systemd_vm"];
/// How the guest script marks its own lines, so they stand out among the tests' output.
const MARK: &str = "zdt-vm:";

/// Suites that a VM run leaves out unless they are named (`--suite`), and why: nothing in them
/// depends on the kernel.
const LEFT_OUT: &[(&str, &str)] = &[
    (
        "package",
        "it checks the Debian package (lintian, then apt in a chroot), a file, not the kernel; \
         emulated, its minute would be ten",
    ),
    (
        "containers",
        "it checks podman's namespaces around the handover that `core` and `watch` check on \
         every kernel; podman's storage is the host's, shared with the guest",
    ),
    (
        "fleet",
        "it checks an Ansible rollout over systemd-nspawn hosts around the handover that \
         `core` checks on every kernel; emulated, its three booting hosts would take minutes",
    ),
];

/// One test executable built by `cargo test --no-run`.
struct TestExe {
    /// The suite (tests/tests/NAME.rs, bench/tests/NAME.rs) or the crate whose unit tests it holds.
    name: String,
    path: PathBuf,
}

pub fn test(
    kernel: &Path,
    suites: &[String],
    except: &[String],
    args: &[String],
    limit: Duration,
) -> anyhow::Result<()> {
    check_kernel(kernel)?;
    if let Some(s) = suites.iter().find(|s| OWN_VM.contains(&s.as_str())) {
        bail!("--suite {s} boots a VM of its own: run it on the host, without --kernel");
    }
    let exes = test_executables(suites, except)?;
    let script = write_script(&exes, args)?;
    boot(kernel, &script, limit)
}

/// A readable kernel image, with its modules installed where virtme-ng looks for them.
fn check_kernel(kernel: &Path) -> anyhow::Result<()> {
    let images = || {
        std::fs::read_dir("/boot")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().contains("vmlinuz-"))
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    if !kernel.is_file() {
        bail!(
            "--kernel {}: no such file; pass a kernel image (bzImage/vmlinuz), e.g. one of: {} \
             (`cargo xtask setup` installs Debian 12's 6.1 kernel)",
            kernel.display(),
            images()
        );
    }
    // Debian's and most distributions' images are named vmlinuz-RELEASE; a self-built bzImage
    // may carry its modules elsewhere, or need none, so only a named image is checked.
    if let Some(release) = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
    {
        let modules = Path::new("/lib/modules").join(release);
        if !modules.is_dir() {
            bail!(
                "--kernel {}: {} is missing; the guest needs the kernel's modules (9p) from the \
                 host: install the package that ships this kernel",
                kernel.display(),
                modules.display()
            );
        }
    }
    Ok(())
}

/// Why a VM run leaves `suite` out (when it is not named, for LEFT_OUT's; always, for OWN_VM's).
fn left_out(suite: &str) -> Option<&'static str> {
    if OWN_VM.contains(&suite) {
        return Some("it boots a VM of its own: it runs on the host only");
    }
    LEFT_OUT
        .iter()
        .find(|(s, _)| *s == suite)
        .map(|(_, why)| *why)
}

/// Whether a run of `suites` (every suite when none is named), in a VM or not, runs `suite`.
pub fn runs_suite(suite: &str, suites: &[String], in_vm: bool) -> bool {
    if in_vm && OWN_VM.contains(&suite) {
        false
    } else if suites.is_empty() {
        !in_vm || left_out(suite).is_none()
    } else {
        suites.iter().any(|s| s == suite)
    }
}

/// Builds the test executables on the host (the guest only runs them) and lists them in
/// cargo's order: those of `suites` only, or all of the workspace's but those a VM run leaves
/// out (LEFT_OUT, OWN_VM) and those of `except`.
fn test_executables(suites: &[String], except: &[String]) -> anyhow::Result<Vec<TestExe>> {
    let mut c = test_cargo("test");
    c.args([
        "--workspace",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for s in suites {
        c.args(["--test", s]);
    }
    c.stderr(Stdio::inherit());
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!("{c:?} failed: {}", out.status);
    }
    let mut exes = Vec::new();
    let mut excepted = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(path)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if !runs_suite(name, suites, true) {
            eprintln!(
                "vm: left out: {name}: {}",
                left_out(name).unwrap_or_default()
            );
            continue;
        }
        if except.iter().any(|e| e == name) {
            eprintln!("vm: left out: {name}: --except");
            excepted.push(name.to_string());
            continue;
        }
        exes.push(TestExe {
            name: name.to_string(),
            path: path.into(),
        });
    }
    if let Some(e) = except.iter().find(|e| !excepted.contains(e)) {
        bail!(
            "--except {e}: no such suite in this run; name one of tests/tests/*.rs or bench/tests/*.rs (or a \
             crate's unit tests), e.g. --except bench"
        );
    }
    if exes.is_empty() {
        bail!("cargo built no test executable (suites {suites:?})");
    }
    Ok(exes)
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the guest runs: the kernel's release, a check that zdt's program loads, then every
/// test executable with the same environment as `cargo xtask test`; exit 1 if any failed.
fn write_script(exes: &[TestExe], args: &[String]) -> anyhow::Result<PathBuf> {
    let root = root();
    let bin_dir = test_bin_dir();
    let args: Vec<String> = std::iter::once("--test-threads=1".to_string())
        .chain(args.iter().map(|a| quote(a)))
        .collect();
    let mut s = format!(
        r#"# Written by `cargo xtask test --kernel`; runs as root inside the VM (xtask/src/vm.rs).
echo "{MARK} guest kernel $(uname -r)"
cd {root}
export ZDT_BIN_DIR={bin_dir}
# tests/tests/udp.rs's HTTP/3 servers and clients (the host's venv: the guest's root is the host's).
export ZDT_QUIC_VENV={quic_venv}
# Everything runs several times slower under TCG: the tests stretch their time limits by this
# (tests/src/load.rs, time_scale); a retransmitted SYN still counts as slow whatever the scale.
export ZDT_TEST_TIME_SCALE={TIME_SCALE}
# The load tests hold many sockets at once: the host's open-file limit, not the guest's default.
{nofile}
# BPF must work before the suite means anything: zdt-ctl attach loads and verifies the
# sk_reuseport program (and mounts bpffs), in a namespace of its own, on listeners made by exec.
if ! unshare -n sh -c 'ip link set lo up &&
        "$ZDT_BIN_DIR/zdt-ctl" exec --listen 127.0.0.1:9 -- "$ZDT_BIN_DIR/zdt-ctl" attach 127.0.0.1:9'
then
    echo "{MARK} BPF check failed: zdt-ctl cannot load its program on $(uname -r) (its error is above)"
    exit 1
fi
failed=""
run() {{
    name=$1; shift
    echo "{MARK} == $name"
    start=$(date +%s)
    if "$@"; then result=passed; else result=FAILED; failed="$failed $name"; fi
    echo "{MARK} $name $result in $(( $(date +%s) - start )) s"
}}
"#,
        root = quote(&root.to_string_lossy()),
        bin_dir = quote(&bin_dir.to_string_lossy()),
        quic_venv = quote(&crate::setup::quic_venv().to_string_lossy()),
        nofile = open_file_limit()
            .map(|n| format!("ulimit -n {n}"))
            .unwrap_or_default(),
    );
    for e in exes {
        s += &format!(
            "run {} {} {}\n",
            quote(&e.name),
            quote(&e.path.to_string_lossy()),
            args.join(" ")
        );
    }
    s += &format!(
        r#"if [ -n "$failed" ]; then echo "{MARK} failed:$failed"; exit 1; fi
echo "{MARK} all passed"
"#
    );
    let path = root.join("target/vm/run-tests.sh");
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, s).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// This process's soft limit of open files (RLIMIT_NOFILE), as /proc/self/limits shows it.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Boots `kernel` with virtme-ng to run `script`, streams the guest's output, and fails if the
/// script fails or the VM outlives `limit` (then it is killed). A guest that dies before its
/// script starts has run no test: its console's last lines are shown and it is booted once more.
fn boot(kernel: &Path, script: &Path, limit: Duration) -> anyhow::Result<()> {
    match boot_once(kernel, script, limit)? {
        Boot::Ran => Ok(()),
        Boot::DiedBeforeScript => {
            eprintln!(
                "vm: the guest died before its script started (no test ran; its console is \
                 above): booting it once more"
            );
            match boot_once(kernel, script, limit)? {
                Boot::Ran => Ok(()),
                Boot::DiedBeforeScript => bail!(
                    "the VM on {} died twice before its script started: qemu or the guest \
                     kernel fails to boot here (its console is above)",
                    kernel.display()
                ),
            }
        }
    }
}

/// How a boot ended, when it did not fail a test.
enum Boot {
    /// The script ran and every test passed.
    Ran,
    /// The guest died before its script's first line: no test ran.
    DiedBeforeScript,
}

/// How many of the console's last lines a failed boot shows.
const CONSOLE_TAIL: usize = 80;

fn boot_once(kernel: &Path, script: &Path, limit: Duration) -> anyhow::Result<Boot> {
    let vng = setup::vng();
    // vng runs virtme-run from PATH.
    let path = format!(
        "{}:{}",
        vng.parent().expect("vng is in a bin directory").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(&vng);
    c.env("PATH", path)
        .current_dir(root())
        .arg("--run")
        .arg(kernel)
        // TCG: nested KVM hangs on the development machine; qemu's default for x86 guests on an
        // x86 host is multi-threaded TCG, one host thread per vCPU.
        .arg("--disable-kvm")
        // Debian 12's qemu ships an old C virtiofsd that virtme-ng cannot drive: it would wait
        // for it for seconds on every boot and then fall back to 9p anyway.
        .arg("--force-9p")
        .args(["--cpus", CPUS, "--memory", MEMORY])
        // Under TCG, Debian 12's 6.1 finds the vCPUs' TSCs "unsynchronized", marks the TSC
        // unstable and falls back to the HPET, whose every read is an emulated MMIO access: the
        // whole guest then runs about 2x slower than 6.12, which keeps the TSC (measured: the
        // `faults` suite 693 s vs 251 s). All vCPUs read qemu's one virtual clock, so the TSC is
        // in fact synchronized.
        .args(["--append", "tsc=reliable"])
        // The guest kernel's console (an oops, a panic) and qemu's own errors come on stderr
        // with --verbose, the script's output on stdout. The console is kept, and shown when
        // the guest dies or a test fails; ZDT_VM_CONSOLE=1 shows it as it comes.
        .arg("--verbose")
        .arg("--exec")
        .arg(format!("sh {}", quote(&script.to_string_lossy())))
        // Nothing to type into the guest; a VM reading the terminal would also stop a run in
        // the background.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Piped, not inherited: qemu opens its console output by path, which truncates a log
        // file that stdout or stderr point to (CI's log lost the host run's output that way).
        .stderr(Stdio::piped());
    eprintln!(
        "vm: booting {} (TCG, {CPUS} vCPUs, {MEMORY}; limit {} min)",
        kernel.display(),
        limit.as_secs() / 60
    );
    let start = Instant::now();
    let mut child = c.spawn().with_context(|| {
        format!(
            "running {}: run `cargo xtask setup` to install virtme-ng",
            vng.display()
        )
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let live = std::env::var_os("ZDT_VM_CONSOLE").is_some();
    let console = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::with_capacity(CONSOLE_TAIL);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if live {
                eprintln!("{line}");
            }
            if tail.len() == CONSOLE_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    });
    // Lines go through here so that the log says when the guest's script started (the boot).
    let reader = std::thread::spawn(move || {
        let mut started = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(&format!("{MARK} guest kernel")) {
                started = true;
                eprintln!("vm: booted in {:.1} s", start.elapsed().as_secs_f64());
            }
            println!("{line}");
        }
        started
    });
    let show_console = |console: std::thread::JoinHandle<std::collections::VecDeque<String>>| {
        if live {
            return;
        }
        let tail = console.join().unwrap_or_default();
        eprintln!("vm: the console's last {} lines:", tail.len());
        for line in tail {
            eprintln!("  | {line}");
        }
    };
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            kill_tree(child.id());
            let _ = child.wait();
            let _ = reader.join();
            show_console(console);
            bail!(
                "the VM ran longer than {} min and was killed: a test hangs on this kernel, or \
                 the run needs a higher --vm-timeout (or fewer suites/tests)",
                limit.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let started = reader.join().unwrap_or(true);
    eprintln!(
        "vm: finished in {:.1} s: {status}",
        start.elapsed().as_secs_f64()
    );
    if status.success() {
        let _ = console.join();
        return Ok(Boot::Ran);
    }
    show_console(console);
    if !started {
        return Ok(Boot::DiedBeforeScript);
    }
    bail!(
        "tests failed in the VM on {} (vng {status}; exit status 255 means the guest died)",
        kernel.display()
    )
}

/// Kills `pid` and all its descendants: vng runs virtme-run, which forks qemu, and qemu must not
/// outlive a timed-out run.
fn kill_tree(pid: u32) {
    let mut parents = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(tree.iter().map(|p| p.to_string()))
        .status();
}

#[cfg(test)]
mod tests {
    use super::runs_suite;

    fn named(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_vm_run_leaves_out_package_unless_named_and_systemd_vm_always() {
        for suite in ["core", "package", "systemd_vm"] {
            assert!(runs_suite(suite, &[], false), "{suite} on the host");
        }
        assert!(runs_suite("core", &[], true));
        assert!(!runs_suite("package", &[], true));
        assert!(runs_suite("package", &named(&["package"]), true));
        assert!(!runs_suite("core", &named(&["package"]), true));
        assert!(!runs_suite("systemd_vm", &[], true));
        assert!(!runs_suite("systemd_vm", &named(&["systemd_vm"]), true));
        assert!(runs_suite("systemd_vm", &named(&["systemd_vm"]), false));
    }
}
