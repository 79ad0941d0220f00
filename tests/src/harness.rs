//! Real processes in a test namespace: the demo service and zdt-ctl, started from the binaries
//! that `cargo xtask build` puts in target/release.
use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{load::scaled, netns::Netns};
pub use zdt_ctl::{
    cmd::status::{Member, Status},
    error::Kind,
    plan::sets::Role,
};

/// Directory of the workspace's binaries: $ZDT_BIN_DIR, else the directory of the running
/// executable (a test runs from target/<profile>/deps, a binary from target/<profile>).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("ZDT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            let mut d = exe.parent().expect("exe dir").to_path_buf();
            if d.ends_with("deps") {
                d.pop();
            }
            d
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask build` (or `cargo build --release --bins`) first",
        path.display()
    );
    path
}

/// Options of one demo service instance.
#[derive(Debug, Clone)]
pub struct AppOpts {
    pub port: u16,
    pub version: String,
    pub warmup: Duration,
    /// true: bind the public port at start (zdt mode); false: after warm-up (plain handover).
    pub bind_at_start: bool,
    pub close_gap: Duration,
    pub extra: Vec<String>,
    /// A listener to hand over the systemd way (fd 3, LISTEN_FDS=1), as a socket-activating
    /// supervisor does: the app serves it instead of binding its own.
    pub inherit: Option<std::os::fd::RawFd>,
    /// Bind the public port this long after start (the admin port binds at once).
    pub bind_delay: Duration,
    /// Run as this uid (and gid), through setpriv(1), as a unit with `User=` does.
    pub uid: Option<u32>,
    /// Run with this gid (the uid unchanged unless `uid` is set), as `Group=` does.
    pub gid: Option<u32>,
}

impl AppOpts {
    pub fn new(port: u16, version: &str) -> Self {
        AppOpts {
            port,
            version: version.into(),
            warmup: Duration::ZERO,
            bind_at_start: true,
            close_gap: Duration::from_millis(100),
            extra: Vec::new(),
            inherit: None,
            bind_delay: Duration::ZERO,
            uid: None,
            gid: None,
        }
    }
    pub fn bind_delay(mut self, d: Duration) -> Self {
        self.bind_delay = d;
        self
    }
    /// Run as `uid` (its own gid too, no supplementary groups).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(uid);
        self
    }
    /// Run with group `gid` (no supplementary groups), the user unchanged.
    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = Some(gid);
        self
    }
    pub fn warmup(mut self, d: Duration) -> Self {
        self.warmup = d;
        self
    }
    pub fn bind_after_warmup(mut self) -> Self {
        self.bind_at_start = false;
        self
    }
    pub fn close_gap(mut self, d: Duration) -> Self {
        self.close_gap = d;
        self
    }
    /// A process that never accepts (its connections pile up in its accept queue) and closes
    /// its listener at once on SIGTERM.
    pub fn stuck(self) -> Self {
        self.arg("--no-accept").close_gap(Duration::ZERO)
    }
    /// Serve `fd` (kept open by the caller across restarts) instead of binding.
    pub fn inherit(mut self, fd: std::os::fd::RawFd) -> Self {
        self.inherit = Some(fd);
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }
}

/// Makes `fd` the child's fd 3 without close-on-exec, where sd_listen_fds(3) looks for the
/// first socket. For a `pre_exec` hook: only async-signal-safe calls.
pub fn fd_to_3(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: plain syscalls on descriptors of this process.
    let rc = unsafe {
        // dup2 onto itself would keep close-on-exec: clear it by hand then.
        if fd == 3 {
            libc::fcntl(3, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, 3)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running demo service. Killed (SIGKILL) when dropped if it is still running.
pub struct App {
    pub child: Child,
    pub pid: i32,
    pub admin: SocketAddr,
    pub version: String,
    lines: mpsc::Receiver<String>,
}

impl App {
    /// Starts the service and waits until its public listener is bound (or, for a service that
    /// binds after warm-up or after a delay, until its admin port is up).
    pub fn start(ns: &Netns, o: &AppOpts) -> anyhow::Result<App> {
        // Every wrapper execs the next program, so the pid is the app's from the start.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if o.uid.is_some() || o.gid.is_some() {
            argv.push("setpriv".into());
            argv.extend(o.uid.map(|u| format!("--reuid={u}").into()));
            argv.extend(o.gid.map(|g| format!("--regid={g}").into()));
            argv.extend(["--clear-groups", "--"].map(Into::into));
        }
        if o.inherit.is_some() {
            // LISTEN_PID must be the app's own pid, known only after the fork: a shell sets it
            // and execs the app under the same pid.
            argv.extend(["sh", "-c", r#"LISTEN_PID=$$ exec "$0" "$@""#].map(Into::into));
        }
        argv.push(bin("zdt-demo-app").into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if o.inherit.is_some() {
            cmd.env("LISTEN_FDS", "1");
        }
        cmd.args(["--port", &o.port.to_string(), "--version", &o.version])
            .args(["--warmup", &format!("{}ms", o.warmup.as_millis())])
            .args(["--close-gap", &format!("{}ms", o.close_gap.as_millis())])
            .args(["--bind-at", if o.bind_at_start { "start" } else { "ready" }])
            .args(["--bind-delay", &format!("{}ms", o.bind_delay.as_millis())])
            // How long a stopping app still waits for the requests of connections it accepted
            // before SIGTERM: the app's 300 ms, stretched like every wait of the tests. Under
            // emulation a client may send its request later than that after its connect, and the
            // app then closes the connection unanswered (an EOF, with an EstabReset).
            .args([
                "--drain-grace",
                &format!("{}ms", scaled(Duration::from_millis(300)).as_millis()),
            ])
            .args(&o.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // setns first: its namespace fd may be the very number (3) the listener goes to.
        ns.command(&mut cmd);
        if let Some(fd) = o.inherit {
            // SAFETY: fd_to_3 only makes async-signal-safe calls; `fd` stays open in the
            // parent during spawn.
            unsafe {
                cmd.pre_exec(move || fd_to_3(fd));
            }
        }
        let mut child = cmd.spawn().context("starting zdt-demo-app")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut app = App {
            pid: child.id() as i32,
            child,
            admin: "0.0.0.0:0".parse().expect("addr"),
            version: o.version.clone(),
            lines,
        };
        let admin = app.wait_line("admin=", scaled(Duration::from_secs(10)))?;
        app.admin = admin.parse().context("admin address")?;
        // The admin port binds the wildcard unless told otherwise; probe it on loopback.
        if app.admin.ip().is_unspecified() {
            app.admin.set_ip(if app.admin.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        if o.bind_at_start && o.bind_delay.is_zero() {
            app.wait_line("bound=", scaled(Duration::from_secs(10)))?;
        }
        Ok(app)
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        wait_for_line(&self.lines, timeout, |l| {
            l.strip_prefix(prefix).map(str::to_string)
        })
        .map_err(|_| anyhow::anyhow!("zdt-demo-app {} printed no {prefix:?} line", self.version))
    }

    /// Makes an app started with `--relisten-on-hup` open a new listener and close the one it
    /// had (a Go server restarted in process, nginx reloading changed `listen` lines), and
    /// waits until it has.
    pub fn relisten(&mut self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGHUP);
        self.wait_line("relistened=", scaled(Duration::from_secs(10)))?;
        Ok(())
    }

    /// Waits until the service prints that its warm-up is over.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(60));
        let mut cmd_done = false;
        while !cmd_done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .context("the service never got ready")?;
            cmd_done = line == "ready";
        }
        Ok(())
    }

    /// Every stdout line printed so far and not yet consumed.
    pub fn drain_lines(&mut self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn readyz(&self) -> String {
        format!("http://{}/readyz", self.admin)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
    }

    /// Stops the process the way examples/app.service does behind `zdt-ctl hold`: its
    /// ExecStop= `zdt-ctl drain PID --stopping` (new connections wait on the placeholder from
    /// then on), then systemd's SIGTERM; waits for it to exit within `timeout`.
    pub fn stop_behind_hold(&mut self, ns: &Netns, timeout: Duration) -> anyhow::Result<()> {
        zdt_ok(ns, &["drain", &self.pid.to_string(), "--stopping"])?;
        self.signal(nix::sys::signal::Signal::SIGTERM);
        anyhow::ensure!(self.wait_exit(timeout), "pid {} did not exit", self.pid);
        Ok(())
    }

    /// Waits for the process to exit; true if it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Output of one zdt-ctl run.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    /// The error kind the exit code stands for: None when the run succeeded (or ended with a
    /// code zdt-ctl never uses, which `{r:?}` in the assertion then shows).
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_exit_code(self.code)
    }
}

/// The error kind of a zdt-ctl run that ended with `status` (see [`Ctl::kind`]).
pub fn kind_of(status: std::process::ExitStatus) -> Option<Kind> {
    Kind::from_exit_code(status.code().unwrap_or(-1))
}

impl From<Output> for Ctl {
    fn from(o: Output) -> Self {
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// `promote PID --readyz URL EXTRA...` for a demo service instance.
pub fn promote_args(app: &App, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "promote".to_string(),
        app.pid.to_string(),
        "--readyz".into(),
        app.readyz(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A deploy: `promote NEW --readyz ... --stop-old`, which must report `old` stopped, and `old`
/// must have exited.
pub fn replace(ns: &Netns, new: &App, old: &mut App) -> anyhow::Result<Ctl> {
    let r = zdt_ok(ns, &strs(&promote_args(new, &["--stop-old"])))?;
    anyhow::ensure!(
        r.stdout
            .contains(&format!("stopped: pid {} exited", old.pid)),
        "{r:?}"
    );
    anyhow::ensure!(
        old.wait_exit(scaled(Duration::from_secs(5))),
        "pid {} still runs",
        old.pid
    );
    Ok(r)
}

/// Borrowed views of owned arguments.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A running `zdt-ctl hold ARGS...`, its stderr lines on a channel; killed when dropped.
pub struct Hold {
    pub child: Child,
    /// What it said when it registered its placeholder (its layout and uid).
    pub registered: String,
    pub lines: mpsc::Receiver<String>,
}

/// Reads `lines` until `wanted` finds what it looks for in one (at most `timeout`): what it
/// found, or the lines read meanwhile.
pub fn wait_for_line<T>(
    lines: &mpsc::Receiver<String>,
    timeout: Duration,
    mut wanted: impl FnMut(&str) -> Option<T>,
) -> Result<T, Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            return Err(seen);
        };
        if let Some(found) = wanted(&line) {
            return Ok(found);
        }
        seen.push(line);
    }
}

impl Hold {
    /// Waits until hold says something containing `what` (at most `timeout`, stretched by the
    /// time scale); returns that line.
    pub fn wait_said(&self, what: &str, timeout: Duration) -> anyhow::Result<String> {
        wait_for_line(&self.lines, scaled(timeout), |l| {
            l.contains(what).then(|| l.to_string())
        })
        .map_err(|said| anyhow::anyhow!("hold never said {what:?}: {said:?}"))
    }

    /// Starts `zdt-ctl hold ARGS...` and waits until it says its placeholder is registered.
    pub fn start(ns: &Netns, args: &[&str]) -> anyhow::Result<Hold> {
        let mut child = zdt_command(ns, &[&["hold"], args].concat())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning zdt-ctl hold")?;
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        // Warnings (another user's listener on the port) may come first.
        let first = loop {
            let l = lines.recv_timeout(scaled(Duration::from_secs(10)))?;
            if !l.starts_with("zdt-ctl: warning:") {
                break l;
            }
        };
        anyhow::ensure!(first.contains("registered"), "zdt-ctl hold said: {first}");
        Ok(Hold {
            child,
            registered: first,
            lines,
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `zdt-ctl ARGS` inside the namespace.
pub fn zdt(ns: &Netns, args: &[&str]) -> Ctl {
    zdt_command(ns, args)
        .output()
        .expect("running zdt-ctl")
        .into()
}

/// The zdt-ctl command, ready to spawn inside the namespace.
pub fn zdt_command(ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("zdt-ctl"));
    cmd.args(args).stdin(Stdio::null());
    ns.command(&mut cmd);
    cmd
}

/// A zdt-ctl run stopped or paused at some point, and what it says on stderr from then on (read
/// by a thread as it comes, so that it never blocks on a full pipe).
pub struct Paused {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
}

impl Paused {
    /// Waits for the run to end: its exit code, and what it said after the point.
    pub fn finish(mut self) -> anyhow::Result<Ctl> {
        let code = self.child.wait()?.code().unwrap_or(-1);
        Ok(Ctl {
            code,
            stdout: String::new(),
            stderr: self.stderr.iter().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// Spawns `cmd` with its stderr piped and returns once it has said a line that contains `want`
/// (true), or has ended without saying it (false). Whatever it says after that line goes to
/// [`Paused::stderr`].
pub fn spawn_until(cmd: &mut Command, want: &str) -> anyhow::Result<(Paused, bool)> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let said = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains(want));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Ok((Paused { child, stderr: rx }, said))
}

/// The arguments of `zdt-ctl exec --listen :PORT -- zdt-demo-app` serving `version`, its
/// readiness on 127.0.0.1:`admin_port` (the demo app takes its sockets from exec).
pub fn exec_demo_args(port: u16, version: &str, admin_port: u16) -> Vec<String> {
    let listen = format!(":{port}");
    let demo = bin("zdt-demo-app").display().to_string();
    let (v, admin) = (version.to_string(), admin_port.to_string());
    [
        "exec",
        "--listen",
        &listen,
        "--",
        &demo,
        "--port",
        "1",
        "--version",
    ]
    .map(String::from)
    .into_iter()
    .chain([v, "--admin-port".into(), admin])
    .collect()
}

/// Runs zdt-ctl with ZDT_FAILPOINT set to `point` in the background; returns once it got there.
pub fn at_failpoint(ns: &Netns, args: &[String], point: &str) -> Paused {
    let mut cmd = zdt_command(ns, &strs(args));
    cmd.env("ZDT_FAILPOINT", point).stdout(Stdio::null());
    let want = format!("failpoint {}", point.split(':').next().unwrap_or(point));
    let (paused, reached) = spawn_until(&mut cmd, &want).expect("spawn zdt-ctl");
    assert!(reached, "zdt-ctl ended before failpoint {point}");
    paused
}

/// Runs zdt-ctl in the background with its info log on; returns once the log names `event`
/// (e.g. "promote started"): a moment in its run that a test acts at, whatever the machine's
/// speed.
pub fn at_log_event(ns: &Netns, args: &[String], event: &str) -> Paused {
    let mut cmd = zdt_command(ns, &strs(args));
    cmd.env("RUST_LOG", "zdt_ctl=info").stdout(Stdio::null());
    let (paused, said) = spawn_until(&mut cmd, event).expect("spawn zdt-ctl");
    assert!(said, "zdt-ctl ended before its log said {event:?}");
    paused
}

/// Waits up to `timeout` for `child` to exit: its status, or None if it still runs then.
pub fn exit_within(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process a test starts, signals and waits for; killed (and reaped) when dropped.
pub struct Proc {
    pub pid: i32,
    child: Child,
}

impl Proc {
    pub fn new(child: Child) -> Self {
        Proc {
            pid: child.id() as i32,
            child,
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
    }

    /// Whether it exited within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        matches!(exit_within(&mut self.child, timeout), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs zdt-ctl and fails with its output if it did not succeed.
pub fn zdt_ok(ns: &Netns, args: &[&str]) -> anyhow::Result<Ctl> {
    let r = zdt(ns, args);
    anyhow::ensure!(
        r.ok(),
        "zdt-ctl {} exited {}:\n{}{}",
        args.join(" "),
        r.code,
        r.stdout,
        r.stderr
    );
    Ok(r)
}

/// How many sockets the live probe lists of `port` name (those of a `promote --probe` that is
/// asking through the public port).
pub fn probe_list_len(ns: &Netns, port: u16) -> anyhow::Result<usize> {
    ns.run(move || -> anyhow::Result<usize> {
        let set = zdt_ctl::state::State::open_read(port.into())?
            .context("not attached")?
            .active_set()?
            .unwrap_or(zdt_common::ActiveSet::EMPTY);
        Ok(set.probe.iter().map(|l| l.len as usize).sum())
    })?
}

/// Waits until a `promote --probe` asks through the public port of `port`: its probe lists are
/// live (at most `timeout`, stretched by the time scale).
pub fn wait_probing(ns: &Netns, port: u16, timeout: Duration) -> anyhow::Result<()> {
    until(
        &format!("a promote probing through port {port}"),
        timeout,
        || Ok(probe_list_len(ns, port)? > 0),
    )
}

/// Waits until `event` says it has happened (at most `timeout`, stretched by the time scale): a
/// test's wait that ends at the event it waits for, not after a fixed pause. `what` names the
/// event in the error.
pub fn until(
    what: &str,
    timeout: Duration,
    event: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    within(timeout, event)?
        .map(drop)
        .with_context(|| format!("{what}: not within {timeout:?}"))
}

/// [`until`] for a wait that may end without the event: how long it took to happen, or None if
/// it did not within `timeout` (stretched by the time scale).
pub fn within(
    timeout: Duration,
    mut event: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Option<Duration>> {
    let start = Instant::now();
    poll_for(timeout, || Ok(event()?.then(|| start.elapsed())))
}

/// Asks `f` every 20 ms until it gives a value, for at most `timeout` (stretched by the time
/// scale): that value, or None.
pub fn poll_for<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An app that re-creates its listener on SIGHUP ([`App::relisten`]) as the port's active
/// member, once `attach` has found it, and a version warming up for an hour beside it, already
/// listening on the port: what a re-listen must not hand any request to.
pub fn relistening_member_beside_a_warming_version(
    ns: &Netns,
    port: u16,
) -> anyhow::Result<(App, App)> {
    let member = App::start(ns, &AppOpts::new(port, "v1").arg("--relisten-on-hup"))?;
    zdt_ok(ns, &["attach", &format!(":{port}")])?;
    let warming = App::start(
        ns,
        &AppOpts::new(port, "v2").warmup(Duration::from_secs(3600)),
    )?;
    Ok((member, warming))
}

/// Waits until `pid` is `port`'s only active member; Err after `within`.
pub fn until_active(ns: &Netns, port: u16, pid: i32, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while active_pids(ns, port)? != [i64::from(pid)] {
        anyhow::ensure!(
            Instant::now() < deadline,
            "pid {pid} not promoted: {:?}",
            report(ns, port)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Connections waiting in the accept queues of `port`'s members of role `role`, as
/// `zdt-ctl status --json` counts them.
pub fn queued(ns: &Netns, port: u16, role: Role) -> anyhow::Result<u64> {
    Ok(report(ns, port)?
        .members
        .iter()
        .filter(|m| m.role == role)
        .map(|m| m.queued)
        .sum())
}

/// `zdt-ctl status PORT --json`, parsed.
pub fn status(ns: &Netns, port: u16) -> anyhow::Result<serde_json::Value> {
    let r = zdt_ok(ns, &["status", &port.to_string(), "--json"])?;
    serde_json::from_str(&r.stdout).context("status JSON")
}

/// `zdt-ctl status PORT --json` read into zdt-ctl's own report type: what the tests check the
/// roles and counters on, by type rather than by JSON string.
pub fn report(ns: &Netns, port: u16) -> anyhow::Result<Status> {
    let r = zdt_ok(ns, &["status", &port.to_string(), "--json"])?;
    serde_json::from_str(&r.stdout).with_context(|| format!("status JSON: {}", r.stdout))
}

/// Each member of `port` with its role, as `zdt-ctl status --json` lists them.
pub fn roles(ns: &Netns, port: u16) -> anyhow::Result<std::collections::BTreeSet<(i32, Role)>> {
    Ok(report(ns, port)?
        .members
        .iter()
        .map(|m| (m.pid, m.role))
        .collect())
}

/// The pids of `port`'s active members, as `zdt-ctl status --json` lists them.
pub fn active_pids(ns: &Netns, port: u16) -> anyhow::Result<Vec<i64>> {
    Ok(report(ns, port)?
        .pids(Role::Active)
        .into_iter()
        .map(i64::from)
        .collect())
}

/// Every byte of zdt's pinned state for `port` except the traffic counters, read inside the
/// namespace; equal fingerprints mean the state did not change.
pub fn fingerprint(ns: &Netns, port: u16) -> anyhow::Result<Option<Vec<u8>>> {
    ns.run(move || {
        zdt_ctl::state::State::open_read(port.into())?
            .map(|s| s.fingerprint())
            .transpose()
    })?
}

/// `port`'s pinned state read as one snapshot, as every command reads it.
pub fn snapshot(ns: &Netns, port: u16) -> anyhow::Result<zdt_ctl::plan::snapshot::Snapshot> {
    ns.run(move || read_snapshot(port))?
}

/// [`snapshot`]'s read, inside the namespace.
fn read_snapshot(port: u16) -> anyhow::Result<zdt_ctl::plan::snapshot::Snapshot> {
    zdt_ctl::state::State::open_read(port.into())?
        .ok_or_else(|| anyhow::anyhow!("port {port} is not attached"))?
        .snapshot()
}

/// [`snapshot`], read while holding the port's lock (waiting for it up to 10 s): a state between
/// two commands, never one a command is still writing (a watcher may be promoting: its live set
/// is written before the roles it gives, docs/ARCHITECTURE.md). It does not settle anything.
pub fn snapshot_between_commands(
    ns: &Netns,
    port: u16,
) -> anyhow::Result<zdt_ctl::plan::snapshot::Snapshot> {
    ns.run(move || -> anyhow::Result<_> {
        let dir = zdt_ctl::state::port_dir(port.into())?;
        let _lock = zdt_ctl::state::Lock::take_within(&dir, Some(scaled(Duration::from_secs(10))))?
            .with_context(|| format!("port {port} is not attached"))?;
        read_snapshot(port)
    })?
}

/// `port`'s live set and rollback target, exactly as the pinned maps hold them (whichever
/// buffer each is in).
pub fn sets(
    ns: &Netns,
    port: u16,
) -> anyhow::Result<(Option<zdt_common::ActiveSet>, Option<zdt_common::ActiveSet>)> {
    let snap = snapshot(ns, port)?;
    Ok((snap.live, snap.target))
}

/// The invariants of docs/ARCHITECTURE.md ("The invariants, and the model that checks them")
/// that can be read from a real port, asserted after a command that completed (the model
/// asserts them after every step, kills included), on a state read under the port's lock:
/// 1. the rollback target, as far as its sockets listen, is not the live set;
/// 2. new connections reach only sockets the live set names
///    ([`assert_steered_to_the_live_set`]);
/// 3. every slot the live set names records the role the set gives it;
///
/// and that every slot the live set names holds a socket zdt put there (or none: closed).
/// [`checked`] adds 4, 5 and 6, which compare the state before a command with after.
pub fn assert_invariants(ns: &Netns, port: u16) -> anyhow::Result<()> {
    use zdt_ctl::plan::sets::{live_only, same};
    let snap = snapshot_between_commands(ns, port)?;
    let Some(live) = snap.live else {
        return Ok(());
    };
    if let Some(target) = &snap.target {
        let (t, l) = (
            live_only(target, &snap.slots, |_| false)?,
            live_only(&live, &snap.slots, |_| false)?,
        );
        anyhow::ensure!(
            t.is_empty() || !same(&t, &l),
            "invariant 1: the rollback target is the live set (active {:?}, canary {:?})",
            l.lists.map(|x| x.as_slice().to_vec()),
            l.canary.map(|x| x.as_slice().to_vec())
        );
    }
    for s in &snap.slots {
        let want = if live.contains(s.index) {
            Some(Role::Active)
        } else if live.is_canary(s.index) {
            Some(Role::Canary)
        } else if live.is_hold(s.index) {
            Some(Role::Hold)
        } else {
            None
        };
        if let Some(want) = want {
            anyhow::ensure!(
                s.recorded() == want,
                "invariant 3: slot {} (pid {}) records {}, the live set makes it {want}",
                s.index,
                s.pid(),
                s.recorded()
            );
        }
    }
    assert_steered_to_the_live_set(ns, port, &snap)
}

/// Invariant 2 on the real kernel, from `before` (a snapshot taken just now): while the live
/// set names a listening IPv4 socket, 20 requests on new connections are answered only by
/// processes the live set names (the demo app says its pid in `x-zdt-pid`; an answer without
/// it, or from another pid namespace, is not counted), and only slots the live set names see
/// their `steered` counters grow (the background load's connections included).
fn assert_steered_to_the_live_set(
    ns: &Netns,
    port: u16,
    before: &zdt_ctl::plan::snapshot::Snapshot,
) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pids: Vec<Option<i32>> = ns.run(move || {
        (0..20)
            .map(|_| {
                let (_, text) = http_get(addr, "/", Duration::from_secs(5)).ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix("x-zdt-pid: "))
                    .and_then(|p| p.trim().parse().ok())
            })
            .collect()
    })?;
    let after = snapshot(ns, port)?;
    // A watcher may run a command meanwhile: a slot either set names is the live set's.
    let named = |slot: u32| {
        [before.live, after.live]
            .iter()
            .flatten()
            .any(|l| l.names(slot))
    };
    for s in &after.slots {
        let was = before
            .slots
            .iter()
            .find(|b| b.index == s.index && b.meta.cookie == s.meta.cookie)
            .map_or(0, |b| b.steered);
        let grew = s.steered.saturating_sub(was);
        anyhow::ensure!(
            grew == 0 || named(s.index),
            "invariant 2: slot {} (pid {}, {}) took {grew} new connections, but the live set \
             does not name it",
            s.index,
            s.pid(),
            s.recorded()
        );
    }
    // While the live set names a listening IPv4 socket, the program selects for every IPv4
    // connection: none is hashed over the group, where a candidate could take it.
    let serving: std::collections::BTreeSet<i32> = [before, &after]
        .iter()
        .flat_map(|snap| snap.slots.iter())
        .filter(|s| s.meta.family == zdt_common::AF_INET && named(s.index))
        .map(|s| s.pid())
        .collect();
    // The pid an app says is its own namespace's: comparable only when every member is in
    // ours (a container's app says 1, say).
    let own_ns = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|n| n.split_whitespace().count() == 1)
        })
    };
    if serving.is_empty() || !after.slots.iter().all(|s| own_ns(s.pid())) {
        return Ok(());
    }
    for pid in pids.into_iter().flatten() {
        anyhow::ensure!(
            serving.contains(&pid),
            "invariant 2: pid {pid} answered a new connection, but the live set names only \
             the sockets of {serving:?}"
        );
    }
    Ok(())
}

/// A command run with the invariants that compare its before and after (docs/ARCHITECTURE.md):
/// 4. a slot the live set or the rollback target named, whose socket listened, holds that
///    socket or none afterwards, never a new one;
/// 5. a process that was hold's, or a candidate that never took a connection, is not stopped
///    by the command (nor is the process the command made active);
/// 6. a refused command (exit 2 or 7) leaves the pinned state byte for byte as it was;
///
/// and, after a command that succeeded, [`assert_invariants`].
pub fn checked(ns: &Netns, port: u16, args: &[&str]) -> anyhow::Result<Ctl> {
    let before = snapshot(ns, port)?;
    let print = fingerprint(ns, port)?;
    let running_before: std::collections::BTreeSet<i32> = before
        .slots
        .iter()
        .map(|s| s.pid())
        .filter(|&pid| running(pid))
        .collect();
    let r = zdt(ns, args);
    let what = format!("zdt-ctl {}", args.join(" "));
    if matches!(r.kind(), Some(Kind::Refused | Kind::BadInput)) {
        anyhow::ensure!(
            fingerprint(ns, port)? == print,
            "invariant 6: {what} was refused ({r:?}) but changed the state"
        );
        return Ok(r);
    }
    let after = snapshot(ns, port)?;
    for b in &before.slots {
        let named = [before.live, before.target]
            .iter()
            .flatten()
            .any(|set| set.names(b.index));
        if let (true, Some(a)) = (named, after.slots.iter().find(|a| a.index == b.index)) {
            anyhow::ensure!(
                a.meta.cookie == b.meta.cookie,
                "invariant 4: {what} gave slot {} (pid {}'s, named by the live set or the \
                 rollback target) to a new socket of pid {}",
                b.index,
                b.pid(),
                a.pid()
            );
        }
    }
    // Hold's placeholders and the candidates that never took a connection, running before
    // the command; and whoever it made active.
    let spared: std::collections::BTreeSet<(i32, Role)> = before
        .slots
        .iter()
        .filter(|s| {
            s.recorded() == Role::Hold || (s.recorded() == Role::Candidate && s.steered == 0)
        })
        .chain(after.slots.iter().filter(|s| s.recorded() == Role::Active))
        .map(|s| (s.pid(), s.recorded()))
        .filter(|&(pid, _)| running_before.contains(&pid))
        .collect();
    for (pid, role) in spared {
        anyhow::ensure!(
            running(pid),
            "invariant 5: pid {pid} ({role} before or after) was stopped by {what}: {r:?}"
        );
    }
    if r.ok() {
        assert_invariants(ns, port)?;
    }
    Ok(r)
}

/// Whether `pid` runs: it exists and is not a zombie that exited (as zdt-ctl itself sees it).
pub fn running(pid: i32) -> bool {
    zdt_ctl::sockets::start_time(pid).is_some()
}

/// Prints one load tally as a table row block: requests, ok, each failure kind, versions.
pub fn print_tally(title: &str, t: &crate::load::Tally) {
    use crate::load::Outcome;
    println!("{title}");
    println!(
        // spaces: the columns of a table.
        "  requests {:>7}   ok {:>7}   failed {:>4}",
        t.requests,
        t.count(Outcome::Ok),
        t.failures()
    );
    let kinds: Vec<String> = Outcome::ALL[1..]
        .iter()
        .map(|o| format!("{} {}", o.name(), t.count(*o)))
        .collect();
    println!("  failures by kind: {}", kinds.join(", "));
    let versions: Vec<String> = t.versions.iter().map(|(v, n)| format!("{v} {n}")).collect();
    println!("  answered by: {}", versions.join(", "));
}

/// Waits until `GET path` on `addr` (inside `ns`) answers 200, for at most `timeout` and while
/// `alive` says so; otherwise returns the last thing it saw. It asks only once `addr` listens (a
/// connection to a port nothing listens on yet is answered with a RST), and waits for each
/// answer as long as the deadline allows (a request given up on is answered later to a closed
/// socket, with a RST too): the RSTs a test counts are its clients' only.
pub fn wait_for_200(
    ns: &Netns,
    addr: SocketAddr,
    path: &'static str,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("not listening");
    loop {
        // A listener on the wildcard of the port takes connections to `addr` too.
        let takes = move |l: SocketAddr| {
            l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified())
        };
        let listening = ns
            .run(move || {
                zdt_ctl::sockets::listen_entries(zdt_ctl::addr::Proto::Tcp)
                    .map(|t| t.values().any(|e| takes(e.local)))
                    .unwrap_or(false)
            })
            .map_err(|e| e.to_string())?;
        if listening {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = ns
                .run(move || http_status(addr, path, left.max(Duration::from_secs(1))))
                .map_err(|e| e.to_string())?;
            if matches!(status, Ok(200)) {
                return Ok(());
            }
            last = format!("{status:?}");
        }
        if !alive() || Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection to `addr` (from a thread inside the namespace) as soon as something listens
/// there: a server that was just started binds its port when it gets to it. Tries for at most
/// `timeout`, stretched by the time scale.
pub fn connect_when_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::anyhow!(
                    "nothing listened on {addr} within {timeout:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `GET path` on `addr`, one connection (call it on a thread inside the namespace): the status.
pub fn http_status(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    http_get(addr, path, timeout).map(|(status, _)| status)
}

/// `GET path` on a new connection to `addr`: the status code and the whole answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: zdt\r\nConnection: close\r\n\r\n"
    )?;
    // To the end: the server closes first, and nothing unread is left to make our close a RST.
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
    Ok((status, text))
}

/// A promote running in the background (its --stop-old wait can outlast the next handover).
pub struct Pending {
    child: Child,
    old: App,
}

impl Pending {
    /// Waits for the promote and the old process; returns the promote's JSON report and what
    /// the old process printed. A promote that failed is an error.
    pub fn finish(mut self) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "zdt-ctl promote failed: {out}");
        let report = serde_json::from_str(&out).context("promote JSON")?;
        self.old.wait_exit(Duration::from_secs(15));
        Ok((report, self.old.drain_lines()))
    }
}

/// Starts `zdt-ctl promote --stop-old` for `new` and returns once it has switched (its info log
/// says so), leaving it to wait for the old process in the background.
pub fn zdt_handover(ns: &Netns, new: &App, old: App, gap: Duration) -> anyhow::Result<Pending> {
    let drain = format!("{}ms", (gap + Duration::from_secs(10)).as_millis());
    let pid = new.pid.to_string();
    let readyz = new.readyz();
    let args = [
        "promote",
        &pid,
        "--readyz",
        &readyz,
        "--stop-old",
        "--drain-timeout",
        &drain,
        "--json",
    ];
    let mut cmd = zdt_command(ns, &args);
    cmd.env("RUST_LOG", "zdt_ctl=info").stdout(Stdio::piped());
    // Either it switched, or it ended (a failure, found when it is reaped).
    let (running, _) = spawn_until(&mut cmd, zdt_ctl::SWITCHED)?;
    Ok(Pending {
        child: running.child,
        old,
    })
}
