//! `zdt-ctl attach [ADDR]:PORT`: load and pin the program; take over listeners already there.
use crate::{
    addr::PortSpec,
    error::require_root,
    sockets::{self, Listener},
    state::State,
};

#[derive(Debug, serde::Serialize)]
pub struct AttachReport {
    pub spec: String,
    /// False when the port was already attached (attach is idempotent).
    pub created: bool,
    /// Pids whose sockets became the active set (only when the port had no active set).
    pub adopted: Vec<i32>,
}

/// Existing listeners of `spec`, validated, with the lowest pid holding each. Validation runs
/// before anything is created, so a listener without SO_REUSEPORT fails the attach cleanly.
fn existing_listeners(spec: &PortSpec) -> anyhow::Result<Vec<(i32, Listener)>> {
    sockets::matching_listeners(spec)?
        .into_iter()
        .map(|(pid, entry, fd)| Ok((pid, sockets::listener_from(pid, fd, &entry)?)))
        .collect()
}

pub fn attach(spec: PortSpec) -> anyhow::Result<AttachReport> {
    require_root()?;
    let listeners = existing_listeners(&spec)?;
    let (mut state, created) = State::create(spec)?;
    // (Re)attach to every group present: harmless if already attached, and it repairs a group
    // that was re-created without the program.
    for (_, l) in &listeners {
        state.attach_to_group(&l.fd)?;
    }
    let mut adopted = Vec::new();
    if state.active_set()?.is_none() && !listeners.is_empty() {
        // The listeners already serving keep serving: they become the active set, so from now
        // on the program steers exactly where kernel hashing did before.
        let mut slots = Vec::new();
        for (pid, l) in &listeners {
            let start = sockets::start_time(*pid).unwrap_or(0);
            slots.extend(state.insert(*pid, start, std::slice::from_ref(l))?);
            if !adopted.contains(pid) {
                adopted.push(*pid);
            }
        }
        let live = state.slots()?;
        state.switch(&live, &slots)?;
        let live = state.slots()?;
        state.set_roles(&live, &crate::state::plain_set(&live, &slots)?)?;
    }
    tracing::info!(port = spec.port, created, ?adopted, "attached");
    Ok(AttachReport {
        spec: spec.to_string(),
        created,
        adopted,
    })
}
