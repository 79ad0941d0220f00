//! A supervisor that hands a listening socket to the program it starts the systemd way (fd 3,
//! LISTEN_FDS=1, LISTEN_PID) and keeps its own copy of it, as systemd does for a
//! socket-activated service. Prints `child=PID`, waits for the child to exit, then keeps the
//! socket until it is killed; the child is killed with it (PR_SET_PDEATHSIG).
//!
//! Usage: zdt-supervisor --listen [ADDR]:PORT -- CMD ARGS...
use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
    time::Duration,
};

use anyhow::bail;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (spec, cmd) = match args.as_slice() {
        [flag, spec, dashes, cmd @ ..]
            if flag == "--listen" && dashes == "--" && !cmd.is_empty() =>
        {
            (spec, cmd)
        }
        _ => bail!("usage: zdt-supervisor --listen [ADDR]:PORT -- CMD ARGS..."),
    };
    let sockets = zdt_ctl::cmd::exec::listeners(&[spec.parse()?], None, 4096)?;
    let Some(socket) = sockets.first() else {
        bail!("no listener for {spec}");
    };
    let fd = socket.as_raw_fd();
    let mut child = Command::new("sh");
    // LISTEN_PID must be the service's own pid: the shell sets it and execs under the same pid.
    child
        .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#])
        .args(cmd)
        .env("LISTEN_FDS", "1");
    // SAFETY: fd_to_3 and prctl are async-signal-safe; `fd` stays open in the parent.
    unsafe {
        child.pre_exec(move || {
            zdt_tests::harness::fd_to_3(fd)?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = child.spawn()?;
    println!("child={}", child.id());
    child.wait()?;
    // systemd keeps a socket unit's socket after its service exits; so does this (`sockets`
    // lives on in this frame).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
