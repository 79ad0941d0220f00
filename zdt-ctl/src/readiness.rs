//! Asking a process's readiness endpoint (`/readyz`): waiting for 200 before a switch, and
//! watching it during probation after one.
use std::time::{Duration, Instant};

use crate::error::{bad_input, err, Kind};

/// How often the URL is asked, and how long one answer may take.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks a readiness URL before anything is waited for, so a typo fails at once.
pub fn check_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        bad_input(format!(
            "invalid readiness URL {url:?}: {e}; write it like http://127.0.0.1:8081/readyz"
        ))
    })?;
    if parsed.scheme() != "http" {
        return Err(bad_input(format!(
            "invalid readiness URL {url:?}: only http:// is supported (the readiness endpoint is \
             an internal per-instance port)"
        )));
    }
    Ok(parsed)
}

/// Asks a readiness URL, one request at a time. The status code alone decides: redirects are
/// not followed, bodies are not read, anything but 200 (or no answer) is "not ready".
pub struct Prober {
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Prober {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Prober {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(REQUEST_TIMEOUT)
                .no_proxy()
                .build()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Ok(()) for 200; otherwise what was seen, for messages.
    pub fn probe(&self, url: &reqwest::Url, limit: Duration) -> Result<(), String> {
        // send() registers its timeout with the runtime's timer: call it inside the runtime.
        let answer = self.rt.block_on(async {
            tokio::time::timeout(
                limit.min(REQUEST_TIMEOUT),
                self.client.get(url.clone()).send(),
            )
            .await
        });
        match answer {
            Ok(Ok(resp)) if resp.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(Ok(resp)) => Err(resp.status().as_u16().to_string()),
            Ok(Err(e)) if e.is_connect() => Err("connection refused".into()),
            Ok(Err(e)) if e.is_timeout() => Err("no answer within 1s".into()),
            Ok(Err(e)) => Err(format!("error: {e}")),
            Err(_) => Err("no answer within 1s".into()),
        }
    }
}

/// Asks `PATH` through the public port, from one of the source ports the program reserves for
/// probes: the program sends such a connection to the candidate and to no other process. Plain
/// HTTP/1.1 on a socket of [`probe_socket`] (an HTTP library would make its own socket).
pub struct PortProber {
    target: std::net::SocketAddr,
    path: String,
}

/// A TCP socket for `target`'s family, bound to loopback (any port) and marked with
/// [`zdt_common::PROBE_MSS`] (TCP_MAXSEG): the program recognizes zdt-ctl's own connections by
/// both (see zdt-ebpf, is_zdt_probe).
pub fn probe_socket(target: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    let ip: std::net::IpAddr = match target {
        std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_tcp_mss(u32::from(zdt_common::PROBE_MSS))?;
    s.bind(&std::net::SocketAddr::new(ip, 0).into())?;
    Ok(s)
}

impl PortProber {
    pub fn new(target: std::net::SocketAddr, path: &str) -> Self {
        PortProber {
            target,
            path: path.to_string(),
        }
    }

    pub fn probe(&self, limit: Duration) -> Result<(), String> {
        use std::io::{Read, Write};
        let limit = limit.min(REQUEST_TIMEOUT).max(Duration::from_millis(10));
        let answer = (|| -> std::io::Result<Vec<u8>> {
            let s = probe_socket(self.target)?;
            s.connect_timeout(&self.target.into(), limit)?;
            let mut s: std::net::TcpStream = s.into();
            s.set_read_timeout(Some(limit))?;
            write!(
                s,
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.path, self.target
            )?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            Ok(buf)
        })();
        match answer {
            Ok(buf) => {
                let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
                match head.split_whitespace().nth(1) {
                    Some("200") => Ok(()),
                    Some(code) if head.starts_with("HTTP/") => Err(code.to_string()),
                    _ => Err("error: not an HTTP answer".into()),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err("connection refused".into())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Err("no answer within 1s".into())
            }
            Err(e) => Err(format!("error: {e}")),
        }
    }
}

/// Polls `url` until it answers 200, for at most `timeout`. `alive` is asked between polls, so
/// a process that dies while warming fails the wait at once. `progress` sees every answer.
pub fn wait_ready(
    url: &reqwest::Url,
    timeout: Duration,
    alive: impl Fn() -> bool,
    progress: impl FnMut(Duration, &str),
) -> anyhow::Result<Duration> {
    let prober = Prober::new()?;
    wait_until(
        url.as_ref(),
        timeout,
        alive,
        |limit| prober.probe(url, limit),
        progress,
    )
}

/// The polling loop of [`wait_ready`], for any probe (`what` names it in messages).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    alive: impl Fn() -> bool,
    probe: impl Fn(Duration) -> Result<(), String>,
    mut progress: impl FnMut(Duration, &str),
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if !alive() {
            return Err(err(
                Kind::ProcessDied,
                "the process exited while zdt was waiting for it to become ready; nothing was changed",
            ));
        }
        let remaining = timeout.saturating_sub(start.elapsed());
        let last = match probe(remaining) {
            Ok(()) => {
                progress(start.elapsed(), "200");
                return Ok(start.elapsed());
            }
            Err(last) => last,
        };
        progress(start.elapsed(), &last);
        if start.elapsed() + POLL_INTERVAL >= timeout {
            return Err(err(
                Kind::ReadinessTimeout,
                format!(
                    "{what} did not answer 200 within {} (last answer: {last}); nothing was changed. \
                     Raise --timeout if the service warms up slower.",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
