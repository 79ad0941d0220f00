//! Types and constants shared by the BPF program (`zdt-ebpf`) and userspace (`zdt-ctl`).
//!
//! Every type here is `#[repr(C)]` and has the same layout on both sides: the BPF program reads
//! and writes map values through these structs, `zdt-ctl` does the same through the `bpf(2)`
//! syscall. Changing a layout means changing [`LAYOUT_VERSION`], so that `zdt-ctl` refuses a
//! pinned state written by another layout instead of misreading it.
#![no_std]

/// Bumped whenever a map layout below changes.
pub const LAYOUT_VERSION: u32 = 3;

/// The layout `zdt-ctl upgrade` converts to [`LAYOUT_VERSION`] in place: layout 2 kept the
/// rollback target in entry 2 of `ZDT_ACTIVE` and had no [`Control::rollback_buf`] (the upper
/// half of its 32-bit port, zero, reads as entry 2 now).
pub const UPGRADABLE_LAYOUT: u32 = 2;

/// Number of slots in the socket array (one listening socket per slot): two versions of an app
/// with 512 workers, each worker with its own socket per family (nginx's `reuseport`), fit at
/// once (2 x 512 x 2 = 2048), with as much again to spare.
pub const MAX_SLOTS: u32 = 4096;

/// Maximum number of sockets of one address family in one list of the active set (two versions
/// of a 512-worker app, both adopted as active at once, fit). The program's cost per new
/// connection does not grow with it: the flow hash picks one slot, and only if that socket
/// cannot take the connection does the program try others, at most [`WALK`] + [`PROBES`].
pub const MAX_ACTIVE: usize = 1024;

/// After a failed selection, how many of the following slots of the list the program tries in
/// turn. A list of at most this many sockets is tried whole.
pub const WALK: u32 = 32;

/// After the walk, how many slots of a longer list the program tries at random. The sockets of
/// one process sit together in a list and die together, so a walk that started among a dead
/// process's slots can end before it leaves them; random probes find a live slot among the rest
/// (with half of the list dead, all of them miss with probability 2^-32).
pub const PROBES: u32 = 32;

/// `AF_INET` / `AF_INET6`, as the kernel's `bpf_sock.family` reports them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// Index of the per-family list inside [`ActiveSet`].
#[inline(always)]
pub fn family_index(family: u32) -> Option<usize> {
    match family {
        AF_INET => Some(0),
        AF_INET6 => Some(1),
        _ => None,
    }
}

/// Map names: the program's maps are pinned under these names in the state directory.
pub mod names {
    pub const PROGRAM: &str = "zdt_select";
    pub const SOCKETS: &str = "ZDT_SOCKETS";
    pub const CONTROL: &str = "ZDT_CONTROL";
    pub const ACTIVE: &str = "ZDT_ACTIVE";
    pub const SLOT_COUNTERS: &str = "ZDT_SLOT_COUNTERS";
    pub const GLOBAL_COUNTERS: &str = "ZDT_GLOBAL_COUNTERS";
    pub const SLOT_META: &str = "ZDT_SLOT_META";
    pub const PROBES: &str = "ZDT_PROBES";
    /// The program of a UDP port (a TCP port's is [`PROGRAM`]).
    pub const PROGRAM_UDP: &str = "zdt_select_udp";
    /// A UDP port's flow table and its counters and settings (pinned for UDP ports only).
    pub const FLOWS: &str = "ZDT_FLOWS";
    pub const FLOW_COUNTERS: &str = "ZDT_FLOW_COUNTERS";
    pub const FLOW_CONFIG: &str = "ZDT_FLOW_CONFIG";
}

/// Value of the one-entry `ZDT_CONTROL` array.
///
/// `active_buf` selects which of the three `ZDT_ACTIVE` entries the program reads:
/// 0 = nothing promoted yet (the program returns SK_PASS and the kernel hashes as if no program
/// were attached), 1..=3 = entry 0..=2. Its values differ in the low byte only, so even a
/// byte-wise copy by the kernel cannot produce a value no writer wrote.
///
/// `rollback_buf` names the entry that holds the rollback target the same way (1..=3; 0, as
/// layout 2 left it, means entry 2). The program reads it only while nothing of the live set
/// can be selected, and then selects only sockets whose [`SlotMeta`] records them active,
/// canary or draining. A command writes entries the control word does not name (the one
/// exception, a new target and a new set in one command, rewrites the old target's entry,
/// which that check covers), then both fields in one write: see zdt-ctl's `plan::buffers`.
///
/// The other fields are written once by `attach` and read only by `zdt-ctl`: the layout the
/// state was created with, and the listeners it manages (`[ADDR]:PORT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub active_buf: u32,
    pub layout_version: u32,
    pub port: u16,
    pub rollback_buf: u16,
    /// 0 = wildcard (`:PORT`), 4 = IPv4 address, 6 = IPv6 address in `addr`; with
    /// [`ADDR_KIND_UDP`] set for a UDP port.
    pub addr_kind: u32,
    pub addr: [u8; 16],
}

/// The bit of [`Control::addr_kind`] that marks a UDP port's state (states made before UDP
/// ports existed never have it: TCP).
pub const ADDR_KIND_UDP: u32 = 0x100;

/// The sockets that receive new connections, per address family (0 = IPv4 group, 1 = IPv6
/// group). A listener belongs to exactly one reuseport group and the kernel rejects a selection
/// across groups, so the program only walks the lists of the group it runs for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveSet {
    /// The active members.
    pub lists: [SlotList; 2],
    /// A canary: `canary_weight` % of new connections, chosen by flow hash (so all packets of
    /// one connection agree), go to these slots instead of `lists`.
    pub canary: [SlotList; 2],
    pub canary_weight: u32,
    /// zdt-ctl's own connections (loopback, marked with [`PROBE_MSS`]) go to these slots and nowhere
    /// else: zdt-ctl checks a candidate's readiness through the public port this way. With no
    /// probe slots, such a connection is refused.
    pub probe: [SlotList; 2],
    /// Placeholders of `zdt-ctl hold`: listeners that never accept. New connections go to them
    /// only when no active (or canary) socket can take them, and wait in their queue instead of
    /// being refused; the hold process moves the queue to the active member once there is one.
    pub hold: [SlotList; 2],
}

/// The mark of zdt-ctl's own connections to the public port (readiness probes through it, and
/// status's check that the program runs), part one: the MSS option of their SYN, set with
/// TCP_MAXSEG. An ordinary client's SYN carries the MSS of its route (65483 on loopback, 1460
/// behind Ethernet), so the program looks up [`ProbeKey`] (part two, which proves it) only for
/// the rare SYN that has this one. Kernel contract: a SYN advertises min(TCP_MAXSEG, the
/// route's advmss) (tcp_connect_init, tcp_mss_clamp), and loopback's is far larger.
pub const PROBE_MSS: u16 = 1237;

/// Key of `ZDT_PROBES`: the loopback address and port a connection of zdt-ctl's comes from.
/// zdt-ctl binds its socket (without SO_REUSEADDR, so no other socket can bind the same address
/// and port meanwhile), writes this key, then connects, and deletes the key when it is done: a
/// connection is zdt-ctl's only if its source is in the map. Any local user can set an MSS, and
/// a SYN cookie's ACK carries none, so the MSS alone proves nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProbeKey {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// The source port, host order.
    pub port: u16,
    /// The source address: an IPv4 address in the first four bytes, the rest zero.
    pub addr: [u8; 16],
}

/// Value of `ZDT_PROBES`: what the program does with such a connection, and who wrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeValue {
    /// [`PROBE_CANDIDATE`] or [`PROBE_REFUSE`].
    pub kind: u32,
    /// The zdt-ctl that wrote it: an entry whose writer is gone (killed before it deleted it)
    /// is removed by the next command that takes the lock.
    pub pid: u32,
}

/// A readiness probe (`promote --probe`): the probe lists' socket, or refused.
pub const PROBE_CANDIDATE: u32 = 1;
/// `status`'s check that the program runs: always refused (counted in `probe_refused`), so it
/// reaches no process.
pub const PROBE_REFUSE: u32 = 2;
/// Not a connection's: a `promote --probe` that waits, without the port's lock, while its probe
/// lists are live (key: family 0, port 0, its thread's id in the address's first four bytes). The
/// program never looks such a key up (a packet's family is AF_INET or AF_INET6); commands that
/// take the lock leave live probe lists alone while their claimant lives.
pub const PROBE_CLAIM: u32 = 3;

/// Entries of `ZDT_PROBES`: zdt-ctl commands probing at once.
pub const MAX_PROBES: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotList {
    pub len: u32,
    pub slots: [u32; MAX_ACTIVE],
}

impl SlotList {
    pub const EMPTY: SlotList = SlotList {
        len: 0,
        slots: [0; MAX_ACTIVE],
    };

    /// The valid prefix of `slots`.
    pub fn as_slice(&self) -> &[u32] {
        let len = (self.len as usize).min(MAX_ACTIVE);
        &self.slots[..len]
    }
}

impl ActiveSet {
    pub const EMPTY: ActiveSet = ActiveSet {
        lists: [SlotList::EMPTY; 2],
        canary: [SlotList::EMPTY; 2],
        canary_weight: 0,
        probe: [SlotList::EMPTY; 2],
        hold: [SlotList::EMPTY; 2],
    };

    /// `slot` is an active member's.
    pub fn contains(&self, slot: u32) -> bool {
        self.lists.iter().any(|l| l.as_slice().contains(&slot))
    }

    /// `slot` gets the canary's share of new connections.
    pub fn is_canary(&self, slot: u32) -> bool {
        self.canary.iter().any(|l| l.as_slice().contains(&slot))
    }

    /// `slot` is a placeholder of `zdt-ctl hold`.
    pub fn is_hold(&self, slot: u32) -> bool {
        self.hold.iter().any(|l| l.as_slice().contains(&slot))
    }

    /// `slot` is in the probe lists of a `promote --probe`.
    pub fn is_probe(&self, slot: u32) -> bool {
        self.probe.iter().any(|l| l.as_slice().contains(&slot))
    }

    /// `slot` is named anywhere in the set (active, canary, probe or hold).
    pub fn names(&self, slot: u32) -> bool {
        self.contains(slot) || self.is_canary(slot) || self.is_hold(slot) || self.is_probe(slot)
    }

    pub fn is_empty(&self) -> bool {
        self.lists.iter().chain(&self.canary).all(|l| l.len == 0)
    }
}

/// Length of one bucket of the "recent connections" counters, as a power of two of
/// CLOCK_MONOTONIC nanoseconds (the clock of bpf_ktime_get_ns): 2^35 ns, 34.4 s. Two buckets:
/// the current one and the one before it, so "recent" means the last 34 to 69 seconds. A
/// power of two so that the program finds the bucket with a shift: a 64-bit division costs tens
/// of cycles on every selection.
pub const RECENT_BUCKET_SHIFT: u32 = 35;

/// The bucket number of CLOCK_MONOTONIC time `ns` (see [`RECENT_BUCKET_SHIFT`]).
#[inline(always)]
pub fn recent_bucket(ns: u64) -> u64 {
    ns >> RECENT_BUCKET_SHIFT
}

/// A UDP port's flow table keeps time in units of 2^30 ns (1.07 s), "seconds" below: a shift of
/// CLOCK_MONOTONIC nanoseconds, where a division by 10^9 would cost every datagram tens of
/// cycles.
pub const FLOW_SECOND_SHIFT: u32 = 30;

/// CLOCK_MONOTONIC time `ns` in the flow table's seconds (see [`FLOW_SECOND_SHIFT`]).
#[inline(always)]
pub fn flow_seconds(ns: u64) -> u32 {
    (ns >> FLOW_SECOND_SHIFT) as u32
}

/// Per-slot counters, written by the program (per-CPU array: no atomics needed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// New connections (SYNs) steered to this slot's socket.
    pub steered: u64,
    /// Queued connections moved to this slot's socket from a closing listener.
    pub migrated: u64,
    /// New connections in bucket `bucket[i]` (bucket number: [`recent_bucket`]; slot i = bucket
    /// number % 2).
    pub recent: [u64; 2],
    pub bucket: [u64; 2],
}

impl SlotCounters {
    /// New connections in the current and the previous bucket, given the current bucket number.
    pub fn recent_at(&self, now_bucket: u64) -> u64 {
        (0..2)
            .filter(|&i| self.bucket[i] == now_bucket || self.bucket[i] + 1 == now_bucket)
            .map(|i| self.recent[i])
            .sum()
    }
}

/// Group-wide counters, written by the program (per-CPU array, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Selections while nothing was promoted: SK_PASS to kernel hashing, by design.
    pub passthrough: u64,
    /// New connections handed to kernel hashing because no active socket could be selected.
    pub fallback: u64,
    /// Individual `bpf_sk_select_reuseport` calls that failed (a closed slot, say).
    pub select_failed: u64,
    /// Migrations for which no active socket could be selected (kernel picked by hash).
    pub migrate_no_target: u64,
    /// New connections steered to an active socket, all slots together (the per-slot counters
    /// go when a slot is reused; these stay until detach).
    pub steered: u64,
    /// Queued connections migrated to an active socket, all slots together.
    pub migrated: u64,
    /// Connections parked on a placeholder of `zdt-ctl hold` (no member could take them): new
    /// ones, and those migrating from a dying member.
    pub held: u64,
    /// zdt-ctl's own connections (loopback, marked with [`PROBE_MSS`]) refused: probes whose
    /// candidate could not be selected, and status's check that the program runs.
    pub probe_refused: u64,
    /// Program runs for zdt-ctl's own connections (a TCP port's: SYNs whose source is in
    /// `ZDT_PROBES`; a UDP port's: empty datagrams), for the IPv4 group and for the IPv6 group;
    /// other runs are not counted, which would cost each a per-CPU write. `zdt-ctl status`
    /// proves that the program is attached to a group by making one such connection to it
    /// (sending one such datagram) and seeing its count move: if the program is not attached to
    /// that group, nothing else can move it.
    pub runs: [u64; 2],
}

/// Metadata per slot, written by zdt-ctl before it puts a socket in the slot; the programs
/// read `role` (before they select a socket of the rollback target) and the UDP one `cookie`
/// (the socket a flow was recorded on). Lives in a pinned map so that
/// all of zdt's state is in one place and every update of it is one atomic map write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotMeta {
    /// Socket cookie when the slot was filled. The socket array returns the cookie of the socket
    /// in a slot; a mismatch means the slot was cleared (socket closed) and perhaps refilled.
    pub cookie: u64,
    /// Start time of `pid` (clock ticks since boot, /proc/PID/stat field 22): tells a reused
    /// pid from the process that was promoted.
    pub pid_start: u64,
    /// Unix time in milliseconds when this slot entered its current role.
    pub since_ms: u64,
    pub pid: u32,
    /// One of the `ROLE_*` constants.
    pub role: u32,
    pub family: u32,
    /// Owner uid of the socket: the kernel only groups sockets of one uid, so a socket of
    /// another uid can never be steered to from this group.
    pub uid: u32,
}

/// In the socket array, not yet promoted (or a promote was interrupted before its switch).
pub const ROLE_CANDIDATE: u32 = 1;
/// In the active set.
pub const ROLE_ACTIVE: u32 = 2;
/// Was active, taken out of the active set; its socket still listens.
pub const ROLE_DRAINING: u32 = 3;
/// Gets a share of new connections as a canary.
pub const ROLE_CANARY: u32 = 4;
/// A placeholder listener of `zdt-ctl hold`.
pub const ROLE_HOLD: u32 = 5;

/// Whether a slot whose metadata records `role` holds a socket that was promoted (active,
/// canary) or served before (draining): what the program may select through the rollback
/// target. A candidate's, a placeholder's and an empty slot's (0) are not.
#[inline(always)]
pub fn served_role(role: u32) -> bool {
    matches!(role, ROLE_ACTIVE | ROLE_CANARY | ROLE_DRAINING)
}

/// Key of a UDP port's flow table (`ZDT_FLOWS`): where a datagram comes from and which of the
/// host's addresses it was sent to. The local port is the port's own, the same for every flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The remote address then the local one: IPv4 addresses in bytes 0..4 and 16..20, the rest
    /// zero; IPv6 addresses in 0..16 and 16..32.
    pub addrs: [u8; 32],
    /// The remote port, network byte order, as the UDP header carries it.
    pub remote_port: u16,
    /// [`AF_INET`] or [`AF_INET6`] (of the packet, not of the socket: an IPv4 client of a
    /// dual-stack socket is AF_INET).
    pub family: u16,
}

/// Value of `ZDT_FLOWS`: the slot whose socket got the flow's first datagram, and which socket
/// that was (the slot's cookie then, [`SlotMeta::cookie`]): a slot refilled by another socket
/// does not take over the flows of the one before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub cookie: u64,
    pub slot: u32,
    /// When a datagram of the flow was last seen, in the flow table's seconds of CLOCK_MONOTONIC
    /// ([`flow_seconds`]; refreshed at most once a second).
    pub seen_s: u32,
}

/// The flow table's default size: flows a UDP port keeps (`attach --flows`).
pub const DEFAULT_FLOWS: u32 = 65536;

/// Settings of a UDP port's program (`ZDT_FLOW_CONFIG`, one entry), written by `attach`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    /// New flows each CPU may record per second (of [`flow_seconds`]). A flood of new 4-tuples (spoofed or real)
    /// would otherwise push live flows out of the LRU table as fast as it arrives; with this
    /// bound the table turns over no faster than its size / (CPUs x this) seconds, and a flow
    /// over the bound is steered as any new flow but not recorded (counted: `unrecorded`).
    pub new_per_cpu_per_s: u32,
    pub _pad: u32,
}

/// Counters of a UDP port's program (per-CPU array, one entry), beside [`GlobalCounters`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Datagrams of a known flow sent to its own socket.
    pub known: u64,
    /// New flows recorded (each one an insertion into the table).
    pub recorded: u64,
    /// New flows steered but not recorded: over the per-second bound, or the insertion failed.
    pub unrecorded: u64,
    /// Known flows whose socket had closed (or whose slot another socket took): steered anew.
    pub orphaned: u64,
    /// Datagrams no ready socket could take, left to the kernel's hash over the group.
    pub fallback: u64,
    /// The second of `budget_used` (CLOCK_MONOTONIC seconds) and the flows recorded in it on
    /// this CPU.
    pub budget_second: u64,
    pub budget_used: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for Control {}
    unsafe impl aya::Pod for ActiveSet {}
    unsafe impl aya::Pod for SlotCounters {}
    unsafe impl aya::Pod for GlobalCounters {}
    unsafe impl aya::Pod for SlotMeta {}
    unsafe impl aya::Pod for ProbeKey {}
    unsafe impl aya::Pod for ProbeValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowConfig {}
    unsafe impl aya::Pod for FlowCounters {}
}
