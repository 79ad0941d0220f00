//! Real servers on one SO_REUSEPORT port, for tests/tests/servers.rs: nginx, HAProxy, gunicorn
//! and Caddy, each started the way its users start it (its own config, in the foreground, stopped
//! with its own graceful signal); apps on Go's net/http, Node's http and uvicorn, which take their
//! socket from `zdt-ctl exec` (LISTEN_FDS); and wrk, a real load generator, with a parser for its
//! report.
use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{
    harness::{bin, wait_for_200},
    load::scaled,
    netns::Netns,
};

/// The public port every instance shares (each test has a namespace of its own).
pub const PORT: u16 = 8080;

/// nginx's config for instance `n` in `dir`: `workers` workers with a `reuseport` listener each
/// on the public port (all made and held by the master, zdt's member), and an admin server on
/// 127.0.0.1:`admin` that answers /readyz. `daemon`: the master detaches, as Debian's
/// nginx.service runs it (and only a detached master takes SIGUSR2, the binary upgrade);
/// otherwise it stays the caller's child, so its exit is seen. Every path is the instance's
/// own: two instances run at once.
pub fn nginx_conf(dir: &Path, daemon: bool, workers: u16, n: u16, admin: u16) -> String {
    let d = dir.display();
    let daemon = if daemon { "on" } else { "off" };
    format!(
        "daemon {daemon};
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {PORT} reuseport;
        location / {{
            add_header X-Zdt-Version v{n};
            return 200 \"hello from nginx v{n}\\n\";
        }}
    }}
    # The instance's own admin server: nginx is ready once it answers.
    server {{
        listen 127.0.0.1:{admin};
        location = /readyz {{ return 200 \"ready\\n\"; }}
    }}
}}
"
    )
}

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nginx with this many worker processes, each with a `reuseport` listener of its own.
    Nginx(u16),
    Haproxy,
    Gunicorn,
    /// Caddy, which binds its own listeners with SO_REUSEPORT (2.6 cannot take one from
    /// LISTEN_FDS). HTTP/3 is off: its UDP socket has no SO_REUSEPORT, so a second instance
    /// could not bind it.
    Caddy,
    /// A Go net/http app (tests/fixtures/zdt_go, standard library only) taking its listener
    /// from LISTEN_FDS.
    Go,
    /// A Node http app (tests/fixtures/zdt_node.js): `server.listen({fd: 3})`.
    Node,
    /// uvicorn `--fd 3` with an ASGI app (tests/fixtures/zdt_asgi.py), whose readiness zdt
    /// asks through the public port (`promote --probe /readyz`), as for an app with no admin
    /// port (the fixture's lifespan opens one, for the control).
    Uvicorn,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nginx(_) => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Gunicorn => "gunicorn",
            Kind::Caddy => "caddy",
            Kind::Go => "go",
            Kind::Node => "node",
            Kind::Uvicorn => "uvicorn",
        }
    }

    /// The signal with which the server's users stop it gracefully: it closes its listeners and
    /// finishes the requests it has taken.
    pub fn graceful_stop(self) -> Signal {
        match self {
            // SIGTERM and SIGINT are nginx's *fast* shutdown: the workers exit at once and drop
            // whatever they are serving. SIGQUIT is the graceful one (`nginx -s quit`).
            Kind::Nginx(_) => Signal::SIGQUIT,
            // SIGTERM is HAProxy's hard stop, which kills the sessions in progress; SIGUSR1 is
            // the soft stop. Sent to the master, which passes it on to its worker.
            Kind::Haproxy => Signal::SIGUSR1,
            // gunicorn's SIGTERM is the graceful one: the workers finish their request, within
            // --graceful-timeout (SIGINT and SIGQUIT are its quick shutdown).
            Kind::Gunicorn => Signal::SIGTERM,
            // The fixtures' own handlers (http.Server.Shutdown, server.close()), and uvicorn's:
            // stop accepting, finish what was taken, close idle keep-alive connections.
            Kind::Go | Kind::Node | Kind::Uvicorn => Signal::SIGTERM,
            // Caddy's graceful exit (SIGQUIT is its immediate one).
            Kind::Caddy => Signal::SIGTERM,
        }
    }

    /// The config file of instance `n` (admin port `admin`), if the server takes one.
    fn config(self, dir: &Path, n: u16, admin: u16) -> Option<String> {
        match self {
            Kind::Nginx(workers) => Some(nginx_conf(dir, false, workers, n, admin)),
            // HAProxy sets SO_REUSEPORT on its listeners by default on Linux (`noreuseport`
            // turns it off). monitor-uri answers 200 on the instance's own frontend.
            Kind::Haproxy => Some(format!(
                "defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s

frontend public
    bind :{PORT}
    http-request return status 200 content-type text/plain string \"hello from haproxy v{n}\" hdr x-zdt-version v{n}

frontend admin
    bind 127.0.0.1:{admin}
    monitor-uri /readyz
"
            )),
            // `protocols h1 h2`: no HTTP/3 listener. The admin API is off (its fixed port
            // would be shared by both instances); a site on the instance's own port answers
            // /readyz instead.
            Kind::Caddy => Some(format!(
                "{{
    admin off
    auto_https off
    servers {{
        protocols h1 h2
    }}
}}

:{PORT} {{
    header X-Zdt-Version v{n}
    respond \"hello from caddy v{n}\" 200
}}

http://127.0.0.1:{admin} {{
    respond /readyz \"ready\" 200
}}
"
            )),
            Kind::Gunicorn | Kind::Go | Kind::Node | Kind::Uvicorn => None,
        }
    }
}

/// A running server instance: its master is our child, in a process group of its own, which is
/// SIGKILLed (workers and all) and its directory removed when dropped.
pub struct Server {
    pub kind: Kind,
    pub version: String,
    /// The process started: nginx's, gunicorn's or HAProxy's master.
    pub pid: i32,
    /// Its own admin address, where /readyz answers.
    pub admin: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// Starts instance `n` (version `vN`, admin port 9000 + n) and returns at once, before it
    /// binds: the deploy script's `server & zdt-ctl promote $!`. `warmup`: gunicorn's app takes
    /// this long to import in each worker (nginx and HAProxy are ready as soon as they run).
    pub fn start(ns: &Netns, kind: Kind, n: u16, warmup: Duration) -> anyhow::Result<Server> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zdt-{}-{}-{}-v{n}",
            kind.name(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let admin = 9000 + n;
        let conf = dir.join(format!("{}.conf", kind.name()));
        if let Some(text) = kind.config(&dir, n, admin) {
            fs::write(&conf, text)?;
        }
        let mut cmd = match kind {
            Kind::Nginx(_) => {
                let mut c = Command::new("nginx");
                // -e: the error log before the config is read (nginx otherwise opens
                // /var/log/nginx/error.log first); -p: relative paths in the instance's dir.
                c.arg("-p").arg(&dir).arg("-c").arg(&conf);
                c.arg("-e").arg(dir.join("error.log"));
                c
            }
            Kind::Haproxy => {
                // Master-worker mode, as Debian's haproxy.service runs it (-Ws there; -W here,
                // without systemd's notify socket).
                let mut c = Command::new("haproxy");
                c.arg("-W").arg("-f").arg(&conf);
                c
            }
            Kind::Gunicorn => {
                let mut c = Command::new("gunicorn");
                c.args(["--reuse-port", "--workers", "2"])
                    .args(["--bind", &format!("0.0.0.0:{PORT}")])
                    .args(["--bind", &format!("127.0.0.1:{admin}")])
                    .arg("--chdir")
                    .arg(fixtures())
                    .arg("zdt_wsgi:app")
                    .env("ZDT_VERSION", format!("v{n}"))
                    .env("ZDT_WARMUP_MS", warmup.as_millis().to_string())
                    // No __pycache__ in the source tree.
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                c
            }
            Kind::Caddy => {
                let mut c = Command::new("caddy");
                c.args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(&conf)
                    // Its storage and autosaved config go in the instance's directory.
                    .env("XDG_DATA_HOME", &dir)
                    .env("XDG_CONFIG_HOME", &dir)
                    .env("HOME", &dir);
                c
            }
            Kind::Go | Kind::Node | Kind::Uvicorn => {
                // The socket the way socket activation passes it: `zdt-ctl exec` makes one
                // dual-stack [::]:PORT listener and execs the app with it on fd 3, under the
                // same pid.
                let mut c = Command::new(bin("zdt-ctl"));
                c.args(["exec", "--listen", &format!(":{PORT}"), "--"]);
                match kind {
                    Kind::Go => c.arg(go_app()?),
                    Kind::Node => c.arg("node").arg(fixtures().join("zdt_node.js")),
                    // --backlog: asyncio calls listen() again on the socket it is given, which
                    // would set uvicorn's default limit (2048) over exec's 4096.
                    _ => c
                        .args([UVICORN, "--fd", "3", "--backlog", "4096", "--app-dir"])
                        .arg(fixtures())
                        .args(["--no-access-log", "--log-level", "warning", "zdt_asgi:app"]),
                };
                c.env("ZDT_VERSION", format!("v{n}"))
                    .env("ZDT_WARMUP_MS", warmup.as_millis().to_string())
                    .env("ZDT_ADMIN_PORT", admin.to_string())
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                c
            }
        };
        let log = fs::File::create(dir.join("out.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        ns.command(&mut cmd);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} (is it installed?)", kind.name()))?;
        Ok(Server {
            kind,
            version: format!("v{n}"),
            pid: child.id() as i32,
            admin: ([127, 0, 0, 1], admin).into(),
            child,
            dir,
        })
    }

    pub fn readyz(&self) -> String {
        format!("http://{}/readyz", self.admin)
    }

    /// How `zdt-ctl promote` asks this instance whether it is ready: its own admin port, or,
    /// for uvicorn, through the public port (`--probe`: only zdt-ctl's marked connections reach
    /// the new instance).
    pub fn readiness(&self) -> Vec<String> {
        match self.kind {
            Kind::Uvicorn => vec!["--probe".into(), "/readyz".into()],
            _ => vec!["--readyz".into(), self.readyz()],
        }
    }

    /// What the server printed, and its error log: for failure messages.
    pub fn log(&self) -> String {
        ["out.log", "error.log"]
            .iter()
            .filter_map(|f| fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("")
    }

    /// The process that serves the public port, the one `zdt-ctl promote` takes: nginx's and
    /// gunicorn's master (their workers share its sockets), HAProxy's worker (in master-worker
    /// mode the master keeps no listener; the worker it forked has them all).
    pub fn serving_pid(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        if self.kind != Kind::Haproxy {
            return Ok(self.pid);
        }
        let children = format!("/proc/{0}/task/{0}/children", self.pid);
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                return Ok(pid.parse()?);
            }
            anyhow::ensure!(
                self.child.try_wait()?.is_none() && Instant::now() < deadline,
                "haproxy {} forked no worker:\n{}",
                self.version,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the instance's /readyz answers 200 ([`wait_for_200`]), while it runs.
    pub fn wait_ready(&mut self, ns: &Netns, timeout: Duration) -> anyhow::Result<()> {
        let child = &mut self.child;
        let waited = wait_for_200(ns, self.admin, "/readyz", timeout, || {
            child.try_wait().is_ok_and(|s| s.is_none())
        });
        waited.map_err(|last| {
            anyhow::anyhow!(
                "{} {} never answered 200 on {} (last: {last}):\n{}",
                self.kind.name(),
                self.version,
                self.readyz(),
                self.log()
            )
        })
    }

    /// Sends the server's graceful stop signal to its master.
    pub fn stop_gracefully(&self) {
        let _ = kill(Pid::from_raw(self.pid), self.kind.graceful_stop());
    }

    /// Waits for the master to exit (after its workers, for all three servers).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} {} (pid {}) still runs after {timeout:?}:\n{}",
                self.kind.name(),
                self.version,
                self.pid,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole group: an nginx or gunicorn master killed alone would leave its workers.
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Debian's uvicorn (package `uvicorn`, on Debian's python3 whatever python3 comes first on
/// PATH).
const UVICORN: &str = "/usr/bin/uvicorn";

/// The Go fixture, built once per test process with Debian's golang-go (standard library
/// only: no module download) into the temporary directory.
fn go_app() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = std::env::temp_dir().join(format!("zdt-go-app-{}", std::process::id()));
            let cache = std::env::temp_dir().join("zdt-go-cache");
            let st = Command::new("go")
                .args(["build", "-o"])
                .arg(&out)
                .arg(".")
                .current_dir(fixtures().join("zdt_go"))
                .env("GOCACHE", &cache)
                .env("GOFLAGS", "-mod=mod")
                .env("GOPROXY", "off")
                .status()
                .map_err(|e| {
                    format!("running go build (golang-go, from `cargo xtask setup`): {e}")
                })?;
            if !st.success() {
                return Err(format!("go build of tests/fixtures/zdt_go: {st}"));
            }
            Ok(out)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Makes the child get SIGKILL when the thread that started it ends: a test process that is
/// killed runs no Drop, and would leave its servers running. (gunicorn's and HAProxy's workers
/// then exit with their master; nginx's workers outlive it.)
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only sets an attribute of the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// wrk running inside a namespace (closed loop: `connections` connections on one thread, each
/// sending its next request as soon as the last one is answered), every request on a new
/// connection.
pub struct Wrk {
    child: Child,
}

impl Wrk {
    /// Starts `wrk http://ADDR/` for at most `max` (its `--duration`); [`Wrk::finish`] ends it
    /// earlier.
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        connections: u32,
        max: Duration,
    ) -> anyhow::Result<Wrk> {
        let mut cmd = Command::new("wrk");
        cmd.args(["--threads", "1"])
            .args(["--connections", &connections.to_string()])
            .args(["--duration", &format!("{}s", max.as_secs().max(1))])
            // Above a SYN retransmit (1 s), so that a connection that waits for one is counted
            // as slow by the latency, not as a timeout; as long again as every wait on a slower
            // machine (whole seconds: wrk's unit).
            .args([
                "--timeout",
                &format!("{}s", scaled(Duration::from_secs(5)).as_secs()),
            ])
            // wrk keeps connections alive; this makes the server close each one after its
            // answer, and wrk then opens a new connection for the next request.
            .args(["-H", "Connection: close"])
            .arg(format!("http://{addr}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ns.command(&mut cmd);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting wrk (is it installed?)")?;
        Ok(Wrk { child })
    }

    /// Stops wrk (SIGINT, on which it prints its report as at the end of its duration) and
    /// parses its report.
    pub fn finish(self) -> anyhow::Result<WrkReport> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        WrkReport::parse(&text).with_context(|| {
            format!(
                "wrk's report ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// wrk's totals, from its report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrkReport {
    /// Answers read completely, whatever their status.
    pub requests: u64,
    /// `Socket errors: connect N, read N, write N, timeout N` (the line is absent when all are
    /// 0). A read error is a reset, or a connection closed before a complete answer.
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// `Non-2xx or 3xx responses: N`: answers with a status of 400 or more.
    pub non_2xx_3xx: u64,
    /// The `Max` column of the `Latency` line.
    pub latency_max: Duration,
}

impl WrkReport {
    pub fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }

    /// Requests that did not get a timely 2xx or 3xx answer, as wrk sees them.
    pub fn failures(&self) -> u64 {
        self.socket_errors() + self.non_2xx_3xx
    }

    pub fn parse(text: &str) -> anyhow::Result<WrkReport> {
        let mut r = WrkReport::default();
        let mut seen = false;
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [n, "requests", "in", ..] = words[..] {
                r.requests = n.parse().context("requests")?;
                seen = true;
            } else if let ["Latency", _avg, _stdev, max, ..] = words[..] {
                r.latency_max = parse_wrk_duration(max)?;
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for item in rest.split(',') {
                    let (name, n) = item
                        .trim()
                        .split_once(' ')
                        .context("a socket error count")?;
                    let n: u64 = n.trim().parse().context("socket errors")?;
                    match name {
                        "connect" => r.connect = n,
                        "read" => r.read = n,
                        "write" => r.write = n,
                        "timeout" => r.timeout = n,
                        other => anyhow::bail!("unknown socket error kind {other:?}"),
                    }
                }
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx_3xx = n.trim().parse().context("non-2xx")?;
            }
        }
        anyhow::ensure!(seen, "no `N requests in` line");
        Ok(r)
    }
}

/// wrk's durations: `351.07us`, `8.43ms`, `1.02s`, `1.50m`.
fn parse_wrk_duration(s: &str) -> anyhow::Result<Duration> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("duration {s:?}"))?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("duration {s:?}"))?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => anyhow::bail!("duration {s:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_reports_with_and_without_errors() {
        // spaces: wrk's own report, as it prints it.
        let clean = "Running 20s test @ http://127.0.0.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   351.07us  200.05us   8.43ms   93.67%
    Req/Sec    10.42k     1.10k   12.06k    70.00%
  51839 requests in 5.00s, 9.64MB read
Requests/sec:  10367.03
Transfer/sec:      1.93MB
";
        let r = WrkReport::parse(clean).unwrap();
        assert_eq!(r.requests, 51839);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.latency_max, Duration::from_micros(8430));
        let failing = format!(
            // spaces: wrk's own report, as it prints it.
            "{}  Socket errors: connect 1, read 12, write 2, timeout 3\n  Non-2xx or 3xx responses: 7\n",
            clean.replace("8.43ms", "1.02s")
        );
        let r = WrkReport::parse(&failing).unwrap();
        assert_eq!(
            (r.connect, r.read, r.write, r.timeout, r.non_2xx_3xx),
            (1, 12, 2, 3, 7)
        );
        assert_eq!((r.socket_errors(), r.failures()), (18, 25));
        assert_eq!(r.latency_max, Duration::from_millis(1020));
        assert!(WrkReport::parse("unable to connect to 127.0.0.1:8080").is_err());
    }
}
