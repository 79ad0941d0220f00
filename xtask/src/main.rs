//! The developer workflow: `cargo xtask setup | build | test | demo | bench`.
//!
//! `setup` installs what a fresh machine lacks (idempotent, quick when all is present); every
//! other task runs it first, so the README's two commands work on a new machine.
mod deb;
mod drift;
// One piece of code with the test crate, which boots the same kernel (tests/src/kernel.rs).
#[path = "../../tests/src/kernel.rs"]
mod kernel;
mod setup;
mod vm;

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the BPF toolchain and what the test suite runs (idempotent; the other tasks
    /// install what they need themselves: `demo` only the toolchain).
    Setup,
    /// Build the release binaries (target/release/zdt-ctl and the demo/test binaries).
    Build,
    /// Run the whole test suite (needs root: every BPF test gets its own network namespace).
    Test {
        /// Run the tests in a VM booted from this kernel image instead of on the host's kernel
        /// (virtme-ng, qemu without KVM), e.g. /boot/vmlinuz-6.1.0-56-amd64; `debian-12`: the
        /// kernel of Debian 12's linux-image-amd64 (6.1), `debian-12-6.12`: that of its
        /// linux-image-6.12-amd64 (Debian 13's series), which this task installs.
        #[arg(long, value_name = "VMLINUZ")]
        kernel: Option<PathBuf>,
        /// Only this suite (tests/tests/NAME.rs or bench/tests/NAME.rs); may repeat. Default:
        /// every test executable.
        #[arg(long = "suite", value_name = "NAME")]
        suites: Vec<String>,
        /// With --kernel: leave this suite out of the VM's run (it still runs on the host);
        /// may repeat.
        #[arg(long = "except", value_name = "NAME", requires = "kernel")]
        except: Vec<String>,
        /// With --kernel: kill the VM after this many minutes.
        #[arg(
            long,
            value_name = "MINUTES",
            default_value_t = 45,
            requires = "kernel"
        )]
        vm_timeout: u64,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The checks `test` runs before any test: formatting, that the docs name only tests,
    /// files and items that exist (and no string literal hides a run of spaces), clippy.
    Lint,
    /// The live demo: three deploys under load in a fresh network namespace.
    Demo,
    /// Shell completions, the man page of zdt-ctl and the Debian package, in target/dist/.
    Dist,
    /// The reset-count benchmark (full run; flags go to zdt-bench, see `--help`).
    Bench {
        /// Replace the results sections of docs/BENCHMARK.md and docs/bench.svg with this run's.
        #[arg(long)]
        readme: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::toolchain()?;
            build()
        }
        Task::Test {
            kernel,
            suites,
            except,
            vm_timeout,
            args,
        } => {
            setup::run()?;
            build_for_tests()?;
            // tests/tests/package.rs, systemd_vm.rs and fleet.rs install the package that
            // `dist` builds from the release build (without test hooks). A VM run leaves them
            // out unless package or fleet is named (systemd_vm runs on the host only).
            let vm = kernel.is_some();
            if ["package", "systemd_vm", "fleet"]
                .iter()
                .any(|s| vm::runs_suite(s, &suites, vm))
            {
                build()?;
                dist()?;
            }
            if vm::runs_suite("fleet", &suites, vm) {
                setup::fleet()?;
            }
            if vm::runs_suite("udp", &suites, vm) {
                setup::quic()?;
            }
            if vm::runs_suite("containers", &suites, vm) {
                setup::compose()?;
            }
            match kernel {
                Some(k) => {
                    setup::vm()?;
                    let k = if k.as_os_str() == "debian-12" {
                        kernel::debian_12_kernel()?
                    } else if k.as_os_str() == "debian-12-6.12" {
                        setup::kernel_6_12()?;
                        kernel::debian_12_kernel_6_12()?
                    } else {
                        k
                    };
                    vm::test(
                        &k,
                        &suites,
                        &except,
                        &args,
                        Duration::from_secs(vm_timeout * 60),
                    )
                }
                None => test(&suites, &args),
            }
        }
        Task::Lint => {
            setup::toolchain()?;
            lint()
        }
        Task::Demo => {
            setup::toolchain()?;
            build()?;
            run(Command::new(root().join("target/release/zdt-demo")))
        }
        Task::Dist => {
            setup::dist()?;
            build()?;
            dist()
        }
        Task::Bench { readme, args } => {
            setup::toolchain()?;
            build()?;
            let out = root().join("bench-results");
            // Results of an earlier run must not pass for this one's in update_readme.
            for f in ["RESULTS.md", "COLD.md", "SCALE.md", "COST.md"] {
                let _ = std::fs::remove_file(out.join(f));
            }
            let mut c = Command::new(root().join("target/release/zdt-bench"));
            c.args(&args).arg("--out").arg(&out);
            run(c)?;
            if readme {
                update_readme(&out)?;
            }
            Ok(())
        }
    }
}

/// Generates completions (bash, zsh, fish) and the man page from zdt-ctl's own clap definitions,
/// then the Debian package with them (deb.rs).
fn dist() -> anyhow::Result<()> {
    let out = root().join("target/dist");
    std::fs::create_dir_all(out.join("completions"))?;
    let ctl = root().join("target/release/zdt-ctl");
    for (what, file) in [
        ("bash", "completions/zdt-ctl.bash"),
        ("zsh", "completions/_zdt-ctl"),
        ("fish", "completions/zdt-ctl.fish"),
        ("man", "zdt-ctl.1"),
    ] {
        let o = Command::new(&ctl).args(["generate", what]).output()?;
        if !o.status.success() {
            bail!(
                "zdt-ctl generate {what}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::fs::write(out.join(file), o.stdout)?;
        eprintln!("wrote target/dist/{file}");
    }
    let deb = deb::build(&out)?;
    eprintln!("wrote {}", deb.strip_prefix(root())?.display());
    Ok(())
}

/// Puts the results of a run into docs/BENCHMARK.md, each part between its markers: RESULTS.md
/// (handover matrix, with the plot copied to docs/), COLD.md (cold restarts), SCALE.md (cost per
/// selection with many sockets) and COST.md (what zdt-ctl's commands cost), whichever the run
/// produced.
fn update_readme(out: &std::path::Path) -> anyhow::Result<()> {
    let path = root().join("docs/BENCHMARK.md");
    let mut doc = std::fs::read_to_string(&path)?;
    let mut any = false;
    if let Ok(results) = std::fs::read_to_string(out.join("RESULTS.md")) {
        let body = format!("{results}\n![failures and latency per cell](bench.svg)");
        doc = replace_section(&doc, "bench", &body)?;
        std::fs::copy(out.join("bench.svg"), root().join("docs/bench.svg"))?;
        any = true;
    }
    for (file, section) in [
        ("COLD.md", "cold"),
        ("SCALE.md", "scale"),
        ("COST.md", "cost"),
    ] {
        if let Ok(text) = std::fs::read_to_string(out.join(file)) {
            doc = replace_section(&doc, section, &text)?;
            any = true;
        }
    }
    if !any {
        bail!(
            "{} has none of RESULTS.md, COLD.md, SCALE.md, COST.md",
            out.display()
        );
    }
    std::fs::write(&path, doc)?;
    Ok(())
}

/// `text` with what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` replaced by `body`.
fn replace_section(text: &str, name: &str, body: &str) -> anyhow::Result<String> {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (Some(a), Some(b)) = (text.find(&begin), text.find(&end)) else {
        bail!("docs/BENCHMARK.md has no {begin} ... {end} section");
    };
    Ok(format!("{}{begin}\n{body}\n{}", &text[..a], &text[b..]))
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    let mut c = cargo();
    // The demo, bench and dist steps run the binaries from target/release: a CARGO_TARGET_DIR
    // in the caller's environment must not send the build elsewhere.
    c.env("CARGO_TARGET_DIR", root().join("target")).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]);
    run(c)
}

/// Where the test build goes: zdt-ctl with its test hooks (`test-hooks`: failpoints and a
/// stand-in kernel release), which the release build in target/release, and so the package,
/// never has. A target directory of its own, so that neither build overwrites the other's
/// binaries.
const TEST_TARGET: &str = "target/test";

/// The directory of the test build's binaries (ZDT_BIN_DIR of the tests).
pub fn test_bin_dir() -> std::path::PathBuf {
    root().join(TEST_TARGET).join("release")
}

/// `cargo SUBCOMMAND --release` for the test build: its target directory and features.
pub fn test_cargo(subcommand: &str) -> Command {
    let mut c = cargo();
    c.env("CARGO_TARGET_DIR", root().join(TEST_TARGET)).args([
        subcommand,
        "--release",
        "--features",
        "zdt-ctl/test-hooks",
    ]);
    c
}

fn build_for_tests() -> anyhow::Result<()> {
    let mut c = test_cargo("build");
    c.args(["--workspace", "--bins"]);
    run(c)
}

/// The lints are part of the test command: formatting, and clippy with every warning an error.
fn lint() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt).context("cargo fmt --check: run `cargo fmt --all`")?;
    drift::check()?;
    // In the test build's directory and with its features: the hooks are linted too, and
    // the dependencies built once serve the tests.
    let mut clippy = test_cargo("clippy");
    clippy.args(["--all-targets", "--workspace", "--", "-D", "warnings"]);
    run(clippy).context("cargo clippy found warnings")?;
    // The BPF program for its own target, with the toolchain that builds it: the clippy above
    // sees none of it (the program is compiled only where target_arch is "bpf").
    let mut ebpf = Command::new("rustup");
    ebpf.current_dir(root().join("zdt-ebpf"))
        .args(["run", setup::TOOLCHAIN, "cargo", "clippy", "--release"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(root().join(TEST_TARGET).join("bpf-clippy"))
        .args(["--", "-D", "warnings"]);
    run(ebpf).context(
        "cargo clippy found warnings in the BPF program (zdt-ebpf); `cargo xtask setup` \
         installs its clippy (rust-web-clippy)",
    )?;
    // zdt-ctl as it is released, without the hooks.
    let mut release = cargo();
    release.args([
        "clippy",
        "--release",
        "-p",
        "zdt-ctl",
        "--",
        "-D",
        "warnings",
    ]);
    run(release).context("cargo clippy found warnings in the release build of zdt-ctl")
}

fn test(suites: &[String], args: &[String]) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the test suite loads BPF programs and creates network namespaces: run it as root");
    }
    lint()?;
    // One test at a time: the tests put real load on real sockets, and on a 2-core machine two
    // of them at once would measure each other. Every suite runs even after one failed, so a
    // run reports all failures at once.
    let mut c = test_cargo("test");
    c.args(["--workspace", "--no-fail-fast"]);
    for s in suites {
        c.args(["--test", s]);
    }
    c.args(["--", "--test-threads=1"])
        .args(args)
        .env("ZDT_BIN_DIR", test_bin_dir())
        // tests/tests/fleet.rs runs ansible-core and ansible-lint from the venv setup made,
        // tests/tests/udp.rs hypercorn and aioquic, tests/tests/containers.rs podman-compose.
        .env("ZDT_ANSIBLE_VENV", setup::ansible_venv())
        .env("ZDT_QUIC_VENV", setup::quic_venv())
        .env("ZDT_COMPOSE_VENV", setup::compose_venv());
    run(c)
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
