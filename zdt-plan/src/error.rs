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
    /// Every kind, in exit-code order.
    pub const ALL: [Kind; 8] = [
        Kind::Internal,
        Kind::BadInput,
        Kind::NotAttached,
        Kind::ReadinessTimeout,
        Kind::ProcessDied,
        Kind::PermissionDenied,
        Kind::Refused,
        Kind::RolledBack,
    ];

    /// The kind a zdt-ctl exit code stands for (None for 0, success, and for codes zdt-ctl
    /// never exits with): what a script or a test that ran zdt-ctl reads back.
    pub fn from_exit_code(code: i32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.exit_code() == code)
    }

    /// Documented in docs/OPERATING.md ("Exit codes") and in the README.
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

/// The error of a write to stdout that failed (`out!`): internal (exit 1), saying that the
/// command itself is done, so that a script does not retry it as if nothing happened.
pub fn output_error(e: std::io::Error) -> anyhow::Error {
    err(
        Kind::Internal,
        format!("writing the output to stdout: {e} (the command itself completed)"),
    )
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_own_exit_code_and_reads_back() {
        let mut codes: Vec<i32> = Kind::ALL.iter().map(|k| k.exit_code()).collect();
        codes.dedup();
        assert_eq!(codes, (1..=8).collect::<Vec<_>>());
        for k in Kind::ALL {
            assert_eq!(Kind::from_exit_code(k.exit_code()), Some(k));
        }
        assert_eq!(Kind::from_exit_code(0), None);
        assert_eq!(Kind::from_exit_code(101), None);
    }
}
