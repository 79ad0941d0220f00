//! Debian 12's kernels, as `cargo xtask setup` installs them: 6.1 (linux-image-amd64), the kernel
//! of `cargo xtask test --kernel debian-12` and the one tests/tests/systemd_vm.rs boots, and 6.12
//! (linux-image-6.12-amd64, from Debian 12's security suite: Debian 13's kernel series), of
//! `--kernel debian-12-6.12`. xtask includes this file by its path, as it cannot depend on the
//! test crate (xtask builds and runs setup before anything the test crate needs is installed).
use std::path::PathBuf;

/// The newest kernel image of Debian 12's 6.1 series in /boot (linux-image-amd64 installs it).
pub fn debian_12_kernel() -> anyhow::Result<PathBuf> {
    newest("6.1.0-", "-amd64", "linux-image-amd64")
}

/// The newest kernel image of Debian 12's 6.12 series in /boot (linux-image-6.12-amd64).
pub fn debian_12_kernel_6_12() -> anyhow::Result<PathBuf> {
    newest("6.12.", "+deb12-amd64", "linux-image-6.12-amd64")
}

/// /boot/vmlinuz-{prefix}N{suffix} with the highest N.
fn newest(prefix: &str, suffix: &str, package: &str) -> anyhow::Result<PathBuf> {
    let start = format!("vmlinuz-{prefix}");
    let number = |p: &PathBuf| -> Option<u32> {
        let name = p.file_name()?.to_string_lossy().into_owned();
        name.strip_prefix(&start)?
            .strip_suffix(suffix)?
            .parse()
            .ok()
    };
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|p| Some((number(&p)?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        anyhow::anyhow!(
            "no /boot/vmlinuz-{prefix}*{suffix}: Debian 12's {package} is not installed \
             (apt-get install {package} installs it)"
        )
    })
}
