//! Debian 12's kernel, as `cargo xtask setup` installs it (linux-image-amd64): the kernel of
//! `cargo xtask test --kernel debian-12` and the one tests/tests/systemd_vm.rs boots. xtask
//! includes this file by its path, as it cannot depend on the test crate (xtask builds and runs
//! setup before anything the test crate needs is installed).
use std::path::PathBuf;

/// The newest kernel image of Debian 12's 6.1 series in /boot (linux-image-amd64 installs it).
pub fn debian_12_kernel() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("vmlinuz-6.1.0-") && name.ends_with("-amd64")
        })
        .collect();
    // vmlinuz-6.1.0-N-amd64: the highest N is the newest.
    found.sort_by_key(|p| {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        name.trim_start_matches("vmlinuz-6.1.0-")
            .trim_end_matches("-amd64")
            .parse::<u32>()
            .unwrap_or(0)
    });
    found.pop().ok_or_else(|| {
        anyhow::anyhow!(
            "no /boot/vmlinuz-6.1.0-*-amd64: Debian 12's linux-image-amd64 is not installed \
             (apt-get install linux-image-amd64 installs it)"
        )
    })
}
