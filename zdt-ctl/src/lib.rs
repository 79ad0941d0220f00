//! zdt-ctl: zero-downtime handover of a SO_REUSEPORT port between processes, steered by a BPF
//! `sk_reuseport` program. The `zdt-ctl` binary is a thin shell over this library; the tests and
//! the benchmark call the same functions.
pub mod addr;
pub mod cmd;
pub mod error;
pub use zdt_plan as plan;
pub mod program;
pub mod readiness;
pub mod settle;
pub mod sockets;
pub mod state;
pub mod sweep;

/// Raises the soft limit of open files to the hard one: a promote duplicates every listener of
/// the new process (an nginx with 512 workers has 1024 on a dual-stack port), which the default
/// soft limit of 1024 would not hold.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `print!` that returns an error from the enclosing function instead of panicking when stdout
/// cannot be written (a full disk, a pipe closed by `head`): by then the command has done its
/// work, and its exit code must say so rather than a panic's 101.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($t)*)
            .and_then(|()| stdout.flush())
            .map_err($crate::error::output_error)?
    }};
}

/// [`out!`] with a newline, as `println!`.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => {{
        $crate::out!($($t)*);
        $crate::out!("\n");
    }};
}

/// The log event (the message of an info line) a promote emits once its switch is made: the
/// new set is live, the members' roles are written, zdt's duplicates of the new process's
/// listeners are closed. Tests wait for it in zdt-ctl's log (`RUST_LOG=zdt_ctl=info`) to act
/// at that moment of a promote's run, e.g. during its probation; unlike [`Step::Switched`], it
/// needs no test hook and zdt-ctl does not pause there.
pub const SWITCHED: &str = "switched";

/// The steps of zdt-ctl's commands that a test can stop or pause zdt-ctl at (`ZDT_FAILPOINT`):
/// one list, which the code's [`failpoint`] calls and the tests both use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// promote: PID listens and its sockets passed every check.
    Validated,
    /// promote: the port's lock is taken after the readiness wait.
    Locked,
    /// promote: the readiness checks are done, under the lock.
    Readied,
    /// promote: PID's sockets are in the map as candidates.
    Inserted,
    /// The new active set is written to the standby buffer, not yet live.
    Staged,
    /// The control word names the new buffer: the new set is live.
    Flipped,
    /// promote: the switch is done (the rollback target recorded).
    Switched,
    /// promote: the members' roles are written.
    Roles,
    /// promote --stop-old: about to SIGTERM the previous members.
    Stopping,
    /// Any locked command: the port's lock is taken.
    LockTaken,
    /// upgrade: the new program is attached to the port's groups, its pin not yet replaced.
    UpgradeAttached,
    /// exec: the listeners are made, the app not yet exec'ed.
    ExecListening,
    /// detach: the lock is taken.
    DetachLocked,
    /// detach: hold's placeholders are shut.
    PlaceholdersShut,
    /// attach: the lock is taken.
    AttachLocked,
    /// Between the read of /proc/PID/fd and pidfd_getfd.
    FdsRead,
    /// hold: its placeholders are in the socket array, not yet in the hold lists.
    HoldInserted,
}

impl Step {
    /// promote's steps, in the order a promote --stop-old passes them.
    pub const PROMOTE: [Step; 9] = [
        Step::Validated,
        Step::Locked,
        Step::Readied,
        Step::Inserted,
        Step::Staged,
        Step::Flipped,
        Step::Switched,
        Step::Roles,
        Step::Stopping,
    ];
    /// The steps of the other commands, and those every locked command passes.
    pub const OTHERS: [Step; 8] = [
        Step::LockTaken,
        Step::UpgradeAttached,
        Step::ExecListening,
        Step::DetachLocked,
        Step::PlaceholdersShut,
        Step::AttachLocked,
        Step::FdsRead,
        Step::HoldInserted,
    ];

    /// Every step.
    pub fn all() -> impl Iterator<Item = Step> {
        Self::PROMOTE.into_iter().chain(Self::OTHERS)
    }

    /// The name `ZDT_FAILPOINT` gives.
    pub fn name(self) -> &'static str {
        match self {
            Step::Validated => "validated",
            Step::Locked => "locked",
            Step::Readied => "readied",
            Step::Inserted => "inserted",
            Step::Staged => "staged",
            Step::Flipped => "flipped",
            Step::Switched => "switched",
            Step::Roles => "roles",
            Step::Stopping => "stopping",
            Step::LockTaken => "lock-taken",
            Step::UpgradeAttached => "upgrade-attached",
            Step::ExecListening => "exec-listening",
            Step::DetachLocked => "detach-locked",
            Step::PlaceholdersShut => "placeholders-shut",
            Step::AttachLocked => "attach-locked",
            Step::FdsRead => "fds-read",
            Step::HoldInserted => "hold-inserted",
        }
    }

    /// `ZDT_FAILPOINT` for a pause of `pause` there (then zdt-ctl goes on).
    pub fn pausing(self, pause: std::time::Duration) -> String {
        format!("{}:{}ms", self.name(), pause.as_millis())
    }
}

/// Test hook: when `ZDT_FAILPOINT` is the step's name, stop there until killed; when it is
/// `NAME:DURATION`, pause there that long and go on. The fault tests SIGKILL zdt-ctl at every
/// step of a command this way, or make something happen between two steps. Compiled only with
/// the `test-hooks` feature: a production zdt-ctl cannot be told to stop halfway through a
/// promote by its environment.
#[cfg(feature = "test-hooks")]
pub fn failpoint(step: Step) {
    let Some(v) = std::env::var_os("ZDT_FAILPOINT") else {
        return;
    };
    let v = v.to_string_lossy();
    let (point, pause) = match v.split_once(':') {
        Some((p, d)) => (p, humantime::parse_duration(d).ok()),
        None => (v.as_ref(), None),
    };
    let name = step.name();
    if point != name {
        return;
    }
    eprintln!("zdt-ctl: failpoint {name} reached");
    match pause {
        Some(d) => std::thread::sleep(d),
        None => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
}

/// Without the `test-hooks` feature a failpoint is nothing.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn failpoint(_step: Step) {}

#[cfg(test)]
mod failpoint_tests {
    use super::Step;

    /// Every step is a failpoint of the code, and every failpoint is one step (by the source).
    #[test]
    fn every_step_is_reached_by_the_code() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut src = String::new();
        let mut dirs = vec![std::path::PathBuf::from(dir)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    src += &std::fs::read_to_string(p).unwrap();
                }
            }
        }
        for step in Step::all() {
            let call = format!("Step::{step:?})");
            assert_eq!(
                src.matches(&call).count(),
                1,
                "failpoint({call} is called once"
            );
        }
        let names: std::collections::BTreeSet<_> = Step::all().map(Step::name).collect();
        assert_eq!(names.len(), Step::all().count(), "two steps with one name");
    }
}
