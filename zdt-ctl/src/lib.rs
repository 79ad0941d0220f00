//! zdt-ctl: zero-downtime handover of a SO_REUSEPORT port between processes, steered by a BPF
//! `sk_reuseport` program. The `zdt-ctl` binary is a thin shell over this library; the tests and
//! the benchmark call the same functions.
pub mod addr;
pub mod cmd;
pub mod error;
pub mod plan;
pub mod program;
pub mod readiness;
pub mod sockets;
pub mod state;

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

/// Test hook: when `ZDT_FAILPOINT` is `NAME`, stop at that point until killed; when it is
/// `NAME:DURATION`, pause there that long and go on. The fault tests SIGKILL zdt-ctl at every
/// step of a command this way, or make something happen between two steps. Compiled only with
/// the `test-hooks` feature: a production zdt-ctl cannot be told to stop halfway through a
/// promote by its environment.
#[cfg(feature = "test-hooks")]
pub fn failpoint(name: &str) {
    let Some(v) = std::env::var_os("ZDT_FAILPOINT") else {
        return;
    };
    let v = v.to_string_lossy();
    let (point, pause) = match v.split_once(':') {
        Some((p, d)) => (p, humantime::parse_duration(d).ok()),
        None => (v.as_ref(), None),
    };
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
pub fn failpoint(_name: &str) {}
