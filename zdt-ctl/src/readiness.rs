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

/// The addresses a readiness URL's host names, with the URL's port: what its probes connect to
/// (see [`Prober`]), and so what the owner check covers (`sockets::check_url_owner`).
/// `localhost` names both loopback addresses (RFC 6761), whatever /etc/hosts says; another name
/// is resolved once, here, so that a probe never reaches an address that was not checked.
pub fn addresses(url: &reqwest::Url) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
    let port = url.port_or_known_default().unwrap_or(80);
    let host = url.host_str().unwrap_or_default();
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        ]);
    }
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            bad_input(format!(
                "readiness URL {url}: {host:?} does not resolve ({e}); write an address, e.g. \
                 http://127.0.0.1:8081/readyz"
            ))
        })?
        .collect();
    addrs.dedup();
    Ok(addrs)
}

/// Asks one readiness URL, one request at a time, on the addresses of [`addresses`] and no
/// others. The status code alone decides: redirects are not followed, bodies are not read,
/// anything but 200 (or no answer) is "not ready".
pub struct Prober {
    pub url: reqwest::Url,
    /// Where the probes connect.
    pub addrs: Vec<std::net::SocketAddr>,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Prober {
    pub fn new(url: &reqwest::Url) -> anyhow::Result<Self> {
        let addrs = addresses(url)?;
        let mut client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .no_proxy();
        // A name connects to the addresses resolved above (and checked), not to what a later
        // lookup might say. An address is used as it is.
        if let Some(host) = url.host_str().filter(|h| !h.starts_with('[')) {
            if host.parse::<std::net::IpAddr>().is_err() {
                client = client.resolve_to_addrs(host, &addrs);
            }
        }
        Ok(Prober {
            url: url.clone(),
            addrs,
            client: client.build()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    pub fn probe(&self, limit: Duration) -> Answer {
        // send() registers its timeout with the runtime's timer: call it inside the runtime.
        let answer = self.rt.block_on(async {
            tokio::time::timeout(
                limit.min(REQUEST_TIMEOUT),
                self.client.get(self.url.clone()).send(),
            )
            .await
        });
        match answer {
            Ok(Ok(resp)) if resp.status() == reqwest::StatusCode::OK => Answer::Ready,
            Ok(Ok(resp)) => Answer::Status(resp.status().as_u16()),
            Ok(Err(e)) if e.is_connect() => Answer::Refused,
            Ok(Err(e)) if e.is_timeout() => Answer::Timeout,
            Ok(Err(e)) => Answer::Error(e.to_string()),
            Err(_) => Answer::Timeout,
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

    pub fn probe(&self, limit: Duration) -> Answer {
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
                match head.split_whitespace().nth(1).map(str::parse::<u16>) {
                    Some(Ok(200)) if head.starts_with("HTTP/") => Answer::Ready,
                    Some(Ok(code)) if head.starts_with("HTTP/") => Answer::Status(code),
                    _ => Answer::NotHttp,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Answer::Refused,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Answer::Timeout
            }
            Err(e) => Answer::Error(e.to_string()),
        }
    }
}

/// What one readiness probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// HTTP 200: ready.
    Ready,
    /// Another HTTP status.
    Status(u16),
    /// Nothing listens on the address.
    Refused,
    /// No answer within the probe's time limit.
    Timeout,
    /// Something answered, not with HTTP.
    NotHttp,
    /// Any other failure, as the system or the HTTP client said it.
    Error(String),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Ready => f.write_str("200"),
            Answer::Status(code) => write!(f, "{code}"),
            Answer::Refused => f.write_str("connection refused"),
            Answer::Timeout => f.write_str("no answer within 1s"),
            Answer::NotHttp => f.write_str("error: not an HTTP answer"),
            Answer::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// The error of a wait whose process exited.
pub fn exited_while_waiting() -> anyhow::Error {
    err(
        Kind::ProcessDied,
        "the process exited while zdt was waiting for it to become ready; nothing was changed",
    )
}

/// Polls `probe` until it answers 200, for at most `timeout` (`what` names it in messages).
/// `check` runs before every probe and again after the 200 that ends the wait: its error ends
/// the wait at once (the process exited, the URL is not its own any more). `progress` sees
/// every answer.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    check: impl Fn() -> anyhow::Result<()>,
    probe: impl Fn(Duration) -> Answer,
    mut progress: impl FnMut(Duration, &Answer),
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    // What the message reports: the last answer, unless the deadline cut that probe short and
    // it timed out, which says nothing about the service (its answer may have been on its way);
    // then the answer before it.
    let mut reported: Option<Answer> = None;
    loop {
        check()?;
        let remaining = timeout.saturating_sub(start.elapsed());
        let last = probe(remaining);
        if !(remaining < REQUEST_TIMEOUT && last == Answer::Timeout && reported.is_some()) {
            reported = Some(last.clone());
        }
        if last == Answer::Ready {
            // The 200 counts only if what answered it was still the process's own.
            check()?;
            progress(start.elapsed(), &last);
            return Ok(start.elapsed());
        }
        progress(start.elapsed(), &last);
        if start.elapsed() + POLL_INTERVAL >= timeout {
            return Err(err(
                Kind::ReadinessTimeout,
                format!(
                    "{what} did not answer 200 within {} (last answer: {}); nothing was changed. \
                     Raise --timeout if the service warms up slower.",
                    humantime::format_duration(timeout),
                    reported.as_ref().unwrap_or(&last)
                ),
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that answers garbage at once, probed until a deadline: the probes that the
    /// deadline cuts short time out (as they would on a machine slow enough that the garbage
    /// takes longer than what is left), and the message must still report the garbage.
    #[test]
    fn a_probe_cut_short_by_the_deadline_does_not_hide_the_last_real_answer() {
        let e = wait_until(
            "http://127.0.0.1:1/readyz",
            Duration::from_millis(1500),
            || Ok(()),
            |limit| {
                if limit < REQUEST_TIMEOUT {
                    Answer::Timeout
                } else {
                    Answer::NotHttp
                }
            },
            |_, _| {},
        )
        .expect_err("never 200");
        let text = format!("{e:#}");
        assert!(
            text.contains("last answer: error: not an HTTP answer"),
            "{text}"
        );
        // A service that never answers is still reported as such.
        let e = wait_until(
            "http://127.0.0.1:1/readyz",
            Duration::from_millis(300),
            || Ok(()),
            |_| Answer::Timeout,
            |_, _| {},
        )
        .expect_err("never 200");
        assert!(format!("{e:#}").contains("last answer: no answer within 1s"));
    }
}
