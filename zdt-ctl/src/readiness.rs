//! Asking a process's readiness endpoint (`/readyz`): waiting for 200 before a switch, and
//! watching it during probation after one.
use std::time::{Duration, Instant};

use crate::{
    addr::fmt_duration,
    error::{bad_input, err, Kind},
};

/// How often the URL is asked, and how long one answer may take.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks a readiness URL before anything is waited for, so a typo fails at once.
pub fn check_url(url: &str) -> anyhow::Result<reqwest::Url> {
    // The URL standard reads `http:///readyz` as the host "readyz" (a special scheme skips
    // extra slashes): a missing host would then fail as a name that does not resolve.
    if url
        .split_once("://")
        .is_some_and(|(_, rest)| rest.is_empty() || rest.starts_with(['/', '?', '#']))
    {
        return Err(bad_input(format!(
            "invalid readiness URL {url:?}: it has no host; write it like \
             http://127.0.0.1:8081/readyz"
        )));
    }
    let mut parsed = reqwest::Url::parse(url).map_err(|e| {
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
    if parsed.port() == Some(0) {
        return Err(bad_input(format!(
            "invalid readiness URL {url:?}: port 0 is no port a server listens on; give the \
             instance's readiness port"
        )));
    }
    // An address literal is probed, and owner-checked, as the address the kernel connects to.
    if let Some(ip) = literal_ip(&parsed) {
        let to = connected_ip(ip);
        if to != ip {
            parsed
                .set_ip_host(to)
                .map_err(|()| bad_input(format!("invalid readiness URL {url:?}")))?;
        }
    }
    Ok(parsed)
}

/// The URL's host if it is an address literal.
fn literal_ip(url: &reqwest::Url) -> Option<std::net::IpAddr> {
    match url.host()? {
        url::Host::Ipv4(a) => Some(a.into()),
        url::Host::Ipv6(a) => Some(a.into()),
        url::Host::Domain(_) => None,
    }
}

/// The address a TCP connect to `ip` reaches. Kernel contract: a v4-mapped IPv6 address is an
/// IPv4 connection (tcp_v6_connect hands it to tcp_v4_connect), an unspecified destination is
/// the loopback address of its family (ip_route_output_key_hash_rcu sets 0.0.0.0 to
/// 127.0.0.1; tcp_v6_connect sets :: to ::1). The owner check must look at the listeners of
/// that address: compared literally, `0.0.0.0` or `::ffff:127.0.0.1` matched no listener, and
/// another process's admin port passed for the new one's.
pub fn connected_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    }
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
    if let Some(ip) = literal_ip(url) {
        return Ok(vec![SocketAddr::new(connected_ip(ip), port)]);
    }
    let mut addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            bad_input(format!(
                "readiness URL {url}: {host:?} does not resolve ({e}); write an address, e.g. \
                 http://127.0.0.1:8081/readyz"
            ))
        })?
        .map(|a: SocketAddr| SocketAddr::new(connected_ip(a.ip()), a.port()))
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
        let limit = probe_limit(limit);
        // One deadline for the whole exchange, the body included: a server that trickles its
        // answer must not hold the command past its --timeout. The body is read (up to
        // MAX_BODY) so that the connection never closes with unread data, which makes the
        // kernel answer the app with a RST.
        let answer = self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let mut resp = self.client.get(self.url.clone()).send().await?;
                let status = resp.status();
                let mut read = 0;
                while let Some(chunk) = resp.chunk().await? {
                    read += chunk.len();
                    if read > MAX_BODY {
                        break;
                    }
                }
                Ok::<_, reqwest::Error>(status)
            })
            .await
        });
        match answer {
            Ok(Ok(reqwest::StatusCode::OK)) => Answer::Ready,
            Ok(Ok(status)) => Answer::Status(status.as_u16()),
            Ok(Err(e)) if e.is_connect() => Answer::Refused,
            Ok(Err(e)) if e.is_timeout() => Answer::Timeout(limit),
            Ok(Err(e)) => Answer::Error(e.to_string()),
            Err(_) => Answer::Timeout(limit),
        }
    }
}

/// The most of a readiness answer's body that is read (and thrown away).
const MAX_BODY: usize = 64 * 1024;

/// How long one probe may take when `left` remains of the wait: at most [`REQUEST_TIMEOUT`],
/// and at least 10 ms, so that a last probe can still be answered.
fn probe_limit(left: Duration) -> Duration {
    left.min(REQUEST_TIMEOUT).max(Duration::from_millis(10))
}

/// Asks `PATH` through the public port as one of zdt-ctl's own connections ([`probe_socket`]):
/// the program sends it to the candidate (the probe lists) and to no other process. Plain
/// HTTP/1.1 on that socket (an HTTP library would make its own socket).
pub struct PortProber {
    target: std::net::SocketAddr,
    path: String,
    /// The port's state directory, whose ZDT_PROBES the connection's source is written to;
    /// None for an unmarked connection (tests without a state).
    state: Option<std::path::PathBuf>,
}

/// The source of one of zdt-ctl's own connections, in the port's ZDT_PROBES for as long as this
/// lives (see [`zdt_common::ProbeKey`]); deleted on drop. An entry left by a killed zdt-ctl is
/// removed by the next command that takes the lock (`settle::settle`).
pub struct ProbeMark {
    map: ProbesMap,
    key: zdt_common::ProbeKey,
}

impl Drop for ProbeMark {
    fn drop(&mut self) {
        let _ = self.map.remove(&self.key);
    }
}

/// The [`zdt_common::ProbeKey`] of a connection from `local`.
pub fn probe_key(local: std::net::SocketAddr) -> zdt_common::ProbeKey {
    let mut key = zdt_common::ProbeKey {
        port: local.port(),
        ..Default::default()
    };
    match local.ip() {
        std::net::IpAddr::V4(ip) => {
            key.family = zdt_common::AF_INET as u16;
            key.addr[..4].copy_from_slice(&ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            key.family = zdt_common::AF_INET6 as u16;
            key.addr = ip.octets();
        }
    }
    key
}

/// A TCP socket for `target`'s family, bound to loopback (any port), with the MSS
/// [`zdt_common::PROBE_MSS`] (TCP_MAXSEG), and its source written to the ZDT_PROBES of the
/// state in `state` with `kind` (`PROBE_CANDIDATE`, `PROBE_REFUSE`): the program knows it as
/// zdt-ctl's by both (see zdt-ebpf, zdt_probe). Not SO_REUSEADDR: while it is bound, no other
/// socket can take its address and port and pass for it.
pub fn probe_socket(
    target: std::net::SocketAddr,
    state: Option<&std::path::Path>,
    kind: u32,
) -> std::io::Result<(socket2::Socket, Option<ProbeMark>)> {
    probe_socket_of(crate::addr::Proto::Tcp, target, state, kind)
}

/// [`probe_socket`] of `proto`: a UDP one is known by its source alone, for the empty
/// datagrams it sends (zdt-ebpf, select_udp).
pub fn probe_socket_of(
    proto: crate::addr::Proto,
    target: std::net::SocketAddr,
    state: Option<&std::path::Path>,
    kind: u32,
) -> std::io::Result<(socket2::Socket, Option<ProbeMark>)> {
    let ip: std::net::IpAddr = match target {
        std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    let kind_of_socket = match proto {
        crate::addr::Proto::Tcp => socket2::Type::STREAM,
        crate::addr::Proto::Udp => socket2::Type::DGRAM,
    };
    let s = socket2::Socket::new(socket2::Domain::for_address(target), kind_of_socket, None)?;
    if proto == crate::addr::Proto::Tcp {
        s.set_tcp_mss(u32::from(zdt_common::PROBE_MSS))?;
    }
    s.bind(&std::net::SocketAddr::new(ip, 0).into())?;
    let Some(dir) = state else {
        return Ok((s, None));
    };
    let local = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("a probe socket without an address"))?;
    let key = probe_key(local);
    let value = zdt_common::ProbeValue {
        kind,
        pid: std::process::id(),
    };
    let mark = ProbeMark::write(dir, key, value)
        .map_err(|e| std::io::Error::other(format!("marking a probe connection: {e:#}")))?;
    Ok((s, Some(mark)))
}

/// The ZDT_PROBES map of a port's state.
pub type ProbesMap =
    aya::maps::HashMap<aya::maps::MapData, zdt_common::ProbeKey, zdt_common::ProbeValue>;

/// The ZDT_PROBES of the state in `dir`; None for a state made by a build before it (which
/// every command but `upgrade` refuses).
pub fn probes_map(dir: &std::path::Path) -> anyhow::Result<Option<ProbesMap>> {
    use anyhow::Context as _;
    let path = dir.join(zdt_common::names::PROBES);
    if !path.exists() {
        return Ok(None);
    }
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Some(aya::maps::Map::HashMap(data).try_into()?))
}

impl ProbeMark {
    /// Writes `key` -> `value` into the ZDT_PROBES of the state in `dir`, until dropped.
    pub fn write(
        dir: &std::path::Path,
        key: zdt_common::ProbeKey,
        value: zdt_common::ProbeValue,
    ) -> anyhow::Result<ProbeMark> {
        use anyhow::Context as _;
        let mut map = probes_map(dir)?.context("the port's state has no ZDT_PROBES")?;
        map.insert(key, value, 0)?;
        Ok(ProbeMark { map, key })
    }
}

impl PortProber {
    pub fn new(target: std::net::SocketAddr, path: &str) -> Self {
        PortProber {
            target,
            path: path.to_string(),
            state: None,
        }
    }

    /// Its connections marked in the ZDT_PROBES of the state in `dir`.
    pub fn marked(mut self, dir: &std::path::Path) -> Self {
        self.state = Some(dir.to_path_buf());
        self
    }

    pub fn probe(&self, limit: Duration) -> Answer {
        use std::io::{Read, Write};
        let limit = probe_limit(limit);
        let deadline = Instant::now() + limit;
        // Each step gets what is left of one deadline: a server that trickles its answer a
        // byte at a time must not hold the command (and the lock) past its --timeout.
        let left = || {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            } else {
                Ok(d)
            }
        };
        let answer = (|| -> std::io::Result<Vec<u8>> {
            let (s, _mark) = probe_socket(
                self.target,
                self.state.as_deref(),
                zdt_common::PROBE_CANDIDATE,
            )?;
            s.connect_timeout(&self.target.into(), left()?)?;
            let mut s: std::net::TcpStream = s.into();
            s.set_write_timeout(Some(left()?))?;
            write!(
                s,
                "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.path, self.target
            )?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while buf.len() <= MAX_BODY {
                s.set_read_timeout(Some(left()?))?;
                match s.read(&mut chunk)? {
                    0 => break,
                    n => buf.extend_from_slice(&chunk[..n]),
                }
            }
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
                Answer::Timeout(limit)
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
    /// No whole answer within the probe's time limit (this long).
    Timeout(Duration),
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
            Answer::Timeout(limit) => write!(f, "no answer within {}", fmt_duration(*limit)),
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
        let cut_short = remaining < REQUEST_TIMEOUT && matches!(last, Answer::Timeout(_));
        if !(cut_short && reported.is_some()) {
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
                    fmt_duration(timeout),
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

    #[test]
    fn an_address_literal_is_checked_and_probed_as_the_address_connect_reaches() {
        for (given, probed) in [
            ("http://0.0.0.0:9001/readyz", "127.0.0.1:9001"),
            ("http://[::]:9001/readyz", "[::1]:9001"),
            ("http://[::ffff:127.0.0.1]:9001/readyz", "127.0.0.1:9001"),
            ("http://[::ffff:0.0.0.0]:9001/readyz", "127.0.0.1:9001"),
            ("http://127.0.0.2:9001/readyz", "127.0.0.2:9001"),
            ("http://[::1]:9001/readyz", "[::1]:9001"),
        ] {
            let url = check_url(given).unwrap();
            let addrs: Vec<String> = addresses(&url)
                .unwrap()
                .iter()
                .map(|a| a.to_string())
                .collect();
            assert_eq!(addrs, [probed], "{given}");
            assert_eq!(url.path(), "/readyz", "{given}");
        }
    }

    #[test]
    fn a_url_without_a_host_is_bad_input_naming_it() {
        for url in [
            "http:///readyz",
            "http://",
            "http://?x",
            "ftp://h/x",
            "nonsense",
            "http://127.0.0.1:0/readyz",
        ] {
            let e = check_url(url).unwrap_err();
            assert_eq!(crate::error::kind_of(&e), Kind::BadInput, "{url}");
            assert!(e.to_string().contains(&format!("{url:?}")), "{url}: {e}");
        }
    }

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
                    Answer::Timeout(limit)
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
            |limit| Answer::Timeout(probe_limit(limit)),
            |_, _| {},
        )
        .expect_err("never 200");
        let text = format!("{e:#}");
        // The probe's own limit, to the millisecond: what was left of a 300 ms wait, not 1 s.
        let limit = text
            .split("last answer: no answer within ")
            .nth(1)
            .and_then(|t| t.split("ms)").next())
            .and_then(|ms| ms.parse::<u64>().ok());
        assert!(limit.is_some_and(|ms| ms <= 300), "{text}");
        assert!(text.contains("within 300ms (last"), "{text}");
    }

    /// A server on loopback that answers a status line one byte every `gap`; returns its
    /// address and how long the whole answer takes it.
    fn trickler(gap: Duration) -> (std::net::SocketAddr, Duration) {
        use std::io::{Read as _, Write as _};
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut c = c;
                let _ = c.read(&mut [0u8; 1024]);
                for b in ANSWER {
                    if c.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(gap);
                }
            }
        });
        (addr, gap * ANSWER.len() as u32)
    }

    #[test]
    fn a_trickled_answer_ends_at_the_probes_deadline() {
        let (addr, whole) = trickler(Duration::from_millis(100));
        let limit = Duration::from_millis(300);
        let t = Instant::now();
        let a = PortProber::new(addr, "/readyz").probe(limit);
        let port = t.elapsed();
        assert_eq!(a, Answer::Timeout(limit));
        let url = check_url(&format!("http://{addr}/readyz")).unwrap();
        let t = Instant::now();
        let a = Prober::new(&url).unwrap().probe(limit);
        let http = t.elapsed();
        assert_eq!(a, Answer::Timeout(limit));
        // Ended by the deadline, not by the answer: well before the trickle would have ended.
        assert!(
            port < whole / 4 && http < whole / 4,
            "{port:?} {http:?} {whole:?}"
        );
    }
}
