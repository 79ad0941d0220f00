//! Builds the BPF program (zdt-ebpf) for bpfel-unknown-none with the Debian toolchain that
//! `cargo xtask setup` installs, and embeds it in zdt-ctl.
use std::process::Command;

const TOOLCHAIN: &str = "debian-web";

fn main() -> anyhow::Result<()> {
    let linker_ok = Command::new("bpf-linker").arg("--version").output().is_ok();
    let toolchain_ok = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !linker_ok || !toolchain_ok {
        // A plain message (no error chain or backtrace): cargo prints a failed build script's
        // stderr as it is.
        eprintln!(
            "error: the BPF toolchain is missing ({}). Run `cargo xtask setup` once, then build again.",
            [
                (!linker_ok).then_some("bpf-linker not on PATH"),
                (!toolchain_ok).then_some("rustup toolchain `debian-web` not linked"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        );
        std::process::exit(1);
    }
    let package = aya_build::Package {
        name: "zdt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zdt-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
}
