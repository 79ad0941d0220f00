//! `cargo xtask setup`: everything a fresh Debian machine needs to build zdt and run its tests.
//! Each task installs only what it needs: `build`, `demo` and `bench` the toolchain
//! ([`toolchain`]), `dist` that and dpkg-dev, `test` everything the suites run ([`run`]).
//!
//! The BPF program is Rust compiled for bpfel-unknown-none. Debian ships a Rust toolchain with a
//! prebuilt `core` for that target (rustc-web + libstd-rust-web-dev-bpf) and LLVM 22; bpf-linker
//! is built against that LLVM from crates.io. rustup then sees Debian's toolchain as
//! `debian-web`, which zdt-ctl's build.rs asks aya-build to use.
//!
//! tests/tests/systemd_vm.rs boots Debian 12's 6.1 kernel in qemu, so setup installs both.
//! `cargo xtask test --kernel` also needs virtme-ng to run the suite on another kernel (see
//! vm.rs); [`vm`] installs it for that task alone.
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use crate::run as run_checked;

/// The toolchain; rust-web-clippy lints the BPF program with the compiler that builds it
/// (`cargo xtask lint`).
const PACKAGES: [&str; 5] = [
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "rust-web-clippy",
];
/// For tests/tests/systemd_vm.rs and `cargo xtask test --kernel` (vm.rs), which boot Debian 12's
/// kernel in qemu: qemu, the kernel (its image, modules and initrd), and e2fsprogs, whose
/// `mkfs.ext4 -d` makes systemd_vm's disk. The kernel's metapackage rather than an ABI-named
/// `linux-image-6.1.0-N-amd64`: the archive stops listing an ABI once a newer one replaces it,
/// and setup must still work on a fresh machine then.
const BOOT_PACKAGES: [&str; 3] = ["qemu-system-x86", "linux-image-amd64", "e2fsprogs"];
/// For `cargo xtask test --kernel` alone (vm.rs): a static busybox, from which virtme-ng builds
/// the initramfs that loads the modules the guest needs to mount its root (9p is a module in
/// Debian's kernel), and Debian's Python venv to hold virtme-ng. virtme-ng boots the guest on the
/// host's root filesystem, so the kernel's modules must be installed on the host, which
/// [`BOOT_PACKAGES`]' kernel package does (`/boot/vmlinuz-6.1.0-N-amd64`,
/// `/lib/modules/6.1.0-N-amd64`).
const VM_PACKAGES: [&str; 2] = ["busybox-static", "python3-venv"];
/// For tests/tests/servers.rs: the real servers it hands over (nginx, HAProxy, gunicorn, Caddy),
/// the runtimes its apps run on (Go's compiler for a standard-library app, Node, Debian's
/// uvicorn) and wrk, the load generator it runs them under. The tests start every
/// instance with a config of their own inside a network namespace of their own, so the
/// packages' own services (nginx's default site on :80, haproxy.service, caddy.service), if the
/// install starts them, share no port with the tests. `nodejs` is whichever the machine's apt
/// sources have (Debian 12's is 18; a NodeSource repository gives 20).
const SERVER_PACKAGES: [&str; 8] = [
    "nginx",
    "haproxy",
    "gunicorn",
    "caddy",
    "golang-go",
    "nodejs",
    "uvicorn",
    "wrk",
];
/// For tests/tests/containers.rs: podman, runc (the runtime it uses here: crun fails on these
/// machines), and catatonit, the init of a pod's infra container (a recommendation of podman's,
/// which setup does not install by itself).
const CONTAINER_PACKAGES: [&str; 3] = ["podman", "runc", "catatonit"];
/// For tests/tests/containers.rs' compose test ([`compose`]): podman-compose from PyPI, the
/// version Debian 13 ships. Debian 12's 1.0.3 cannot run `network_mode: host` (it adds the
/// project's network too, and podman refuses: "cannot set multiple networks without bridge
/// network mode"), and exits 0 all the same.
const PODMAN_COMPOSE_VERSION: &str = "1.3.0";
/// For `cargo xtask dist`: dpkg-shlibdeps (and binutils' strip) to build the package.
const DIST_PACKAGES: [&str; 1] = ["dpkg-dev"];
/// For tests/tests/package.rs and systemd_vm.rs, which check the package: lintian to check it,
/// mmdebstrap to make the Debian roots it is installed into.
const PACKAGE_PACKAGES: [&str; 2] = ["lintian", "mmdebstrap"];
/// For tests/tests/fleet.rs alone ([`fleet`]): systemd-nspawn, which boots the fleet's hosts
/// (Debian roots that mmdebstrap makes, with systemd and sshd), ssh to reach them, Debian's
/// ansible-core (2.14) for the smoke play, and Debian's Python venv for the newest ansible-core
/// that Debian 12's Python 3.11 runs, from PyPI.
const FLEET_PACKAGES: [&str; 5] = [
    "systemd-container",
    "openssh-client",
    "ansible-core",
    "python3-venv",
    "mmdebstrap",
];
/// ansible-core 2.19 is the last series whose controller runs on Python 3.11 (2.20 needs 3.12);
/// ansible-lint checks the collection.
const ANSIBLE_CORE_VERSION: &str = "2.19.14";
const ANSIBLE_LINT_VERSION: &str = "26.10.1";
/// For tests/tests/udp.rs alone ([`quic`]): hypercorn with aioquic (HTTP/3) and aioquic's own
/// client and server, from PyPI (Debian 12's hypercorn 0.13 has no HTTP/3), in a venv of
/// Debian's Python; openssl makes the servers' certificate.
const QUIC_PACKAGES: [&str; 2] = ["python3-venv", "openssl"];
const HYPERCORN_VERSION: &str = "0.18.0";
const AIOQUIC_VERSION: &str = "1.7.2";
/// virtme-ng from PyPI (Debian 12 has no package for it).
const VIRTME_NG_VERSION: &str = "1.42";
const BPF_LINKER_VERSION: &str = "0.13.0";
pub const TOOLCHAIN: &str = "debian-web";

fn run_quiet(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn missing_packages(wanted: impl IntoIterator<Item = &'static str>) -> Vec<&'static str> {
    wanted
        .into_iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

/// virtme-ng's own venv, so that neither Debian's Python nor a pyenv on PATH is changed. It is
/// outside the work tree so that every clone (and CI's fresh one) shares it; its name carries the
/// version, so a new pin installs next to the old one instead of being mistaken for it.
fn virtme_ng_venv() -> PathBuf {
    PathBuf::from(format!("/opt/zdt/virtme-ng-{VIRTME_NG_VERSION}"))
}

/// The venv's `vng`; it exists only once pip has installed virtme-ng completely.
pub fn vng() -> PathBuf {
    virtme_ng_venv().join("bin/vng")
}

fn has_toolchain() -> bool {
    run_quiet(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"]))
}

/// Installs `packages` that are missing (apt-get update first, only then).
fn apt_install(packages: impl IntoIterator<Item = &'static str>) -> anyhow::Result<()> {
    let packages = missing_packages(packages);
    if packages.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", packages.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run_checked(apt(&["update", "-q"])).context("apt-get update (setup needs root)")?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&packages);
    run_checked(install)
}

/// `cargo xtask setup` and `cargo xtask test`: the toolchain and what the test suite runs (the
/// suites' own extras, [`vm`], [`kernel_6_12`] and [`fleet`], come with the runs that need
/// them).
pub fn run() -> anyhow::Result<()> {
    apt_install(
        SERVER_PACKAGES
            .into_iter()
            .chain(CONTAINER_PACKAGES)
            .chain(DIST_PACKAGES)
            .chain(PACKAGE_PACKAGES)
            .chain(BOOT_PACKAGES),
    )?;
    toolchain()
}

/// `cargo xtask dist`: the toolchain and the Debian package's tools.
pub fn dist() -> anyhow::Result<()> {
    apt_install(DIST_PACKAGES)?;
    toolchain()
}

/// What building zdt needs, and all that `build`, `demo` and `bench` need: the BPF toolchain,
/// rustfmt and clippy.
pub fn toolchain() -> anyhow::Result<()> {
    apt_install(PACKAGES)?;
    if !has_bpf_linker() {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "--locked",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        run_checked(c)?;
    }
    // `cargo xtask test` checks formatting and runs clippy first.
    if !run_quiet(Command::new("cargo").args(["fmt", "--version"]))
        || !run_quiet(Command::new("cargo").args(["clippy", "--version"]))
    {
        eprintln!("setup: adding rustfmt and clippy to the Rust toolchain");
        run_checked({
            let mut c = Command::new("rustup");
            c.args(["component", "add", "rustfmt", "clippy"]);
            c
        })?;
    }
    if !has_toolchain() {
        eprintln!("setup: linking Debian's Rust as rustup toolchain {TOOLCHAIN}");
        run_checked({
            let mut c = Command::new("rustup");
            c.args(["toolchain", "link", TOOLCHAIN, "/usr"]);
            c
        })?;
    }
    anyhow::ensure!(
        has_bpf_linker() && has_toolchain(),
        "setup finished but the BPF toolchain is still not usable: is ~/.cargo/bin on PATH?"
    );
    Ok(())
}

/// Debian 12's 6.12 kernel (from its security suite; Debian 13's series), for `cargo xtask
/// test --kernel debian-12-6.12` alone: the metapackage, for the same reason as
/// [`BOOT_PACKAGES`]' 6.1.
pub fn kernel_6_12() -> anyhow::Result<()> {
    apt_install(["linux-image-6.12-amd64"])
}

/// What `cargo xtask test --kernel` needs besides [`run`]'s: virtme-ng. Only that task installs
/// it.
pub fn vm() -> anyhow::Result<()> {
    apt_install(VM_PACKAGES)?;
    pip_venv(
        &virtme_ng_venv(),
        &[&format!("virtme-ng=={VIRTME_NG_VERSION}")],
        &vng(),
    )
}

/// The venv that holds ansible-core and ansible-lint from PyPI, named after their versions.
pub fn ansible_venv() -> PathBuf {
    PathBuf::from(format!(
        "/opt/zdt/ansible-core-{ANSIBLE_CORE_VERSION}-lint-{ANSIBLE_LINT_VERSION}"
    ))
}

/// The venv that holds hypercorn and aioquic from PyPI, named after their versions.
pub fn quic_venv() -> PathBuf {
    PathBuf::from(format!(
        "/opt/zdt/hypercorn-{HYPERCORN_VERSION}-aioquic-{AIOQUIC_VERSION}"
    ))
}

/// What tests/tests/udp.rs needs besides [`run`]'s; only a run of that suite installs it.
pub fn quic() -> anyhow::Result<()> {
    apt_install(QUIC_PACKAGES)?;
    let venv = quic_venv();
    pip_venv(
        &venv,
        &[
            &format!("hypercorn[h3]=={HYPERCORN_VERSION}"),
            &format!("aioquic=={AIOQUIC_VERSION}"),
        ],
        &venv.join("bin/hypercorn"),
    )
}

/// The venv that holds podman-compose from PyPI, named after its version.
pub fn compose_venv() -> PathBuf {
    PathBuf::from(format!("/opt/zdt/podman-compose-{PODMAN_COMPOSE_VERSION}"))
}

/// What tests/tests/containers.rs needs besides [`run`]'s; only a run of that suite installs it.
pub fn compose() -> anyhow::Result<()> {
    apt_install(["python3-venv"])?;
    let venv = compose_venv();
    pip_venv(
        &venv,
        &[&format!("podman-compose=={PODMAN_COMPOSE_VERSION}")],
        &venv.join("bin/podman-compose"),
    )
}

/// What tests/tests/fleet.rs needs besides [`run`]'s; only a run of that suite installs it.
pub fn fleet() -> anyhow::Result<()> {
    apt_install(FLEET_PACKAGES)?;
    let venv = ansible_venv();
    pip_venv(
        &venv,
        &[
            &format!("ansible-core=={ANSIBLE_CORE_VERSION}"),
            &format!("ansible-lint=={ANSIBLE_LINT_VERSION}"),
        ],
        &venv.join("bin/ansible-lint"),
    )
}

/// A venv at `venv` with `requirements` from PyPI, unless `last` (the last file pip installs)
/// exists: a venv that pip did not finish is installed into again.
fn pip_venv(
    venv: &std::path::Path,
    requirements: &[&str],
    last: &std::path::Path,
) -> anyhow::Result<()> {
    if last.exists() {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} in {}",
        requirements.join(" "),
        venv.display()
    );
    // Debian's python3, not whatever `python3` is first on PATH: the venv must outlive a pyenv
    // or a user's PATH.
    run_checked({
        let mut c = Command::new("/usr/bin/python3");
        c.arg("-m").arg("venv").arg(venv);
        c
    })?;
    run_checked({
        let mut c = Command::new(venv.join("bin/pip"));
        c.args(["install", "-q"]).args(requirements);
        c
    })
    .with_context(|| format!("pip install {} (needs PyPI)", requirements.join(" ")))?;
    anyhow::ensure!(
        last.exists(),
        "setup installed {} but {} is missing",
        requirements.join(" "),
        last.display()
    );
    Ok(())
}
