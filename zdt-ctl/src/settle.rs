//! What every command that takes a port's lock does before it plans anything: put right what a
//! command killed halfway left ([`repair`]), forget the probe marks of zdt-ctls that are gone,
//! and make the slots follow the kernel ([`follow_kernel`]: inherited sockets, re-created
//! listeners). The decisions are zdt-plan's (`plan::sets::repair`, `drift`, `rejoin`); this
//! module reads the kernel's side and applies them through [`State`], which keeps the maps.
use zdt_common::{ProbeKey, SlotList};

use crate::{plan::sets::Role, sockets, state::State};

/// What every command that takes the lock runs first: [`forget_stale_probes`],
/// [`repair`], then [`follow_kernel`].
pub(crate) fn settle(state: &mut State) -> anyhow::Result<()> {
    // Claims of zdt-ctls that are gone first: the repair keeps probe lists a live one claims.
    forget_stale_probes(state)?;
    repair(state)?;
    follow_kernel(state)
}

/// Removes the ZDT_PROBES entries of zdt-ctl processes that are gone (killed before they
/// deleted them): such an entry names a loopback address and port that an ordinary client
/// may use later, whose SYN cookie's ACK would then be taken for zdt-ctl's.
fn forget_stale_probes(state: &mut State) -> anyhow::Result<()> {
    // None yet in a state of an earlier build that `upgrade` is about to bring up to date.
    let Some(mut map) = crate::readiness::probes_map(&state.dir)? else {
        return Ok(());
    };
    let stale: Vec<ProbeKey> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| {
            let pid = nix::unistd::Pid::from_raw(v.pid as i32);
            nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
        })
        .map(|(k, _)| k)
        .collect();
    for k in stale {
        tracing::info!(
            port = k.port,
            "removing the probe mark of a zdt-ctl that is gone"
        );
        let _ = map.remove(&k);
    }
    Ok(())
}

/// Puts right what a command killed halfway left behind; run by every command that takes
/// the lock, so no other command is halfway through now:
/// - live probe lists (a `promote --probe` killed while it waited): zdt-ctl's own marked
///   connections would keep reaching that process;
/// - members of the live set still recorded as candidates (a promote killed between its
///   flip and its roles): `--stop-old` stops only members whose role says they served.
fn repair(state: &mut State) -> anyhow::Result<()> {
    let Some(live) = state.active_set()? else {
        return Ok(());
    };
    // Only the live set's few slots are read on the way of every command; the whole array
    // only when there is something to put right.
    // Probe lists a live `promote --probe` claims are its, while it waits without the lock.
    let has_probe = live.probe != [SlotList::EMPTY; 2];
    let claimed = has_probe && state.probe_claimant()?.is_some();
    let probing = has_probe && !claimed;
    if !probing
        && !state
            .serving_slots()?
            .iter()
            .any(|m| Role::from_raw(m.role) == Role::Candidate)
    {
        return Ok(());
    }
    if let Some(plan) = crate::plan::sets::repair(&state.slots()?, &live, claimed) {
        tracing::info!(probing, "putting right what an interrupted command left");
        state.apply(&plan)?;
    }
    Ok(())
}

/// Membership follows the kernel; run by every command that takes the lock, after
/// [`repair`]. A process with a role that holds a listener of the port no slot
/// holds (it re-created its listener) gets it adopted, in its role; a slot whose process
/// is gone is recorded as the process that serves its socket now (it inherited it); then
/// every live socket of an active (canary) process joins the active (canary) lists, in
/// one switch. Without this, a re-created listener left the set naming only closed
/// sockets: every connection fell to kernel hashing, which handed some to a version still
/// warming up. The rollback target is left as it is.
fn follow_kernel(state: &mut State) -> anyhow::Result<()> {
    if state.active_set()?.is_none() {
        return Ok(());
    }
    // Also with no live slot at all: the only member may have re-created its only listener.
    let (snap, read) = state.read()?;
    let drift = snap.drift();
    for &(slot, heir) in &drift.rehome {
        let from = snap.recorded(slot).map(|p| p.pid);
        tracing::warn!(
            slot,
            from,
            to = heir.pid,
            "a socket's process exited and another holds it (inherited): recorded as its"
        );
        state.record_process(slot, heir)?;
    }
    // Duplicates of the listeners to adopt (the map update takes an fd of ours), from the
    // same read: the snapshot looked for the holders of every listener in no slot.
    for &(cookie, p, role) in &drift.adopt {
        let Some(found) = read.dup(cookie) else {
            continue;
        };
        // A listener that cannot be used (no SO_REUSEPORT, a changed fd) is left out:
        // the command the operator ran must not fail for it.
        let Ok(l) = sockets::listener_from(p.pid, found.fd, &found.entry) else {
            continue;
        };
        state.attach_to_group(&l.fd)?;
        state.insert(p.pid, p.start, std::slice::from_ref(&l), role)?;
        tracing::warn!(
            pid = p.pid,
            local = %l.local,
            %role,
            "a member re-created its listener: adopted in its role"
        );
    }
    let snap = if drift.is_empty() {
        snap
    } else {
        state.snapshot()?
    };
    if let Some(plan) = snap.rejoin()? {
        state.apply(&plan)?;
    }
    Ok(())
}
