//! One module per verb. Each owns its command-line arguments (`Args`), its run (a function of
//! the library, which the tests and the benchmark call too) and its rendering (`execute` runs it
//! and prints the outcome as text or JSON); the binary's main only parses and dispatches.
pub mod attach;
pub mod detach;
pub mod drain;
pub mod exec;
pub mod hold;
pub mod metrics;
pub mod promote;
pub mod rollback;
pub mod status;
pub mod upgrade;
pub mod watch;

use crate::addr::Port;
use std::time::Duration;

use crate::{
    addr::{parse_duration, parse_pid, parse_port, PortSpec},
    error::{bad_input, err, Kind},
};

// clap's value parsers return String errors; ours name the input already.
pub(crate) fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}
pub(crate) fn parse_pid_arg(s: &str) -> Result<i32, String> {
    parse_pid(s).map_err(|e| e.to_string())
}
pub(crate) fn parse_port_arg(s: &str) -> Result<Port, String> {
    parse_port(s).map_err(|e| e.to_string())
}
/// `--probe PATH`: an absolute path as it goes in the request line, with no space or control
/// character (a line break would end the request line and add headers of its own).
pub(crate) fn parse_probe_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!(
            "{s:?} is not a path: give the path the probe asks for, starting with /, e.g. /readyz"
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} contains {c:?}: a path has no spaces or control characters (percent-encode them)"
        ));
    }
    Ok(s.to_string())
}

/// `--backlog`: 1 to 65535 (listen() takes an int, the kernel caps it at net.core.somaxconn).
pub(crate) fn parse_backlog(s: &str) -> Result<i32, String> {
    match s.parse::<i64>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as i32),
        _ => Err(format!(
            "invalid backlog {s:?}: a number of connections from 1 to 65535, e.g. 4096"
        )),
    }
}

pub(crate) fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Prints `value` as pretty JSON: one object for one port asked for, else an array.
pub(crate) fn print_json<T: serde::Serialize>(all: &[T], one: bool) -> anyhow::Result<()> {
    let text = match all {
        [single] if one => serde_json::to_string_pretty(single)?,
        _ => serde_json::to_string_pretty(all)?,
    };
    crate::outln!("{text}");
    Ok(())
}

/// "1, 2, 3"
pub(crate) fn pid_list(pids: &[i32]) -> String {
    pids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The port a command without `--port` means: the only attached port of this namespace.
pub fn resolve_port(port: Option<Port>) -> anyhow::Result<Port> {
    if let Some(p) = port {
        return Ok(p);
    }
    let ports = status::attached_ports()?;
    match ports.as_slice() {
        [p] => Ok(*p),
        [] => Err(err(
            Kind::NotAttached,
            "no port is attached in this network namespace: run `zdt-ctl attach :PORT` first",
        )),
        many => Err(bad_input(format!(
            "several ports are attached ({}): pass --port",
            many.iter()
                .map(Port::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_probe_path_is_absolute_with_nothing_that_breaks_the_request_line() {
        assert_eq!(
            super::parse_probe_path("/readyz?x=1").as_deref(),
            Ok("/readyz?x=1")
        );
        for bad in [
            "",
            "readyz",
            "http://x/y",
            "/a b",
            "/readyz\r\nX: y",
            "/a\tb",
        ] {
            let e = super::parse_probe_path(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }
}
