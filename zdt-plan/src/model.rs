//! A model test of [`super::sets`]: random sequences of commands, kills and process exits over
//! a pure model of one port, with the invariants checked after every step.
//!
//! The model: processes (pid, start time; apps, or `zdt-ctl hold` with its placeholders), each
//! with listening sockets (family, cookie); the socket array (slot -> cookie, emptied when the
//! socket closes); the slot metadata; the three entries of ZDT_ACTIVE with the live one and the
//! target's ([`Buffers`]: the live set, None before the first switch; the rollback target, read
//! as none when empty, without probe lists).
//! Commands run as `cmd/*.rs` and `State` run them: a locked command first runs `sets::repair`
//! and `settle::follow_kernel` (`sets::drift`, the adoption of a member's re-created listener,
//! the heir of an inherited socket, `sets::rejoin`); a new socket gets the slot
//! `State::insert` gives it; a plan is written as `State::apply_steps` writes it (entries the
//! control word does not name, the control word, roles: [`Buffers::commit`]), and the command
//! can be killed after each write. The ground truth
//! (which sockets a promote switched to, which placeholders hold registered, which socket a
//! slot held when a set naming it was written) is the driver's alone.
//!
//! The invariants, checked after every step (each check names its number):
//! 1. A promote that switched (not killed) saved the set before it, and a rollback right after
//!    it is not refused while a member of that set listens. A rollback never would restore the
//!    live set itself ([`Model::target_is_live`]), but for the reasons in [`Why`]:
//!    ARCHITECTURE.md's "the rollback target is never the live set" holds for what every
//!    command writes, killed anywhere, but not after a drain or a close.
//! 2. While the program can select a socket of a family (active or canary list; the rollback
//!    target's active or canary list, a slot recorded active, canary or draining; hold list),
//!    a SYN of it reaches only a socket a promote switched to (active, canary, the target's)
//!    or a registered placeholder (hold), never a candidate. (With none selectable, the kernel
//!    hashes over every listener, warming ones too: by design.)
//! 3. Once a plan wrote all its roles, every live slot records what the live set makes it
//!    (active, canary, hold; else draining or candidate); after the repair, no member of the
//!    live set records candidate.
//! 4. A slot that the live set names, or the target names in its active or canary lists (what
//!    rollback restores), is never given to a new socket: it holds the socket it held when
//!    that set was written, or none.
//! 5. A promote's `to_stop` never names the promoted process, hold's, or one that never served;
//!    a plan's `drained` names only processes that served.
//! 6. A decision never refuses a promote of a process that listens.
//!
//! A refused decision must find the model as it was just before ([`Model::decide`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use proptest::prelude::*;
use zdt_common::{family_index, ActiveSet, SlotList, SlotMeta, AF_INET, AF_INET6};

use super::{
    buffers::{without_probe, Buffers},
    sets::{self, Plan, Process, Role, Slot},
    snapshot::{Listen, Snapshot},
};

const PORT: u16 = 80;

/// Where a command is killed: not, after its insert (or its lock), after writing the entries
/// (before the control word), after the switch (before the roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kill {
    Not,
    Inserted,
    Staged,
    Switched,
}

/// `promote --probe`: off, ready, never ready (exit 4, the set before written back), killed
/// while it waits (the probe lists stay live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Off,
    Ready,
    NeverReady,
    Killed,
}

/// After a promote's switch: nothing, `--stop-old`, or a failed watch (unready in probation,
/// dead right after the switch) that restores the set before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Fine,
    StopOld,
    Unready,
    Dies,
}

/// A step. `who` picks among the processes a step applies to, modulo their number, in pid
/// order (pids are 100, 101, ... in the order processes start).
#[derive(Clone, Debug)]
enum Op {
    /// An app starts with (IPv4, IPv6) listeners: warming up, in no slot.
    Start(usize, usize),
    /// Promote app `who` (one that listens): weight, probe, kill, what follows.
    Promote(usize, Option<u32>, Probe, Kill, After),
    /// The last promote again, same pid and weight (a deploy script's retry).
    Retry(Kill),
    Rollback(Kill),
    /// Drain `who` (any process, also one that exited), with `zdt-ctl drain`'s flags.
    Drain(usize, sets::DrainOpts, Kill),
    /// `who` exits: its sockets close.
    Exit(usize),
    /// `who` closes its `which`th open listener.
    Close(usize, usize),
    /// `zdt-ctl hold` registers its placeholders (started if none runs); `moved`: they moved a
    /// queue (shutdown, listen), which took them out of the array. Killing it closes them.
    Hold(bool, Kill),
    /// Another locked command: the repair and membership following the kernel alone.
    Lock,
    /// `who` re-creates its `which`th open listener in process: a new socket of the same
    /// family, then the old one closes.
    Relisten(usize, usize),
    /// A new process inherits every open listener of `who` (a binary upgrade), and `who` exits.
    Inherit(usize),
}

#[derive(Clone, Debug, PartialEq)]
struct Proc {
    p: Process,
    hold: bool,
    /// It has exited (its pid and start time name no process any more).
    gone: bool,
    /// (cookie, family, open)
    socks: Vec<(u64, u32, bool)>,
}

/// Why a rollback may restore the live set itself (invariant 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// Design: only promote and rollback write the target, so a drain can come back to it
    /// (draining a canary returns to the set before the canary). Nothing is lost.
    Drained,
    /// Design: listeners closed, and what is left of the target is the live set, or of the
    /// live set the target (a canary beside the target's members exited; the target's other
    /// members are gone for good): rollback says there is nothing to roll back to.
    Closed,
}

#[derive(Clone, Debug, PartialEq)]
struct Model {
    procs: Vec<Proc>,
    array: BTreeMap<u32, u64>,
    meta: BTreeMap<u32, SlotMeta>,
    bufs: Buffers,
    /// Ground truth: sockets a promote switched to; placeholders hold made live.
    promoted: BTreeSet<u64>,
    registered: BTreeSet<u64>,
    /// Ground truth: per entry, each slot its set names (any list) -> the socket in it when
    /// the entry was written.
    seen: [BTreeMap<u32, Option<u64>>; 3],
    /// A command was killed between a switch and its roles, and no plan wrote all roles since.
    stale_roles: bool,
    last: Option<(Process, Option<u32>)>,
    next: u64,
    /// Why the target is the live set (since the step that made it so), and the target it
    /// excuses; what this step did.
    why_live: Option<(Why, ActiveSet)>,
    why_now: Option<Why>,
}

/// Why a step ended early: a refusal (nothing more written), a kill, a violated invariant.
enum Stop {
    Refused(String),
    Killed,
    Violation(String),
}

type Step<T = ()> = Result<T, Stop>;

fn violated<T>(check: &str, msg: String) -> Step<T> {
    Err(Stop::Violation(format!("{check}: {msg}")))
}

/// An active set in a line, IPv4/IPv6 per list.
fn brief(set: &ActiveSet) -> String {
    let l = |x: &[SlotList; 2]| format!("{:?}/{:?}", x[0].as_slice(), x[1].as_slice());
    let (a, c, w) = (l(&set.lists), l(&set.canary), set.canary_weight);
    format!(
        "active {a} canary {c}@{w} probe {} hold {}",
        l(&set.probe),
        l(&set.hold)
    )
}

impl Model {
    fn new() -> Model {
        Model {
            procs: Vec::new(),
            array: BTreeMap::new(),
            meta: BTreeMap::new(),
            bufs: Buffers {
                entries: [ActiveSet::EMPTY; 3],
                live: None,
                target: 2,
            },
            promoted: BTreeSet::new(),
            registered: BTreeSet::new(),
            seen: Default::default(),
            stale_roles: false,
            last: None,
            next: 1000,
            why_live: None,
            why_now: None,
        }
    }

    fn set(&self) -> ActiveSet {
        self.live().unwrap_or(ActiveSet::EMPTY)
    }

    fn live(&self) -> Option<ActiveSet> {
        self.bufs.live_set()
    }

    /// `State::previous_set`.
    fn previous(&self) -> Option<ActiveSet> {
        self.bufs.target_set()
    }

    /// The rollback target's entry, without probe lists.
    fn target(&self) -> ActiveSet {
        without_probe(&self.bufs.entries[self.bufs.target])
    }

    /// `State::snapshot`.
    fn snapshot(&self) -> Snapshot {
        let recorded = self
            .meta
            .keys()
            .filter_map(|&i| Some((i, self.recorded(i)?)));
        let slots = self.slots();
        let running: BTreeSet<Process> = (self.procs.iter())
            .filter(|x| !x.gone && slots.iter().any(|s| s.process() == x.p))
            .map(|x| x.p)
            .collect();
        // As `State::snapshot` reads them: every open listener, its member looked for only
        // where the maps do not say.
        let mut listeners: Vec<Listen> = Vec::new();
        for &(cookie, family, open) in self.procs.iter().flat_map(|x| &x.socks) {
            if !open || listeners.iter().any(|l| l.cookie == cookie) {
                continue;
            }
            let local = if family == AF_INET {
                SocketAddr::from(([0, 0, 0, 0], PORT))
            } else {
                SocketAddr::from(([0u16; 8], PORT))
            };
            listeners.push(Listen {
                cookie,
                local,
                v6only: true,
                uid: 0,
                device: 0,
                member: Snapshot::unclaimed(&slots, &running, cookie)
                    .then(|| self.member(cookie))
                    .flatten(),
            });
        }
        Snapshot {
            port: PORT,
            slots,
            live: self.live(),
            target: self.previous(),
            recorded: recorded.collect(),
            listeners,
            running,
        }
    }

    /// `State::slots`: the slots that hold the socket their metadata records.
    fn slots(&self) -> Vec<Slot> {
        let live = self.set();
        let kept = self
            .meta
            .iter()
            .filter(|(i, m)| self.array.get(i) == Some(&m.cookie));
        kept.map(|(&index, &meta)| Slot {
            index,
            meta,
            steered: 0,
            migrated: 0,
            recent: 0,
            active: live.contains(index),
            canary: live.is_canary(index),
        })
        .collect()
    }

    fn proc_of(&self, p: Process) -> &Proc {
        self.procs
            .iter()
            .find(|x| x.p == p)
            .expect("a process of the model")
    }

    /// Its open sockets: (cookie, family).
    fn open(&self, p: Process) -> Vec<(u64, u32)> {
        let socks = self.proc_of(p).socks.iter();
        socks.filter(|s| s.2).map(|&(c, f, _)| (c, f)).collect()
    }

    fn spawn(&mut self, v4: usize, v6: usize, hold: bool) -> Process {
        let (pid, start) = (100 + self.procs.len() as i32, self.next);
        let families = std::iter::repeat_n(AF_INET, v4).chain(std::iter::repeat_n(AF_INET6, v6));
        let socks = families
            .zip(start + 1..)
            .map(|(f, c)| (c, f, true))
            .collect();
        self.next += 1 + (v4 + v6) as u64;
        let p = Process { pid, start };
        self.procs.push(Proc {
            p,
            hold,
            gone: false,
            socks,
        });
        p
    }

    /// `p` closes a socket (all of them and exits, if `cookie` is None): a socket no other
    /// process holds stops listening, and the kernel empties its slot.
    fn close(&mut self, p: Process, cookie: Option<u64>) {
        self.why_now.get_or_insert(Why::Closed);
        let x = self.procs.iter_mut().find(|x| x.p == p).expect("a process");
        x.gone |= cookie.is_none();
        let mut closed = Vec::new();
        for s in x.socks.iter_mut() {
            if s.2 && cookie.is_none_or(|c| c == s.0) {
                s.2 = false;
                closed.push(s.0);
            }
        }
        for c in closed {
            let held = self
                .procs
                .iter()
                .any(|x| x.socks.iter().any(|s| s.0 == c && s.2));
            if !held {
                self.array.retain(|_, a| *a != c);
            }
        }
    }

    /// The process that serves the open listener `cookie` ([`crate::member`]: the lowest
    /// pid among the apps that hold it; hold's placeholders serve nothing).
    fn member(&self, cookie: u64) -> Option<Process> {
        let holds = |x: &&Proc| !x.hold && x.socks.iter().any(|s| s.0 == cookie && s.2);
        self.procs
            .iter()
            .filter(holds)
            .map(|x| x.p)
            .min_by_key(|p| p.pid)
    }

    /// The process a slot's metadata records (`State::recorded`).
    fn recorded(&self, slot: u32) -> Option<Process> {
        let m = self.meta.get(&slot)?;
        Some(Process {
            pid: m.pid as i32,
            start: m.pid_start,
        })
    }

    /// `settle::follow_kernel`: membership follows the processes that hold the listeners.
    fn follow_kernel(&mut self) -> Step {
        if self.live().is_none() {
            return Ok(());
        }
        let read = self.snapshot();
        let drift = read.drift();
        for &(slot, heir) in &drift.rehome {
            let m = self.meta.get_mut(&slot).expect("a slot's metadata");
            (m.pid, m.pid_start) = (heir.pid as u32, heir.start);
        }
        for &(cookie, p, _) in &drift.adopt {
            let family = (self.procs.iter().flat_map(|x| &x.socks))
                .find(|s| s.0 == cookie)
                .map(|s| s.1)
                .expect("an adopted listener is open");
            // One that finds no free slot is left out (settle::follow_kernel goes on).
            if let Err(Stop::Violation(v)) = self.insert(p, &[(cookie, family)]) {
                return Err(Stop::Violation(v));
            }
        }
        let (read, snap) = (self.snapshot(), self.clone());
        if let Some(plan) = self.decide(&snap, "rejoin", read.rejoin())? {
            self.apply(&plan, Kill::Not, &[], &[]);
        }
        Ok(())
    }

    fn seen<'a>(&self, lists: impl Iterator<Item = &'a SlotList>) -> BTreeMap<u32, Option<u64>> {
        let slots = lists.flat_map(|l| l.as_slice().iter());
        slots.map(|&i| (i, self.array.get(&i).copied())).collect()
    }

    /// `State::commit`, killed after the entries' writes (before the control word) if `staged`;
    /// whether it wrote everything.
    fn commit(&mut self, set: Option<ActiveSet>, target: Option<ActiveSet>, staged: bool) -> bool {
        let commit = self.bufs.commit(set, target);
        // A set is decided over the sockets the slots hold now, also when its entry holds it
        // already (it is not written again then).
        let decided = commit.live.filter(|_| set.is_some());
        let written = commit.writes.iter().map(|&(i, s)| (i, s));
        for (i, set) in written.chain(decided.map(|i| (i, set.unwrap_or(ActiveSet::EMPTY)))) {
            let lists = [set.lists, set.canary, set.probe, set.hold];
            self.seen[i] = self.seen(lists.iter().flatten());
        }
        let upto = staged.then_some(commit.writes.len());
        self.bufs = self.bufs.after(&commit, upto);
        !staged
    }

    /// `State::save_rollback`.
    fn save_rollback(&mut self, set: &ActiveSet) {
        self.commit(None, Some(*set), false);
    }

    /// `State::write_set`.
    fn write_set(&mut self, set: ActiveSet) {
        self.commit(Some(set), None, false);
    }

    /// `State::apply_steps`, killed after the write `kill` names; whether it wrote everything.
    /// The switch makes `promoted` active or canary (a promote's), `registered` placeholders.
    fn apply(&mut self, plan: &Plan, kill: Kill, promoted: &[u64], registered: &[u64]) -> bool {
        if !self.commit(Some(plan.set), plan.rollback, kill == Kill::Staged) {
            return false;
        }
        self.promoted.extend(promoted);
        self.registered.extend(registered);
        if kill == Kill::Switched {
            self.stale_roles = true;
            return false;
        }
        for &(slot, role) in &plan.roles {
            self.meta.get_mut(&slot).expect("a slot's metadata").role = role.raw();
        }
        // Every plan but hold's records the role of every slot (`roles_after`).
        self.stale_roles &= !registered.is_empty();
        true
    }

    /// `State::insert`: `p`'s sockets into the array as candidates (one already there keeps
    /// its slot); their slots.
    fn insert(&mut self, p: Process, socks: &[(u64, u32)]) -> Step<Vec<u32>> {
        let cookies: Vec<u64> = socks.iter().map(|s| s.0).collect();
        let empty = |i| !self.array.contains_key(&i);
        let placement = (self.snapshot())
            .place(p.pid, &cookies, empty)
            .map_err(|e| Stop::Refused(e.to_string()))?;
        if let Some(target) = &placement.target {
            self.save_rollback(target);
        }
        let chosen: Vec<(u64, u32, u32, bool)> = (socks.iter().zip(&placement.slots))
            .map(|(&(cookie, family), &(slot, new))| (cookie, family, slot, new))
            .collect();
        for &(cookie, family, slot, _) in chosen.iter().filter(|c| c.3) {
            let restorable = self.target().contains(slot) || self.target().is_canary(slot);
            if self.set().names(slot) || restorable {
                let (live, target) = (brief(&self.set()), brief(&self.target()));
                let msg = format!("socket {cookie} into slot {slot}; live {live}; target {target}");
                return violated("4 (a named slot is never given to a new socket)", msg);
            }
            let (pid, pid_start, role) = (p.pid as u32, p.start, Role::Candidate.raw());
            let meta = SlotMeta {
                cookie,
                pid_start,
                pid,
                role,
                family,
                ..SlotMeta::default()
            };
            self.meta.insert(slot, meta);
            self.array.insert(slot, cookie);
        }
        Ok(chosen.iter().map(|c| c.2).collect())
    }

    /// A decision of `sets`: an Err is a refusal, which must find the model as it was just
    /// before (`snap`): a refused command writes nothing.
    fn decide<T>(&self, snap: &Model, what: &str, r: anyhow::Result<T>) -> Step<T> {
        r.map_err(|e| match self == snap {
            true => Stop::Refused(format!("{what}: {e:#}")),
            false => Stop::Violation(format!("a refused {what} changed the model: {e:#}")),
        })
    }

    /// What a locked command runs first: `settle::repair`, then `settle::follow_kernel`.
    fn lock(&mut self) -> Step {
        if self.live().is_none() {
            return Ok(());
        }
        // A killed prober's claim is gone with it: nothing claims the probe lists.
        if let Some(plan) = self.snapshot().repair(false) {
            self.apply(&plan, Kill::Not, &[], &[]);
        }
        let slots = self.slots();
        let stale = slots
            .iter()
            .find(|s| (s.active || s.canary) && s.recorded() == Role::Candidate);
        if let Some(s) = stale {
            let msg = format!("after the repair, live slot {} records candidate", s.index);
            return violated("3 (roles match the set)", msg);
        }
        self.follow_kernel()
    }

    /// The sockets a SYN of `family` can reach, with the list that reaches each; None when the
    /// program selects none (the kernel hashes over every listener).
    fn syn_targets(&self, family: u32) -> Option<Vec<(u64, &'static str)>> {
        let (set, i) = (self.live()?, family_index(family)?);
        let sel = |l: &SlotList, name| -> Vec<(u64, &'static str)> {
            let cookies = l.as_slice().iter().filter_map(|s| self.array.get(s));
            cookies.map(|&c| (c, name)).collect()
        };
        let (active, canary) = (sel(&set.lists[i], "active"), sel(&set.canary[i], "canary"));
        let mut out = if set.canary_weight > 0 {
            canary.clone()
        } else {
            Vec::new()
        };
        // The program's `previous`: the entry the control word names as the target (not the
        // live one), its slots whose metadata records a served role.
        let previous = match self.bufs.entries.get(self.bufs.target) {
            Some(t) if Some(self.bufs.target) != self.bufs.live => {
                let served = |s: &&u32| {
                    self.meta
                        .get(*s)
                        .is_some_and(|m| zdt_common::served_role(m.role))
                };
                let (a, c) = (t.lists[i].as_slice(), t.canary[i].as_slice());
                let slots = a.iter().filter(served).chain(c.iter().filter(served));
                slots
                    .filter_map(|s| self.array.get(s))
                    .map(|&c| (c, "previous"))
                    .collect()
            }
            _ => Vec::new(),
        };
        let first = [active, canary, previous, sel(&set.hold[i], "hold")]
            .into_iter()
            .find(|l| !l.is_empty());
        out.extend(first?);
        Some(out)
    }

    /// Who `set` makes serve, by process: (process, active or canary) for each slot it names
    /// whose socket listens, or whose socket closed while its process still has a live slot
    /// (it re-created its listener); active wins over canary; with `skip_candidates`, slots
    /// recorded candidate are left out. The canary weight counts when there is a canary.
    fn members(&self, set: &ActiveSet, skip_candidates: bool) -> (BTreeSet<(Process, Role)>, u32) {
        let slots = self.slots();
        let mut out = BTreeSet::new();
        for (lists, role) in [(&set.canary, Role::Canary), (&set.lists, Role::Active)] {
            for &i in lists.iter().flat_map(|l| l.as_slice()) {
                let p = match slots.iter().find(|s| s.index == i) {
                    Some(s) if skip_candidates && s.recorded() == Role::Candidate => continue,
                    Some(s) => s.process(),
                    None => match self.recorded(i) {
                        Some(p)
                            if slots
                                .iter()
                                .any(|s| s.process() == p && s.recorded() != Role::Hold) =>
                        {
                            p
                        }
                        _ => continue,
                    },
                };
                out.remove(&(p, Role::Canary));
                out.insert((p, role));
            }
        }
        let weight = if out.iter().any(|m| m.1 == Role::Canary) {
            set.canary_weight
        } else {
            0
        };
        (out, weight)
    }

    /// Whether a rollback now would restore the live set itself (`sets::rollback` refuses it
    /// as "the set that is live now"): the same processes in the same roles, the target's
    /// candidates left out.
    fn target_is_live(&self) -> bool {
        self.target_vs_live() == Some(true)
    }

    /// Whether the target names the live set's members; None when it names no one now (its
    /// members' sockets are all closed, though a member that re-created its listener may be
    /// re-adopted and bring it back to what it was).
    fn target_vs_live(&self) -> Option<bool> {
        let (Some(previous), Some(live)) = (self.previous(), self.live()) else {
            return Some(false);
        };
        let back = self.members(&previous, true);
        (!back.0.is_empty()).then(|| back == self.members(&live, false))
    }

    /// The invariants that hold after every step.
    fn check(&self) -> Step {
        let live = self.set();
        if self.why_live.is_none() && self.target_is_live() {
            return violated("1 (rollback target)", "it is the live set".into());
        }
        for family in [AF_INET, AF_INET6] {
            for (cookie, list) in self.syn_targets(family).unwrap_or_default() {
                let hold = list == "hold";
                let known = if hold {
                    &self.registered
                } else {
                    &self.promoted
                };
                if !known.contains(&cookie) {
                    let msg = format!(
                        "a SYN of family {family} reaches socket {cookie} through the {list} \
                         list, which no {} made {list}; live {}",
                        if hold { "hold" } else { "promote" },
                        brief(&live)
                    );
                    return violated("2 (SYNs reach only promoted sockets)", msg);
                }
            }
        }
        for s in self.slots().iter().filter(|_| !self.stale_roles) {
            let named = [
                (live.contains(s.index), Role::Active),
                (live.is_canary(s.index), Role::Canary),
                (live.is_hold(s.index), Role::Hold),
            ];
            let want = named.into_iter().find(|n| n.0).map(|n| n.1);
            let recorded = s.recorded();
            let ok = match want {
                Some(r) => recorded == r,
                None => matches!(recorded, Role::Draining | Role::Candidate | Role::Hold),
            };
            if !ok {
                let (i, pid) = (s.index, s.pid());
                let msg = format!("slot {i} (pid {pid}) records {recorded}, the set says {want:?}");
                return violated("3 (roles match the set)", msg);
            }
        }
        let target = self.target();
        let restorable = |i: &u32| target.contains(*i) || target.is_canary(*i);
        let live_seen = self
            .bufs
            .live
            .map(|i| self.seen[i].clone())
            .unwrap_or_default();
        let mut target_seen = self.seen[self.bufs.target].clone();
        target_seen.retain(|i, _| restorable(i));
        for (which, seen) in [("live set", &live_seen), ("target", &target_seen)] {
            for (slot, then) in seen {
                let now = self.array.get(slot).copied();
                if now.is_some() && now != *then {
                    let msg = format!("slot {slot} of the {which} held {then:?}, holds {now:?}");
                    return violated("4 (a named slot is never given to a new socket)", msg);
                }
            }
        }
        Ok(())
    }

    /// Invariant 5.
    fn check_stopped(&self, promoted: Option<Process>, plan: &Plan) -> Step {
        let served = |q: &Process| {
            let x = self.proc_of(*q);
            !x.hold && x.socks.iter().any(|s| self.promoted.contains(&s.0))
        };
        for (list, who) in [("to_stop", &plan.to_stop), ("drained", &plan.drained)] {
            if let Some(q) = who.iter().find(|q| Some(**q) == promoted || !served(q)) {
                let (pid, hold, served) = (q.pid, self.proc_of(*q).hold, served(q));
                let msg = format!("{list} {who:?} names pid {pid} (hold {hold}, served {served})");
                return violated("5 (to_stop and drained name who served)", msg);
            }
        }
        Ok(())
    }

    /// Invariant 1, after a promote that switched and wrote everything.
    fn check_switched(&self, before: &ActiveSet) -> Step {
        if self.target() != without_probe(before) {
            let msg = format!("a switch saved {}", brief(&self.target()));
            return violated("1 (rollback target)", msg);
        }
        let slots = self.slots();
        let listening = |named: &dyn Fn(u32) -> bool| {
            (slots.iter()).any(|s| named(s.index) && s.recorded() != Role::Candidate)
        };
        if !listening(&|i| before.contains(i) || before.is_canary(i)) {
            return Ok(());
        }
        // With no active member left, the set before is its canary alone, taking every
        // connection: when that is the process just promoted, there is nothing to go back to.
        if !listening(&|i| before.contains(i)) {
            return Ok(());
        }
        match self.snapshot().rollback() {
            Err(e) => violated(
                "1 (rollback target)",
                format!("rollback after a promote: {e:#}"),
            ),
            Ok(_) => Ok(()),
        }
    }
}

/// The commands, as `cmd/*.rs` run them.
impl Model {
    fn promote(
        &mut self,
        p: Process,
        weight: Option<u32>,
        probe: Probe,
        kill: Kill,
        after: After,
    ) -> Step {
        self.last = Some((p, weight));
        self.lock()?;
        let socks = self.open(p);
        if socks.is_empty() {
            return Err(Stop::Refused("pid does not listen (exit 4)".into()));
        }
        let snap = self.clone();
        let families = socks.iter().map(|s| s.1);
        self.decide(&snap, "admit", sets::admit(&[p.pid], PORT, families))?;
        if probe != Probe::Off {
            let new = self.insert(p, &socks)?;
            let (before, snap) = (self.set(), self.clone());
            let set = self.decide(&snap, "probe", self.snapshot().probe(&new))?;
            self.write_set(set);
            match probe {
                Probe::Killed => return Err(Stop::Killed),
                Probe::NeverReady => {
                    self.write_set(before);
                    return Err(Stop::Refused("never ready through --probe (exit 4)".into()));
                }
                _ => {}
            }
        }
        let new = self.insert(p, &socks)?;
        if kill == Kill::Inserted {
            return Err(Stop::Killed);
        }
        let (before, snap) = (self.set(), self.clone());
        let target = self.previous();
        let plan = self.snapshot().promote(p.pid, &new, weight);
        if let Err(e) = &plan {
            let e = format!("{e:#}");
            return violated("6 (a promote of a listening process is decided)", e);
        }
        let plan = self.decide(&snap, "promote", plan)?;
        self.check_stopped(Some(p), &plan)?;
        let cookies: Vec<u64> = socks.iter().map(|s| s.0).collect();
        if !self.apply(&plan, kill, &cookies, &[]) {
            return Err(Stop::Killed);
        }
        if plan.rollback.is_some() {
            self.check_switched(&before)?;
        }
        match after {
            After::Fine => return Ok(()),
            // --stop-old conflicts with --weight.
            After::StopOld if weight.is_none() => {
                plan.to_stop.iter().for_each(|&q| self.close(q, None));
                return Ok(());
            }
            After::StopOld => return Ok(()),
            After::Dies => self.close(p, None),
            After::Unready => {}
        }
        let snap = self.clone();
        let plan = self.snapshot().restore(&before, target.as_ref());
        if let Some(plan) = self.decide(&snap, "restore", plan)? {
            self.apply(&plan, Kill::Not, &[], &[]);
        }
        Err(Stop::Refused("the watch failed: restored (exit 8)".into()))
    }

    /// `rollback`, or `drain` of `drain.0` (with the flags `drain.1`).
    fn switch(&mut self, drain: Option<(Process, sets::DrainOpts)>, kill: Kill) -> Step {
        self.lock()?;
        if kill == Kill::Inserted {
            return Err(Stop::Killed);
        }
        let (read, snap) = (self.snapshot(), self.clone());
        let plan = match drain {
            None => read.rollback(),
            Some((p, opts)) => read.drain(p.pid, opts),
        };
        let plan = self.decide(
            &snap,
            if drain.is_some() { "drain" } else { "rollback" },
            plan,
        )?;
        self.check_stopped(None, &plan)?;
        self.why_now = drain.map(|_| Why::Drained);
        match self.apply(&plan, kill, &[], &[]) {
            true => Ok(()),
            false => Err(Stop::Killed),
        }
    }

    /// `cmd/hold.rs`, `register`.
    fn hold(&mut self, moved: bool, kill: Kill) -> Step {
        let h = match self
            .procs
            .iter()
            .find(|x| x.hold && x.socks.iter().any(|s| s.2))
        {
            Some(x) => x.p,
            None => self.spawn(1, 1, true),
        };
        let socks = self.open(h);
        if moved {
            self.array.retain(|_, c| !socks.iter().any(|s| s.0 == *c));
        }
        self.lock()?;
        let live = self.slots();
        let (mut indices, mut missing) = (Vec::new(), Vec::new());
        for &s in &socks {
            match live.iter().find(|l| l.meta.cookie == s.0) {
                Some(l) => indices.push(l.index),
                None => missing.push(s),
            }
        }
        indices.extend(self.insert(h, &missing)?);
        let (read, snap) = (self.snapshot(), self.clone());
        let plan = match kill {
            Kill::Inserted => None,
            _ => Some(self.decide(&snap, "hold", read.hold(&indices))?),
        };
        let cookies: Vec<u64> = socks.iter().map(|s| s.0).collect();
        if !plan.is_some_and(|plan| self.apply(&plan, kill, &[], &cookies)) {
            self.close(h, None);
            return Err(Stop::Killed);
        }
        Ok(())
    }

    /// Runs `op`; what it did, in words.
    fn run(&mut self, op: &Op) -> (String, Step) {
        let pick = |m: &Model, who: usize, app: bool, listens: bool| -> Option<Process> {
            let keep = |x: &&Proc| (!app || !x.hold) && (!listens || x.socks.iter().any(|s| s.2));
            let all: Vec<Process> = m.procs.iter().filter(keep).map(|x| x.p).collect();
            (!all.is_empty()).then(|| all[who % all.len()])
        };
        let nobody = (String::from("no such process"), Ok(()));
        match *op {
            Op::Start(v4, v6) => {
                let p = self.spawn(v4, v6, false);
                (
                    format!("start pid {} ({v4} IPv4, {v6} IPv6)", p.pid),
                    Ok(()),
                )
            }
            Op::Promote(who, weight, probe, kill, after) => {
                let Some(p) = pick(self, who, true, true) else {
                    return nobody;
                };
                let what = format!(
                    "promote pid {} {weight:?} {probe:?} {kill:?} {after:?}",
                    p.pid
                );
                (what, self.promote(p, weight, probe, kill, after))
            }
            Op::Retry(kill) => {
                let Some((p, weight)) = self.last else {
                    return nobody;
                };
                let what = format!("retry: promote pid {} {weight:?} {kill:?}", p.pid);
                (what, self.promote(p, weight, Probe::Off, kill, After::Fine))
            }
            Op::Rollback(kill) => (format!("rollback {kill:?}"), self.switch(None, kill)),
            Op::Drain(who, opts, kill) => {
                let Some(p) = pick(self, who, false, false) else {
                    return nobody;
                };
                let what = format!("drain pid {} {opts:?} {kill:?}", p.pid);
                (what, self.switch(Some((p, opts)), kill))
            }
            Op::Exit(who) => {
                let Some(p) = pick(self, who, false, true) else {
                    return nobody;
                };
                self.close(p, None);
                (format!("pid {} exits", p.pid), Ok(()))
            }
            Op::Close(who, which) => {
                let Some(p) = pick(self, who, false, true) else {
                    return nobody;
                };
                let open = self.open(p);
                let cookie = open[which % open.len()].0;
                self.close(p, Some(cookie));
                (format!("pid {} closes socket {cookie}", p.pid), Ok(()))
            }
            Op::Hold(moved, kill) => (
                format!("hold registers, moved {moved}, {kill:?}"),
                self.hold(moved, kill),
            ),
            Op::Lock => ("a locked command".into(), self.lock()),
            Op::Relisten(who, which) => {
                let Some(p) = pick(self, who, true, true) else {
                    return nobody;
                };
                let open = self.open(p);
                let (old, family) = open[which % open.len()];
                let new = self.next;
                self.next += 1;
                let x = self.procs.iter_mut().find(|x| x.p == p).expect("a process");
                x.socks.push((new, family, true));
                // Ground truth: a promoted process's new listener is as promoted as its old.
                if self.promoted.contains(&old) {
                    self.promoted.insert(new);
                }
                self.close(p, Some(old));
                (
                    format!("pid {} re-creates socket {old} as {new}", p.pid),
                    Ok(()),
                )
            }
            Op::Inherit(who) => {
                let Some(p) = pick(self, who, true, true) else {
                    return nobody;
                };
                let socks: Vec<(u64, u32, bool)> = self.proc_of(p).socks.clone();
                let heir = self.spawn(0, 0, false);
                let x = self
                    .procs
                    .iter_mut()
                    .find(|x| x.p == heir)
                    .expect("a process");
                x.socks = socks.into_iter().filter(|s| s.2).collect();
                self.close(p, None);
                let what = format!("pid {} inherits pid {}'s listeners", heir.pid, p.pid);
                (what, Ok(()))
            }
        }
    }
}

/// Runs `ops` from a port with nothing promoted, checking the invariants after every step; on
/// a violation, the steps so far and the state.
fn replay(ops: &[Op]) -> Result<(), String> {
    // An ActiveSet is 32 KiB (eight lists of 1024 slots), and the model's frames hold several
    // (a snapshot of the model, plans, sets): more than a test thread's 2 MiB stack.
    let ops = ops.to_vec();
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || replay_here(&ops))
        .expect("a thread")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Whether every slot of `a`'s active and canary lists is in the same list of `b`, and the
/// canary weights agree.
fn within(a: &ActiveSet, b: &ActiveSet) -> bool {
    let sub = |x: &[SlotList; 2], y: &[SlotList; 2]| {
        (0..2).all(|f| x[f].as_slice().iter().all(|i| y[f].as_slice().contains(i)))
    };
    sub(&a.lists, &b.lists) && sub(&a.canary, &b.canary) && a.canary_weight == b.canary_weight
}

fn replay_here(ops: &[Op]) -> Result<(), String> {
    let mut m = Model::new();
    let mut log = Vec::new();
    for op in ops {
        let (what, r) = m.run(op);
        // An excuse lasts while the target is the live set, and while the target names no one
        // that listens now (it may name the live set again once a re-listen is re-adopted).
        // An excuse covers the target it was given for, and what `insert` prunes of it (closed
        // slots); a failed promote's restore writes it back as it was.
        let covered = m.why_live.filter(|(_, t)| within(&m.target(), t));
        m.why_live = match m.target_vs_live() {
            Some(false) => None,
            // None: the target names no one who listens now; a closure that brought it there
            // excuses what it may become (a re-adopted listener brings its process back).
            _ => covered.or(m.why_now.map(|w| (w, m.target()))),
        };
        m.why_now = None;
        let (outcome, r) = match r {
            Ok(()) => ("done".to_string(), m.check()),
            Err(Stop::Refused(e)) => (format!("refused: {e}"), m.check()),
            Err(Stop::Killed) => ("killed".to_string(), m.check()),
            Err(v) => ("VIOLATION".to_string(), Err(v)),
        };
        log.push(format!("{what}: {outcome}"));
        if let Err(Stop::Violation(v)) = r {
            let slot = |s: &Slot| format!("{}: pid {} {}", s.index, s.pid(), s.recorded());
            let slots = m.slots().iter().map(slot).collect::<Vec<_>>().join(", ");
            let live = m.live().map_or("none (pass-through)".into(), |l| brief(&l));
            let (log, target) = (log.join("\n  "), brief(&m.target()));
            // spaces: the values aligned.
            let state = format!("live:   {live}\ntarget: {target}\nslots:  {slots}");
            return Err(format!("invariant {v}\nsteps:\n  {log}\n{state}"));
        }
    }
    Ok(())
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    use Kill::{Inserted, Not, Staged, Switched};
    use {After::*, Probe::*};
    let kill =
        || prop_oneof![8 => Just(Not), 1 => Just(Inserted), 1 => Just(Staged), 1 => Just(Switched)];
    let probe =
        prop_oneof![6 => Just(Off), 1 => Just(Ready), 1 => Just(NeverReady), 1 => Just(Killed)];
    let after =
        prop_oneof![4 => Just(Fine), 2 => Just(StopOld), 1 => Just(Unready), 1 => Just(Dies)];
    let weight = prop::option::weighted(0.3, 1u32..=99);
    let who = || 0..8usize;
    let op = prop_oneof![
        // 0 to 3 listeners per family, at least one.
        3 => (0..=3usize, 0..=3usize).prop_map(|(v4, v6)| Op::Start(v4.max((v6 == 0).into()), v6)),
        6 => (who(), weight, probe, kill(), after)
            .prop_map(|(w, g, p, k, a)| Op::Promote(w, g, p, k, a)),
        1 => kill().prop_map(Op::Retry),
        2 => kill().prop_map(Op::Rollback),
        2 => (who(), any::<(bool, bool)>(), kill()).prop_map(|(w, (force, stopping), k)| {
            Op::Drain(w, sets::DrainOpts { force, stopping }, k)
        }),
        2 => who().prop_map(Op::Exit),
        1 => (who(), who()).prop_map(|(w, i)| Op::Close(w, i)),
        1 => (any::<bool>(), kill()).prop_map(|(m, k)| Op::Hold(m, k)),
        1 => Just(Op::Lock),
        1 => (who(), who()).prop_map(|(w, i)| Op::Relisten(w, i)),
        1 => who().prop_map(Op::Inherit),
    ];
    prop::collection::vec(op, 1..30)
}

proptest! {
    // No regression file in the tree: a failure prints its shrunk sequence.
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_step_keeps_the_invariants(ops in ops()) {
        replay(&ops).map_err(TestCaseError::fail)?;
    }
}

/// Sequences that broke the invariants of an earlier build, minimal.
mod sequences {
    use super::{After::*, Kill::Not, Op::*, Probe::Off};

    fn check(ops: &[super::Op]) {
        super::replay(ops).unwrap_or_else(|e| panic!("{e}"));
    }

    /// pid 100, then 101 (two IPv4 listeners) promoted: rollback goes back to 100.
    /// 101 closes a listener, and the deploy script retries its promote: the retry saves 101's
    /// set as the target (it compared with the live set as written, closed slot included), and
    /// rollback was refused while 100 still listened.
    #[test]
    fn a_retry_after_a_closed_listener_keeps_the_rollback_target() {
        let (a, b) = (
            Promote(0, None, Off, Not, Fine),
            Promote(1, None, Off, Not, Fine),
        );
        check(&[Start(1, 0), a, Start(2, 0), b, Close(1, 0), Retry(Not)]);
    }

    /// 100, then 101 promoted; 102's promote fails its probation, 101 is restored: the target
    /// was left as 101's set, and rollback was refused while 100 still listened.
    #[test]
    fn a_failed_probation_keeps_the_rollback_target() {
        let [a, b] = [0, 1].map(|who| Promote(who, None, Off, Not, Fine));
        let c = Promote(2, None, Off, Not, Unready);
        check(&[Start(1, 0), a, Start(1, 0), b, Start(1, 0), c]);
    }

    /// pid 100 active, exits; `promote 101 --weight 10` failed ("switching to slot 0, which
    /// holds no socket", exit 1) with 101's sockets inserted.
    #[test]
    fn a_canary_beside_a_dead_member_is_promoted() {
        let (a, canary) = (
            Promote(0, None, Off, Not, Fine),
            Promote(0, Some(10), Off, Not, Fine),
        );
        check(&[Start(1, 0), a, Exit(0), Start(1, 0), canary]);
    }

    /// 101 active, 100 its canary; promoting 100 fails (it dies after the switch) and the set
    /// before is restored; 100 is promoted again.
    #[test]
    fn a_promote_after_a_dead_canary_keeps_the_rollback_target() {
        let (a, canary) = (
            Promote(5, None, Off, Not, Fine),
            Promote(2, Some(1), Off, Not, Fine),
        );
        let (dies, again) = (
            Promote(6, None, Off, Not, Dies),
            Promote(0, None, Off, Not, Fine),
        );
        check(&[Start(1, 0), Start(1, 0), a, canary, dies, again]);
    }

    /// 100, then 101 promoted; a rollback killed after it saved the target (101's set) and
    /// before its switch left the live set as the target: the retried rollback was refused
    /// while 100 still listened. Now a kill before the control word changes nothing.
    #[test]
    fn a_rollback_killed_before_its_switch_keeps_the_target() {
        let [a, b] = [0, 1].map(|who| Promote(who, None, Off, Not, Fine));
        let killed = Rollback(super::Kill::Staged);
        check(&[Start(1, 0), a, Start(1, 0), b, killed, Rollback(Not)]);
    }
}
