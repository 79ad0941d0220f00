//! Errors that tell the user what was wrong and what to do: the kinds and exit codes are
//! zdt-plan's ([`zdt_plan::error`], re-exported here); this adds the checks every command makes
//! before it reads or changes anything (root, a kernel with what zdt relies on).
pub use zdt_plan::error::*;

/// The oldest kernel zdt runs on: 5.14 brought the migration of a closing listener's queue
/// through a BPF program (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) and SO_NETNS_COOKIE; pidfd_open
/// (5.3) and pidfd_getfd (5.6) came before.
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// (major, minor) of a kernel release string such as "6.1.0-26-amd64".
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

#[cfg(feature = "test-hooks")]
fn stand_in_release() -> Option<String> {
    std::env::var("ZDT_KERNEL_RELEASE").ok()
}

#[cfg(not(feature = "test-hooks"))]
fn stand_in_release() -> Option<String> {
    None
}

/// Refuses a kernel older than [`MIN_KERNEL`] with a message naming it, before anything is
/// read or changed. With the `test-hooks` feature, `ZDT_KERNEL_RELEASE` stands in for the
/// running kernel's release (an old kernel cannot be booted for every test run).
pub fn require_kernel() -> anyhow::Result<()> {
    let release = stand_in_release().unwrap_or_else(|| {
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let too_old = |why: String| {
        err(
            Kind::Refused,
            format!(
                "this kernel is {release}; zdt needs Linux >= {}.{} (a BPF program that migrates \
                 a closing listener's queue, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, SO_NETNS_COOKIE, \
                 pidfd_open and pidfd_getfd){why}; nothing was changed",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )
    };
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => return Err(too_old(String::new())),
    }
    // A release number is a claim: a distribution's kernel may lack what its number says (or a
    // seccomp filter may refuse it). The three system calls are tried on zdt-ctl's own objects,
    // a few microseconds. The migrate attach type cannot be tried without loading a program;
    // attach loads one and says so if the kernel refuses it.
    match missing_feature() {
        Some(what) => Err(too_old(format!(", and {what} fails here"))),
        None => Ok(()),
    }
}

/// The first of the system calls zdt relies on that fails on zdt-ctl's own objects.
fn missing_feature() -> Option<&'static str> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain system calls on our own pid and on fds we own; each returned fd is owned
    // (and closed) at once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0);
        if pidfd < 0 {
            return Some("pidfd_open (5.3)");
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let dup = libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            pidfd.as_raw_fd(),
            0,
        );
        if dup < 0 {
            return Some("pidfd_getfd (5.6)");
        }
        drop(OwnedFd::from_raw_fd(dup as i32));
        let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return None;
        }
        let sock = OwnedFd::from_raw_fd(sock);
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        );
        (rc != 0).then_some("SO_NETNS_COOKIE (5.14)")
    }
}

/// zdt loads BPF programs, writes pinned maps and duplicates other processes' sockets: all of it
/// needs root, and a kernel that has what zdt relies on. Checked first, so a run that cannot
/// work touches nothing.
pub fn require_root() -> anyhow::Result<()> {
    require_kernel()?;
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(err(
            Kind::PermissionDenied,
            "zdt-ctl must run as root: it loads a BPF program, writes its pinned maps under \
             /sys/fs/bpf and takes listening sockets from other processes. Run it with sudo.",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_are_read_and_compared() {
        assert_eq!(kernel_version("6.1.0-26-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.14.0-284.el9.x86_64"), Some((5, 14)));
        assert_eq!(kernel_version("6.18.44-fc-v769"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.13.19").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.14.0").unwrap() >= MIN_KERNEL);
        assert!(kernel_version("6.0.1").unwrap() >= MIN_KERNEL);
    }
}
