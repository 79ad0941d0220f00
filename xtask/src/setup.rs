//! `cargo xtask setup`: everything a fresh Debian machine needs to build and run zdt.
//!
//! The BPF program is Rust compiled for bpfel-unknown-none. Debian ships a Rust toolchain with a
//! prebuilt `core` for that target (rustc-web + libstd-rust-web-dev-bpf) and LLVM 22; bpf-linker
//! is built against that LLVM from crates.io. rustup then sees Debian's toolchain as
//! `debian-web`, which zdt-ctl's build.rs asks aya-build to use.
use std::process::Command;

use anyhow::Context as _;

use crate::run as run_checked;

const PACKAGES: [&str; 4] = [
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
/// For tests/tests/servers.rs: the real servers it hands over (nginx, HAProxy, gunicorn) and wrk,
/// the load generator it runs them under. The tests start every instance with a config of their
/// own inside a network namespace of their own, so the packages' own services (nginx's default
/// site on :80, haproxy.service), if the install starts them, share no port with the tests.
const SERVER_PACKAGES: [&str; 4] = ["nginx", "haproxy", "gunicorn", "wrk"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const TOOLCHAIN: &str = "debian-web";

fn run_quiet(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .into_iter()
        .chain(SERVER_PACKAGES)
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

fn has_toolchain() -> bool {
    run_quiet(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"]))
}

pub fn run() -> anyhow::Result<()> {
    let packages = missing_packages();
    if !packages.is_empty() {
        eprintln!("setup: installing {}", packages.join(" "));
        let apt = |args: &[&str]| {
            let mut c = Command::new("apt-get");
            c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        run_checked(apt(&["update", "-q"])).context("apt-get update (setup needs root)")?;
        let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
        install.args(&packages);
        run_checked(install)?;
    }
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
