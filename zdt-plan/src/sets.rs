//! Who takes a port's new connections: the active set and the roles, decided as pure functions
//! from what the state holds now (the live slots, the live set, the rollback target) and what a
//! command asks for, to what the command must write (a [`Plan`]). The verbs read the state,
//! call one of these, and hand the plan to `State::apply`; nothing here reads or writes a map.
use std::fmt;

use zdt_common::{family_index, ActiveSet, SlotList, SlotMeta, AF_INET, MAX_ACTIVE, MAX_SLOTS};

use crate::error::{bad_input, err, Kind};

/// What a slot's socket is to zdt, as recorded in its metadata (`SlotMeta::role`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// In the socket array, not (yet) promoted: a promote that has not switched, or one that
    /// was interrupted before its switch.
    Candidate,
    /// Takes the port's new connections.
    Active,
    /// Took connections, takes none now; its socket still listens.
    Draining,
    /// Takes a share of new connections next to the active members.
    Canary,
    /// A placeholder of `zdt-ctl hold`: parks connections while no member can take them.
    Hold,
}

impl Role {
    /// The role a metadata entry records (the map's encoding, zdt_common's `ROLE_*`). An
    /// unknown value reads as draining: a socket zdt cannot place must not take connections.
    pub fn from_raw(raw: u32) -> Role {
        match raw {
            zdt_common::ROLE_CANDIDATE => Role::Candidate,
            zdt_common::ROLE_ACTIVE => Role::Active,
            zdt_common::ROLE_CANARY => Role::Canary,
            zdt_common::ROLE_HOLD => Role::Hold,
            _ => Role::Draining,
        }
    }

    /// Whether a socket of this role takes new connections: an active member's or a canary's.
    pub fn serves(self) -> bool {
        matches!(self, Role::Active | Role::Canary)
    }

    pub fn raw(self) -> u32 {
        match self {
            Role::Candidate => zdt_common::ROLE_CANDIDATE,
            Role::Active => zdt_common::ROLE_ACTIVE,
            Role::Draining => zdt_common::ROLE_DRAINING,
            Role::Canary => zdt_common::ROLE_CANARY,
            Role::Hold => zdt_common::ROLE_HOLD,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Candidate => "candidate",
            Role::Active => "active",
            Role::Draining => "draining",
            Role::Canary => "canary",
            Role::Hold => "hold",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad: status's table aligns the column with a width.
        f.pad(self.as_str())
    }
}

/// One slot of the socket array that holds a live socket zdt put there, with what zdt knows
/// about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub meta: SlotMeta,
    /// New connections steered to this slot (all CPUs).
    pub steered: u64,
    /// Connections migrated to this slot.
    pub migrated: u64,
    /// New connections steered here in the last 34 to 69 seconds.
    pub recent: u64,
    /// In the live set's active lists.
    pub active: bool,
    /// In the live set's canary lists.
    pub canary: bool,
}

impl Slot {
    /// The role its metadata records.
    pub fn recorded(&self) -> Role {
        Role::from_raw(self.meta.role)
    }

    /// The role it plays now: the live set decides active and canary (a command killed after
    /// its switch may not have recorded them yet), the metadata the rest.
    pub fn role(&self) -> Role {
        match self.recorded() {
            _ if self.active => Role::Active,
            _ if self.canary => Role::Canary,
            r @ (Role::Hold | Role::Candidate) => r,
            _ => Role::Draining,
        }
    }

    pub fn pid(&self) -> i32 {
        self.meta.pid as i32
    }

    /// The process recorded for it, told from a reused pid by its start time.
    pub fn process(&self) -> Process {
        Process {
            pid: self.pid(),
            start: self.meta.pid_start,
        }
    }
}

/// A process as zdt records it: its pid and its start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Process {
    pub pid: i32,
    pub start: u64,
}

/// What a command writes, in this order: the rollback target, the set (one switch), the roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What `rollback` restores from now on; None leaves it as it is.
    pub rollback: Option<ActiveSet>,
    /// The set to make live.
    pub set: ActiveSet,
    /// The roles to record once the set is live: (slot, role), for the slots whose role changes.
    pub roles: Vec<(u32, Role)>,
    /// Processes that took connections and take none once the set is live.
    pub drained: Vec<Process>,
    /// Processes `promote --stop-old` stops: every member that takes no connection once the set
    /// is live and once served (not a candidate), the promoted process and hold's placeholders
    /// never.
    pub to_stop: Vec<Process>,
}

impl Plan {
    /// A plan that makes `set` live (hold's placeholders carried over from `live`) and records
    /// the roles that follow from it.
    fn switch(slots: &[Slot], live: &ActiveSet, set: ActiveSet) -> Plan {
        let set = with_hold(set, live);
        Plan {
            rollback: None,
            roles: roles_after(slots, &set),
            set,
            drained: Vec::new(),
            to_stop: Vec::new(),
        }
    }

    /// The pids of the slots the new set names, hold's placeholders left out: who serves.
    pub fn serving(&self, slots: &[Slot]) -> Vec<i32> {
        pids_where(slots, |s| {
            self.set.names(s.index) && s.recorded() != Role::Hold && !self.set.is_hold(s.index)
        })
    }
}

/// The per-family lists of `indices` (slots of `slots`), as the program reads them.
pub fn lists_of(slots: &[Slot], indices: &[u32]) -> anyhow::Result<[SlotList; 2]> {
    let mut lists = [SlotList::EMPTY; 2];
    for index in indices {
        let slot = slots
            .iter()
            .find(|s| s.index == *index)
            .ok_or_else(|| anyhow::anyhow!("switching to slot {index}, which holds no socket"))?;
        let list = family_index(slot.meta.family)
            .and_then(|i| lists.get_mut(i))
            .ok_or_else(|| anyhow::anyhow!("slot {index} has an unknown address family"))?;
        let n = list.len as usize;
        if n >= MAX_ACTIVE {
            anyhow::bail!("more than {MAX_ACTIVE} sockets of one family in the active set");
        }
        list.slots[n] = *index;
        list.len += 1;
    }
    Ok(lists)
}

/// The slots of `lists`, in order.
fn indices(lists: &[SlotList; 2]) -> impl Iterator<Item = u32> + '_ {
    lists.iter().flat_map(|l| l.as_slice().iter().copied())
}

/// `set` with the live set's placeholders of `zdt-ctl hold`: they are registered by hold alone
/// ([`hold`]) and ride along in every other set, also in a set restored from before they were
/// registered (those of then may be gone).
pub fn with_hold(mut set: ActiveSet, live: &ActiveSet) -> ActiveSet {
    set.hold = live.hold;
    set
}

/// `set` without the slots that no longer hold a live socket of zdt's (and without those
/// `skip` selects): what can still be made live of an earlier set. No probe lists.
pub fn live_only(
    set: &ActiveSet,
    slots: &[Slot],
    skip: impl Fn(&Slot) -> bool,
) -> anyhow::Result<ActiveSet> {
    let keep = |lists: &[SlotList; 2]| -> anyhow::Result<[SlotList; 2]> {
        let kept: Vec<u32> = indices(lists)
            .filter(|i| slots.iter().any(|s| s.index == *i && !skip(s)))
            .collect();
        lists_of(slots, &kept)
    };
    let mut out = *set;
    out.lists = keep(&set.lists)?;
    out.canary = keep(&set.canary)?;
    out.probe = [SlotList::EMPTY; 2];
    Ok(out)
}

/// The pids of the slots that `keep` selects, each once, in order.
pub fn pids_where(slots: &[Slot], keep: impl Fn(&Slot) -> bool) -> Vec<i32> {
    let mut pids: Vec<i32> = slots.iter().filter(|s| keep(s)).map(Slot::pid).collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The processes of the slots that `keep` selects, each once, in slot order.
fn processes_where(slots: &[Slot], keep: impl Fn(&Slot) -> bool) -> Vec<Process> {
    let mut out: Vec<Process> = Vec::new();
    for p in slots.iter().filter(|s| keep(s)).map(Slot::process) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The roles once `set` is live: its active slots active, its canary slots canary, hold's
/// placeholders hold, candidates it does not name (and that took no connection) candidates
/// still, everything else draining. Only the slots whose role changes.
pub fn roles_after(slots: &[Slot], set: &ActiveSet) -> Vec<(u32, Role)> {
    slots
        .iter()
        .filter_map(|s| {
            let role = match s.recorded() {
                _ if set.contains(s.index) => Role::Active,
                _ if set.is_canary(s.index) => Role::Canary,
                Role::Hold => Role::Hold,
                Role::Candidate if !s.active && !s.canary => Role::Candidate,
                _ => Role::Draining,
            };
            (role != s.recorded()).then_some((s.index, role))
        })
        .collect()
}

/// The slot for a new socket: not taken by a live socket, empty in the array, and named by
/// neither the live set nor the rollback target. The program must never send connections to
/// a socket merely because it landed in a slot a dead member left in a set (now, or after a
/// rollback to the previous set).
pub fn free_slot(
    taken: &[u32],
    live: &ActiveSet,
    previous: &ActiveSet,
    is_empty: impl Fn(u32) -> bool,
) -> anyhow::Result<u32> {
    (0..MAX_SLOTS)
        .find(|&i| !taken.contains(&i) && !live.names(i) && !previous.names(i) && is_empty(i))
        .ok_or_else(|| {
            anyhow::anyhow!("all {MAX_SLOTS} socket slots are in use; drain old members")
        })
}

/// `promote PID`: PID's slots `new` take every new connection (with `weight`, that share of
/// them as a canary beside the active members, which stay). Whoever served before and is not
/// named now drains; the set live before becomes the rollback target.
pub fn promote(
    slots: &[Slot],
    live: &ActiveSet,
    pid: i32,
    new: &[u32],
    weight: Option<u32>,
) -> anyhow::Result<Plan> {
    // What of the live set still listens: the set as written may name slots whose sockets
    // have closed since (they are left out of every set written from now on).
    let current = live_only(live, slots, |_| false)?;
    let set = match weight {
        Some(w) => ActiveSet {
            lists: lists_of(
                slots,
                &indices(&current.lists)
                    .filter(|i| !new.contains(i))
                    .collect::<Vec<_>>(),
            )?,
            canary: lists_of(slots, new)?,
            canary_weight: w,
            ..ActiveSet::EMPTY
        },
        None => ActiveSet {
            lists: lists_of(slots, new)?,
            ..ActiveSet::EMPTY
        },
    };
    let mut plan = Plan::switch(slots, live, set);
    // Never PID itself, never hold's placeholders.
    let others = |s: &Slot| s.pid() != pid && s.recorded() != Role::Hold;
    plan.drained = processes_where(slots, |s| {
        others(s) && (s.active || s.canary) && !plan.set.names(s.index)
    });
    // Also members an earlier promote demoted without stopping them (one killed after its
    // switch, whose retry this is); not candidates, which never served.
    plan.to_stop = processes_where(slots, |s| {
        others(s) && !plan.set.names(s.index) && s.recorded() != Role::Candidate
    });
    // The set live now becomes the rollback target only when this promote changes who takes
    // connections: a promote of the active member again, or the retry of a promote whose
    // switch happened (a killed one), must keep the target, or `rollback` would restore the
    // live set itself and the previous version, still listening, could never come back. The
    // comparison is with what still listens: a closed slot dropped from the set changes no one.
    plan.rollback = (!same(&plan.set, &with_hold(current, live))).then(|| without_probe(live));
    Ok(plan)
}

/// Whether two sets make the same processes active and canary (by their live slots), with the
/// same canary share: what a command that let go of the lock checks before it undoes its own
/// switch (hold's placeholders, a re-adopted listener, a closed socket change nothing here).
pub fn same_members(slots: &[Slot], a: &ActiveSet, b: &ActiveSet) -> bool {
    let members = |set: &ActiveSet| {
        let active = processes_where(slots, |s| set.contains(s.index));
        let mut canary = processes_where(slots, |s| set.is_canary(s.index));
        canary.retain(|p| !active.contains(p));
        let (mut active, weight) = (
            active,
            if canary.is_empty() {
                0
            } else {
                set.canary_weight
            },
        );
        active.sort_unstable();
        canary.sort_unstable();
        (active, canary, weight)
    };
    members(a) == members(b)
}

/// Whether two sets send new connections to the same sockets in the same shares. The order of
/// a list only decides which socket a given flow hash lands on, and lists are written in
/// different orders (a promote lists PID's slots in socket order, a re-adopted listener is
/// appended), so the lists are compared as sets.
pub fn same(a: &ActiveSet, b: &ActiveSet) -> bool {
    let sorted = |lists: &[SlotList; 2]| {
        lists.map(|l| {
            let mut v = l.as_slice().to_vec();
            v.sort_unstable();
            v
        })
    };
    let weight = |s: &ActiveSet| {
        if s.canary.iter().all(|l| l.len == 0) {
            0
        } else {
            s.canary_weight
        }
    };
    [a.lists, a.canary, a.probe, a.hold].map(|l| sorted(&l))
        == [b.lists, b.canary, b.probe, b.hold].map(|l| sorted(&l))
        && weight(a) == weight(b)
}

/// Whether the sockets of `families` (one entry per socket) of the processes `pids` (a
/// promote's one, or those an attach adopts) fit in the lists the program reads: at most
/// [`MAX_ACTIVE`] per family. Checked before anything is inserted, so what cannot fit is
/// refused having changed nothing.
pub fn admit(
    pids: &[i32],
    port: u16,
    families: impl IntoIterator<Item = u32>,
) -> anyhow::Result<()> {
    let mut count = [0usize; 2];
    for f in families {
        if let Some(n) = family_index(f).and_then(|i| count.get_mut(i)) {
            *n += 1;
        }
    }
    for (i, n) in count.into_iter().enumerate() {
        if n > MAX_ACTIVE {
            let family = if i == 0 { "IPv4" } else { "IPv6" };
            let list: Vec<String> = pids.iter().map(i32::to_string).collect();
            let who = match pids {
                [one] => format!("pid {one} has"),
                _ => format!("pids {} have", list.join(", ")),
            };
            return Err(err(
                Kind::Refused,
                format!(
                    "{who} {n} {family} sockets on port {port}; zdt steers at most \
                     {MAX_ACTIVE} per family (fewer workers with `reuseport`, or workers sharing \
                     their sockets); nothing was changed"
                ),
            ));
        }
    }
    Ok(())
}

/// `promote --probe`: the live set, with PID's slots `new` in the probe lists (zdt-ctl's own
/// marked connections reach them and nothing else does).
pub fn probe(slots: &[Slot], live: &ActiveSet, new: &[u32]) -> anyhow::Result<ActiveSet> {
    let mut set = *live;
    set.probe = lists_of(slots, new)?;
    Ok(set)
}

use super::buffers::without_probe;

/// After a failed switch or probation: the set live before it (`before`), as far as its
/// sockets still listen, and the rollback target from before it (`target`, None for none):
/// the switch saved `before` as the target, which would make a rollback restore the live set
/// and lose the version before. None when no socket of `before` listens (nothing to restore).
pub fn restore(
    slots: &[Slot],
    live: &ActiveSet,
    before: &ActiveSet,
    target: Option<&ActiveSet>,
) -> anyhow::Result<Option<Plan>> {
    let set = live_only(before, slots, |_| false)?;
    if set.is_empty() {
        return Ok(None);
    }
    let mut plan = Plan::switch(slots, live, set);
    plan.rollback = Some(target.copied().unwrap_or(ActiveSet::EMPTY));
    Ok(Some(plan))
}

/// `rollback`: the rollback target made live again, as far as its sockets still listen and
/// never with a candidate (a socket that was never promoted); the set live now becomes the
/// rollback target, so a second rollback goes forward again. `recorded` reads a slot's
/// metadata as the process it records (for [`closed_members`]).
pub fn rollback(
    slots: &[Slot],
    live: Option<&ActiveSet>,
    previous: Option<&ActiveSet>,
    port: u16,
    recorded: impl Fn(u32) -> Option<Process>,
) -> anyhow::Result<Plan> {
    let Some(previous) = previous else {
        return Err(err(
            Kind::Refused,
            format!(
                "port {port} has no previous active set to go back to (nothing was switched \
                 since attach)"
            ),
        ));
    };
    // A slot of the rollback target is never given to another socket (free_slot), so a live
    // slot still holds the socket it held then.
    // Whole processes: a member of the target that re-created its listener since comes back
    // with the listener it has now.
    let mut back = whole(
        slots,
        &live_only(previous, slots, |s| s.recorded() == Role::Candidate)?,
        &closed_members(previous, slots, &recorded),
    )?;
    // A canary whose active members are all gone is all that is left: it takes every
    // connection (a canary of no one would be a share of nothing).
    if back.lists.iter().all(|l| l.len == 0) {
        (back.lists, back.canary) = (back.canary, [SlotList::EMPTY; 2]);
        back.canary_weight = 0;
    }
    if back.is_empty() {
        return Err(err(
            Kind::Refused,
            format!(
                "the previous members of port {port} no longer listen (stopped or exited): there \
                 is nothing to roll back to; nothing was changed"
            ),
        ));
    }
    let mut plan = Plan::switch(slots, live.unwrap_or(&ActiveSet::EMPTY), back);
    // A target that is the live set (written by an older build, whose promote of the active
    // member again overwrote it) restores nothing: say so rather than report a rollback.
    let current = live
        .map(|l| {
            whole(
                slots,
                &live_only(l, slots, |_| false)?,
                &closed_members(l, slots, &recorded),
            )
        })
        .transpose()?;
    if current.is_some_and(|c| same(&c, &plan.set)) {
        return Err(err(
            Kind::Refused,
            format!(
                "the rollback target of port {port} is the set that is live now: there is \
                 nothing to roll back to; nothing was changed"
            ),
        ));
    }
    plan.drained = processes_where(slots, |s| {
        (s.active || s.canary) && !plan.set.names(s.index)
    });
    plan.rollback = live.map(without_probe);
    Ok(plan)
}

/// How `drain` may leave the port: the flags of `zdt-ctl drain`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainOpts {
    /// Even with no active socket left: new connections go to the rollback target's sockets
    /// while they listen, else to hold's placeholders, else to kernel hashing.
    pub force: bool,
    /// PID stops next (a unit's ExecStop=): its families may be left to hold's placeholders.
    pub stopping: bool,
}

/// `drain PID`: PID's slots leave the active set. Refused when it would leave the port with
/// no active socket (unless `force`, or `stopping` with hold's placeholders in each family
/// left without one), and, unless `stopping`, when hold's placeholder would then take a
/// family's new connections while PID still listens.
pub fn drain(
    slots: &[Slot],
    live: &ActiveSet,
    pid: i32,
    opts: DrainOpts,
    port: u16,
) -> anyhow::Result<Plan> {
    let mine: Vec<u32> = slots
        .iter()
        .filter(|s| s.pid() == pid)
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
    // kernel hashing would have handed it to PID. --force does not make that right. Unless PID
    // is about to stop (`stopping`): then parking is what its stop would do anyway, and doing
    // it first keeps the kernel from resetting a handshake that completes on PID's listener at
    // the instant it closes (`inet_csk_reqsk_queue_add()` finds it no longer listening and
    // forgets the child, where a closed listener's queue is migrated).
    let holders =
        |family: u32| pids_where(slots, |h| live.is_hold(h.index) && h.meta.family == family);
    let emptied: Vec<&Slot> = slots
        .iter()
        .filter(|s| {
            s.active
                && mine.contains(&s.index)
                && !slots
                    .iter()
                    .any(|r| remaining.contains(&r.index) && r.meta.family == s.meta.family)
        })
        .collect();
    let parked = emptied.iter().find(|s| !holders(s.meta.family).is_empty());
    if let (Some(s), false) = (parked, opts.stopping) {
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
                 restart without overlap, pass --stopping and then stop pid {pid} (what is \
                 queued on it moves to the placeholder); nothing was changed",
                holds.join(", pid ")
            ),
        ));
    }
    // With `stopping`, a family left to hold's placeholders keeps its connections waiting for
    // the next promote; only one left to kernel hashing (warming candidates answer) needs force.
    let held_all = opts.stopping
        && !emptied.is_empty()
        && emptied.iter().all(|s| !holders(s.meta.family).is_empty());
    if remaining.is_empty() && !opts.force && !held_all {
        return Err(err(
            Kind::Refused,
            format!(
                "draining pid {pid} would leave port {port} with no active socket; promote another \
                 process first, or pass --force (new connections then go to the previous version \
                 while it still listens, else to kernel hashing)"
            ),
        ));
    }
    // A running canary stays, with its weight, unless it is PID's.
    let canary: Vec<u32> = slots
        .iter()
        .filter(|s| s.canary && !mine.contains(&s.index))
        .map(|s| s.index)
        .collect();
    let set = ActiveSet {
        lists: lists_of(slots, &remaining)?,
        canary: lists_of(slots, &canary)?,
        canary_weight: if canary.is_empty() {
            0
        } else {
            live.canary_weight
        },
        ..ActiveSet::EMPTY
    };
    let mut plan = Plan::switch(slots, live, set);
    plan.drained = processes_where(slots, |s| s.pid() == pid && (s.active || s.canary));
    Ok(plan)
}

/// `attach` of a port whose listeners already serve: their slots `indices` become the
/// active members, as if promoted.
pub fn adopt(slots: &[Slot], live: &ActiveSet, indices: &[u32]) -> anyhow::Result<Plan> {
    let set = ActiveSet {
        lists: lists_of(slots, indices)?,
        ..ActiveSet::EMPTY
    };
    Ok(Plan::switch(slots, live, set))
}

/// `hold` registers its placeholders `indices` (replacing earlier ones): role hold, and the
/// hold lists of the live set; members and the rollback target stay as they are.
pub fn hold(slots: &[Slot], live: &ActiveSet, indices: &[u32]) -> anyhow::Result<Plan> {
    let mut set = *live;
    set.hold = lists_of(slots, indices)?;
    let roles = slots
        .iter()
        .filter(|s| indices.contains(&s.index) && s.recorded() != Role::Hold)
        .map(|s| (s.index, Role::Hold))
        .collect();
    Ok(Plan {
        rollback: None,
        set,
        roles,
        drained: Vec::new(),
        to_stop: Vec::new(),
    })
}

/// What an interrupted command left in the live set, put right by the next command that takes
/// the lock: live probe lists (a `promote --probe` killed while it waited: zdt-ctl's marked
/// connections would keep reaching that process), and members still recorded as candidates (a
/// promote killed between its switch and its roles: `--stop-old` stops only members whose role
/// says they served). None when there is nothing to put right.
pub fn repair(slots: &[Slot], live: &ActiveSet, keep_probe: bool) -> Option<Plan> {
    // `keep_probe`: a `promote --probe` that waits without the lock claims them (alive).
    let set = if keep_probe {
        *live
    } else {
        without_probe(live)
    };
    let roles = roles_after(slots, &set);
    let stale_candidates = slots
        .iter()
        .any(|s| (s.active || s.canary) && s.recorded() == Role::Candidate);
    if set == *live && !stale_candidates {
        return None;
    }
    Some(Plan {
        rollback: None,
        set,
        roles,
        drained: Vec::new(),
        to_stop: Vec::new(),
    })
}

/// A listener of the port's groups as the kernel shows it (sock_diag), with the process that
/// serves it ([`crate::member`]; None when only processes that do not serve it hold it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub cookie: u64,
    pub member: Option<Process>,
}

/// Where the kernel's view of the port's listeners and the slots' records part, and what
/// membership must become: membership follows the processes that hold the group's sockets,
/// not what was recorded when they were put in the array.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Live slots whose recorded process is gone while another process serves the socket (it
    /// inherited it: a systemd socket unit, nginx's binary upgrade, tableflip): (slot, that
    /// process), which takes the slot's role over.
    pub rehome: Vec<(u32, Process)>,
    /// Listeners in no slot served by a process that has a role (it re-created its listener:
    /// a Go server restarted in process, nginx reloading changed `listen` lines, shutdown then
    /// listen again): (cookie, that process, the role its listener takes: active, canary or
    /// draining). A process with no role (a warming version, another app) is never adopted.
    pub adopt: Vec<(u64, Process, Role)>,
    /// Processes with no role that serve a listener in no slot: a new version started beside
    /// the running one (what `zdt-ctl watch` promotes once ready), in pid order.
    pub newcomers: Vec<Process>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.rehome.is_empty() && self.adopt.is_empty()
    }
}

/// Processes whose every live slot is a candidate's that no running `promote --probe` names
/// (`live`'s probe lists; a gone zdt-ctl's are cleared before any command plans): a promote
/// that put them in slots ended before its switch (killed, or a watcher restarted during its
/// wait). Their listeners are in slots, so they are no [`Drift::newcomers`]; `zdt-ctl watch`
/// takes them on as it does newcomers. `alive` tells whether a recorded process still runs.
pub fn waiting(
    slots: &[Slot],
    live: Option<&ActiveSet>,
    alive: impl Fn(&Process) -> bool,
) -> Vec<Process> {
    let probed = |i: u32| live.is_some_and(|l| l.is_probe(i));
    let mut out: Vec<Process> = Vec::new();
    for s in slots {
        let p = s.process();
        if out.contains(&p) || !alive(&p) {
            continue;
        }
        let mine = || slots.iter().filter(|t| t.process() == p);
        if mine().all(|t| t.role() == Role::Candidate && !probed(t.index)) {
            out.push(p);
        }
    }
    out
}

/// The processes the live set names through slots whose socket has closed, with the role the
/// set gives them (active, canary): a member that re-created its only listener has no live slot
/// left, and is still what the set made it. `recorded` reads a slot's metadata (which outlives
/// its socket) as the process it records.
pub fn closed_members(
    live: &ActiveSet,
    slots: &[Slot],
    recorded: impl Fn(u32) -> Option<Process>,
) -> Vec<(Process, Role)> {
    let mut out: Vec<(Process, Role)> = Vec::new();
    for (lists, role) in [(&live.lists, Role::Active), (&live.canary, Role::Canary)] {
        for i in indices(lists) {
            if slots.iter().any(|s| s.index == i) {
                continue;
            }
            if let Some(p) = recorded(i).filter(|p| !out.iter().any(|(q, _)| q == p)) {
                out.push((p, role));
            }
        }
    }
    out
}

/// The role a process plays on the port by its live slots, or by the live set's closed slots
/// (`closed`, [`closed_members`]): active or canary if the live set names one of them,
/// draining if one served before; None for candidates and placeholders.
fn role_of(slots: &[Slot], closed: &[(Process, Role)], p: &Process) -> Option<Role> {
    let mine = || slots.iter().filter(|s| s.process() == *p);
    let was = |role| closed.contains(&(*p, role));
    if mine().any(|s| s.active) || was(Role::Active) {
        Some(Role::Active)
    } else if mine().any(|s| s.canary) || was(Role::Canary) {
        Some(Role::Canary)
    } else if mine().any(|s| s.role() == Role::Draining) {
        Some(Role::Draining)
    } else {
        None
    }
}

/// Compares the slots with the listeners `seen` in the port's groups; `closed` is what
/// [`closed_members`] finds; `alive` tells whether a recorded process still runs (pid and start
/// time). Pure: the caller reads all three.
pub fn drift(
    slots: &[Slot],
    seen: &[Seen],
    closed: &[(Process, Role)],
    alive: impl Fn(&Process) -> bool,
) -> Drift {
    let mut out = Drift::default();
    let mut rehomed: Vec<Slot> = slots.to_vec();
    for s in rehomed.iter_mut() {
        if s.recorded() == Role::Hold || alive(&s.process()) {
            continue;
        }
        let heir = seen
            .iter()
            .find(|l| l.cookie == s.meta.cookie)
            .and_then(|l| l.member)
            .filter(|m| *m != s.process());
        if let Some(m) = heir {
            out.rehome.push((s.index, m));
            s.meta.pid = m.pid as u32;
            s.meta.pid_start = m.start;
        }
    }
    for l in seen {
        if rehomed.iter().any(|s| s.meta.cookie == l.cookie) {
            continue;
        }
        let Some(m) = l.member else { continue };
        match role_of(&rehomed, closed, &m) {
            Some(role) => out.adopt.push((l.cookie, m, role)),
            None if !out.newcomers.contains(&m) => out.newcomers.push(m),
            None => {}
        }
    }
    out.newcomers.sort_unstable_by_key(|p| p.pid);
    out
}

/// `set` as whole processes: every live slot (hold's placeholders aside) of a process that
/// `set` names as active (canary) joins its active (canary) lists; slots whose socket has
/// closed are left out, and the processes they named (`closed`, [`closed_members`] of `set`)
/// keep their role through their live slots. A set is written whole by every locked command
/// ([`rejoin`]), so sets are compared whole: two sets that differ only by a re-created
/// listener name the same members.
pub fn whole(
    slots: &[Slot],
    set: &ActiveSet,
    closed: &[(Process, Role)],
) -> anyhow::Result<ActiveSet> {
    let was = |role| closed.iter().filter(move |c| c.1 == role).map(|c| c.0);
    let mut active: Vec<Process> = processes_where(slots, |s| set.contains(s.index));
    active.extend(was(Role::Active));
    let mut canary: Vec<Process> =
        processes_where(slots, |s| set.is_canary(s.index) && !set.contains(s.index));
    canary.extend(was(Role::Canary).filter(|p| !active.contains(p)));
    let pick = |lists: &[SlotList; 2], of: &[Process]| -> Vec<u32> {
        let mut out: Vec<u32> = indices(lists)
            .filter(|i| slots.iter().any(|s| s.index == *i))
            .collect();
        for s in slots {
            if of.contains(&s.process()) && s.recorded() != Role::Hold && !out.contains(&s.index) {
                out.push(s.index);
            }
        }
        out
    };
    let mut out = *set;
    out.lists = lists_of(slots, &pick(&set.lists, &active))?;
    out.canary = lists_of(slots, &pick(&set.canary, &canary))?;
    Ok(out)
}

/// After adopted listeners were put into the array (as candidates): the live set with every
/// live slot of an active process in the active lists and of a canary process in the canary
/// lists, and the roles that follow; None when that is the live set already and no role
/// changes. Slots of the live set whose socket has closed are left out; the processes they
/// named (`closed`, [`closed_members`]) keep their role through their live slots.
pub fn rejoin(
    slots: &[Slot],
    live: &ActiveSet,
    closed: &[(Process, Role)],
) -> anyhow::Result<Option<Plan>> {
    let set = whole(slots, live, closed)?;
    let mut plan = Plan::switch(slots, live, set);
    // A draining process's adopted listener is recorded draining, so that `--stop-old` knows
    // the process still serves something.
    let draining = processes_where(slots, |s| s.role() == Role::Draining);
    for s in slots {
        if s.recorded() == Role::Candidate
            && draining.contains(&s.process())
            && !plan.set.names(s.index)
        {
            plan.roles.push((s.index, Role::Draining));
        }
    }
    let joined = slots.iter().any(|s| {
        !s.active && !s.canary && (plan.set.contains(s.index) || plan.set.is_canary(s.index))
    });
    if !joined && !plan.roles.iter().any(|(_, r)| *r == Role::Draining) {
        return Ok(None);
    }
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use zdt_common::AF_INET6;

    const FORCE: DrainOpts = DrainOpts {
        force: true,
        stopping: false,
    };
    const STOPPING: DrainOpts = DrainOpts {
        force: false,
        stopping: true,
    };

    use super::*;

    /// A live slot: `index`, held by `pid` (started at pid * 10), of `family`, recording `role`,
    /// and whether the live set lists it as active or canary.
    fn slot(index: u32, pid: u32, family: u32, role: Role) -> Slot {
        Slot {
            index,
            meta: SlotMeta {
                cookie: 1000 + index as u64,
                pid_start: pid as u64 * 10,
                since_ms: 0,
                pid,
                role: role.raw(),
                family,
                uid: 0,
            },
            steered: 0,
            migrated: 0,
            recent: 0,
            active: role == Role::Active,
            canary: role == Role::Canary,
        }
    }

    fn set_of(slots: &[Slot], active: &[u32]) -> ActiveSet {
        ActiveSet {
            lists: lists_of(slots, active).unwrap(),
            ..ActiveSet::EMPTY
        }
    }

    fn listed(lists: &[SlotList; 2]) -> [Vec<u32>; 2] {
        [lists[0].as_slice().to_vec(), lists[1].as_slice().to_vec()]
    }

    fn proc_of(pid: i32) -> Process {
        Process {
            pid,
            start: pid as u64 * 10,
        }
    }

    /// v1 (pid 100) active on slots 0 (IPv4) and 1 (IPv6), v2 (pid 200) a candidate on 2 and 3.
    fn deploy() -> (Vec<Slot>, ActiveSet) {
        let slots = vec![
            slot(0, 100, AF_INET, Role::Active),
            slot(1, 100, AF_INET6, Role::Active),
            slot(2, 200, AF_INET, Role::Candidate),
            slot(3, 200, AF_INET6, Role::Candidate),
        ];
        let live = set_of(&slots, &[0, 1]);
        (slots, live)
    }

    /// The slots as the state holds them once `plan` was applied.
    fn after(slots: &[Slot], plan: &Plan) -> Vec<Slot> {
        slots
            .iter()
            .map(|s| {
                let mut s = *s;
                s.active = plan.set.contains(s.index);
                s.canary = plan.set.is_canary(s.index);
                if let Some((_, r)) = plan.roles.iter().find(|(i, _)| *i == s.index) {
                    s.meta.role = r.raw();
                }
                s
            })
            .collect()
    }

    fn code(e: &anyhow::Error) -> i32 {
        crate::error::kind_of(e).exit_code()
    }

    #[test]
    fn waiting_candidates_are_those_no_running_probe_names() {
        let slots = vec![
            slot(0, 100, AF_INET, Role::Active),
            slot(2, 200, AF_INET, Role::Candidate),
            slot(3, 200, AF_INET6, Role::Candidate),
            slot(4, 300, AF_INET, Role::Candidate),
            slot(5, 400, AF_INET, Role::Candidate),
            slot(6, 500, AF_INET, Role::Candidate),
            slot(7, 500, AF_INET, Role::Draining),
        ];
        let mut live = set_of(&slots, &[0]);
        live.probe = lists_of(&slots, &[4]).unwrap();
        let alive = |p: &Process| p.pid != 400;
        // 300 is being probed, 400 is gone, 500 served before: only 200 waits.
        let pids = |w: Vec<Process>| w.iter().map(|p| p.pid).collect::<Vec<_>>();
        assert_eq!(pids(waiting(&slots, Some(&live), alive)), [200]);
        // Once the probe's zdt-ctl is gone (its lists cleared), 300 waits too.
        assert_eq!(pids(waiting(&slots, None, alive)), [200, 300]);
    }

    #[test]
    fn roles_read_and_write_the_maps_encoding() {
        for r in [
            Role::Candidate,
            Role::Active,
            Role::Draining,
            Role::Canary,
            Role::Hold,
        ] {
            assert_eq!(Role::from_raw(r.raw()), r);
        }
        // An entry zdt cannot read never counts as taking connections.
        assert_eq!(Role::from_raw(0), Role::Draining);
        assert_eq!(Role::from_raw(99), Role::Draining);
        assert_eq!(Role::Canary.to_string(), "canary");
        // spaces: padded to 8 columns.
        assert_eq!(format!("{:<8}|", Role::Hold), "hold    |");
    }

    #[test]
    fn the_live_set_decides_active_and_canary_before_the_recorded_role() {
        let mut s = slot(0, 100, AF_INET, Role::Candidate);
        assert_eq!(s.role(), Role::Candidate);
        // Switched, roles not yet recorded (a promote killed in between).
        s.active = true;
        assert_eq!(s.role(), Role::Active);
        // Recorded active, no longer in the live set: it drains.
        let mut s = slot(0, 100, AF_INET, Role::Active);
        s.active = false;
        assert_eq!(s.role(), Role::Draining);
        assert_eq!(slot(0, 1, AF_INET, Role::Hold).role(), Role::Hold);
    }

    #[test]
    fn lists_split_by_family_in_the_given_order() {
        let (slots, _) = deploy();
        let lists = lists_of(&slots, &[3, 0, 2, 1]).unwrap();
        assert_eq!(listed(&lists), [vec![0, 2], vec![3, 1]]);
        let e = lists_of(&slots, &[7]).unwrap_err().to_string();
        assert!(e.contains("slot 7"), "{e}");
    }

    #[test]
    fn a_promote_makes_the_new_slots_active_and_drains_the_old_member() {
        let (slots, live) = deploy();
        let p = promote(&slots, &live, 200, &[2, 3], None).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![2], vec![3]]);
        assert_eq!(p.rollback, Some(live));
        assert_eq!(
            p.roles,
            vec![
                (0, Role::Draining),
                (1, Role::Draining),
                (2, Role::Active),
                (3, Role::Active)
            ]
        );
        assert_eq!(p.drained, vec![proc_of(100)]);
        assert_eq!(p.to_stop, vec![proc_of(100)]);
        assert_eq!(p.serving(&slots), vec![200]);
    }

    #[test]
    fn a_promote_stops_members_an_earlier_promote_demoted_but_never_candidates() {
        let (mut slots, live) = deploy();
        // pid 50 drained by a promote killed before --stop-old; pid 60 a candidate that never
        // served (a promote that failed before its switch).
        slots.push(slot(4, 50, AF_INET, Role::Draining));
        slots.push(slot(5, 60, AF_INET, Role::Candidate));
        let p = promote(&slots, &live, 200, &[2, 3], None).unwrap();
        assert_eq!(p.drained, vec![proc_of(100)]);
        assert_eq!(p.to_stop, vec![proc_of(100), proc_of(50)]);
        // The candidate stays one.
        assert!(!p.roles.iter().any(|(i, _)| *i == 5));
    }

    #[test]
    fn a_promote_of_the_active_member_again_drains_and_stops_no_one() {
        let (slots, live) = deploy();
        let p = promote(&slots, &live, 100, &[0, 1], None).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![0], vec![1]]);
        assert!(p.drained.is_empty() && p.to_stop.is_empty());
        assert!(p.roles.is_empty(), "{:?}", p.roles);
        // Nothing switches, so the rollback target stays what it was.
        assert_eq!(p.rollback, None);
    }

    #[test]
    fn a_retried_promote_keeps_the_rollback_target() {
        let (slots, live) = deploy();
        let first = promote(&slots, &live, 200, &[2, 3], None).unwrap();
        assert_eq!(first.rollback, Some(live));
        // The retry sees its own switch live (the first was killed after it, or exited 0).
        let slots = after(&slots, &first);
        let retry = promote(&slots, &first.set, 200, &[2, 3], None).unwrap();
        assert_eq!(retry.set, first.set);
        assert_eq!(retry.rollback, None);
        // So a rollback still goes back to pid 100.
        let back = rollback(&slots, Some(&first.set), Some(&live), 80, |_| None).unwrap();
        assert_eq!(back.serving(&slots), vec![100]);
    }

    #[test]
    fn more_sockets_of_a_family_than_the_lists_hold_are_refused() {
        let v4 = |n| std::iter::repeat_n(AF_INET, n);
        admit(
            &[7],
            80,
            v4(MAX_ACTIVE).chain(std::iter::repeat_n(AF_INET6, MAX_ACTIVE)),
        )
        .unwrap();
        let e = admit(&[7], 80, v4(MAX_ACTIVE + 1)).unwrap_err();
        assert_eq!(code(&e), 7, "{e}");
        assert!(e.to_string().contains("1025 IPv4 sockets"), "{e}");
    }

    #[test]
    fn draining_one_active_member_keeps_the_canary() {
        let (mut slots, live) = deploy();
        slots.push(slot(4, 150, AF_INET, Role::Active));
        let live = ActiveSet {
            lists: lists_of(&slots, &[0, 1, 4]).unwrap(),
            ..live
        };
        let canary = promote(&slots, &live, 200, &[2, 3], Some(10)).unwrap();
        let slots = after(&slots, &canary);
        let p = drain(&slots, &canary.set, 150, DrainOpts::default(), 80).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![0], vec![1]]);
        assert_eq!(listed(&p.set.canary), [vec![2], vec![3]]);
        assert_eq!(p.set.canary_weight, 10);
        assert_eq!(p.drained, vec![proc_of(150)]);
        // Draining the canary itself ends it.
        let p = drain(&slots, &canary.set, 200, DrainOpts::default(), 80).unwrap();
        assert!(p.set.canary.iter().all(|l| l.len == 0));
        assert_eq!(p.set.canary_weight, 0);
        assert_eq!(listed(&p.set.lists), [vec![0, 4], vec![1]]);
    }

    fn seen(cookie: u64, pid: i32) -> Seen {
        Seen {
            cookie,
            member: Some(proc_of(pid)),
        }
    }

    #[test]
    fn a_relisten_of_the_active_member_is_adopted_and_joins_the_active_set() {
        let (mut slots, live) = deploy();
        // pid 100 re-created its IPv4 listener: slot 0's socket closed (gone from the live
        // slots), a new socket (cookie 77) of pid 100 listens. pid 200 warms up beside it.
        slots.remove(0);
        let d = drift(&slots, &[seen(77, 100), seen(1002, 200)], &[], |_| true);
        assert_eq!(d.adopt, vec![(77, proc_of(100), Role::Active)]);
        assert!(d.rehome.is_empty());
        // Inserted as a candidate in slot 5: it joins the active lists, slot 0 is left out.
        slots.push(slot(5, 100, AF_INET, Role::Candidate));
        let p = rejoin(&slots, &live, &[]).unwrap().expect("a switch");
        assert_eq!(listed(&p.set.lists), [vec![5], vec![1]]);
        assert!(p.roles.contains(&(5, Role::Active)));
        assert_eq!(p.rollback, None);
        // pid 200, never promoted, stays a candidate outside the set.
        assert!(!p.set.names(2) && !p.set.names(3));
        // Once applied there is nothing more to do.
        let after = after(&slots, &p);
        assert_eq!(rejoin(&after, &p.set, &[]).unwrap(), None);
    }

    #[test]
    fn a_member_that_recreated_its_only_listener_keeps_its_role() {
        let (mut slots, live) = deploy();
        // pid 100's IPv6 socket (slot 1) is in the set too: drop it from the set, so that slot 0
        // was pid 100's only one; then it closes.
        let live = ActiveSet {
            lists: lists_of(&slots, &[0]).unwrap(),
            ..live
        };
        slots.retain(|s| s.pid() != 100);
        // No live slot of pid 100 is left: only the set's closed slot 0 says what it was.
        // Without it, pid 100 is a process with no role: a newcomer (what `watch` promotes),
        // never adopted.
        let unknown = drift(&slots, &[seen(77, 100)], &[], |_| true);
        assert!(
            unknown.adopt.is_empty() && unknown.rehome.is_empty(),
            "{unknown:?}"
        );
        assert_eq!(unknown.newcomers, [proc_of(100)]);
        let closed = closed_members(&live, &slots, |i| (i == 0).then(|| proc_of(100)));
        assert_eq!(closed, vec![(proc_of(100), Role::Active)]);
        let d = drift(&slots, &[seen(77, 100)], &closed, |_| true);
        assert_eq!(d.adopt, vec![(77, proc_of(100), Role::Active)]);
        slots.push(slot(5, 100, AF_INET, Role::Candidate));
        let p = rejoin(&slots, &live, &closed).unwrap().expect("a switch");
        assert_eq!(listed(&p.set.lists), [vec![5], vec![]]);
        assert!(p.roles.contains(&(5, Role::Active)));
    }

    #[test]
    fn an_inherited_socket_is_rehomed_to_the_process_that_serves_it() {
        let (slots, _) = deploy();
        // pid 100 handed its sockets to pid 300 (binary upgrade) and exited.
        let d = drift(&slots, &[seen(1000, 300), seen(1001, 300)], &[], |p| {
            p.pid != 100
        });
        assert_eq!(d.rehome, vec![(0, proc_of(300)), (1, proc_of(300))]);
        assert!(d.adopt.is_empty());
        // A dead member whose socket only a non-serving holder keeps is left as it is.
        let lone = [Seen {
            cookie: 1000,
            member: None,
        }];
        assert!(drift(&slots, &lone, &[], |p| p.pid != 100).is_empty());
    }

    #[test]
    fn a_draining_process_relisten_is_recorded_draining_and_a_stranger_never_adopted() {
        let (mut slots, _) = deploy();
        slots[0].meta.role = Role::Draining.raw();
        slots[0].active = false;
        let d = drift(&slots, &[seen(88, 100), seen(99, 999)], &[], |_| true);
        // pid 100 is still active through slot 1: its new socket joins the active set.
        assert_eq!(d.adopt, vec![(88, proc_of(100), Role::Active)]);
        // A process that only drains.
        let (mut slots, _) = deploy();
        for s in slots.iter_mut().take(2) {
            s.meta.role = Role::Draining.raw();
            s.active = false;
        }
        let empty = ActiveSet::EMPTY;
        let d = drift(&slots, &[seen(88, 100)], &[], |_| true);
        assert_eq!(d.adopt, vec![(88, proc_of(100), Role::Draining)]);
        slots.push(slot(6, 100, AF_INET, Role::Candidate));
        let p = rejoin(&slots, &empty, &[]).unwrap().expect("a role");
        assert_eq!(p.roles, vec![(6, Role::Draining)]);
        assert!(!p.set.names(6));
    }

    #[test]
    fn a_rollback_to_the_live_set_is_refused() {
        let (slots, live) = deploy();
        let e = rollback(&slots, Some(&live), Some(&live), 80, |_| None).unwrap_err();
        assert_eq!(code(&e), 7, "{e}");
        assert!(e.to_string().contains("nothing to roll back to"), "{e}");
    }

    #[test]
    fn a_canary_takes_its_share_beside_the_active_members() {
        let (slots, live) = deploy();
        let p = promote(&slots, &live, 200, &[2, 3], Some(10)).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![0], vec![1]]);
        assert_eq!(listed(&p.set.canary), [vec![2], vec![3]]);
        assert_eq!(p.set.canary_weight, 10);
        assert!(p.drained.is_empty() && p.to_stop.is_empty());
        assert_eq!(p.roles, vec![(2, Role::Canary), (3, Role::Canary)]);
        assert_eq!(p.serving(&slots), vec![100, 200]);
    }

    #[test]
    fn completing_a_canary_makes_it_active_and_drains_the_old_member() {
        let (slots, live) = deploy();
        let canary = promote(&slots, &live, 200, &[2, 3], Some(10)).unwrap();
        let slots = after(&slots, &canary);
        let p = promote(&slots, &canary.set, 200, &[2, 3], None).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![2], vec![3]]);
        assert!(p.set.canary.iter().all(|l| l.len == 0));
        assert_eq!(p.set.canary_weight, 0);
        assert_eq!(p.drained, vec![proc_of(100)]);
        // Rollback then goes back to the canary.
        assert_eq!(p.rollback, Some(canary.set));
    }

    #[test]
    fn a_new_canary_replaces_the_previous_one() {
        let (mut slots, live) = deploy();
        slots[2].canary = true;
        slots[2].meta.role = Role::Canary.raw();
        slots.push(slot(4, 300, AF_INET, Role::Candidate));
        let mut live = live;
        live.canary = lists_of(&slots, &[2]).unwrap();
        live.canary_weight = 5;
        let p = promote(&slots, &live, 300, &[4], Some(20)).unwrap();
        assert_eq!(listed(&p.set.canary), [vec![4], vec![]]);
        assert_eq!(p.drained, vec![proc_of(200)]);
        assert!(p.roles.contains(&(2, Role::Draining)));
    }

    #[test]
    fn the_placeholders_ride_along_in_a_promote_and_are_never_drained_or_stopped() {
        let (mut slots, mut live) = deploy();
        slots.push(slot(8, 42, AF_INET, Role::Hold));
        slots.push(slot(9, 42, AF_INET6, Role::Hold));
        live.hold = lists_of(&slots, &[8, 9]).unwrap();
        let p = promote(&slots, &live, 200, &[2, 3], None).unwrap();
        assert_eq!(p.set.hold, live.hold);
        assert_eq!(p.drained, vec![proc_of(100)]);
        assert_eq!(p.to_stop, vec![proc_of(100)]);
        assert!(!p.roles.iter().any(|(i, _)| *i >= 8));
        assert_eq!(p.serving(&slots), vec![200]);
    }

    #[test]
    fn a_probe_adds_probe_lists_to_the_live_set_and_the_switch_clears_them() {
        let (slots, live) = deploy();
        let probing = probe(&slots, &live, &[2, 3]).unwrap();
        assert_eq!(probing.lists, live.lists);
        assert_eq!(listed(&probing.probe), [vec![2], vec![3]]);
        let p = promote(&slots, &probing, 200, &[2, 3], None).unwrap();
        assert!(p.set.probe.iter().all(|l| l.len == 0));
        // The rollback target never carries probe lists either.
        assert!(p.rollback.unwrap().probe.iter().all(|l| l.len == 0));
    }

    #[test]
    fn many_sockets_of_both_families_fit_up_to_the_limit() {
        // Two versions of a 512-worker app with a listener per worker per family.
        let mut slots = Vec::new();
        for i in 0..2048u32 {
            let (pid, family) = (
                100 + 100 * (i / 1024),
                [AF_INET, AF_INET6][(i % 2) as usize],
            );
            slots.push(slot(
                i,
                pid,
                family,
                if pid == 100 {
                    Role::Active
                } else {
                    Role::Candidate
                },
            ));
        }
        let old: Vec<u32> = (0..1024).collect();
        let new: Vec<u32> = (1024..2048).collect();
        let live = set_of(&slots, &old);
        let p = promote(&slots, &live, 200, &new, None).unwrap();
        assert_eq!(p.set.lists[0].len, 512);
        assert_eq!(p.set.lists[1].len, 512);
        assert_eq!(p.roles.len(), 2048);
        assert_eq!(p.drained, vec![proc_of(100)]);
        // Both versions active at once (an attach adopting both) still fit: 1024 per family.
        let both: Vec<u32> = (0..2048).collect();
        assert_eq!(
            adopt(&slots, &ActiveSet::EMPTY, &both).unwrap().set.lists[0].len,
            1024
        );
        // One more of a family does not.
        slots.push(slot(2048, 300, AF_INET, Role::Candidate));
        let over: Vec<u32> = (0..2049).collect();
        let e = adopt(&slots, &ActiveSet::EMPTY, &over)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1024"), "{e}");
    }

    #[test]
    fn a_new_socket_never_takes_a_slot_a_set_still_names() {
        let (slots, live) = deploy();
        let previous = set_of(&slots, &[2]);
        let taken: Vec<u32> = slots.iter().map(|s| s.index).collect();
        // Slots 0-3 taken; 5 named by the live set's hold list, 6 by the rollback target
        // although their sockets are gone.
        let mut live = live;
        live.hold[0].slots[0] = 5;
        live.hold[0].len = 1;
        let mut previous = previous;
        previous.lists[0].slots[1] = 6;
        previous.lists[0].len = 2;
        assert_eq!(free_slot(&taken, &live, &previous, |_| true).unwrap(), 4);
        assert_eq!(free_slot(&taken, &live, &previous, |i| i > 4).unwrap(), 7);
        let e = free_slot(&taken, &live, &previous, |_| false).unwrap_err();
        assert!(e.to_string().contains("socket slots are in use"), "{e}");
    }

    #[test]
    fn a_failed_switch_restores_what_still_listens_of_the_set_before() {
        let (slots, before) = deploy();
        let switched = promote(&slots, &before, 200, &[2, 3], None).unwrap();
        let slots = after(&slots, &switched);
        let p = restore(&slots, &switched.set, &before, None)
            .unwrap()
            .unwrap();
        assert_eq!(p.set.lists, before.lists);
        assert!(p.roles.contains(&(0, Role::Active)));
        assert!(p.roles.contains(&(2, Role::Draining)));
        assert_eq!(p.serving(&slots), vec![100]);
        // v1's IPv6 socket closed meanwhile: only its IPv4 one comes back.
        let without_v6: Vec<Slot> = slots.iter().copied().filter(|s| s.index != 1).collect();
        let p = restore(&without_v6, &switched.set, &before, None)
            .unwrap()
            .unwrap();
        assert_eq!(listed(&p.set.lists), [vec![0], vec![]]);
        // v1 gone entirely: nothing to restore.
        let gone: Vec<Slot> = slots.iter().copied().filter(|s| s.pid() != 100).collect();
        assert_eq!(restore(&gone, &switched.set, &before, None).unwrap(), None);
    }

    #[test]
    fn a_rollback_restores_the_set_before_the_last_promote_and_can_go_forward_again() {
        let (slots, live) = deploy();
        let promoted = promote(&slots, &live, 200, &[2, 3], None).unwrap();
        let slots = after(&slots, &promoted);
        let back = rollback(
            &slots,
            Some(&promoted.set),
            promoted.rollback.as_ref(),
            80,
            |_| None,
        )
        .unwrap();
        assert_eq!(back.set.lists, live.lists);
        assert_eq!(back.rollback, Some(promoted.set));
        assert_eq!(back.drained, vec![proc_of(200)]);
        assert_eq!(back.serving(&slots), vec![100]);
        assert!(
            back.roles.contains(&(0, Role::Active)) && back.roles.contains(&(3, Role::Draining))
        );
    }

    #[test]
    fn a_rollback_never_makes_a_candidate_live_and_refuses_when_nothing_listens() {
        let (slots, live) = deploy();
        let e = rollback(&slots, Some(&live), None, 80, |_| None).unwrap_err();
        assert_eq!(code(&e), 7);
        assert!(e.to_string().contains("no previous active set"), "{e}");
        // The rollback target names only slot 2, a candidate now (its socket was reused by a
        // promote that failed before its switch): nothing to go back to.
        let previous = set_of(&slots, &[2]);
        let e = rollback(&slots, Some(&live), Some(&previous), 80, |_| None).unwrap_err();
        assert_eq!(code(&e), 7);
        assert!(e.to_string().contains("no longer listen"), "{e}");
    }

    /// v1 active, v2 its canary, then v2 promoted without a weight (the target: v1 active and
    /// v2 canary), then v1 exits: what is left of the target is v2 as a canary beside no active
    /// member. Restoring it made v2 a canary of nothing and exited 0; it is the live set's
    /// member alone, so there is nothing to roll back to.
    #[test]
    fn a_target_left_with_only_its_canary_is_nothing_to_roll_back_to() {
        let (mut slots, _) = deploy();
        for s in &mut slots[2..] {
            (s.active, s.meta.role) = (true, Role::Active.raw());
        }
        let live = set_of(&slots, &[2, 3]);
        let mut target = set_of(&slots, &[0, 1]);
        (target.canary, target.canary_weight) = (lists_of(&slots, &[2, 3]).unwrap(), 30);
        slots.drain(..2); // v1 exited: its slots are empty
        let e = rollback(&slots, Some(&live), Some(&target), 80, |_| None).unwrap_err();
        assert_eq!(code(&e), 7, "{e}");
    }

    #[test]
    fn a_rollback_keeps_the_placeholders_registered_since_the_promote() {
        let (mut slots, live) = deploy();
        // v2 served before (the rollback target), v1 was promoted since.
        slots[2].meta.role = Role::Draining.raw();
        slots[3].meta.role = Role::Draining.raw();
        let previous = set_of(&slots, &[2, 3]);
        // hold registered (again) after the promote: its slots are the live set's.
        slots.push(slot(8, 42, AF_INET, Role::Hold));
        let mut live = live;
        live.hold = lists_of(&slots, &[8]).unwrap();
        let p = rollback(&slots, Some(&live), Some(&previous), 80, |_| None).unwrap();
        assert_eq!(p.set.hold, live.hold);
        assert_eq!(p.serving(&slots), vec![200]);
    }

    #[test]
    fn a_drain_leaves_the_other_members_active() {
        let (mut slots, live) = deploy();
        slots[2].active = true;
        slots[2].meta.role = Role::Active.raw();
        let live = ActiveSet {
            lists: lists_of(&slots, &[0, 1, 2]).unwrap(),
            ..live
        };
        let p = drain(&slots, &live, 100, DrainOpts::default(), 80).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![2], vec![]]);
        assert_eq!(p.drained, vec![proc_of(100)]);
        assert_eq!(p.roles, vec![(0, Role::Draining), (1, Role::Draining)]);
        assert_eq!(p.rollback, None);
    }

    #[test]
    fn a_drain_of_the_last_member_needs_force_and_of_a_stranger_is_bad_input() {
        let (slots, live) = deploy();
        let e = drain(&slots, &live, 100, DrainOpts::default(), 80).unwrap_err();
        assert_eq!(code(&e), 7);
        assert!(e.to_string().contains("--force"), "{e}");
        let p = drain(&slots, &live, 100, FORCE, 80).unwrap();
        assert!(p.set.is_empty());
        let e = drain(&slots, &live, 4242, DrainOpts::default(), 80).unwrap_err();
        assert_eq!(code(&e), 2);
        assert!(e.to_string().contains("not a member of port 80"), "{e}");
    }

    #[test]
    fn a_drain_that_would_park_a_family_on_hold_is_refused_even_with_force() {
        let (mut slots, mut live) = deploy();
        slots.push(slot(8, 42, AF_INET6, Role::Hold));
        live.hold = lists_of(&slots, &[8]).unwrap();
        // v2 active for IPv4 only: draining v1 leaves IPv6 to hold's placeholder.
        slots[2].active = true;
        live.lists = lists_of(&slots, &[0, 1, 2]).unwrap();
        for force in [false, true] {
            let opts = DrainOpts {
                force,
                stopping: false,
            };
            let e = drain(&slots, &live, 100, opts, 80).unwrap_err();
            assert_eq!(code(&e), 7);
            assert!(e.to_string().contains("last active IPv6 member"), "{e}");
            assert!(e.to_string().contains("pid 42"), "{e}");
            assert!(e.to_string().contains("--stopping"), "{e}");
        }
        // PID stops next: its IPv6 connections may wait on the placeholder.
        let p = drain(&slots, &live, 100, STOPPING, 80).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![2], vec![]]);
        assert_eq!(p.set.hold, live.hold);
        // With a v2 IPv6 socket active as well, the drain goes ahead and keeps the placeholder.
        slots[3].active = true;
        live.lists = lists_of(&slots, &[0, 1, 2, 3]).unwrap();
        let p = drain(&slots, &live, 100, DrainOpts::default(), 80).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![2], vec![3]]);
        assert_eq!(p.set.hold, live.hold);
    }

    #[test]
    fn a_stopping_drain_of_the_last_member_needs_hold_in_each_of_its_families() {
        let (mut slots, mut live) = deploy();
        // hold in IPv4 only: v1's IPv6 connections would be hashed, to warming v2 as well.
        slots.push(slot(8, 42, AF_INET, Role::Hold));
        live.hold = lists_of(&slots, &[8]).unwrap();
        let e = drain(&slots, &live, 100, STOPPING, 80).unwrap_err();
        assert_eq!(code(&e), 7);
        assert!(e.to_string().contains("--force"), "{e}");
        // hold in both: the whole port waits on it for the next promote.
        slots.push(slot(9, 42, AF_INET6, Role::Hold));
        live.hold = lists_of(&slots, &[8, 9]).unwrap();
        let p = drain(&slots, &live, 100, STOPPING, 80).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![], vec![]]);
        assert_eq!(p.set.hold, live.hold);
        assert_eq!(p.drained, vec![proc_of(100)]);
    }

    #[test]
    fn hold_registers_its_placeholders_without_touching_members_or_the_rollback_target() {
        let (mut slots, live) = deploy();
        slots.push(slot(8, 42, AF_INET, Role::Candidate));
        slots.push(slot(9, 42, AF_INET6, Role::Candidate));
        let p = hold(&slots, &live, &[8, 9]).unwrap();
        assert_eq!(p.set.lists, live.lists);
        assert_eq!(listed(&p.set.hold), [vec![8], vec![9]]);
        assert_eq!(p.roles, vec![(8, Role::Hold), (9, Role::Hold)]);
        assert_eq!(p.rollback, None);
        assert!(p.drained.is_empty() && p.to_stop.is_empty());
        // A re-registration replaces the earlier placeholders.
        let mut slots2 = slots.clone();
        slots2.push(slot(10, 43, AF_INET, Role::Candidate));
        let again = hold(&slots2, &p.set, &[10]).unwrap();
        assert_eq!(listed(&again.set.hold), [vec![10], vec![]]);
    }

    #[test]
    fn adopting_listeners_at_attach_makes_them_active() {
        let slots = vec![
            slot(0, 100, AF_INET, Role::Candidate),
            slot(1, 100, AF_INET6, Role::Candidate),
        ];
        let p = adopt(&slots, &ActiveSet::EMPTY, &[0, 1]).unwrap();
        assert_eq!(listed(&p.set.lists), [vec![0], vec![1]]);
        assert_eq!(p.roles, vec![(0, Role::Active), (1, Role::Active)]);
        assert_eq!(p.rollback, None);
    }

    #[test]
    fn repair_clears_probe_lists_and_records_roles_of_an_interrupted_switch() {
        let (mut slots, live) = deploy();
        assert_eq!(repair(&slots, &live, false), None);
        // A promote --probe killed while it waited.
        let probing = probe(&slots, &live, &[2, 3]).unwrap();
        let p = repair(&slots, &probing, false).unwrap();
        assert_eq!(p.set, live);
        assert!(p.roles.is_empty());
        // One that waits, alive (it claims them): its probe lists stay.
        assert_eq!(repair(&slots, &probing, true), None);
        // A promote killed between its switch and its roles.
        let switched = set_of(&slots, &[2, 3]);
        for s in &mut slots {
            s.active = switched.contains(s.index);
        }
        let p = repair(&slots, &switched, false).unwrap();
        assert_eq!(p.set, switched);
        assert!(p.roles.contains(&(2, Role::Active)) && p.roles.contains(&(0, Role::Draining)));
    }
}
