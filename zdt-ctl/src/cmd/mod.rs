//! One module per verb. Each is a function of the library; the CLI only parses and prints.
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

use crate::error::{bad_input, err, Kind};

/// The port a command without `--port` means: the only attached port of this namespace.
pub fn resolve_port(port: Option<u16>) -> anyhow::Result<u16> {
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
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
