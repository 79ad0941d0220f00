//! What every command that takes a port's lock does before it plans anything: put right what a
//! command killed halfway left ([`repair`]), forget the probe marks of zdt-ctls that are gone,
//! and make the slots follow the kernel ([`follow_kernel`]: inherited sockets, re-created
//! listeners). The decisions are zdt-plan's (`plan::sets::repair`, `drift`, `rejoin`); this
//! module reads the kernel's side and applies them through [`State`], which keeps the maps.
use zdt_common::{ProbeKey, SlotList};

use crate::{
    plan::sets::{self, Role, Slot},
    sockets,
    state::State,
};

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

/// Where the slots and the kernel part (see [`sets::drift`]): the listeners of the spec's
/// groups in no slot, and the slots whose recorded process is gone, with the processes
/// that serve those sockets now. Reads sock_diag's listeners and each recorded process's
/// start time; only when one of the two differs does it scan /proc for the holders.
pub fn drift(state: &State, slots: &[Slot]) -> anyhow::Result<sets::Drift> {
    use std::collections::{BTreeMap, BTreeSet};
    let table = sockets::listen_entries(state.spec.proto)?;
    let known: BTreeSet<u64> = slots.iter().map(|s| s.meta.cookie).collect();
    let mut starts: BTreeMap<i32, Option<u64>> = BTreeMap::new();
    for s in slots {
        starts
            .entry(s.pid())
            .or_insert_with(|| sockets::start_time(s.pid()));
    }
    let alive = |p: &sets::Process| starts.get(&p.pid).copied().flatten() == Some(p.start);
    let dead: BTreeSet<u64> = slots
        .iter()
        .filter(|s| s.recorded() != Role::Hold && !alive(&s.process()))
        .map(|s| s.meta.cookie)
        .collect();
    let inodes: BTreeSet<u64> = table
        .values()
        .filter(|e| {
            state.spec.matches(&e.local) && (!known.contains(&e.cookie) || dead.contains(&e.cookie))
        })
        .map(|e| e.inode)
        .collect();
    if inodes.is_empty() {
        return Ok(sets::Drift::default());
    }
    let h = sockets::holders(&inodes);
    let seen: Vec<sets::Seen> = inodes
        .iter()
        .filter_map(|i| table.get(i))
        .map(|e| sets::Seen {
            cookie: e.cookie,
            member: crate::plan::member(&h.pids(e.inode), &h.procs).and_then(|pid| {
                Some(sets::Process {
                    pid,
                    start: sockets::start_time(pid)?,
                })
            }),
        })
        .collect();
    Ok(sets::drift(
        slots,
        &seen,
        &closed_members(state, slots)?,
        alive,
    ))
}

/// [`sets::closed_members`] of the live set, from the slots' metadata.
fn closed_members(state: &State, slots: &[Slot]) -> anyhow::Result<Vec<(sets::Process, Role)>> {
    let Some(live) = state.active_set()? else {
        return Ok(Vec::new());
    };
    Ok(sets::closed_members(&live, slots, |i| state.recorded(i)))
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
    let Some(live) = state.active_set()? else {
        return Ok(());
    };
    // Also with no live slot at all: the only member may have re-created its only listener.
    let slots = state.slots()?;
    let drift = drift(state, &slots)?;
    for &(slot, heir) in &drift.rehome {
        let from = state.recorded(slot).map(|p| p.pid);
        tracing::warn!(
            slot,
            from,
            to = heir.pid,
            "a socket's process exited and another holds it (inherited): recorded as its"
        );
        state.record_process(slot, heir)?;
    }
    if !drift.adopt.is_empty() {
        // Duplicates of the listeners to adopt (the map update takes an fd of ours).
        for found in sockets::matching_listeners(&state.spec)? {
            let Some(&(_, p, role)) = drift.adopt.iter().find(|(c, ..)| *c == found.entry.cookie)
            else {
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
    }
    let slots = if drift.is_empty() {
        slots
    } else {
        state.slots()?
    };
    let closed = closed_members(state, &slots)?;
    if let Some(plan) = sets::rejoin(&slots, &live, &closed)? {
        state.apply(&plan)?;
    }
    Ok(())
}
