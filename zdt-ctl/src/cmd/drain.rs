//! `zdt-ctl drain PID [--force]`: take a process's sockets out of the active set.
use zdt_common::{ActiveSet, AF_INET};

use crate::{
    error::{bad_input, err, require_root, Kind},
    state::{pids_where, State},
};

pub fn drain(port: u16, pid: i32, force: bool) -> anyhow::Result<Vec<u32>> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let slots = state.slots()?;
    let mine: Vec<u32> = slots
        .iter()
        .filter(|s| s.meta.pid == pid as u32)
        .map(|s| s.index)
        .collect();
    if mine.is_empty() {
        return Err(bad_input(format!(
            "pid {pid} is not a member of port {port} (see `zdt-ctl status {port}`)"
        )));
    }
    let remaining: Vec<u32> = slots
        .iter()
        .filter(|s| s.active && !mine.contains(&s.index))
        .map(|s| s.index)
        .collect();
    // A family that would keep no active socket while `zdt-ctl hold` has a placeholder in it:
    // the program would park every new connection of that family on the placeholder (the hold
    // list is its last choice before kernel hashing), to wait for a promote that may never come
    // (up to hold's --max-wait), while PID still listens and could answer it. Without hold,
    // kernel hashing would have handed it to PID. --force does not make that right.
    let live = state.active_set()?.unwrap_or(ActiveSet::EMPTY);
    // The pids of hold's live placeholders of a family.
    let holders =
        |family: u32| pids_where(&slots, |h| live.is_hold(h.index) && h.meta.family == family);
    let parked = slots.iter().find(|s| {
        let family = s.meta.family;
        s.active
            && mine.contains(&s.index)
            && !holders(family).is_empty()
            && !slots
                .iter()
                .any(|r| remaining.contains(&r.index) && r.meta.family == family)
    });
    if let Some(s) = parked {
        let family = if s.meta.family == AF_INET {
            "IPv4"
        } else {
            "IPv6"
        };
        let holds: Vec<String> = holders(s.meta.family).iter().map(i32::to_string).collect();
        return Err(err(
            Kind::Refused,
            format!(
                "pid {pid} is the last active {family} member of port {port}, and `zdt-ctl hold` \
                 (pid {}) runs: draining it would park every new {family} connection on hold's \
                 placeholder to wait for the next promote (up to hold's --max-wait), while pid \
                 {pid} still listens and could answer it. Promote another process first; to \
                 restart without overlap, stop pid {pid} instead (what is queued on it moves to \
                 the placeholder); nothing was changed",
                holds.join(", pid ")
            ),
        ));
    }
    if remaining.is_empty() && !force {
        return Err(err(
            Kind::Refused,
            format!(
                "draining pid {pid} would leave port {port} with no active socket; promote another \
                 process first, or pass --force (new connections then go to kernel hashing)"
            ),
        ));
    }
    state.switch(&slots, &remaining)?;
    state.set_roles(&slots, &crate::state::plain_set(&slots, &remaining)?)?;
    tracing::info!(port, pid, "drained");
    Ok(mine)
}
