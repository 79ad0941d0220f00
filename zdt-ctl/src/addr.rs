//! The `[ADDR]:PORT` argument and durations, parsed with errors that name the input.
use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use crate::error::bad_input;

/// The transport of a port: its sockets, its reuseport group and zdt's state for it are the
/// protocol's own (TCP port 443 and UDP port 443 are two ports to the kernel and to zdt).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    /// The suffix that names it after a port: none for TCP, `/udp` for UDP.
    pub fn suffix(self) -> &'static str {
        match self {
            Proto::Tcp => "",
            Proto::Udp => "/udp",
        }
    }

    /// The steering program of a port of this protocol.
    pub fn program(self) -> &'static str {
        match self {
            Proto::Tcp => zdt_common::names::PROGRAM,
            Proto::Udp => zdt_common::names::PROGRAM_UDP,
        }
    }

    /// "TCP" or "UDP", for messages.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// A port as zdt keeps state for it: its number and protocol. Written `443` (TCP) or
/// `443/udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    pub number: u16,
    pub proto: Proto,
}

impl Port {
    pub fn tcp(number: u16) -> Self {
        Port {
            number,
            proto: Proto::Tcp,
        }
    }

    pub fn udp(number: u16) -> Self {
        Port {
            number,
            proto: Proto::Udp,
        }
    }

    /// The name of its state directory: `443`, `443-udp` (no `/` in a file name).
    pub fn dir_name(self) -> String {
        match self.proto {
            Proto::Tcp => self.number.to_string(),
            Proto::Udp => format!("{}-udp", self.number),
        }
    }

    /// The port a state directory's name stands for.
    pub fn from_dir_name(name: &str) -> Option<Self> {
        match name.strip_suffix("-udp") {
            Some(n) => n.parse().ok().filter(|&n| n != 0).map(Port::udp),
            None => name.parse().ok().filter(|&n| n != 0).map(Port::tcp),
        }
    }
}

/// A port number alone is a TCP port, as everywhere before UDP ports existed.
impl From<u16> for Port {
    fn from(number: u16) -> Self {
        Port::tcp(number)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.number, self.proto.suffix())
    }
}

/// Which sockets of a port zdt manages: `:80` means the wildcard listeners (0.0.0.0 and/or
/// [::]), `127.0.0.1:8080` or `[::1]:80` the listeners bound to that address; a `/udp` suffix
/// (`:443/udp`) the UDP sockets bound there instead of the TCP listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub proto: Proto,
}

const FORMS: &str = "expected [ADDR]:PORT[/udp], e.g. :80, 127.0.0.1:8080, [::]:80 or :443/udp";

/// Splits a `/udp` or `/tcp` suffix off `s`.
fn split_proto(s: &str) -> anyhow::Result<(&str, Proto)> {
    match s.rsplit_once('/') {
        None => Ok((s, Proto::Tcp)),
        Some((rest, "udp")) => Ok((rest, Proto::Udp)),
        Some((rest, "tcp")) => Ok((rest, Proto::Tcp)),
        Some((_, other)) => Err(bad_input(format!(
            "invalid address {s:?}: unknown protocol {other:?} after `/`; write /udp for a UDP \
             port, nothing (or /tcp) for TCP"
        ))),
    }
}

impl FromStr for PortSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let invalid = |why: &str| bad_input(format!("invalid address {s:?}: {why}"));
        let (s_addr, proto) = split_proto(s)?;
        let (host, port) = s_addr
            .rsplit_once(':')
            .ok_or_else(|| invalid(&format!("no port; {FORMS}")))?;
        let port: u16 = port
            .parse()
            .map_err(|_| invalid(&format!("port {port:?} is not a number from 1 to 65535")))?;
        if port == 0 {
            return Err(invalid("port 0 is not a port a service listens on"));
        }
        let addr = match host {
            "" => None,
            h if h.starts_with('[') && h.ends_with(']') => {
                Some(IpAddr::V6(h[1..h.len() - 1].parse().map_err(|_| {
                    invalid(&format!("{h} is not an IPv6 address; {FORMS}"))
                })?))
            }
            h => Some(IpAddr::V4(h.parse().map_err(|_| {
                invalid(&format!(
                    "{h:?} is not an IPv4 address (write IPv6 as [ADDR]); {FORMS}"
                ))
            })?)),
        };
        // The unspecified addresses are the wildcard: `0.0.0.0:80` and `[::]:80` name the same
        // kind of listener as `:80` but keep the family.
        Ok(PortSpec { addr, port, proto })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, ":{}", self.port),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
        }?;
        f.write_str(self.proto.suffix())
    }
}

impl PortSpec {
    /// The port zdt keeps the state of these sockets under.
    pub fn key(&self) -> Port {
        Port {
            number: self.port,
            proto: self.proto,
        }
    }

    /// Whether a listener bound to `local` belongs to the listeners this spec names.
    pub fn matches(&self, local: &std::net::SocketAddr) -> bool {
        local.port() == self.port
            && match self.addr {
                None => local.ip().is_unspecified(),
                Some(a) => a == local.ip(),
            }
    }

    /// Where zdt-ctl connects to reach the port from this host (status's check, `--probe`):
    /// the attached address, or the loopback address of the family asked for. An IPv4-mapped
    /// IPv6 address (`[::ffff:127.0.0.1]`) as the IPv4 address it maps: its packets are IPv4
    /// anyway, and an IPv6 socket bound to ::1 cannot reach it.
    pub fn reach(&self, v4: bool) -> std::net::SocketAddr {
        let ip = match self.addr {
            Some(a) => a.to_canonical(),
            None if v4 => std::net::Ipv4Addr::LOCALHOST.into(),
            None => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        std::net::SocketAddr::new(ip, self.port)
    }
}

/// Parses a port given alone (`80`, `443/udp`) or as `[ADDR]:PORT[/udp]`; used by `status`.
pub fn parse_port(s: &str) -> anyhow::Result<Port> {
    if s.contains(':') {
        return Ok(s.parse::<PortSpec>()?.key());
    }
    let (number, proto) = split_proto(s)?;
    match number.parse::<u16>() {
        Ok(p) if p != 0 => Ok(Port { number: p, proto }),
        _ => Err(bad_input(format!(
            "invalid port {s:?}: expected a number from 1 to 65535, with /udp for a UDP port"
        ))),
    }
}

/// The longest duration an option takes: every wait is added to the clock, and a deadline
/// beyond what the clock can hold would panic.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses a duration such as `30s`, `500ms` or `2m`, of at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s).map_err(|e| {
        bad_input(format!(
            "invalid duration {s:?}: {e}; write it like 30s, 500ms or 2m"
        ))
    })?;
    if d > MAX_DURATION {
        return Err(bad_input(format!(
            "invalid duration {s:?}: longer than {} (the longest zdt waits); write it like 30s, \
             500ms or 2m",
            fmt_duration(MAX_DURATION)
        )));
    }
    Ok(d)
}

/// A duration for messages, to the millisecond (`1s 500ms`, not `1s 499ms 987us 12ns`).
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// Parses a pid argument: a positive integer that can be a process id.
pub fn parse_pid(s: &str) -> anyhow::Result<i32> {
    match s.parse::<i64>() {
        Ok(p) if p > 0 && p <= i64::from(i32::MAX) => Ok(p as i32),
        Ok(_) => Err(bad_input(format!(
            "invalid pid {s:?}: a pid is a positive number (see `pgrep`, `systemctl show -p MainPID`)"
        ))),
        Err(_) => Err(bad_input(format!(
            "invalid pid {s:?}: not a number (see `pgrep`, `systemctl show -p MainPID`)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_port_is_named_with_its_suffix_everywhere() {
        let p: PortSpec = ":443/udp".parse().unwrap();
        assert_eq!((p.addr, p.port, p.proto), (None, 443, Proto::Udp));
        assert_eq!(p.to_string(), ":443/udp");
        assert_eq!(p.key(), Port::udp(443));
        let p: PortSpec = "[::1]:53/udp".parse().unwrap();
        assert_eq!(p.to_string(), "[::1]:53/udp");
        let p: PortSpec = "127.0.0.1:80/tcp".parse().unwrap();
        assert_eq!(
            (p.proto, p.to_string()),
            (Proto::Tcp, "127.0.0.1:80".to_string())
        );
        assert_eq!(parse_port("443/udp").unwrap(), Port::udp(443));
        assert_eq!(parse_port("443").unwrap(), Port::tcp(443));
        assert_eq!(parse_port(":443/udp").unwrap().to_string(), "443/udp");
        for bad in [":443/sctp", "443/", "0/udp", "x/udp"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        for port in [Port::udp(443), Port::tcp(443)] {
            assert_eq!(Port::from_dir_name(&port.dir_name()), Some(port));
        }
        assert_eq!(Port::from_dir_name("443-tcp"), None);
    }

    #[test]
    fn port_specs() {
        let p: PortSpec = ":80".parse().unwrap();
        assert_eq!(
            p,
            PortSpec {
                addr: None,
                port: 80,
                proto: Proto::Tcp
            }
        );
        let p: PortSpec = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(p.addr, Some("127.0.0.1".parse().unwrap()));
        let p: PortSpec = "[::]:80".parse().unwrap();
        assert_eq!(p.addr, Some("::".parse().unwrap()));
        assert_eq!(p.to_string(), "[::]:80");
        for bad in [
            "80", ":0", ":65536", "x:80", "[zz]:80", "::1:80", ":http", "",
        ] {
            let e = bad.parse::<PortSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn spec_matches_only_its_listeners() {
        let any: PortSpec = ":80".parse().unwrap();
        assert!(any.matches(&"0.0.0.0:80".parse().unwrap()));
        assert!(any.matches(&"[::]:80".parse().unwrap()));
        assert!(!any.matches(&"127.0.0.1:80".parse().unwrap()));
        assert!(!any.matches(&"0.0.0.0:81".parse().unwrap()));
        let lo: PortSpec = "127.0.0.1:80".parse().unwrap();
        assert!(lo.matches(&"127.0.0.1:80".parse().unwrap()));
        assert!(!lo.matches(&"0.0.0.0:80".parse().unwrap()));
    }

    #[test]
    fn the_port_is_reached_at_its_address_a_mapped_one_through_ipv4() {
        let reach = |s: &str, v4| s.parse::<PortSpec>().unwrap().reach(v4).to_string();
        assert_eq!(reach(":80", true), "127.0.0.1:80");
        assert_eq!(reach(":80", false), "[::1]:80");
        assert_eq!(reach("[::ffff:127.0.0.1]:80", false), "127.0.0.1:80");
        assert_eq!(reach("[::1]:80", false), "[::1]:80");
        assert_eq!(reach("10.0.0.1:80", true), "10.0.0.1:80");
    }

    #[test]
    fn pids_and_durations() {
        assert_eq!(parse_pid("42").unwrap(), 42);
        for bad in ["0", "-1", "abc", "99999999999", ""] {
            assert!(parse_pid(bad).unwrap_err().to_string().contains(bad));
        }
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        for huge in ["300000000000years", "31days"] {
            let e = parse_duration(huge).unwrap_err();
            assert_eq!(crate::error::kind_of(&e), crate::error::Kind::BadInput);
            assert!(e.to_string().contains(huge), "{e}");
        }
        assert_eq!(parse_duration("30days").unwrap(), MAX_DURATION);
        assert_eq!(
            fmt_duration(Duration::from_nanos(1_499_987_012)),
            "1s 499ms"
        );
        assert!(parse_duration("soon")
            .unwrap_err()
            .to_string()
            .contains("soon"));
        assert_eq!(parse_port("8080").unwrap(), Port::tcp(8080));
        assert_eq!(parse_port(":8080").unwrap(), Port::tcp(8080));
        assert!(parse_port("0").is_err());
    }
}
