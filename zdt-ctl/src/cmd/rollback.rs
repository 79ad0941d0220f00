//! `zdt-ctl rollback [PORT]`: make the active set that was live before the last switch live
//! again, in one update. The fast path back from a deploy: the previous version, drained but not
//! yet stopped, takes all new connections again at once.
use crate::{
    error::{err, require_root, Kind},
    state::{pids_where, State},
};

#[derive(Debug, serde::Serialize)]
pub struct RollbackReport {
    pub port: u16,
    /// Pids active again.
    pub restored: Vec<i32>,
    /// Pids that were active and are draining now.
    pub demoted: Vec<i32>,
}

pub fn rollback(port: u16) -> anyhow::Result<RollbackReport> {
    require_root()?;
    let mut state = State::open_locked(port)?;
    let Some(previous) = state.previous_set()? else {
        return Err(err(
            Kind::Refused,
            format!("port {port} has no previous active set to go back to (nothing was switched since attach)"),
        ));
    };
    let slots = state.slots()?;
    // Only sockets that still listen can be restored. A slot of the previous set is never given
    // to another socket (State::insert), so a live slot still holds the socket it held then.
    // Candidates are left out: a rollback must never make live a socket that was not promoted.
    let back = crate::state::live_only(&previous, &slots, |s| {
        s.meta.role == zdt_common::ROLE_CANDIDATE
    })?;
    if back.is_empty() {
        return Err(err(
            Kind::Refused,
            format!(
                "the previous members of port {port} no longer listen (stopped or exited): there is \
                 nothing to roll back to; nothing was changed"
            ),
        ));
    }
    let demoted = pids_where(&slots, |s| (s.active || s.canary) && !back.names(s.index));
    // A second rollback goes forward again.
    if let Some(live) = state.active_set()? {
        state.save_rollback(&live)?;
    }
    state.switch_set(&back)?;
    state.set_roles(&slots, &back)?;
    // The placeholders of `zdt-ctl hold` ride along in every set; they are not members.
    let restored = pids_where(&slots, |s| {
        back.names(s.index) && s.meta.role != zdt_common::ROLE_HOLD
    });
    tracing::info!(port, ?restored, ?demoted, "rolled back");
    Ok(RollbackReport {
        port,
        restored,
        demoted,
    })
}
