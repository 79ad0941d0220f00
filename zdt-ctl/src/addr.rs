//! The `[ADDR]:PORT` argument and durations, parsed with errors that name the input.
use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use crate::error::bad_input;

/// Which listeners of a port zdt manages: `:80` means the wildcard listeners (0.0.0.0 and/or
/// [::]), `127.0.0.1:8080` or `[::1]:80` the listeners bound to that address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub addr: Option<IpAddr>,
    pub port: u16,
}

const FORMS: &str = "expected [ADDR]:PORT, e.g. :80, 127.0.0.1:8080 or [::]:80";

impl FromStr for PortSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let invalid = |why: &str| bad_input(format!("invalid address {s:?}: {why}"));
        let (host, port) = s
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
        Ok(PortSpec { addr, port })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            None => write!(f, ":{}", self.port),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl PortSpec {
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

/// Parses a port given alone (`80`) or as `[ADDR]:PORT`; used by `status`.
pub fn parse_port(s: &str) -> anyhow::Result<u16> {
    if s.contains(':') {
        return Ok(s.parse::<PortSpec>()?.port);
    }
    match s.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(bad_input(format!(
            "invalid port {s:?}: expected a number from 1 to 65535"
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
    fn port_specs() {
        let p: PortSpec = ":80".parse().unwrap();
        assert_eq!(
            p,
            PortSpec {
                addr: None,
                port: 80
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
        assert_eq!(parse_port("8080").unwrap(), 8080);
        assert_eq!(parse_port(":8080").unwrap(), 8080);
        assert!(parse_port("0").is_err());
    }
}
