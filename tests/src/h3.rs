//! HTTP/3 servers and clients for the UDP suite, from the venv setup makes (hypercorn and aioquic
//! from PyPI, $ZDT_QUIC_VENV): the fixtures tests/fixtures/zdt_h3_*.py.
use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    harness::{bin, Proc},
    load::scaled,
    netns::Netns,
};

/// The venv with hypercorn and aioquic.
pub fn venv() -> PathBuf {
    std::env::var_os("ZDT_QUIC_VENV")
        .map(PathBuf::from)
        .expect("ZDT_QUIC_VENV is unset: run this suite with `cargo xtask test --suite udp`")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A self-signed certificate and its key for `localhost`, in `dir`.
pub fn certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl")?;
    anyhow::ensure!(out.status.success(), "openssl req failed: {out:?}");
    Ok((cert, key))
}

/// hypercorn's --graceful-timeout here: for the requests in flight at SIGTERM.
pub const HYPERCORN_GRACE: Duration = Duration::from_secs(1);

/// Which HTTP/3 server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// hypercorn with aioquic, on the UDP socket `zdt-ctl exec --listen :PORT/udp` passes. After
    /// SIGTERM (hypercorn 0.18) it takes no new connection, answers no new request on the ones
    /// it has, finishes those in flight, and exits at its --graceful-timeout without closing its
    /// connections (no GOAWAY, no CONNECTION_CLOSE): SIGTERM must wait until they are idle.
    Hypercorn,
    /// zdt_h3_server.py: aioquic alone, on a SO_REUSEPORT socket it makes itself.
    Aioquic,
}

/// One HTTP/3 server process.
pub struct H3 {
    pub process: Proc,
    /// Its admin port (/readyz over plain HTTP/1.1).
    pub admin: u16,
}

impl H3 {
    /// Starts `server` on UDP `port`, warming up for `warmup`, its admin port `admin` (any
    /// port: each test has a namespace of its own), and waits until its admin port answers.
    pub fn start(
        ns: &Netns,
        server: Server,
        port: u16,
        admin: u16,
        warmup: Duration,
        (cert, key): (&Path, &Path),
    ) -> anyhow::Result<H3> {
        let venv = venv();
        let mut cmd = match server {
            Server::Hypercorn => {
                let mut c = Command::new(bin("zdt-ctl"));
                c.args(["exec", "--listen", &format!(":{port}/udp"), "--"])
                    .arg(venv.join("bin/hypercorn"))
                    .args(["--quic-bind", "fd://3", "--workers", "0"])
                    // The TLS TCP port hypercorn binds beside (unused here), and the admin port.
                    .args(["--bind", &format!("127.0.0.1:{}", admin + 1000)])
                    .args(["--insecure-bind", &format!("127.0.0.1:{admin}")])
                    .args(["--graceful-timeout", &HYPERCORN_GRACE.as_secs().to_string()])
                    .arg("--certfile")
                    .arg(cert)
                    .arg("--keyfile")
                    .arg(key)
                    .arg("zdt_h3_app:app")
                    .env("PYTHONPATH", fixtures());
                c
            }
            Server::Aioquic => {
                let mut c = Command::new(venv.join("bin/python3"));
                c.arg(fixtures().join("zdt_h3_server.py"))
                    .args(["--port", &port.to_string(), "--admin", &admin.to_string()])
                    .args(["--warmup-ms", &warmup.as_millis().to_string()])
                    .arg("--cert")
                    .arg(cert)
                    .arg("--key")
                    .arg(key);
                c
            }
        };
        cmd.env("ZDT_WARMUP_MS", warmup.as_millis().to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ns.command(&mut cmd);
        let child = cmd.spawn().context("starting an HTTP/3 server")?;
        let h3 = H3 {
            process: Proc::new(child),
            admin,
        };
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while ns
            .run(move || crate::harness::http_status(addr, "/readyz", Duration::from_secs(1)))?
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{server:?} on {port}: no admin port"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(h3)
    }

    pub fn readyz(&self) -> String {
        format!("http://127.0.0.1:{}/readyz", self.admin)
    }
}

impl std::ops::Deref for H3 {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.process
    }
}

impl std::ops::DerefMut for H3 {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.process
    }
}

/// What the HTTP/3 clients saw (zdt_h3_client.py's summary).
#[derive(Debug, Default, serde::Deserialize)]
pub struct H3Tally {
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub warming: u64,
    pub moved: u64,
    pub stalls: u64,
    pub slowest_ms: f64,
    pub byes: u64,
    pub closed: u64,
    pub cut: u64,
    /// [opened (unix ms), pid, its local port] of every connection that got an answer.
    pub connections: Vec<(u64, i32, u16)>,
}

impl H3Tally {
    /// Requests that failed or stalled, or reached a process that was not ready or not theirs.
    pub fn bad(&self) -> u64 {
        self.failed + self.warming + self.moved + self.stalls
    }
}

/// The running HTTP/3 load: `connections` long-lived connections, a request every 100 ms each,
/// and new connections arriving at `new_per_s`.
pub struct H3Load {
    child: Child,
    answered: Arc<AtomicU64>,
    summary: std::sync::mpsc::Receiver<String>,
}

impl H3Load {
    /// `lifetime`: how long each long-lived connection lives (None: until the server tells it
    /// to move on or closes it).
    pub fn start(
        ns: &Netns,
        port: u16,
        connections: u32,
        new_per_s: f64,
        lifetime: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(venv().join("bin/python3"));
        cmd.arg(fixtures().join("zdt_h3_client.py"))
            .args(["--port", &port.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--new-per-s", &new_per_s.to_string()])
            .args(["--interval-ms", "100"])
            .args([
                "--lifetime-s",
                &lifetime.map_or(0.0, |d| d.as_secs_f64()).to_string(),
            ])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        ns.command(&mut cmd);
        let mut child = cmd.spawn().context("starting zdt_h3_client.py")?;
        let stdout = child.stdout.take().expect("piped");
        let answered = Arc::new(AtomicU64::new(0));
        let (tx, summary) = std::sync::mpsc::channel();
        let count = answered.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                match line.strip_prefix("answered=") {
                    Some(n) => count.store(n.parse().unwrap_or(0), Ordering::Relaxed),
                    None => {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        Ok(H3Load {
            child,
            answered,
            summary,
        })
    }

    /// Waits until `n` more requests were answered (bounded by a scaled 20 s).
    pub fn see(&self, n: u64) {
        let start = self.answered.load(Ordering::Relaxed);
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        while self.answered.load(Ordering::Relaxed) < start + n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) -> anyhow::Result<H3Tally> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let line = self
            .summary
            .recv_timeout(scaled(Duration::from_secs(20)))
            .context("zdt_h3_client.py printed no summary")?;
        let _ = self.child.wait();
        serde_json::from_str(&line).with_context(|| format!("zdt_h3_client.py's summary: {line}"))
    }
}
