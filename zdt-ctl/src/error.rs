//! Errors that tell the user what was wrong and what to do, each with its own exit code so that
//! deploy scripts can branch on the outcome.
use std::fmt;

/// What kind of failure an error is. The exit code of `zdt-ctl` is derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything unexpected: a kernel call that should not fail, a bug.
    Internal,
    /// Bad input: a malformed argument, a pid that does not exist or has no suitable socket.
    BadInput,
    /// The port is not under zdt's control (`zdt-ctl attach` first).
    NotAttached,
    /// The readiness URL never answered 200 within the timeout.
    ReadinessTimeout,
    /// The process being promoted exited before the switch.
    ProcessDied,
    /// Not run as root.
    PermissionDenied,
    /// The request is valid but would break the service (e.g. draining the last active member),
    /// or the pinned state is not one zdt created.
    Refused,
    /// The switch happened, then the new process failed (died, or stopped answering 200 during
    /// --probation), and the previous active set was restored.
    RolledBack,
}

impl Kind {
    /// Documented in the README ("Exit codes").
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::BadInput => 2,
            Kind::NotAttached => 3,
            Kind::ReadinessTimeout => 4,
            Kind::ProcessDied => 5,
            Kind::PermissionDenied => 6,
            Kind::Refused => 7,
            Kind::RolledBack => 8,
        }
    }
}

#[derive(Debug)]
pub struct ZdtError {
    pub kind: Kind,
    pub message: String,
}

impl fmt::Display for ZdtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ZdtError {}

/// Builds an [`anyhow::Error`] of the given kind.
pub fn err(kind: Kind, message: impl Into<String>) -> anyhow::Error {
    ZdtError {
        kind,
        message: message.into(),
    }
    .into()
}

/// Shorthand for the most common kind.
pub fn bad_input(message: impl Into<String>) -> anyhow::Error {
    err(Kind::BadInput, message)
}

/// The kind of an error chain: the first [`ZdtError`] in it, else `Internal`.
pub fn kind_of(error: &anyhow::Error) -> Kind {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<ZdtError>())
        .map_or(Kind::Internal, |e| e.kind)
}

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

/// Refuses a kernel older than [`MIN_KERNEL`] with a message naming it, before anything is
/// read or changed. `ZDT_KERNEL_RELEASE` stands in for the running kernel's release in tests
/// (an old kernel cannot be booted for every test run).
pub fn require_kernel() -> anyhow::Result<()> {
    let release = match std::env::var("ZDT_KERNEL_RELEASE") {
        Ok(r) => r,
        Err(_) => nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(err(
            Kind::Refused,
            format!(
                "this kernel is {release}; zdt needs Linux >= {}.{} (a BPF program that migrates \
                 a closing listener's queue, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, and \
                 SO_NETNS_COOKIE); nothing was changed",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )),
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
