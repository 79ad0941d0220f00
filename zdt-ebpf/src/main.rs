//! zdt's steering program: one `sk_reuseport` program for a port's SO_REUSEPORT group(s).
//!
//! For every new connection (SYN) on the port, and for every connection being migrated off a
//! closing listener, the kernel runs this program to choose the listener. It chooses among the
//! sockets of the *active set* that `zdt-ctl` publishes; sockets of a warming process (not yet
//! promoted) and of a draining process (demoted) are in the group but never chosen.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use core::{cell::UnsafeCell, ffi::c_void};

    use aya_ebpf::{
        bindings::{
            bpf_hdr_start_off::BPF_HDR_START_NET,
            bpf_map_def,
            bpf_map_type::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
            sk_action::{SK_DROP, SK_PASS},
        },
        helpers::generated::{
            bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_sk_select_reuseport,
            bpf_skb_load_bytes_relative,
        },
        macros::{map, sk_reuseport},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::SkReuseportContext,
        EbpfContext,
    };
    use zdt_common::{
        family_index, flow_seconds, recent_bucket, served_role, ActiveSet, Control, FlowConfig,
        FlowCounters, FlowKey, FlowValue, GlobalCounters, ProbeKey, ProbeValue, SlotCounters,
        SlotList, SlotMeta, AF_INET, AF_INET6, MAX_PROBES, MAX_SLOTS, PROBES, PROBE_CANDIDATE,
        PROBE_MSS, WALK,
    };

    /// A map definition in the `maps` section, laid out as aya's own (`bpf_map_def` in a cell).
    #[repr(transparent)]
    struct SockArray(UnsafeCell<bpf_map_def>);
    // SAFETY: the definition is only read, by the loader; the program passes its address to a
    // helper and never touches the contents.
    unsafe impl Sync for SockArray {}

    /// slot -> listening socket. Kernel contracts (kernel/bpf/reuseport_array.c):
    /// - the kernel clears a slot by itself when its socket stops listening (close of the last
    ///   reference, or shutdown), so a dead process's slot can never be selected;
    /// - the value is 8 bytes because a userspace lookup returns the socket's cookie only for
    ///   value_size 8 (-ENOSPC otherwise): zdt-ctl identifies the socket in a slot by it.
    #[map]
    static ZDT_SOCKETS: SockArray = SockArray(UnsafeCell::new(bpf_map_def {
        type_: BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: MAX_SLOTS,
        map_flags: 0,
        id: 0,
        pinning: 0,
    }));

    /// The coarse clock's last reading and the tick (jiffies) it was taken in: see
    /// [`coarse_ns`]. Global data (.bss), shared by the CPUs: the program's own, not pinned.
    #[repr(C)]
    struct TickClock {
        jiffies: u64,
        ns: u64,
    }

    static mut TICK_CLOCK: TickClock = TickClock { jiffies: 0, ns: 0 };

    /// CLOCK_MONOTONIC_COARSE (5.11+), read once per tick. The coarse clock is the time of the
    /// last tick, so within one value of jiffies it does not move: a run whose tick is the
    /// cached one reuses the reading, where bpf_ktime_get_coarse_ns costs about 40 ns a call on
    /// a 2-core AMD VM (the timekeeper's seqcount), a fifth of a whole selection, and
    /// bpf_jiffies64 a plain load. Kernel contract: the tick that increments jiffies_64 updates
    /// the coarse clock right after (tick_do_update_jiffies64, then update_wall_time), so a run
    /// between the two, or two CPUs refreshing the cache at once, may keep a reading one tick
    /// old for one tick: a few milliseconds, against the recent-share buckets' 34 s and the
    /// flow table's 1.07 s units.
    #[inline(always)]
    fn coarse_ns() -> u64 {
        // SAFETY: helpers without arguments; TICK_CLOCK is plain data that every run may read
        // and write. Torn or racing updates are harmless (see above), and volatile accesses
        // keep the compiler from caching or merging them.
        unsafe {
            let tick = bpf_jiffies64();
            let cache = core::ptr::addr_of_mut!(TICK_CLOCK);
            if core::ptr::read_volatile(core::ptr::addr_of!((*cache).jiffies)) == tick {
                return core::ptr::read_volatile(core::ptr::addr_of!((*cache).ns));
            }
            let ns = bpf_ktime_get_coarse_ns();
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*cache).ns), ns);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*cache).jiffies), tick);
            ns
        }
    }

    /// bpf_sk_select_reuseport: 0 if `slot`'s socket is now the selected one.
    #[inline(always)]
    fn select_slot(ctx: &SkReuseportContext, slot: u32) -> bool {
        let mut key = slot;
        // SAFETY: the helper reads the 4-byte key and the map definition's address identifies
        // the map to the verifier.
        let rc = unsafe {
            bpf_sk_select_reuseport(
                ctx.as_ptr().cast(),
                ZDT_SOCKETS.0.get().cast::<c_void>(),
                (&mut key as *mut u32).cast(),
                0,
            )
        };
        rc == 0
    }

    /// One entry: which ZDT_ACTIVE entry is live (0 = none: pass through).
    #[map]
    static ZDT_CONTROL: Array<Control> = Array::with_max_entries(1, 0);

    /// Three entries of the active set: the live one, the rollback target (what `zdt-ctl
    /// rollback` restores, and what the program falls back to while nothing of the live set
    /// listens: [`previous`]) and a free one. zdt-ctl writes only an entry ZDT_CONTROL does not
    /// name, names it in one write, then waits for an RCU grace period before it may write
    /// again, so a running program only ever reads a live set that nobody is writing: it sees
    /// the old set or the new one, never a mix.
    #[map]
    static ZDT_ACTIVE: Array<ActiveSet> = Array::with_max_entries(3, 0);

    #[map]
    static ZDT_SLOT_COUNTERS: PerCpuArray<SlotCounters> =
        PerCpuArray::with_max_entries(MAX_SLOTS, 0);

    #[map]
    static ZDT_GLOBAL_COUNTERS: PerCpuArray<GlobalCounters> = PerCpuArray::with_max_entries(1, 0);

    /// Userspace bookkeeping (pid, role, cookie per slot). Declared here so that it is created
    /// and pinned with the other maps. The programs read a slot's role before they select a
    /// socket of the rollback target ([`previous`]); the UDP program reads a slot's cookie, to
    /// tell the socket a flow was recorded on from one that took its slot since.
    #[map]
    static ZDT_SLOT_META: Array<SlotMeta> = Array::with_max_entries(MAX_SLOTS, 0);

    /// The sources of zdt-ctl's own connections (see [`ProbeKey`]), written by zdt-ctl before it
    /// connects: what the program does with each ([`PROBE_CANDIDATE`], or refuse).
    #[map]
    static ZDT_PROBES: HashMap<ProbeKey, ProbeValue> = HashMap::with_max_entries(MAX_PROBES, 0);

    /// Why the program runs: a SYN, the ACK of a SYN cookie (the kernel sent the SYN-ACK
    /// without keeping a request, and looks the listener up again when the ACK comes), or a
    /// closing listener's queue migrating. Only SYNs and migrations are counted: with
    /// net.ipv4.tcp_syncookies the same connection runs the program at its SYN and at its ACK.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Run {
        Syn,
        CookieAck,
        Migrate,
        /// A UDP datagram of a flow the table does not know: counted as a SYN is.
        Flow,
    }

    /// Attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (section `sk_reuseport/migrate`): with it
    /// the kernel migrates the accept queue of a closing listener to the socket this program
    /// selects, whatever net.ipv4.tcp_migrate_req says (net/core/sock_reuseport.c,
    /// reuseport_migrate_sock; kernel >= 5.14). Without it, those connections are reset.
    #[sk_reuseport(migrate)]
    pub fn zdt_select(ctx: SkReuseportContext) -> u32 {
        select(&ctx)
    }

    #[inline(always)]
    fn global(update: impl FnOnce(&mut GlobalCounters)) {
        if let Some(c) = ZDT_GLOBAL_COUNTERS.get_ptr_mut(0) {
            // SAFETY: a per-CPU value, and two runs never interleave on one CPU: a SYN is handled
            // in softirq, and the migration path (inet_csk_listen_stop) runs the program with
            // bottom halves disabled. So a plain increment is enough, without atomics.
            update(unsafe { &mut *c });
        }
    }

    /// Counts a run of the program for the group of family index `i` (see [`GlobalCounters`]).
    #[inline(always)]
    fn count_run(i: usize) {
        global(|g| {
            if let Some(r) = g.runs.get_mut(i) {
                *r += 1;
            }
        });
    }

    /// `hash` mapped onto 0..n by a multiplication (Lemire's range reduction), not `hash % n`:
    /// a division costs tens of cycles on every selection. It keeps the hash's upper bits, so
    /// the canary's share is decided on its lower ones ([`canary_share`]).
    #[inline(always)]
    fn scale(hash: u32, n: u32) -> u32 {
        ((u64::from(hash) * u64::from(n)) >> 32) as u32
    }

    /// Whether a flow of hash `hash` is in the canary's `weight` %: decided on the hash's lower
    /// 16 bits, where the slot ([`scale`]) is decided on its upper ones. Deciding both on the
    /// same bits would leave the canary's connections only the slots those bits reach under
    /// the share (with weight 1 and 2 or 4 sockets, the first socket alone).
    #[inline(always)]
    fn canary_share(hash: u32, weight: u32) -> bool {
        ((hash & 0xffff) * 100) >> 16 < weight
    }

    #[inline(always)]
    fn select(ctx: &SkReuseportContext) -> u32 {
        // Kernel contract: migrating_sk is set only on the migration path (5.14+); `sk` is
        // always a socket of the group the program runs for (PTR_TO_SOCKET, never NULL).
        let migrating = ctx.migrating_sk().is_some();
        let run = if migrating {
            Run::Migrate
        } else if is_syn(ctx) {
            Run::Syn
        } else {
            Run::CookieAck
        };

        // SAFETY: ctx.sk() is never NULL for sk_reuseport programs (see above).
        let family = unsafe { (*ctx.sk().sock).family };
        let fam = family_index(family);

        let buf = live_buf();
        // zdt-ctl's own connections: a readiness probe through the public port reaches the
        // candidate and nothing else; with no candidate (or one that cannot be selected), and
        // for status's check that the program runs, it is refused rather than answered by
        // another process, parked on a placeholder, or handed to the app. A SYN cookie's ACK
        // is looked up too: it decides where the connection is made, and carries no MSS.
        if let Some(kind) = zdt_probe(ctx, run) {
            // Runs are counted for zdt-ctl's own connections only: status's check that the
            // program runs is one of them, and a count of every run would cost every SYN a
            // per-CPU write.
            if let (Run::Syn, Some(i)) = (run, fam) {
                count_run(i);
            }
            if kind == PROBE_CANDIDATE && buf != 0 {
                if let (Some(set), Some(i)) = (ZDT_ACTIVE.get(buf - 1), fam) {
                    if let Some(probe) = set.probe.get(i) {
                        if try_list(ctx, probe, run) {
                            return SK_PASS;
                        }
                    }
                }
            }
            if run == Run::Syn {
                global(|g| g.probe_refused += 1);
            }
            return SK_DROP;
        }

        if buf == 0 {
            // Nothing promoted yet. SK_PASS without a selection makes the kernel hash over all
            // listeners of the group, exactly as if no program were attached, so attaching zdt
            // changes nothing by itself.
            if run == Run::Syn {
                global(|g| g.passthrough += 1);
            }
            return SK_PASS;
        }

        if let (Some(set), Some(i)) = (ZDT_ACTIVE.get(buf - 1), fam) {
            if run != Run::Migrate {
                // The canary's share, by flow hash: every SYN of one connection (retransmits
                // included) has the same hash, so a connection never changes sides.
                if let Some(canary) = set.canary.get(i) {
                    if set.canary_weight > 0
                        && canary.len > 0
                        && canary_share(ctx.hash(), set.canary_weight)
                        && try_list(ctx, canary, run)
                    {
                        return SK_PASS;
                    }
                }
            }
            if let Some(list) = set.lists.get(i) {
                if try_list(ctx, list, run) {
                    return SK_PASS;
                }
            }
            // No active socket could take it: the canary, which is ready too, can.
            if let Some(canary) = set.canary.get(i) {
                if try_list(ctx, canary, run) {
                    return SK_PASS;
                }
            }
            // None of the live set listens (it crashed, or re-created its listener and the
            // next command has not adopted the new socket yet): the version before it, while it
            // still runs, was ready and promoted, where a warming one beside it is not.
            if previous(ctx, buf, i, run).is_some() {
                return SK_PASS;
            }
            // Nothing ready listens (a restart without overlap, a crash): park the connection on
            // a placeholder, where it waits instead of being refused, reset, or answered by a
            // process that is still warming up. On the migration path too: a dying member's
            // queue waits there for the next one. When the placeholder's own queue migrates,
            // its slot is already empty (-ENOENT, see try_list), so it never selects itself.
            if let Some(hold) = set.hold.get(i) {
                if try_list(ctx, hold, run) {
                    if run != Run::CookieAck {
                        global(|g| g.held += 1);
                    }
                    return SK_PASS;
                }
            }
        }

        // No active socket of this group could be selected. SK_PASS without selection falls back
        // to kernel hashing over every listener of the group (warming and draining ones included):
        // a connection that lands on a not-yet-ready process still beats a refused or reset one.
        // SK_DROP would refuse a new connection and reset a migrating one, so it is never used.
        match run {
            Run::Migrate => global(|g| g.migrate_no_target += 1),
            Run::Syn => global(|g| g.fallback += 1),
            Run::CookieAck | Run::Flow => {}
        }
        SK_PASS
    }

    /// The entry of ZDT_ACTIVE that the control word names live (1-based, 0 = nothing
    /// promoted).
    #[inline(always)]
    fn live_buf() -> u32 {
        match ZDT_CONTROL.get(0) {
            // SAFETY: a plain aligned u32 read of a map value that stays valid under RCU.
            Some(control) => unsafe { core::ptr::read_volatile(&control.active_buf) },
            None => 0,
        }
    }

    /// The entry of ZDT_ACTIVE that the control word names the rollback target (0-based). Read
    /// only when the live set could not take a connection, so selections off that path do not
    /// pay for it. It may come from a later write of the control word than `live_buf` did
    /// (zdt-ctl writes the word whole, not atomically): see [`previous`] for why that is safe.
    #[inline(always)]
    fn target_buf() -> u32 {
        // SAFETY: a plain aligned u16 read of a map value that stays valid under RCU.
        let n = ZDT_CONTROL
            .get(0)
            .map_or(0, |c| unsafe { core::ptr::read_volatile(&c.rollback_buf) });
        match n {
            0 => 2,
            n => u32::from(n) - 1,
        }
    }

    /// Selects a socket of the rollback target (its active members, then its canary): the
    /// version that served before the live one, while it still runs. Used only when nothing of
    /// the live set can be selected, before placeholders and the kernel's hash over the whole
    /// group (which would reach a candidate that is still warming up).
    ///
    /// Why a slot it names can only hold a socket that served: zdt-ctl never gives a slot the
    /// target names to a new socket (it takes the slot out of the target first, and waits for
    /// an RCU grace period after every write of the control word, so no run still reads the
    /// old target then), and it writes a slot's metadata before it puts a socket there. A run
    /// that read the control word while it was written, or the target's entry while zdt-ctl
    /// rewrote it for the next command, could see a list that names other slots: so a slot is
    /// selected only if its metadata records its socket active, canary or draining, never a
    /// candidate's, a placeholder's or an empty one.
    #[inline(always)]
    fn previous(ctx: &SkReuseportContext, buf: u32, i: usize, run: Run) -> Option<u32> {
        let target = target_buf();
        if target + 1 == buf {
            return None;
        }
        let set = ZDT_ACTIVE.get(target)?;
        if let Some(slot) = pick_if(ctx, set.lists.get(i)?, run, true) {
            return Some(slot);
        }
        pick_if(ctx, set.canary.get(i)?, run, true)
    }

    /// Selects one of the slots of `list`: the one the flow hash picks, so that the cost of a
    /// selection does not grow with the list; if that fails, the next [`WALK`] slots in turn,
    /// then [`PROBES`] slots at random. A selection fails with -ENOENT for a slot whose socket
    /// has stopped listening: on the migration path that is always the case for the closing
    /// socket itself, which has already left the socket array (net/core/filter.c,
    /// sk_select_reuseport), so this naturally picks "an active socket other than the closing
    /// one". A list of at most WALK slots is tried whole.
    #[inline(always)]
    fn try_list(ctx: &SkReuseportContext, list: &SlotList, run: Run) -> bool {
        pick(ctx, list, run).is_some()
    }

    /// [`try_list`], giving the slot selected.
    #[inline(always)]
    fn pick(ctx: &SkReuseportContext, list: &SlotList, run: Run) -> Option<u32> {
        pick_if(ctx, list, run, false)
    }

    /// [`pick`]; with `served_only`, a slot is selected only if ZDT_SLOT_META records its
    /// socket active, canary or draining (see [`previous`]).
    #[inline(always)]
    fn pick_if(
        ctx: &SkReuseportContext,
        list: &SlotList,
        run: Run,
        served_only: bool,
    ) -> Option<u32> {
        // Not clamped to MAX_ACTIVE on purpose: the bounds check in try_slot (`slots.get`) is
        // what the verifier needs to see, and the compiler would drop it as redundant if it
        // knew that every index is below n <= MAX_ACTIVE. A longer len (never written) only
        // makes some selections fail.
        let n = list.len;
        if n == 0 {
            return None;
        }
        let start = scale(ctx.hash(), n);
        for i in 0..WALK {
            if i >= n {
                return None;
            }
            let mut idx = start + i;
            if idx >= n {
                idx -= n;
            }
            if let Some(slot) = try_slot(ctx, list, idx, run, served_only) {
                return Some(slot);
            }
        }
        for _ in 0..PROBES {
            // SAFETY: a helper without arguments.
            let idx = scale(unsafe { bpf_get_prandom_u32() }, n);
            if let Some(slot) = try_slot(ctx, list, idx, run, served_only) {
                return Some(slot);
            }
        }
        None
    }

    /// Selects the socket of `list.slots[idx]` and counts it (see [`Run`]); its slot, or None
    /// if it cannot be selected.
    #[inline(always)]
    fn try_slot(
        ctx: &SkReuseportContext,
        list: &SlotList,
        idx: u32,
        run: Run,
        served_only: bool,
    ) -> Option<u32> {
        let &slot = list.slots.get(idx as usize)?;
        if served_only && !served_role(ZDT_SLOT_META.get(slot).map_or(0, |m| m.role)) {
            return None;
        }
        if !select_slot(ctx, slot) {
            global(|g| g.select_failed += 1);
            return None;
        }
        if run == Run::CookieAck {
            return Some(slot);
        }
        let migrating = run == Run::Migrate;
        if let Some(c) = ZDT_SLOT_COUNTERS.get_ptr_mut(slot) {
            // SAFETY: per-CPU value, no concurrent writer on this CPU (see `global`).
            let c = unsafe { &mut *c };
            if migrating {
                c.migrated += 1;
            } else {
                c.steered += 1;
                // Two rotating buckets give `status` the share of recent connections without a
                // daemon keeping history.
                // The coarse clock: a tick's resolution is plenty for buckets of half a minute,
                // and zdt-ctl compares them with CLOCK_MONOTONIC, of which this is the
                // tick-rounded value.
                let bucket = recent_bucket(coarse_ns());
                let i = (bucket & 1) as usize;
                if let (Some(b), Some(r)) = (c.bucket.get_mut(i), c.recent.get_mut(i)) {
                    if *b != bucket {
                        *b = bucket;
                        *r = 0;
                    }
                    *r += 1;
                }
            }
        }
        global(|g| {
            if migrating {
                g.migrated += 1;
            } else {
                g.steered += 1;
            }
        });
        Some(slot)
    }

    /// Whether the packet is a SYN (not an ACK). Off the migration path the program runs for a
    /// packet that found no connection: a SYN, or the ACK that completes a SYN cookie's
    /// handshake (a stray ACK too, which the listener answers with a RST). Kernel contract: for
    /// an sk_reuseport program, data..data_end starts at the TCP header
    /// (net/core/filter.c, bpf_run_sk_reuseport); the migration of an established connection
    /// runs the program without an skb, so it is never called there.
    #[inline(always)]
    fn is_syn(ctx: &SkReuseportContext) -> bool {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 14 > end {
            return false;
        }
        // SAFETY: bounds checked just above: byte 13 (the flags) is in.
        let flags = unsafe { *((data + 13) as *const u8) };
        flags & 0x02 != 0 && flags & 0x10 == 0
    }

    /// What to do with one of zdt-ctl's own connections ([`ZDT_PROBES`]'s value for its
    /// source), or None for any other. A SYN is looked up only if its MSS option is
    /// [`PROBE_MSS`] (part one of the mark, a cheap filter: no lookup for ordinary clients);
    /// a cookie's ACK, which carries no MSS, always (they are rare). Call only off the
    /// migration path.
    ///
    /// Kernel contracts: Linux writes the MSS option first in a SYN's options
    /// (tcp_options_write: only an MD5 or AO signature, which zdt-ctl never asks for, comes
    /// before it); bpf_skb_load_bytes_relative(BPF_HDR_START_NET) reads the IP header
    /// (sk_reuseport_func_proto offers it); the packet's family is eth_protocol (skb->protocol,
    /// big-endian), not the group's: an IPv4 client of a dual-stack listener meets an IPv6
    /// group.
    #[inline(always)]
    fn zdt_probe(ctx: &SkReuseportContext, run: Run) -> Option<u32> {
        let (data, end) = (ctx.data(), ctx.data_end());
        // The fixed header (20 bytes): a cookie's ACK may have no option at all (no TCP
        // timestamps), so only a SYN is required to carry more.
        if run == Run::Migrate || data + 20 > end {
            return None;
        }
        // SAFETY: bounds checked just above, against data_end: bytes 0..2 are in.
        let port = unsafe { core::ptr::read_unaligned(data as *const [u8; 2]) };
        if run == Run::Syn {
            // One MSS option (kind 2, length 4, value) after the fixed header.
            if data + 24 > end {
                return None;
            }
            // SAFETY: bounds checked just above: bytes 12 and 20..24 are in.
            let (doff, option) = unsafe {
                (
                    *((data + 12) as *const u8) >> 4,
                    core::ptr::read_unaligned((data + 20) as *const [u8; 4]),
                )
            };
            let mss = u16::from_be_bytes([option[2], option[3]]);
            if doff < 6 || option[0] != 2 || option[1] != 4 || mss != PROBE_MSS {
                return None;
            }
        }
        let (family, offset, len) = match u16::from_be(ctx.eth_protocol() as u16) {
            // IPv4: the source address at offset 12 of the IP header; IPv6: at offset 8.
            0x0800 => (AF_INET, 12, 4),
            0x86dd => (AF_INET6, 8, 16),
            _ => return None,
        };
        let mut key = ProbeKey {
            family: family as u16,
            port: u16::from_be_bytes(port),
            addr: [0; 16],
        };
        // SAFETY: `key.addr` is a writable buffer of 16 bytes and `len` is at most 16.
        let loaded = unsafe {
            bpf_skb_load_bytes_relative(
                ctx.as_ptr(),
                offset,
                key.addr.as_mut_ptr() as *mut c_void,
                len,
                BPF_HDR_START_NET,
            ) == 0
        };
        if !loaded {
            return None;
        }
        // SAFETY: a plain read of a hash map value, valid under RCU for this run.
        unsafe { ZDT_PROBES.get(key) }.map(|v| v.kind)
    }

    /// A UDP port's flows: which socket got each flow's first datagram (see [`FlowKey`]). An LRU
    /// table: when full, the kernel evicts the flows least recently looked up, so a flow that
    /// keeps sending keeps its entry; [`FlowConfig`] bounds how fast new flows can push others
    /// out. Its size is set when `attach` creates it (a TCP port's program never reads it).
    #[map]
    static ZDT_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(1, 0);

    #[map]
    static ZDT_FLOW_COUNTERS: PerCpuArray<FlowCounters> = PerCpuArray::with_max_entries(1, 0);

    #[map]
    static ZDT_FLOW_CONFIG: Array<FlowConfig> = Array::with_max_entries(1, 0);

    #[inline(always)]
    fn flows(update: impl FnOnce(&mut FlowCounters)) {
        if let Some(c) = ZDT_FLOW_COUNTERS.get_ptr_mut(0) {
            // SAFETY: a per-CPU value; runs for datagrams (softirq) never interleave on one
            // CPU, as for `global`.
            update(unsafe { &mut *c });
        }
    }

    /// The program of a UDP port's group (attach type BPF_SK_REUSEPORT_SELECT: UDP has no
    /// migration; a closing socket's queued datagrams are freed with it). The kernel runs it for
    /// every datagram that no connected socket claims (udp4_lib_lookup2 -> lookup_reuseport; a
    /// GRO train once). Rules:
    /// - a datagram of a known flow goes to the socket that got the flow's first datagram, while
    ///   that socket lives, whatever its role now: a draining process keeps its flows;
    /// - a new flow goes to the active set (the canary's share by flow hash), as a TCP
    ///   connection does, and is recorded;
    /// - nothing reaches a candidate: while nothing is promoted the program passes (one
    ///   generation, as if no program were attached), and after that the kernel's own hash
    ///   over the whole group is used only when no active, canary or flow socket can be
    ///   selected (`fallback`);
    /// - never SK_DROP a client's datagram: the kernel would answer ICMP port unreachable.
    #[sk_reuseport]
    pub fn zdt_select_udp(ctx: SkReuseportContext) -> u32 {
        select_udp(&ctx)
    }

    #[inline(always)]
    fn select_udp(ctx: &SkReuseportContext) -> u32 {
        // SAFETY: ctx.sk() is never NULL for sk_reuseport programs.
        let family = unsafe { (*ctx.sk().sock).family };
        // A UDP group is IPv4 or IPv6. Leaving here otherwise keeps `i` a plain value below:
        // as an Option, the compiler spilled an unset register on the None path, which the
        // verifier refuses to read (`R5 !read_ok`).
        let Some(i) = family_index(family) else {
            flows(|f| f.fallback += 1);
            return SK_PASS;
        };
        let Some((key, empty)) = flow_key(ctx) else {
            flows(|f| f.fallback += 1);
            return SK_PASS;
        };
        // zdt-ctl's own datagrams (status's check that the program runs) carry no payload, which
        // no QUIC, DNS or syslog client sends: only those are looked up. Refused, they reach no
        // process; the ICMP error goes to zdt-ctl's own socket, not to a client. Runs are
        // counted for empty datagrams only: that check is what reads them, and a count per
        // datagram would cost every datagram a per-CPU write.
        if empty {
            count_run(i);
            let mut probe = ProbeKey {
                family: key.family,
                port: u16::from_be(key.remote_port),
                addr: [0; 16],
            };
            if let Some(src) = key.addrs.get(..16) {
                probe.addr.copy_from_slice(src);
            }
            // SAFETY: a plain read of a hash map value, valid under RCU for this run.
            if unsafe { ZDT_PROBES.get(probe) }.is_some() {
                global(|g| g.probe_refused += 1);
                return SK_DROP;
            }
        }
        let buf = live_buf();
        if buf == 0 {
            global(|g| g.passthrough += 1);
            return SK_PASS;
        }
        if let Some(v) = ZDT_FLOWS.get_ptr_mut(key) {
            // SAFETY: a value of the LRU table, valid under RCU for this run; a concurrent run
            // on another CPU for the same flow writes the same fields, and a torn `seen_s` is
            // only a refresh time.
            let v = unsafe { &mut *v };
            // Kernel contract: the socket array clears a slot when its socket closes, and
            // zdt-ctl writes a slot's new cookie into ZDT_SLOT_META before it puts another
            // socket there: a flow is sent only to the socket that got its first datagram.
            let owner = ZDT_SLOT_META.get(v.slot).map(|m| m.cookie);
            if owner == Some(v.cookie) && select_slot(ctx, v.slot) {
                let now = now_s();
                if v.seen_s != now {
                    v.seen_s = now;
                }
                flows(|f| f.known += 1);
                return SK_PASS;
            }
            flows(|f| f.orphaned += 1);
        }
        let mut chosen = None;
        if let Some(set) = ZDT_ACTIVE.get(buf - 1) {
            if let Some(canary) = set.canary.get(i) {
                if set.canary_weight > 0
                    && canary.len > 0
                    && canary_share(ctx.hash(), set.canary_weight)
                {
                    chosen = pick(ctx, canary, Run::Flow);
                }
            }
            if chosen.is_none() {
                if let Some(list) = set.lists.get(i) {
                    chosen = pick(ctx, list, Run::Flow);
                }
            }
            if chosen.is_none() {
                if let Some(canary) = set.canary.get(i) {
                    chosen = pick(ctx, canary, Run::Flow);
                }
            }
            if chosen.is_none() {
                chosen = previous(ctx, buf, i, Run::Flow);
            }
        }
        let Some(slot) = chosen else {
            flows(|f| f.fallback += 1);
            return SK_PASS;
        };
        record(&key, slot);
        SK_PASS
    }

    /// CLOCK_MONOTONIC in the flow table's seconds, from the coarse clock ([`coarse_ns`]).
    #[inline(always)]
    fn now_s() -> u32 {
        flow_seconds(coarse_ns())
    }

    /// Records a new flow on `slot`, within this CPU's budget of new flows per second.
    #[inline(always)]
    fn record(key: &FlowKey, slot: u32) {
        let limit = ZDT_FLOW_CONFIG
            .get(0)
            .map_or(0, |c| u64::from(c.new_per_cpu_per_s));
        let now = now_s();
        let mut within = false;
        flows(|f| {
            if f.budget_second != u64::from(now) {
                f.budget_second = u64::from(now);
                f.budget_used = 0;
            }
            if f.budget_used < limit {
                f.budget_used += 1;
                within = true;
            }
        });
        let cookie = ZDT_SLOT_META.get(slot).map(|m| m.cookie);
        let inserted = match (within, cookie) {
            (true, Some(cookie)) => {
                let value = FlowValue {
                    cookie,
                    slot,
                    seen_s: now,
                };
                ZDT_FLOWS.insert(key, value, 0).is_ok()
            }
            _ => false,
        };
        flows(|f| {
            if inserted {
                f.recorded += 1;
            } else {
                f.unrecorded += 1;
            }
        });
    }

    /// The flow a datagram belongs to, and whether its payload is empty. Kernel contracts: for
    /// a UDP group, data..data_end starts at the UDP header (bpf_run_sk_reuseport); the packet's
    /// family is eth_protocol, and bpf_skb_load_bytes_relative(BPF_HDR_START_NET) reads the IP
    /// header, whose source and destination addresses are contiguous (IPv4 at 12, IPv6 at 8).
    #[inline(always)]
    fn flow_key(ctx: &SkReuseportContext) -> Option<(FlowKey, bool)> {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + 8 > end {
            return None;
        }
        // SAFETY: bounds checked just above: the 8 bytes of the UDP header are in.
        let (port, len) = unsafe {
            (
                core::ptr::read_unaligned(data as *const u16),
                core::ptr::read_unaligned((data + 4) as *const [u8; 2]),
            )
        };
        let mut key = FlowKey {
            addrs: [0; 32],
            remote_port: port,
            family: 0,
        };
        let loaded = match u16::from_be(ctx.eth_protocol() as u16) {
            0x0800 => {
                key.family = AF_INET as u16;
                let mut both = [0u8; 8];
                // SAFETY: `both` is a writable buffer of 8 bytes.
                let ok = unsafe {
                    bpf_skb_load_bytes_relative(
                        ctx.as_ptr(),
                        12,
                        both.as_mut_ptr() as *mut c_void,
                        8,
                        BPF_HDR_START_NET,
                    ) == 0
                };
                if let (Some(r), Some(l)) = (key.addrs.get_mut(..4), both.get(..4)) {
                    r.copy_from_slice(l);
                }
                if let (Some(r), Some(l)) = (key.addrs.get_mut(16..20), both.get(4..)) {
                    r.copy_from_slice(l);
                }
                ok
            }
            0x86dd => {
                key.family = AF_INET6 as u16;
                // SAFETY: `key.addrs` is a writable buffer of 32 bytes.
                unsafe {
                    bpf_skb_load_bytes_relative(
                        ctx.as_ptr(),
                        8,
                        key.addrs.as_mut_ptr() as *mut c_void,
                        32,
                        BPF_HDR_START_NET,
                    ) == 0
                }
            }
            _ => false,
        };
        loaded.then_some((key, u16::from_be_bytes(len) <= 8))
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host this crate builds to an empty binary (the workspace is checked and linted on the
/// host); the real program is only built for bpfel-unknown-none by zdt-ctl's build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
