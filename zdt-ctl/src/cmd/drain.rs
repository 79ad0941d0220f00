//! `zdt-ctl drain PID [--force]`: take a process's sockets out of the active set.
use crate::{
    error::{bad_input, err, require_root, Kind},
    state::State,
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
