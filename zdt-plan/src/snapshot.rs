//! One read of a port's state, and every decision a command makes from it.
//!
//! A command that changes the state takes the port's lock, reads a [`Snapshot`] once
//! (`State::snapshot`), asks it for a plan (pure: no kernel, no /proc), and writes the plan
//! (`State::apply`, or `State::insert` for a [`Placement`]). Deciding from one read is what
//! keeps the decisions consistent with each other: the slot a socket gets, whether the rollback
//! target moves, who becomes active, who drains and who is stopped.
use std::collections::BTreeMap;

use zdt_common::{ActiveSet, SlotList};

use super::sets::{self, free_slot, live_only, Plan, Process, Role, Slot};
use crate::error::{err, Kind};

/// A port's state as one command read it, under the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub port: u16,
    /// The slots that hold the socket their metadata records.
    pub slots: Vec<Slot>,
    /// The live set; None before the first switch (the program passes through).
    pub live: Option<ActiveSet>,
    /// The rollback target, None when it names no one.
    pub target: Option<ActiveSet>,
    /// The process each slot's metadata records, also of a slot whose socket has closed.
    pub recorded: BTreeMap<u32, Process>,
}

/// Where new sockets go: for each, its slot and whether it is new there (false: it is in the
/// array already). `target`: the rollback target pruned of slots whose socket closed, to be
/// written before a slot it names is given to a new socket (a rollback must never name one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub slots: Vec<(u32, bool)>,
    pub target: Option<ActiveSet>,
}

/// What `detach` does before it takes the program away: the plan that takes hold's
/// placeholders out of the live set (None when there are none), and their cookies, to be shut
/// down after that switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detach {
    pub plan: Option<Plan>,
    pub placeholders: Vec<u64>,
}

impl Snapshot {
    /// The live set, empty before the first switch.
    pub fn live_set(&self) -> ActiveSet {
        self.live.unwrap_or(ActiveSet::EMPTY)
    }

    pub fn recorded(&self, slot: u32) -> Option<Process> {
        self.recorded.get(&slot).copied()
    }

    /// The slots for `cookies` (sockets of one process, `count` in all for the message). A
    /// socket already in the array keeps its slot; a new one takes a [`free_slot`] that neither
    /// the live set nor the rollback target names (`is_empty`: the array holds no socket
    /// there). Every slot is chosen before anything is written: when there are not enough, the
    /// command is refused having changed nothing.
    pub fn place(
        &self,
        pid: i32,
        cookies: &[u64],
        is_empty: impl Fn(u32) -> bool,
    ) -> anyhow::Result<Placement> {
        // A slot of the rollback target whose socket has closed can never be restored (the
        // socket is gone for good): it need not stay reserved. Without this, three generations
        // of a large app held 3 x its sockets, and the third deploy found no free slot.
        let pruned = match &self.target {
            Some(p) => live_only(p, &self.slots, |_| false)?,
            None => ActiveSet::EMPTY,
        };
        let live = self.live_set();
        let mut taken: Vec<u32> = self.slots.iter().map(|s| s.index).collect();
        let mut slots = Vec::new();
        for &cookie in cookies {
            if let Some(s) = self.slots.iter().find(|s| s.meta.cookie == cookie) {
                slots.push((s.index, false));
                continue;
            }
            let slot = free_slot(&taken, &live, &pruned, &is_empty).map_err(|e| {
                err(
                    Kind::Refused,
                    format!(
                        "{e}: pid {pid} has {} sockets to insert; nothing was changed",
                        cookies.len()
                    ),
                )
            })?;
            taken.push(slot);
            slots.push((slot, true));
        }
        let reuses_target = slots
            .iter()
            .any(|&(slot, new)| new && self.target.is_some_and(|t| t.names(slot)));
        Ok(Placement {
            slots,
            target: reuses_target.then_some(pruned),
        })
    }

    /// The newest process that takes new connections (active or canary) and started after
    /// `start` (clock ticks since boot, as /proc/PID/stat says).
    pub fn newer_serving(&self, start: u64) -> Option<Process> {
        self.slots
            .iter()
            .filter(|s| s.active || s.canary)
            .map(Slot::process)
            .filter(|p| p.start > start)
            .max_by_key(|p| p.start)
    }

    /// `promote`: [`sets::promote`].
    pub fn promote(&self, pid: i32, new: &[u32], weight: Option<u32>) -> anyhow::Result<Plan> {
        sets::promote(&self.slots, &self.live_set(), pid, new, weight)
    }

    /// `promote --probe` while it waits: [`sets::probe`].
    pub fn probe(&self, new: &[u32]) -> anyhow::Result<ActiveSet> {
        sets::probe(&self.slots, &self.live_set(), new)
    }

    /// After a failed switch or probation: [`sets::restore`].
    pub fn restore(
        &self,
        before: &ActiveSet,
        target: Option<&ActiveSet>,
    ) -> anyhow::Result<Option<Plan>> {
        sets::restore(&self.slots, &self.live_set(), before, target)
    }

    /// `rollback`: [`sets::rollback`].
    pub fn rollback(&self) -> anyhow::Result<Plan> {
        let (live, target) = (self.live.as_ref(), self.target.as_ref());
        sets::rollback(&self.slots, live, target, self.port, |i| self.recorded(i))
    }

    /// `drain`: [`sets::drain`].
    pub fn drain(&self, pid: i32, opts: sets::DrainOpts) -> anyhow::Result<Plan> {
        sets::drain(&self.slots, &self.live_set(), pid, opts, self.port)
    }

    /// hold's registration: [`sets::hold`].
    pub fn hold(&self, indices: &[u32]) -> anyhow::Result<Plan> {
        sets::hold(&self.slots, &self.live_set(), indices)
    }

    /// `attach` of listeners that already serve: [`sets::adopt`].
    pub fn adopt(&self, indices: &[u32]) -> anyhow::Result<Plan> {
        sets::adopt(&self.slots, &self.live_set(), indices)
    }

    /// What every locked command runs first: [`sets::repair`] (None: nothing to repair).
    pub fn repair(&self, keep_probe: bool) -> Option<Plan> {
        sets::repair(&self.slots, self.live.as_ref()?, keep_probe)
    }

    /// `detach`: hold's placeholders leave the live set first, while the program still steers
    /// (kernel hashing would give them, which never accept, a share of new connections), and
    /// are shut down after that switch.
    pub fn detach(&self) -> Detach {
        let placeholders: Vec<u64> = (self.slots.iter())
            .filter(|s| s.recorded() == Role::Hold)
            .map(|s| s.meta.cookie)
            .collect();
        let plan = self.live.filter(|_| !placeholders.is_empty()).map(|live| {
            let set = ActiveSet {
                hold: [SlotList::EMPTY; 2],
                ..live
            };
            Plan {
                rollback: None,
                set,
                roles: Vec::new(),
                drained: Vec::new(),
                to_stop: Vec::new(),
            }
        });
        Detach { plan, placeholders }
    }
}

#[cfg(test)]
mod tests {
    use zdt_common::{SlotMeta, AF_INET};

    use super::*;

    fn slot(index: u32, cookie: u64, role: Role) -> Slot {
        Slot {
            index,
            meta: SlotMeta {
                cookie,
                pid: 100 + index,
                pid_start: 1,
                role: role.raw(),
                family: AF_INET,
                ..SlotMeta::default()
            },
            steered: 0,
            migrated: 0,
            recent: 0,
            active: false,
            canary: false,
        }
    }

    fn list(slots: &[u32]) -> [SlotList; 2] {
        let mut l = [SlotList::EMPTY; 2];
        l[0].slots[..slots.len()].copy_from_slice(slots);
        l[0].len = slots.len() as u32;
        l
    }

    fn snapshot(slots: Vec<Slot>, live: &[u32], target: &[u32]) -> Snapshot {
        let set = |s: &[u32]| ActiveSet {
            lists: list(s),
            ..ActiveSet::EMPTY
        };
        Snapshot {
            port: 80,
            slots,
            live: Some(set(live)),
            target: (!target.is_empty()).then(|| set(target)),
            recorded: BTreeMap::new(),
        }
    }

    #[test]
    fn a_socket_keeps_its_slot_and_a_new_one_takes_a_slot_no_set_names() {
        let s = snapshot(vec![slot(0, 10, Role::Active)], &[0], &[1]);
        // Slot 1 is the target's (its socket closed: the target is pruned of it first).
        let p = s.place(200, &[10, 11, 12], |_| true).unwrap();
        assert_eq!(p.slots, [(0, false), (1, true), (2, true)]);
        assert_eq!(p.target, Some(ActiveSet::EMPTY), "{p:?}");
    }

    #[test]
    fn only_a_serving_process_started_later_is_newer() {
        let started = |mut s: Slot, start: u64, active: bool, canary: bool| {
            s.meta.pid_start = start;
            s.active = active;
            s.canary = canary;
            s
        };
        let s = snapshot(
            vec![
                started(slot(0, 10, Role::Active), 50, true, false),
                started(slot(1, 11, Role::Canary), 70, false, true),
                // Started later but serving nothing: a candidate, a placeholder, a drained one.
                started(slot(2, 12, Role::Candidate), 90, false, false),
                started(slot(3, 13, Role::Hold), 95, false, false),
                started(slot(4, 14, Role::Draining), 99, false, false),
            ],
            &[0],
            &[],
        );
        assert_eq!(
            s.newer_serving(40).map(|p| (p.pid, p.start)),
            Some((101, 70))
        );
        assert_eq!(s.newer_serving(60).map(|p| p.pid), Some(101));
        assert_eq!(s.newer_serving(70), None, "the same start is not newer");
        assert_eq!(s.newer_serving(80), None);
    }

    #[test]
    fn placing_more_sockets_than_free_slots_is_refused() {
        let s = snapshot(vec![slot(0, 10, Role::Active)], &[0], &[]);
        let e = s.place(200, &[11, 12], |i| i < 2).unwrap_err();
        assert_eq!(crate::error::kind_of(&e), Kind::Refused);
        assert!(e.to_string().contains("pid 200 has 2 sockets"), "{e}");
    }

    #[test]
    fn detach_takes_placeholders_out_of_the_live_set_first() {
        let mut s = snapshot(
            vec![slot(0, 10, Role::Active), slot(1, 11, Role::Hold)],
            &[0],
            &[],
        );
        let mut live = s.live_set();
        live.hold = list(&[1]);
        s.live = Some(live);
        let d = s.detach();
        assert_eq!(d.placeholders, [11]);
        let plan = d.plan.expect("a switch");
        assert_eq!(plan.set.hold, [SlotList::EMPTY; 2]);
        assert_eq!(plan.set.lists, live.lists);
        assert_eq!(plan.rollback, None);
        // Without placeholders, nothing to switch.
        let none = snapshot(vec![slot(0, 10, Role::Active)], &[0], &[]);
        assert_eq!(
            none.detach(),
            Detach {
                plan: None,
                placeholders: vec![]
            }
        );
    }
}
