//! One read of a port's state, and every decision a command makes from it.
//!
//! A command that changes the state takes the port's lock, reads a [`Snapshot`] once
//! (`State::snapshot`: the maps, and the kernel's listeners of the port's groups with the
//! processes that serve them), asks it for a plan (pure: no kernel, no /proc), and writes the
//! plan (`State::apply`, or `State::insert` for a [`Placement`]). Deciding from one read is what
//! keeps the decisions consistent with each other: which listeners are re-adopted, whether a
//! new version's sockets can take the port over, the slot a socket gets, whether the rollback
//! target moves, who becomes active, who drains and who is stopped.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use zdt_common::{ActiveSet, SlotList};

use super::sets::{self, free_slot, live_only, Drift, Plan, Process, Role, Seen, Slot};
use crate::{
    device_conflict,
    error::{bad_input, err, Kind},
    layout_conflict, GroupKind, GroupSet,
};

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
    /// Every listener of the groups the port's spec names, as the kernel showed it in the same
    /// read (sock_diag).
    pub listeners: Vec<Listen>,
    /// The processes the slots record that still run (the same pid and start time).
    pub running: BTreeSet<Process>,
}

/// A listener of a group the port's spec names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen {
    pub cookie: u64,
    pub local: SocketAddr,
    /// IPV6_V6ONLY (false for IPv4 sockets).
    pub v6only: bool,
    /// The owner uid: the kernel groups only one owner's sockets.
    pub uid: u32,
    /// The interface index it is bound to (SO_BINDTODEVICE), 0 for none.
    pub device: u32,
    /// The process that serves it ([`crate::member`]), looked for only where the maps do not
    /// say ([`Snapshot::unclaimed`]); None elsewhere, and where only processes that do not
    /// serve it (systemd, zdt-ctl) hold it.
    pub member: Option<Process>,
}

impl Listen {
    pub fn group_kind(&self) -> GroupKind {
        GroupKind::of(&self.local, self.v6only)
    }
}

fn joined(ids: &[u32]) -> String {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    ids.join(", ")
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

    /// Whether the maps do not say who serves the listener `cookie`, so that the reader must
    /// look for its holders: it is in no slot, or in a slot (not a placeholder's) whose recorded
    /// process no longer runs (`running`). Looking only there keeps the scan of /proc, most of a
    /// read's cost, off the commands that find nothing new.
    pub fn unclaimed(slots: &[Slot], running: &BTreeSet<Process>, cookie: u64) -> bool {
        match slots.iter().find(|s| s.meta.cookie == cookie) {
            None => true,
            Some(s) => s.recorded() != Role::Hold && !running.contains(&s.process()),
        }
    }

    /// The live set's members whose slots' sockets have closed: [`sets::closed_members`].
    pub fn closed(&self) -> Vec<(Process, Role)> {
        match &self.live {
            Some(live) => sets::closed_members(live, &self.slots, |i| self.recorded(i)),
            None => Vec::new(),
        }
    }

    /// Where the slots and the kernel part: [`sets::drift`] of the listeners the maps do not
    /// account for.
    pub fn drift(&self) -> Drift {
        let seen: Vec<Seen> = (self.listeners.iter())
            .filter(|l| Self::unclaimed(&self.slots, &self.running, l.cookie))
            .map(|l| Seen {
                cookie: l.cookie,
                member: l.member,
            })
            .collect();
        sets::drift(&self.slots, &seen, &self.closed(), |p| {
            self.running.contains(p)
        })
    }

    /// Candidates left by a promote that ended before its switch: [`sets::waiting`].
    pub fn waiting(&self) -> Vec<Process> {
        sets::waiting(&self.slots, self.live.as_ref(), |p| {
            self.running.contains(p)
        })
    }

    /// After adopted listeners were put into the array: [`sets::rejoin`] (None: nothing to
    /// switch).
    pub fn rejoin(&self) -> anyhow::Result<Option<Plan>> {
        match &self.live {
            Some(live) => sets::rejoin(&self.slots, live, &self.closed()),
            None => Ok(None),
        }
    }

    /// The owner uids of the port's members (empty when there is none).
    pub fn member_uids(&self) -> Vec<u32> {
        let uids: BTreeSet<u32> = self.slots.iter().map(|s| s.meta.uid).collect();
        uids.into_iter().collect()
    }

    /// The kernel's view of the sockets whose slots match `keep`.
    fn listeners_of(&self, keep: impl Fn(&Slot) -> bool) -> Vec<Listen> {
        let cookies: Vec<u64> = (self.slots.iter().filter(|s| keep(s)))
            .map(|s| s.meta.cookie)
            .collect();
        (self.listeners.iter())
            .filter(|l| cookies.contains(&l.cookie))
            .copied()
            .collect()
    }

    /// The devices the sockets that take new connections (the live set's active and canary
    /// slots) are bound to; empty when nothing serves.
    pub fn serving_devices(&self) -> BTreeSet<u32> {
        (self.listeners_of(|s| s.active || s.canary).iter())
            .map(|l| l.device)
            .collect()
    }

    /// Whether PID's listeners `new` can take the port over from its current sockets (the live
    /// set's members and hold's placeholders) without a loss: the same owner uid, the same
    /// devices ([`device_conflict`]) and the same layout of groups ([`layout_conflict`]).
    /// `name` gives an interface's name, for the message.
    pub fn fits(
        &self,
        pid: i32,
        new: &[Listen],
        name: impl Fn(u32) -> String,
    ) -> anyhow::Result<()> {
        let port = self.port;
        // The kernel groups only sockets of one owner uid (sock_reuseport.c, reuseport_match):
        // a socket of another uid would never be selectable from this group. And the port's
        // members are the app's user's in every family: a process of another user that listens
        // in a family the app does not serve (`[::]:PORT` beside an app on `0.0.0.0:PORT`) is
        // someone else's, never the app's next version.
        if let Some((l, s)) = new.iter().find_map(|l| {
            (self.slots.iter())
                .find(|s| s.pid() != pid && s.meta.uid != l.uid)
                .map(|s| (l, s))
        }) {
            return Err(bad_input(format!(
                "the socket of pid {pid} on {} belongs to uid {}, the port's members to uid {} \
                 (pid {}): zdt hands over only between processes of the app's user (the kernel \
                 keeps sockets of different uids in separate groups); run the new version as \
                 uid {}",
                l.local, l.uid, s.meta.uid, s.meta.pid, s.meta.uid
            )));
        }
        // The sockets that take connections now, or would park them: the live set's and the
        // placeholders of `zdt-ctl hold`.
        let live = self.live_set();
        let now = self.listeners_of(|s| {
            s.pid() != pid && (live.names(s.index) || s.recorded() == Role::Hold)
        });
        if now.is_empty() {
            return Ok(());
        }
        let devices: Vec<(SocketAddr, u32)> = new.iter().map(|l| (l.local, l.device)).collect();
        let bound = now.iter().map(|l| l.device).collect();
        if let Some(why) = device_conflict(&bound, &devices, name) {
            return Err(err(
                Kind::Refused,
                format!("pid {pid} cannot take port {port} over: {why}; nothing was changed"),
            ));
        }
        let current = GroupSet::new(now.iter().map(Listen::group_kind));
        let new_kinds = GroupSet::new(new.iter().map(Listen::group_kind));
        let Some(why) = layout_conflict(&current, &new_kinds) else {
            return Ok(());
        };
        let holding = (self.slots.iter())
            .any(|s| s.recorded() == Role::Hold && now.iter().any(|l| l.cookie == s.meta.cookie));
        let todo = if holding && new_kinds.has_dual_stack() {
            "Start the new version with the same sockets or, if the app is meant to listen \
             dual-stack, restart `zdt-ctl hold` with --dual-stack"
        } else if holding {
            "Start the new version with the same sockets, or restart `zdt-ctl hold` with --split"
        } else {
            "Start the new version with the same sockets as the running one (IPV6_V6ONLY, and an \
             IPv4 socket or not). To change the layout, stop the old version first: a restart \
             without overlap, behind `zdt-ctl hold` started with the new layout"
        };
        Err(err(
            Kind::Refused,
            format!("pid {pid} cannot take port {port} over: {why}. {todo}; nothing was changed"),
        ))
    }

    /// Why the process `p`, which serves listeners in no slot, is not the app's next version,
    /// so that `zdt-ctl watch` leaves it alone: its listeners belong to a uid the port's members
    /// do not have (another user's process), it runs with a group (`gid`: a process's
    /// effective gid, None once it has exited) that none of the processes serving now has, or
    /// its listeners are bound to a device theirs are not (a SO_REUSEPORT group of its own).
    /// None: it may be.
    pub fn foreign(
        &self,
        p: &Process,
        gid: impl Fn(i32) -> Option<u32>,
        name: impl Fn(u32) -> String,
    ) -> Option<String> {
        let theirs: Vec<&Listen> = (self.listeners.iter())
            .filter(|l| l.member == Some(*p))
            .collect();
        let uids = self.member_uids();
        if let Some(other) =
            (theirs.iter().map(|l| l.uid)).find(|u| !uids.is_empty() && !uids.contains(u))
        {
            return Some(format!(
                "pid {} listens as uid {other}, not as the app's user (uid {})",
                p.pid,
                joined(&uids)
            ));
        }
        // The kernel groups sockets by uid only: a process of the app's user but another
        // group (another service run as the same user, `User=` without the unit's `Group=`)
        // would be grouped with the app's sockets all the same.
        let serving: BTreeSet<Process> = (self.slots.iter())
            .filter(|s| s.active || s.canary)
            .filter_map(|s| self.recorded(s.index))
            .filter(|m| self.running.contains(m))
            .collect();
        let gids: BTreeSet<u32> = serving.iter().filter_map(|m| gid(m.pid)).collect();
        if let Some(other) = gid(p.pid).filter(|g| !gids.is_empty() && !gids.contains(g)) {
            let gids: Vec<u32> = gids.into_iter().collect();
            return Some(format!(
                "pid {} runs as gid {other}, not as the app's group (gid {})",
                p.pid,
                joined(&gids)
            ));
        }
        let devices: Vec<(SocketAddr, u32)> = theirs.iter().map(|l| (l.local, l.device)).collect();
        let why = device_conflict(&self.serving_devices(), &devices, name)?;
        Some(format!("pid {} cannot take the port over: {why}", p.pid))
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
        place(&self.slots, self.live, self.target, pid, cookies, is_empty)
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

/// [`Snapshot::place`], from the maps alone: `State::insert` places sockets from the slots
/// and the two sets it reads under the lock, without the kernel's side.
pub fn place(
    slots: &[Slot],
    live: Option<ActiveSet>,
    target: Option<ActiveSet>,
    pid: i32,
    cookies: &[u64],
    is_empty: impl Fn(u32) -> bool,
) -> anyhow::Result<Placement> {
    // A slot of the rollback target whose socket has closed can never be restored (the
    // socket is gone for good): it need not stay reserved. Without this, three generations
    // of a large app held 3 x its sockets, and the third deploy found no free slot.
    let pruned = match &target {
        Some(p) => live_only(p, slots, |_| false)?,
        None => ActiveSet::EMPTY,
    };
    let live = live.unwrap_or(ActiveSet::EMPTY);
    let mut taken: Vec<u32> = slots.iter().map(|s| s.index).collect();
    let mut placed = Vec::new();
    for &cookie in cookies {
        if let Some(s) = slots.iter().find(|s| s.meta.cookie == cookie) {
            placed.push((s.index, false));
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
        placed.push((slot, true));
    }
    let reuses_target = placed
        .iter()
        .any(|&(slot, new)| new && target.is_some_and(|t| t.names(slot)));
    Ok(Placement {
        slots: placed,
        target: reuses_target.then_some(pruned),
    })
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
            listeners: Vec::new(),
            running: BTreeSet::new(),
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

    fn listen(cookie: u64, local: &str, uid: u32, device: u32) -> Listen {
        Listen {
            cookie,
            local: local.parse().unwrap(),
            v6only: false,
            uid,
            device,
            member: None,
        }
    }

    /// An active member, pid 100 (slot 0, cookie 10), on 0.0.0.0:80 as uid 1000 on no device.
    fn serving() -> Snapshot {
        let mut app = slot(0, 10, Role::Active);
        app.meta.uid = 1000;
        app.active = true;
        let mut s = snapshot(vec![app], &[0], &[]);
        s.listeners = vec![listen(10, "0.0.0.0:80", 1000, 0)];
        let member = Process { pid: 100, start: 1 };
        s.recorded.insert(0, member);
        s.running.insert(member);
        s
    }

    #[test]
    fn a_candidate_fits_only_with_the_members_uid_device_and_layout() {
        let s = serving();
        let name = |i: u32| format!("if{i}");
        s.fits(7, &[listen(20, "0.0.0.0:80", 1000, 0)], name)
            .expect("the same socket as the member's");
        let uid = s
            .fits(7, &[listen(20, "0.0.0.0:80", 0, 0)], name)
            .unwrap_err();
        assert_eq!(crate::error::kind_of(&uid), Kind::BadInput);
        assert!(uid.to_string().contains("belongs to uid 0"), "{uid}");
        let bound = s
            .fits(7, &[listen(20, "0.0.0.0:80", 1000, 3)], name)
            .unwrap_err();
        assert_eq!(crate::error::kind_of(&bound), Kind::Refused);
        assert!(bound.to_string().contains("if3"), "{bound}");
        // A dual-stack socket in place of an IPv4 one: another layout of groups.
        let mut dual = listen(20, "[::]:80", 1000, 0);
        dual.v6only = false;
        let layout = s.fits(7, &[dual], name).unwrap_err();
        assert_eq!(crate::error::kind_of(&layout), Kind::Refused);
        assert!(
            layout.to_string().contains("nothing was changed"),
            "{layout}"
        );
        // Nothing serves yet: any layout and device will do, but never another uid.
        let mut idle = serving();
        idle.live = None;
        idle.slots[0].active = false;
        idle.fits(7, &[listen(20, "0.0.0.0:80", 1000, 3)], name)
            .expect("nothing to fit beside");
    }

    #[test]
    fn the_watcher_leaves_another_users_groups_or_devices_process_alone() {
        let mut s = serving();
        let p = |pid| Process { pid, start: 5 };
        s.listeners.push(Listen {
            member: Some(p(7)),
            ..listen(20, "0.0.0.0:80", 1000, 0)
        });
        s.listeners.push(Listen {
            member: Some(p(8)),
            ..listen(21, "0.0.0.0:80", 0, 0)
        });
        s.listeners.push(Listen {
            member: Some(p(9)),
            ..listen(22, "0.0.0.0:80", 1000, 4)
        });
        let name = |i: u32| format!("if{i}");
        // The member (pid 100) and pids 7 to 9 run as gid 1000.
        let gid = |pid: i32| {
            Some(if (7..=9).contains(&pid) || pid >= 100 {
                1000
            } else {
                50
            })
        };
        assert_eq!(s.foreign(&p(7), gid, name), None);
        let other = s.foreign(&p(8), gid, name).expect("another uid");
        assert!(other.contains("pid 8 listens as uid 0"), "{other}");
        let bound = s.foreign(&p(9), gid, name).expect("another device");
        assert!(bound.contains("pid 9 cannot take the port over"), "{bound}");
        // The app's user, another group.
        let group = |pid: i32| Some(if pid == 7 { 50 } else { 1000 });
        let other = s.foreign(&p(7), group, name).expect("another gid");
        assert!(
            other.contains("pid 7 runs as gid 50, not as the app's group (gid 1000)"),
            "{other}"
        );
        // A member that has exited tells no group; nor does a newcomer that has.
        assert_eq!(s.foreign(&p(7), |pid| (pid == 7).then_some(50), name), None);
        assert_eq!(
            s.foreign(&p(7), |pid| (pid != 7).then_some(1000), name),
            None
        );
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
