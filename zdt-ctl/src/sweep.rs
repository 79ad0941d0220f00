//! Pinned state of network namespaces that have ended: found and removed by `attach`.
use std::{fs, fs::File, os::fd::AsRawFd as _, path::Path};

use zdt_common::names;

use crate::{
    sockets,
    state::{holds_socket, remove_maps, BPFFS},
};

/// Removes the pinned state of network namespaces that no longer exist, and returns their
/// cookies. Pins outlive their namespace (bpffs is per boot, not per namespace): every
/// container or test namespace that used zdt would otherwise leave its maps (about 0.7 MiB of
/// kernel memory per port) until reboot. A namespace's state is taken for dead only when both
/// say so: no thread, open namespace file or nsfs mount has its cookie
/// ([`sockets::live_netns_cookies`]), and none of its ports' socket arrays holds a socket (a
/// socket keeps its namespace alive, and the array holds only live ones). A port whose lock is
/// held is left for the next sweep. The cookie counter never repeats within a boot, so a
/// removed directory cannot belong to a namespace made later.
pub fn sweep_dead_namespaces() -> anyhow::Result<Vec<u64>> {
    let root = Path::new(BPFFS).join("zdt");
    let Ok(dir) = fs::read_dir(&root) else {
        return Ok(Vec::new());
    };
    let mine = sockets::netns_cookie()?;
    let pinned: Vec<u64> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|c| *c != mine)
        .collect();
    if pinned.is_empty() {
        return Ok(Vec::new());
    }
    let live = sockets::live_netns_cookies()?;
    let mut removed = Vec::new();
    for cookie in pinned.into_iter().filter(|c| !live.contains(c)) {
        if remove_dead_netns(&root.join(cookie.to_string()))? {
            tracing::info!(
                cookie,
                "removed the pinned state of a network namespace that is gone"
            );
            removed.push(cookie);
        }
    }
    Ok(removed)
}

/// Removes one dead namespace's directory: each port's pins (program first, as `remove`
/// does) under its lock, taken without waiting. False if a port was left (locked, or its
/// socket array still holds a socket).
fn remove_dead_netns(dir: &Path) -> anyhow::Result<bool> {
    let mut all = true;
    for port in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = port.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            all = false;
            continue;
        }
        if holds_socket(&path) {
            all = false;
            continue;
        }
        let _ = fs::remove_file(path.join(names::PROGRAM));
        remove_maps(&path);
        if fs::remove_dir(&path).is_err() {
            all = false;
        }
    }
    Ok(all && fs::remove_dir(dir).is_ok())
}
