//! `zdt-ctl detach [ADDR]:PORT`: take the program off the port's groups and remove the state.
use std::collections::BTreeSet;

use aya::programs::SkReuseport;

use crate::{
    addr::PortSpec,
    error::{bad_input, require_root},
    sockets,
    state::State,
};

pub fn detach(spec: PortSpec) -> anyhow::Result<usize> {
    require_root()?;
    let state = State::open_locked(spec.port)?;
    if state.spec != spec {
        return Err(bad_input(format!(
            "port {} is attached as {}, not {spec}; run `zdt-ctl detach {}`",
            spec.port, state.spec, state.spec
        )));
    }
    // One member of each group is enough: the program belongs to the group. Detach first, then
    // remove the pins: if this is interrupted, the state still says "attached" and a second
    // detach finishes the job.
    let mut families_done = BTreeSet::new();
    for found in sockets::matching_listeners(&spec)? {
        if families_done.insert(found.entry.group()) {
            // ENOENT means the group has no program (re-created since): nothing to detach.
            let _ = SkReuseport::detach(&found.fd);
        }
    }
    state.remove()?;
    tracing::info!(port = spec.port, groups = families_done.len(), "detached");
    Ok(families_done.len())
}
