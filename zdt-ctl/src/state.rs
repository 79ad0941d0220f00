//! zdt's state for one port: the BPF program and its maps, pinned under
//! `/sys/fs/bpf/zdt/<netns cookie>/<port>/`, and the state machine over those maps.
//!
//! There is no daemon: every command opens the pinned objects, takes an exclusive flock on the
//! port's directory (so two commands never interleave), changes the maps, and exits. Every change
//! is ordered so that a command killed at any point leaves a state the next command accepts:
//! - creation pins the maps first and the program last; a directory without the program pin is
//!   an interrupted creation and is wiped and redone by the next `attach`;
//! - sockets enter the socket array as candidates, which the program never selects; only the
//!   one-word flip of `ZDT_CONTROL` makes a new active set live (see [`State::write_set`]).
use std::{
    fs::{self, File},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::{DirBuilderExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuValues};
use zdt_common::{
    names, ActiveSet, Control, FlowConfig, FlowCounters, FlowKey, FlowValue, GlobalCounters,
    ProbeKey, ProbeValue, SlotCounters, SlotList, SlotMeta, LAYOUT_VERSION, MAX_PROBES, MAX_SLOTS,
    UPGRADABLE_LAYOUT,
};

use crate::{
    addr::{Port, PortSpec, Proto},
    error::{err, Kind},
    plan::{
        buffers::Buffers,
        sets::{self, Plan, Role},
        snapshot::{self, Snapshot},
    },
    program,
    sockets::{self, Listener},
};

pub use crate::plan::sets::Slot;

pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// Where `upgrade` pins the new program before it is attached everywhere; renamed over
/// [`names::PROGRAM`] as the last step (bpffs refuses names with a dot).
const STAGED_PROGRAM: &str = "zdt_select_next";
/// Slot metadata entries read per BPF_MAP_LOOKUP_BATCH call (see `State::read_all_meta`).
const META_BATCH: usize = 256;
/// The maps of a UDP port's state only, beside [`ALL_MAPS`].
const UDP_MAPS: [&str; 3] = [names::FLOWS, names::FLOW_COUNTERS, names::FLOW_CONFIG];

/// The maps pinned for a port of `proto`.
fn maps_of(proto: Proto) -> Vec<&'static str> {
    let mut maps = ALL_MAPS.to_vec();
    if proto == Proto::Udp {
        maps.extend(UDP_MAPS);
    }
    maps
}

const ALL_MAPS: [&str; 7] = [
    names::SOCKETS,
    names::CONTROL,
    names::ACTIVE,
    names::SLOT_COUNTERS,
    names::GLOBAL_COUNTERS,
    names::SLOT_META,
    names::PROBES,
];

/// `/sys/fs/bpf/zdt/<netns cookie>`: the state of every port of this network namespace.
pub fn netns_dir() -> anyhow::Result<PathBuf> {
    Ok(Path::new(BPFFS)
        .join("zdt")
        .join(sockets::netns_cookie()?.to_string()))
}

/// The directory of one port's state.
pub fn port_dir(port: Port) -> anyhow::Result<PathBuf> {
    Ok(netns_dir()?.join(port.dir_name()))
}

/// Who claims the probe lists: the thread, not the process. `zdt-ctl watch` probes in one
/// thread while its main thread takes the port's lock on every change of the port's listeners;
/// a claim by process would be that lock's own command's to its repair, which would clear the
/// probe lists under the waiting probe (its marked connections would then be refused).
/// A thread id is a pid to kill(2), so a claim whose thread has ended is forgotten as a gone
/// process's is; in a one-threaded zdt-ctl it is the pid.
fn prober_id() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

/// The ZDT_PROBES key of `pid`'s claim of the probe lists: family 0, which no packet has.
fn claim_key(pid: u32) -> ProbeKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&pid.to_le_bytes());
    ProbeKey {
        family: 0,
        port: 0,
        addr,
    }
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there (a minimal system or container).
fn ensure_bpffs() -> anyhow::Result<()> {
    let is_bpffs = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting bpffs on {BPFFS}"))?;
    Ok(())
}

/// Removes the pins of a port's state directory other than the program's (the staged program
/// and every map), each if it is there: what `remove` does after the program pin, and what
/// `create` clears of an interrupted creation.
pub(crate) fn remove_maps(dir: &Path) {
    let _ = fs::remove_file(dir.join(STAGED_PROGRAM));
    for name in ALL_MAPS.iter().chain(&UDP_MAPS) {
        let _ = fs::remove_file(dir.join(name));
    }
}

/// Whether the socket array pinned in `dir` holds any socket (a socket keeps its network
/// namespace alive, and the array holds only live ones).
pub(crate) fn holds_socket(dir: &Path) -> bool {
    match MapData::from_pin(dir.join(names::SOCKETS)) {
        Ok(map) => (0..MAX_SLOTS).any(|slot| {
            let mut cookie: u64 = 0;
            bpf_map_elem(BPF_MAP_LOOKUP_ELEM, &map, slot, &mut cookie).is_ok()
        }),
        Err(_) => false,
    }
}

/// Creates `dir` (and parents) readable and writable by root only.
fn mkdir_private(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))
}

/// An exclusive flock on a state directory, released when dropped (also when the process dies:
/// the kernel drops flocks with the last fd, so a killed command never leaves the lock held).
pub struct Lock {
    _dir: File,
}

impl Lock {
    /// Locks the directory that `dir` names when the lock is granted; None if it is gone by then.
    ///
    /// Kernel contract: flock locks the inode of the open file, not the path. A command that
    /// waited here while `detach` removed the directory and `attach` made a new one would hold
    /// the lock of a directory that is gone, beside the holder of the new one's: so after the
    /// lock is granted, the path must still name the locked inode, else the new one is locked.
    fn take(dir: &Path) -> anyhow::Result<Option<Self>> {
        Self::take_within(dir, None)
    }

    /// [`Lock::take`], waiting at most `within` for the lock (None: as long as it takes); an
    /// error once that has passed. For a reader that must not wait on a stuck command forever
    /// (the tests' invariant checks).
    pub fn take_within(
        dir: &Path,
        within: Option<std::time::Duration>,
    ) -> anyhow::Result<Option<Self>> {
        use std::os::unix::fs::MetadataExt as _;
        let deadline = within.map(|w| std::time::Instant::now() + w);
        loop {
            let file = match File::open(dir) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("opening {}", dir.display())),
            };
            let how = if deadline.is_some() {
                libc::LOCK_EX | libc::LOCK_NB
            } else {
                libc::LOCK_EX
            };
            // SAFETY: flock on an fd we own.
            while unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
                let e = std::io::Error::last_os_error();
                match deadline {
                    Some(d) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                        anyhow::ensure!(
                            std::time::Instant::now() < d,
                            "{} stayed locked for {:?}: a command is stuck",
                            dir.display(),
                            within.unwrap_or_default()
                        );
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    _ => return Err(e).with_context(|| format!("locking {}", dir.display())),
                }
            }
            crate::failpoint(crate::Step::LockTaken);
            let locked = file.metadata()?.ino();
            match fs::metadata(dir) {
                Ok(m) if m.ino() == locked => return Ok(Some(Lock { _dir: file })),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            }
        }
    }
}

/// The opened state of one port.
pub struct State {
    pub dir: PathBuf,
    pub spec: PortSpec,
    sockets: MapData,
    control: Array<MapData, Control>,
    active: Array<MapData, ActiveSet>,
    slot_counters: PerCpuArray<MapData, SlotCounters>,
    global_counters: PerCpuArray<MapData, GlobalCounters>,
    meta: Array<MapData, SlotMeta>,
    /// A UDP port's flow maps (None for TCP).
    flows: Option<FlowMaps>,
    /// The slot metadata as last read or written by this command, kept while it holds the lock
    /// (only lock holders write it, so the copy stays true): reading all MAX_SLOTS entries
    /// costs a 160 KB copy out of the kernel, and a promote needs them several times.
    meta_cache: std::cell::RefCell<Option<Vec<SlotMeta>>>,
    /// The pinned program, opened by path (BPF_OBJ_GET). Not through aya's
    /// `SkReuseport::from_pin`: that reads the program's name, which makes aya probe every
    /// kernel feature once per process (five verifier runs and nine BTF loads, about half of a
    /// status's CPU time).
    program: std::os::fd::OwnedFd,
    _lock: Option<Lock>,
}

fn open_map(dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// `spec` asked for while the port is attached as `attached`.
pub fn attached_as(spec: PortSpec, attached: PortSpec) -> anyhow::Error {
    crate::error::bad_input(format!(
        "port {} is already attached as {attached}; run `zdt-ctl detach {attached}` first to \
         attach {spec}",
        spec.key()
    ))
}

pub fn not_attached(port: Port) -> anyhow::Error {
    err(
        Kind::NotAttached,
        format!(
            "port {port} is not attached: run `zdt-ctl attach :{}{}` first",
            port.number,
            port.proto.suffix()
        ),
    )
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the program's bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl State {
    /// Whether the program is attached to the group of one family (IPv4 if `v4`): makes one
    /// connection to the port and sees whether the program ran for that family. Kernel contract:
    /// the group's program runs on the SYN, before the handshake completes, so when connect()
    /// returns the count has moved, unless the group has no program or another one (an app can
    /// replace it with SO_ATTACH_REUSEPORT_EBPF, or remove it with SO_DETACH_REUSEPORT_BPF).
    /// The program refuses that connection (its source is in ZDT_PROBES as one to refuse:
    /// readiness::probe_socket), so the app never sees it, nor does a `--probe` candidate;
    /// without the program, the app gets it and sees it close.
    ///
    /// A UDP port is checked with an empty datagram from a source in ZDT_PROBES, which the
    /// program refuses (the ICMP error comes back to that socket): no app sees it either. Its
    /// run may come in the softirq after sendto() returns, so the count is read until it moves
    /// or 1 s has passed.
    pub fn probe_attached(&self, v4: bool) -> anyhow::Result<bool> {
        let i = usize::from(!v4);
        let before = self.global_counters()?.runs[i];
        let target = self.spec.reach(v4);
        // Marked as one to refuse, so the app never sees it. A refused or timed-out
        // connection still ran the program (if attached) on its SYN.
        let (s, _mark) = crate::readiness::probe_socket_of(
            self.spec.proto,
            target,
            Some(&self.dir),
            zdt_common::PROBE_REFUSE,
        )
        .context("binding status's probe socket")?;
        if self.spec.proto == Proto::Udp {
            s.send_to(&[], &target.into())
                .context("sending status's probe datagram")?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while std::time::Instant::now() < deadline {
                if self.global_counters()?.runs[i] > before {
                    return Ok(true);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            return Ok(false);
        }
        drop(s.connect_timeout(&target.into(), std::time::Duration::from_secs(1)));
        Ok(self.global_counters()?.runs[i] > before)
    }

    /// Whether a complete state exists for `port` (the program pin is written last).
    pub fn exists(port: Port) -> anyhow::Result<bool> {
        Ok(port_dir(port)?.join(names::PROGRAM).exists())
    }

    /// Opens the state of `port` and takes its lock (for commands that change it).
    pub fn open_locked(port: Port) -> anyhow::Result<Self> {
        Self::lock_and_open(port, Program::Ours)
    }

    /// Opens the state of `port` locked, whichever program is pinned, for `upgrade`: everything
    /// else is checked as for any command (permissions, the maps' shapes, the layout version).
    pub fn open_for_upgrade(port: Port) -> anyhow::Result<Self> {
        Self::lock_and_open(port, Program::Any)
    }

    fn lock_and_open(port: Port, program: Program) -> anyhow::Result<Self> {
        let dir = port_dir(port)?;
        let lock = Lock::take(&dir)?.ok_or_else(|| not_attached(port))?;
        // A detach may have removed the state while we waited for the lock.
        if !dir.join(names::PROGRAM).exists() {
            return Err(not_attached(port));
        }
        let mut state = Self::open_checked(dir, Some(lock), program, port.proto)?;
        crate::settle::settle(&mut state)?;
        Ok(state)
    }

    /// Opens the state of `port` without the lock, for reading (status). Every map read is one
    /// syscall and each value is consistent by itself.
    pub fn open_read(port: Port) -> anyhow::Result<Option<Self>> {
        let dir = port_dir(port)?;
        if !dir.join(names::PROGRAM).exists() {
            return Ok(None);
        }
        Self::open_at(dir, None, port.proto).map(Some)
    }

    fn open_at(dir: PathBuf, lock: Option<Lock>, proto: Proto) -> anyhow::Result<Self> {
        Self::open_checked(dir, lock, Program::Ours, proto)
    }

    fn open_checked(
        dir: PathBuf,
        lock: Option<Lock>,
        program: Program,
        proto: Proto,
    ) -> anyhow::Result<Self> {
        verify(&dir, program, proto)?;
        let mut control: Array<MapData, Control> =
            Map::Array(open_map(&dir, names::CONTROL)?).try_into()?;
        let mut c = control.get(&0, 0)?;
        if c.layout_version == UPGRADABLE_LAYOUT && program == Program::Any {
            // What `upgrade` converts: the rollback target stays in entry 2, which layout 2's
            // zero rollback_buf names; only the version changes (under the lock).
            c.layout_version = LAYOUT_VERSION;
            control.set(0, c, 0)?;
        }
        if c.layout_version == UPGRADABLE_LAYOUT {
            return Err(err(
                Kind::Refused,
                format!(
                    "the state in {} was written by the zdt version before this one (map layout \
                     {UPGRADABLE_LAYOUT}, this zdt-ctl's {LAYOUT_VERSION}): run `zdt-ctl upgrade` \
                     once, which converts it in place and keeps roles and counters; nothing was \
                     changed",
                    dir.display(),
                ),
            ));
        }
        if c.layout_version != LAYOUT_VERSION {
            return Err(err(
                Kind::Refused,
                format!(
                    "the state in {} was written by another zdt version (map layout {}, this \
                     zdt-ctl's {LAYOUT_VERSION}): this zdt-ctl cannot read its maps, and \
                     `zdt-ctl upgrade` cannot keep them. Detach with the zdt-ctl that attached \
                     (or remove the directory), then attach with this one; nothing was changed",
                    dir.display(),
                    c.layout_version
                ),
            ));
        }
        let spec = decode_spec(&c);
        if spec.proto != proto {
            return Err(refused_state(
                &dir,
                format!("its control map names {spec}, a port of another protocol"),
            ));
        }
        let program = obj_get(&dir.join(names::PROGRAM))?;
        let flows = match proto {
            Proto::Tcp => None,
            Proto::Udp => Some(FlowMaps {
                flows: Map::LruHashMap(open_map(&dir, names::FLOWS)?).try_into()?,
                counters: Map::PerCpuArray(open_map(&dir, names::FLOW_COUNTERS)?).try_into()?,
            }),
        };
        Ok(State {
            flows,
            sockets: open_map(&dir, names::SOCKETS)?,
            control,
            active: Map::Array(open_map(&dir, names::ACTIVE)?).try_into()?,
            slot_counters: Map::PerCpuArray(open_map(&dir, names::SLOT_COUNTERS)?).try_into()?,
            global_counters: Map::PerCpuArray(open_map(&dir, names::GLOBAL_COUNTERS)?)
                .try_into()?,
            meta: Map::Array(open_map(&dir, names::SLOT_META)?).try_into()?,
            program,
            dir,
            spec,
            meta_cache: Default::default(),
            _lock: lock,
        })
    }

    /// Creates the state for `spec` (or opens it if it exists for the same spec), locked, a UDP
    /// port's with a table of `flows` flows. Returns the state and whether it was created now.
    pub fn create(spec: PortSpec, flows: u32) -> anyhow::Result<(Self, bool)> {
        ensure_bpffs()?;
        let dir = port_dir(spec.key())?;
        // A detach may remove the directory between its creation and the lock: make it again.
        let lock = loop {
            mkdir_private(&dir)?;
            if let Some(lock) = Lock::take(&dir)? {
                break lock;
            }
        };
        if dir.join(names::PROGRAM).exists() {
            let mut state = Self::open_at(dir, Some(lock), spec.proto)?;
            if state.spec != spec {
                return Err(attached_as(spec, state.spec));
            }
            crate::settle::settle(&mut state)?;
            return Ok((state, false));
        }
        // No program pin: nothing, or an interrupted creation. Start clean.
        remove_maps(&dir);
        let mut ebpf = program::load_fresh(flows)?;
        for name in maps_of(spec.proto) {
            let map = ebpf
                .map(name)
                .with_context(|| format!("BPF object has no map {name}"))?;
            let path = dir.join(name);
            map.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        {
            let mut control: Array<&mut MapData, Control> = ebpf
                .map_mut(names::CONTROL)
                .context("BPF object has no control map")?
                .try_into()?;
            control.set(0, encode_control(&spec, 0), 0)?;
        }
        if spec.proto == Proto::Udp {
            let mut config: Array<&mut MapData, FlowConfig> = ebpf
                .map_mut(names::FLOW_CONFIG)
                .context("BPF object has no flow config map")?
                .try_into()?;
            config.set(0, flow_config(flows)?, 0)?;
        }
        let program = program::load_program(&mut ebpf, spec.proto)?;
        let path = dir.join(names::PROGRAM);
        program
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok((Self::open_at(dir, Some(lock), spec.proto)?, true))
    }

    /// Removes the pinned state. The program pin goes first, so an interrupted removal reads as
    /// "not attached" and the next attach starts clean.
    pub fn remove(self) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        fs::remove_file(dir.join(names::PROGRAM))
            .with_context(|| format!("removing {}", dir.display()))?;
        remove_maps(&dir);
        drop(self);
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        // Leave the per-netns directory for other ports; remove it when it is empty.
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Attaches the program to the reuseport group of `socket`. Kernel contract: the program
    /// belongs to the group, not the socket; attaching through any member replaces the group's
    /// program (SO_ATTACH_REUSEPORT_EBPF), so this is idempotent. A group re-created after all its
    /// listeners closed starts without a program: attaching again through a new member fixes it.
    pub fn attach_to_group(&self, socket: impl AsFd) -> anyhow::Result<()> {
        attach_program(&self.program, socket)
            .context("attaching the program to the port's SO_REUSEPORT group")
    }

    /// The kernel's view of the pinned program.
    fn program_info(&self) -> anyhow::Result<aya::programs::ProgramInfo> {
        Ok(aya::programs::ProgramInfo::from_pin(
            self.dir.join(names::PROGRAM),
        )?)
    }

    /// The tag of the pinned program (the kernel's hash of its instructions).
    pub fn program_tag(&self) -> anyhow::Result<u64> {
        Ok(self.program_info()?.tag())
    }

    /// The flow table's size (1 for a TCP port, whose program has none).
    pub fn flow_capacity(&self) -> anyhow::Result<u32> {
        match self.spec.proto {
            Proto::Tcp => Ok(1),
            Proto::Udp => Ok(open_map(&self.dir, names::FLOWS)?.info()?.max_entries()),
        }
    }

    /// A UDP port's flow counters, summed over CPUs (None for TCP).
    pub fn flow_counters(&self) -> anyhow::Result<Option<FlowCounters>> {
        let Some(f) = &self.flows else {
            return Ok(None);
        };
        let per_cpu = f.counters.get(&0, 0)?;
        let mut sum = FlowCounters::default();
        for c in per_cpu.iter() {
            sum.known += c.known;
            sum.recorded += c.recorded;
            sum.unrecorded += c.unrecorded;
            sum.orphaned += c.orphaned;
            sum.fallback += c.fallback;
        }
        Ok(Some(sum))
    }

    /// A UDP port's flow table in one read of it (None for TCP): its entries, and the flows of
    /// each slot that owns some (the slot's socket, by cookie) with how many of them were seen
    /// within `recent` seconds: (all, recent).
    pub fn flow_table(&self, recent: u32) -> anyhow::Result<Option<FlowTable>> {
        let Some(f) = &self.flows else {
            return Ok(None);
        };
        let now = zdt_common::flow_seconds(monotonic_ns());
        let meta = self.all_meta()?;
        let mut out = FlowTable::default();
        for entry in f.flows.iter() {
            let Ok((_, v)) = entry else { continue };
            out.entries += 1;
            // A flow whose socket is gone (its slot refilled since) belongs to nobody.
            if meta.get(v.slot as usize).map(|m| m.cookie) != Some(v.cookie) {
                continue;
            }
            let e = out.by_slot.entry(v.slot).or_default();
            e.0 += 1;
            if now.saturating_sub(v.seen_s) <= recent {
                e.1 += 1;
            }
        }
        Ok(Some(out))
    }

    /// Replaces the pinned program with this build's, keeping the maps and so every slot, role,
    /// set and counter: the new program is loaded against the pinned maps, pinned beside the
    /// old one, attached to the group of every socket of `sockets`, and only then renamed over
    /// the old pin. Kernel contract: SO_ATTACH_REUSEPORT_EBPF swaps a group's program in one
    /// step (reuseport_attach_prog, under the reuseport lock; the old one is freed after an RCU
    /// grace period), so every SYN and every migration runs either the old or the new program.
    /// Both read the same maps, whose layout the caller has checked. Killed before the rename,
    /// the old pin stays, every command but `upgrade` keeps refusing, and `upgrade` redoes it.
    /// Returns the new program's tag.
    pub fn replace_program<S: AsFd>(&mut self, sockets: &[S]) -> anyhow::Result<u64> {
        // A map this build has and the state has not (ZDT_PROBES, for a state of an earlier
        // build) is created and pinned by the loader; it is root's alone like the others.
        let proto = self.spec.proto;
        let maps = maps_of(proto);
        let mut ebpf = program::load_against(&self.dir, &maps, self.flow_capacity()?)?;
        for name in &maps {
            fs::set_permissions(self.dir.join(name), fs::Permissions::from_mode(0o600))?;
        }
        let new = program::load_program(&mut ebpf, proto)?;
        let staged = self.dir.join(STAGED_PROGRAM);
        let _ = fs::remove_file(&staged);
        new.pin(&staged)
            .with_context(|| format!("pinning {}", staged.display()))?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        for s in sockets {
            attach_program(new.fd()?, s)
                .context("attaching the new program to the port's SO_REUSEPORT group")?;
        }
        crate::failpoint(crate::Step::UpgradeAttached);
        let path = self.dir.join(names::PROGRAM);
        fs::rename(&staged, &path)
            .with_context(|| format!("renaming {} to {}", staged.display(), path.display()))?;
        self.program = obj_get(&path)?;
        self.program_tag()
    }

    /// The kernel's id of the loaded program (as `bpftool prog` shows it).
    pub fn program_id(&self) -> anyhow::Result<u32> {
        Ok(self.program_info()?.id())
    }

    /// The kernel's run statistics of the program: (runs, total run time). They only grow while
    /// run-time stats are enabled (kernel.bpf_stats_enabled, or aya::sys::enable_stats).
    pub fn program_stats(&self) -> anyhow::Result<(u64, std::time::Duration)> {
        let info = self.program_info()?;
        Ok((info.run_count(), info.run_time()))
    }

    pub fn control(&self) -> anyhow::Result<Control> {
        Ok(self.control.get(&0, 0)?)
    }

    /// The live active set, or None while nothing was promoted (pass-through).
    pub fn active_set(&self) -> anyhow::Result<Option<ActiveSet>> {
        let c = self.control()?;
        if c.active_buf == 0 {
            return Ok(None);
        }
        Ok(Some(self.active.get(&(c.active_buf - 1), 0)?))
    }

    /// The three entries of ZDT_ACTIVE and which the control word names live and target.
    fn buffers(&self) -> anyhow::Result<Buffers> {
        let c = self.control()?;
        let mut entries = [ActiveSet::EMPTY; 3];
        for (i, e) in (0u32..).zip(entries.iter_mut()) {
            *e = self.active.get(&i, 0)?;
        }
        Ok(Buffers {
            entries,
            live: (c.active_buf as usize).checked_sub(1),
            target: match c.rollback_buf {
                0 => 2,
                n => usize::from(n) - 1,
            },
        })
    }

    /// The address families (AF_INET, AF_INET6) in which an active or canary slot of the live
    /// set holds a listening socket of zdt's. A few map reads (the set, then each listed slot's
    /// cookie and metadata), unlike [`State::slots`], which reads all of them: `zdt-ctl hold`
    /// asks this every few milliseconds while connections wait.
    pub fn ready_families(&self) -> anyhow::Result<Vec<u32>> {
        let mut out: Vec<u32> = self.serving_slots()?.iter().map(|m| m.family).collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The owner uids of the sockets zdt put in the array and that still listen (every
    /// member's, whatever its role): one uid, since each passed the check that it is the group's.
    pub fn member_uids(&self) -> anyhow::Result<Vec<u32>> {
        let mut uids: Vec<u32> = self.slots()?.iter().map(|s| s.meta.uid).collect();
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// The cookies of the sockets that take connections: the live set's active and canary
    /// members (what the port is served with, as opposed to candidates and draining members).
    pub fn serving_cookies(&self) -> anyhow::Result<Vec<u64>> {
        Ok(self.serving_slots()?.iter().map(|m| m.cookie).collect())
    }

    /// The metadata of the live set's active and canary slots that hold a live socket.
    pub(crate) fn serving_slots(&self) -> anyhow::Result<Vec<SlotMeta>> {
        let Some(set) = self.active_set()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for list in set.lists.iter().chain(set.canary.iter()) {
            for &slot in list.as_slice() {
                out.extend(self.live_meta(slot)?);
            }
        }
        Ok(out)
    }

    /// What `rollback` restores: the set that was live before the last promote (or the last
    /// rollback, so that a second one goes forward again). None before the first promote.
    pub fn previous_set(&self) -> anyhow::Result<Option<ActiveSet>> {
        Ok(self.buffers()?.target_set())
    }

    /// Records `set` as what `rollback` restores, the live set unchanged.
    pub fn save_rollback(&mut self, set: &ActiveSet) -> anyhow::Result<()> {
        self.commit(None, Some(*set)).map(drop)
    }

    /// Claims the live probe lists for this zdt-ctl while its `promote --probe` waits without
    /// the lock (see [`zdt_common::PROBE_CLAIM`]); the claim goes when the guard is dropped, or
    /// with this process.
    pub fn claim_probe(&self) -> anyhow::Result<crate::readiness::ProbeMark> {
        let pid = prober_id();
        crate::readiness::ProbeMark::write(
            &self.dir,
            claim_key(pid),
            ProbeValue {
                kind: zdt_common::PROBE_CLAIM,
                pid,
            },
        )
    }

    /// The pid of another zdt-ctl that claims the probe lists (a `promote --probe` waiting),
    /// if one lives (run after `settle::forget_stale_probes`, so every claim left is live).
    pub fn probe_claimant(&self) -> anyhow::Result<Option<u32>> {
        let Some(map) = crate::readiness::probes_map(&self.dir)? else {
            return Ok(None);
        };
        let me = prober_id();
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .find(|(_, v)| v.kind == zdt_common::PROBE_CLAIM && v.pid != me)
            .map(|(_, v)| v.pid))
    }

    /// The process `slot`'s metadata records (which outlives the slot's socket), None if it
    /// cannot be read.
    pub fn recorded(&self, slot: u32) -> Option<sets::Process> {
        let m = self.meta.get(&slot, 0).ok()?;
        Some(sets::Process {
            pid: m.pid as i32,
            start: m.pid_start,
        })
    }

    /// Cookie of the socket in `slot`, or None if the slot is empty. Kernel contract: a lookup
    /// of a REUSEPORT_SOCKARRAY from userspace returns the socket's cookie (8 bytes), and -ENOENT
    /// for a slot whose socket has closed (reuseport_array.c).
    fn cookie_at(&self, slot: u32) -> anyhow::Result<Option<u64>> {
        let mut cookie: u64 = 0;
        match bpf_map_elem(BPF_MAP_LOOKUP_ELEM, &self.sockets, slot, &mut cookie) {
            Ok(()) => Ok(Some(cookie)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("looking up the socket array"),
        }
    }

    /// The metadata of `slot` if it holds a live socket that zdt put there: the slot's cookie
    /// matches the one zdt recorded (a slot whose socket closed is empty, see `cookie_at`).
    fn live_meta(&self, slot: u32) -> anyhow::Result<Option<SlotMeta>> {
        let Some(cookie) = self.cookie_at(slot)? else {
            return Ok(None);
        };
        let meta = self.meta.get(&slot, 0)?;
        Ok((meta.cookie == cookie).then_some(meta))
    }

    /// Records `process` as the one that serves `slot`'s socket (it inherited it), the slot's
    /// role and the rest of its metadata unchanged.
    pub fn record_process(&mut self, slot: u32, process: sets::Process) -> anyhow::Result<()> {
        let mut meta = self.meta.get(&slot, 0)?;
        meta.pid = process.pid as u32;
        meta.pid_start = process.start;
        self.set_meta(slot, meta)
    }

    /// Writes the metadata of `slot` (and the cached copy).
    fn set_meta(&mut self, slot: u32, meta: SlotMeta) -> anyhow::Result<()> {
        self.meta.set(slot, meta, 0)?;
        if let Some(m) = self.meta_cache.get_mut().as_mut() {
            m[slot as usize] = meta;
        }
        Ok(())
    }

    /// Every slot's metadata: the cached copy under the lock, else one batch read.
    fn all_meta(&self) -> anyhow::Result<Vec<SlotMeta>> {
        if let Some(m) = self.meta_cache.borrow().as_ref() {
            return Ok(m.clone());
        }
        let out = self.read_all_meta()?;
        if self._lock.is_some() {
            *self.meta_cache.borrow_mut() = Some(out.clone());
        }
        Ok(out)
    }

    /// Every slot's metadata, read in batches of [`META_BATCH`] entries up to the first batch
    /// that holds a slot zdt never filled (cookie 0); all entries after it are unfilled too, and
    /// are returned zeroed without being read. Invariant: slots are filled lowest first
    /// ([`free_slot`] takes the lowest free one, and a never-filled slot is always free: no set
    /// names it and the array holds nothing there), so the filled slots are a prefix of the
    /// array. Reading all MAX_SLOTS entries costs a 160 KB copy out of the kernel, about a fifth
    /// of a promote's CPU time; a port with a few sockets needs one batch.
    fn read_all_meta(&self) -> anyhow::Result<Vec<SlotMeta>> {
        self.read_meta(false)
    }

    /// `whole`: read every entry, also past the prefix (the fingerprint, which must see a
    /// state that breaks the invariant).
    fn read_meta(&self, whole: bool) -> anyhow::Result<Vec<SlotMeta>> {
        let mut out = vec![SlotMeta::default(); MAX_SLOTS as usize];
        let mut keys = vec![0u32; MAX_SLOTS as usize];
        let fd = self.meta_fd();
        let mut done = 0usize;
        let mut next: u32 = 0;
        while done < out.len() {
            let count = if whole {
                out.len() - done
            } else {
                META_BATCH.min(out.len() - done)
            };
            let mut attr = BpfBatchAttr {
                in_batch: if done == 0 {
                    0
                } else {
                    &next as *const u32 as u64
                },
                out_batch: &mut next as *mut u32 as u64,
                keys: keys[done..].as_mut_ptr() as u64,
                values: out[done..].as_mut_ptr() as u64,
                count: count as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: the kernel writes at most `count` keys and values into the two buffers,
            // which have room for that many, and reads/writes the u32 batch cursors; all of
            // them outlive the call.
            let rc = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            let err = std::io::Error::last_os_error();
            let read = done..done + attr.count as usize;
            done = read.end;
            if rc == 0 {
                if !whole && out[read].iter().any(|m| m.cookie == 0) {
                    break;
                }
                continue;
            }
            // ENOENT: the end of the array was reached (the last batch is filled).
            if err.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(err).context("reading the slot metadata (BPF_MAP_LOOKUP_BATCH)");
        }
        Ok(out)
    }

    fn meta_fd(&self) -> i32 {
        let map: &MapData = aya::maps::IterableMap::map(&self.meta);
        map.fd().as_fd().as_raw_fd()
    }

    /// One read of the port's state, for a plan to decide from: [`Snapshot`]. The maps; the
    /// listeners of the spec's groups (sock_diag); whether each recorded process still runs
    /// (its start time); and, only for the listeners the maps do not account for
    /// ([`Snapshot::unclaimed`]), the process that serves each, from one scan of /proc.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(self.read()?.0)
    }

    /// [`State::snapshot`], with the read of the kernel's side it was made from, which can
    /// duplicate the listeners whose holders it looked for (those the maps do not account for).
    pub fn read(&self) -> anyhow::Result<(Snapshot, sockets::PortRead)> {
        let b = self.buffers()?;
        let recorded = (0..)
            .zip(self.all_meta()?)
            .filter(|(_, m)| m.cookie != 0)
            .map(|(i, m)| {
                let p = sets::Process {
                    pid: m.pid as i32,
                    start: m.pid_start,
                };
                (i, p)
            })
            .collect();
        let slots = self.slots_of(&b.live_set().unwrap_or(ActiveSet::EMPTY))?;
        let mut running = BTreeSet::new();
        for p in slots.iter().map(Slot::process) {
            if !running.contains(&p) && sockets::start_time(p.pid) == Some(p.start) {
                running.insert(p);
            }
        }
        let read = sockets::PortRead::read_where(
            &self.spec,
            |e| self.spec.matches(&e.local),
            |e| Snapshot::unclaimed(&slots, &running, e.cookie),
        )?;
        let listeners = read.seen.iter().map(|o| o.listen).collect();
        let snap = Snapshot {
            port: self.spec.port,
            slots,
            live: b.live_set(),
            target: b.target_set(),
            recorded,
            listeners,
            running,
        };
        Ok((snap, read))
    }

    /// Every slot that holds a live socket zdt put there (cookie matches its metadata).
    pub fn slots(&self) -> anyhow::Result<Vec<Slot>> {
        self.slots_of(&self.active_set()?.unwrap_or(ActiveSet::EMPTY))
    }

    /// [`State::slots`], with `active` as the live set.
    fn slots_of(&self, active: &ActiveSet) -> anyhow::Result<Vec<Slot>> {
        let mut out = Vec::new();
        for (index, meta) in (0..MAX_SLOTS).zip(self.all_meta()?) {
            // A slot zdt never filled has no cookie in its metadata: no need to ask the array.
            if meta.cookie == 0 || self.cookie_at(index)? != Some(meta.cookie) {
                continue;
            }
            let per_cpu = self.slot_counters.get(&index, 0)?;
            let now_bucket = zdt_common::recent_bucket(monotonic_ns());
            out.push(Slot {
                index,
                meta,
                steered: per_cpu.iter().map(|c| c.steered).sum(),
                migrated: per_cpu.iter().map(|c| c.migrated).sum(),
                recent: per_cpu.iter().map(|c| c.recent_at(now_bucket)).sum(),
                active: active.contains(index),
                canary: active.is_canary(index),
            });
        }
        Ok(out)
    }

    pub fn global_counters(&self) -> anyhow::Result<GlobalCounters> {
        Ok(self
            .global_counters
            .get(&0, 0)?
            .iter()
            .fold(GlobalCounters::default(), |a, c| GlobalCounters {
                passthrough: a.passthrough + c.passthrough,
                fallback: a.fallback + c.fallback,
                select_failed: a.select_failed + c.select_failed,
                migrate_no_target: a.migrate_no_target + c.migrate_no_target,
                probe_refused: a.probe_refused + c.probe_refused,
                held: a.held + c.held,
                steered: a.steered + c.steered,
                migrated: a.migrated + c.migrated,
                runs: [a.runs[0] + c.runs[0], a.runs[1] + c.runs[1]],
            }))
    }

    /// Puts `listeners` of process `pid` into the socket array, recorded with `role` (a promote's
    /// candidates, hold's placeholders), and returns their slots, as [`Snapshot::place`] decides.
    /// Every slot is chosen before anything is written:
    /// when there are not enough, the command fails having changed nothing.
    pub fn insert(
        &mut self,
        pid: i32,
        pid_start: u64,
        listeners: &[Listener],
        role: Role,
    ) -> anyhow::Result<Vec<u32>> {
        let cookies: Vec<u64> = listeners.iter().map(|l| l.cookie).collect();
        // The maps alone decide a placement: no need to read the kernel's side again.
        let b = self.buffers()?;
        let slots = self.slots_of(&b.live_set().unwrap_or(ActiveSet::EMPTY))?;
        let placement =
            snapshot::place(&slots, b.live_set(), b.target_set(), pid, &cookies, |i| {
                self.is_empty_slot(i)
            })?;
        if let Some(target) = &placement.target {
            // Written before the slot is reused: a rollback must never name a new socket.
            self.save_rollback(target)?;
        }
        let plan = listeners
            .iter()
            .zip(placement.slots)
            .map(|(l, (s, new))| (l, s, new));
        let mut out = Vec::new();
        for (l, slot, new) in plan {
            out.push(slot);
            if !new {
                continue;
            }
            let meta = SlotMeta {
                cookie: l.cookie,
                pid_start,
                since_ms: now_ms(),
                pid: pid as u32,
                role: role.raw(),
                family: l.family(),
                uid: l.uid,
            };
            // Metadata and zeroed counters first: the socket only counts as zdt's once the
            // array holds it (Slot requires the cookie to match). The UDP program relies on
            // this order too: a flow recorded on the slot's previous socket carries that
            // socket's cookie, which no longer matches once the new one's is written, so it is
            // never sent to the new socket, even for the instant before the array holds it.
            self.set_meta(slot, meta)?;
            let zero = PerCpuValues::try_from(vec![
                SlotCounters::default();
                aya::util::nr_cpus().map_err(|(_, e)| e)?
            ])?;
            self.slot_counters.set(slot, zero, 0)?;
            // Kernel contract: the update takes an fd of zdt-ctl's own table; the socket must be
            // a listener in a reuseport group; -EBUSY if it is already in a socket array.
            sockarray_set(&self.sockets, slot, l.fd.as_raw_fd())
                .with_context(|| format!("putting the socket on {} into slot {slot}", l.local))?;
        }
        Ok(out)
    }

    fn is_empty_slot(&self, slot: u32) -> bool {
        matches!(self.cookie_at(slot), Ok(None))
    }

    /// Makes `set` live in one step, exactly as it is (hold lists included), the rollback
    /// target unchanged, and returns when no running program can still be using the previous
    /// set: [`State::commit`]. Returns the Unix time (ms) of the flip (now if `set` was live).
    pub fn write_set(&mut self, set: &ActiveSet) -> anyhow::Result<u64> {
        Ok(self.commit(Some(*set), None)?.unwrap_or_else(now_ms))
    }

    /// Makes `set` live (None: the live set stays) and `target` the rollback target (None: it
    /// stays) in one write of the control word, and returns when no running program can still
    /// be using the previous set. Returns the Unix time (ms) of the flip, None when the live
    /// set did not change.
    ///
    /// Protocol ([`Buffers::commit`]): write only entries of ZDT_ACTIVE that the control word
    /// does not name (no program reads them: see below), then name them in one write of
    /// ZDT_CONTROL (the program reads `active_buf` alone, whose values differ in one byte, so no
    /// reader can see a torn value), then wait for an RCU grace period. Kernel contract:
    /// sk_reuseport programs run in an RCU read-side critical section (softirq), and
    /// membarrier(MEMBARRIER_CMD_GLOBAL) returns only after synchronize_rcu(); afterwards every
    /// program run started after the flip, so the entry that was live is unused: the next writer
    /// may overwrite it, and the caller knows that no new connection can be steered by the old
    /// set any more. Killed before the control word, the command changed nothing anyone reads.
    fn commit(
        &mut self,
        set: Option<ActiveSet>,
        target: Option<ActiveSet>,
    ) -> anyhow::Result<Option<u64>> {
        let now = self.buffers()?;
        let commit = now.commit(set, target);
        for (i, set) in &commit.writes {
            self.active.set(*i as u32, *set, 0)?;
        }
        crate::failpoint(crate::Step::Staged);
        if !commit.switches(&now) {
            return Ok(None);
        }
        let mut control = self.control()?;
        control.active_buf = commit.live.map_or(0, |i| i as u32 + 1);
        control.rollback_buf = commit.target as u16 + 1;
        self.control.set(0, control, 0)?;
        let flipped = commit.live != now.live;
        let flipped_at = now_ms();
        if flipped {
            crate::failpoint(crate::Step::Flipped);
        }
        // Also when only the target changed: the program reads the target too (when nothing of
        // the live set listens), and a slot taken out of it may be given to a new socket next.
        rcu_grace_period();
        Ok(flipped.then_some(flipped_at))
    }

    /// Writes what `plan` decided: the rollback target and the set in one switch
    /// ([`State::commit`]; a command killed before it changed nothing), then the roles (a
    /// command killed before them leaves members of the live set recorded as candidates, which
    /// the next command records: `repair`). Returns the Unix time (ms) of the switch, or now
    /// when the set was live already.
    pub fn apply(&mut self, plan: &Plan) -> anyhow::Result<u64> {
        self.apply_steps(plan, |_| {})
    }

    /// [`State::apply`], calling `step` after the switch ("switched") and after the roles
    /// ("roles"): promote's failpoints.
    pub fn apply_steps(
        &mut self,
        plan: &Plan,
        mut step: impl FnMut(crate::Step),
    ) -> anyhow::Result<u64> {
        let live = self.active_set()?;
        let mut set = plan.set;
        // The probe lists of a `promote --probe` that waits without the lock (alive: it claims
        // them) ride along in a switch another command makes meanwhile, as hold's placeholders
        // do; only zdt-ctl's marked connections reach them.
        let no_probe = [SlotList::EMPTY; 2];
        if let Some(live) = live.filter(|l| set.probe == no_probe && l.probe != no_probe) {
            if self.probe_claimant()?.is_some() {
                set.probe = live.probe;
            }
        }
        let at = self
            .commit(Some(set), plan.rollback)?
            .unwrap_or_else(now_ms);
        step(crate::Step::Switched);
        for &(slot, role) in &plan.roles {
            let mut meta = self.meta.get(&slot, 0)?;
            meta.role = role.raw();
            meta.since_ms = now_ms();
            self.set_meta(slot, meta)?;
        }
        step(crate::Step::Roles);
        Ok(at)
    }

    /// All of the state except the traffic counters, as bytes: the control word, both active
    /// buffers, every slot's metadata and the cookie in every slot. Tests compare two of these to
    /// show that a failed command changed nothing.
    pub fn fingerprint(&self) -> anyhow::Result<Vec<u8>> {
        let mut out = format!("{:?}", self.control()?).into_bytes();
        for i in 0..3 {
            out.extend(format!("{:?}", self.active.get(&i, 0)?).bytes());
        }
        for (slot, meta) in (0..MAX_SLOTS).zip(self.read_meta(true)?) {
            out.extend(format!("{slot}:{:?}:{meta:?}", self.cookie_at(slot)?).bytes());
        }
        Ok(out)
    }
}

/// What zdt created, to check a pinned state against before using it: (map, type, key size,
/// value size, entries).
fn expected_maps(proto: Proto) -> Vec<(&'static str, aya::maps::MapType, usize, usize, u32)> {
    use aya::maps::MapType as T;
    use std::mem::size_of;
    let mut maps = vec![
        (names::SOCKETS, T::ReuseportSockArray, 4, 8, MAX_SLOTS),
        (names::CONTROL, T::Array, 4, size_of::<Control>(), 1),
        (names::ACTIVE, T::Array, 4, size_of::<ActiveSet>(), 3),
        (
            names::SLOT_COUNTERS,
            T::PerCpuArray,
            4,
            size_of::<SlotCounters>(),
            MAX_SLOTS,
        ),
        (
            names::GLOBAL_COUNTERS,
            T::PerCpuArray,
            4,
            size_of::<GlobalCounters>(),
            1,
        ),
        (
            names::SLOT_META,
            T::Array,
            4,
            size_of::<SlotMeta>(),
            MAX_SLOTS,
        ),
        (
            names::PROBES,
            T::Hash,
            size_of::<ProbeKey>(),
            size_of::<ProbeValue>(),
            MAX_PROBES,
        ),
    ];
    if proto == Proto::Udp {
        maps.extend([
            (
                names::FLOWS,
                T::LruHash,
                size_of::<FlowKey>(),
                size_of::<FlowValue>(),
                0,
            ),
            (
                names::FLOW_COUNTERS,
                T::PerCpuArray,
                4,
                size_of::<FlowCounters>(),
                1,
            ),
            (names::FLOW_CONFIG, T::Array, 4, size_of::<FlowConfig>(), 1),
        ]);
    }
    maps
}

/// A UDP port's per-CPU bound on recorded new flows: the table turns over in no less than
/// [`FLOW_TURNOVER_S`] seconds, however many new 4-tuples arrive.
fn flow_config(flows: u32) -> anyhow::Result<FlowConfig> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting the possible CPUs")?
        .max(1) as u32;
    Ok(FlowConfig {
        new_per_cpu_per_s: (flows / FLOW_TURNOVER_S / cpus).max(1),
        _pad: 0,
    })
}

/// See [`flow_config`]: a flow that sends at least this often is never pushed out of a full
/// table by new ones.
pub const FLOW_TURNOVER_S: u32 = 4;

/// What one read of a UDP port's flow table found ([`State::flow_table`]).
#[derive(Debug, Default)]
pub struct FlowTable {
    /// Every entry, its socket's or not.
    pub entries: u64,
    /// Slot -> (its flows, those seen recently).
    pub by_slot: BTreeMap<u32, (u64, u64)>,
}

/// A UDP port's flow table and the program's flow counters.
struct FlowMaps {
    flows: aya::maps::HashMap<MapData, FlowKey, FlowValue>,
    counters: PerCpuArray<MapData, FlowCounters>,
}

/// A pinned state that is not as zdt created it.
fn refused_state(dir: &Path, what: String) -> anyhow::Error {
    err(
        Kind::Refused,
        format!(
            "the pinned state in {} is not as zdt created it: {what}. Find out who changed it; to start over, remove that directory (rm -r) and run `zdt-ctl attach` again",
            dir.display()
        ),
    )
}

/// Which pinned program a command accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    /// This build's (every command but `upgrade`).
    Ours,
    /// Any (`upgrade`, which replaces it).
    Any,
}

/// Refuses a pinned state that zdt did not create as it is: the access control of the state is
/// the directory's permissions (a user who can open a pinned map can write it), so they must be
/// root-only; and maps or a program of another shape would be misread or would steer wrongly.
fn verify(dir: &Path, program: Program, proto: Proto) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let refuse = |what: String| refused_state(dir, what);
    let check_mode = |path: &Path, mode: u32| -> anyhow::Result<()> {
        let m = match fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse(format!("{} is missing", path.display())));
            }
            m => m.with_context(|| format!("reading {}", path.display()))?,
        };
        if m.uid() != 0 || m.mode() & 0o7777 != mode {
            return Err(refuse(format!(
                "{} has owner uid {} and mode {:o}, not root and {mode:o}",
                path.display(),
                m.uid(),
                m.mode() & 0o7777
            )));
        }
        Ok(())
    };
    // The directories above: whoever can rename or replace one of them can put a state of
    // their own where zdt looks (bpffs is an ordinary filesystem for that). Each must be a real
    // directory (not a symlink), root's, and writable by root alone; bpffs's root may be
    // world-writable only with the sticky bit, as /tmp is.
    let mut above: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|p| p.starts_with(BPFFS))
        .collect();
    above.reverse();
    for (i, p) in above.iter().enumerate() {
        let m = fs::symlink_metadata(p).with_context(|| format!("reading {}", p.display()))?;
        let mode = m.mode() & 0o7777;
        let open = if i == 0 {
            mode & 0o002 != 0 && mode & 0o1000 == 0
        } else {
            mode & 0o022 != 0
        };
        if !m.file_type().is_dir() || m.uid() != 0 || open {
            return Err(refuse(format!(
                "{} is {}owned by uid {} with mode {mode:o}: it must be a directory of root's \
                 that no one else can write",
                p.display(),
                if m.file_type().is_symlink() {
                    "a symlink, "
                } else {
                    ""
                },
                m.uid()
            )));
        }
    }
    if fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return Err(refuse(format!("{} is a symlink", dir.display())));
    }
    check_mode(dir, 0o700)?;
    check_mode(&dir.join(names::PROGRAM), 0o600)?;
    for (name, kind, key, value, entries) in expected_maps(proto) {
        let path = dir.join(name);
        // A state created by a build before ZDT_PROBES has none: `upgrade` creates it (the
        // other commands refuse that state anyway, for its program).
        if name == names::PROBES && !path.exists() {
            if program == Program::Any {
                continue;
            }
            return Err(err(
                Kind::Refused,
                format!(
                    "the pinned state in {} was made by an earlier zdt-ctl (it has no map \
                     {name}): run `zdt-ctl upgrade` to bring it to this build",
                    dir.display()
                ),
            ));
        }
        check_mode(&path, 0o600)?;
        let info = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?
            .info()?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        // The flow table's size is the port's own (`attach --flows`).
        let entries = if name == names::FLOWS {
            info.max_entries()
        } else {
            entries
        };
        if found != (Some(kind), key, value, entries) {
            return Err(refuse(format!(
                "map {name} is {found:?}, expected {:?}",
                (kind, key, value, entries)
            )));
        }
    }
    let pinned = aya::programs::ProgramInfo::from_pin(dir.join(names::PROGRAM))?;
    if program == Program::Ours && !program::is_ours(proto, pinned.tag())? {
        // Not `refuse`: starting over is not the first thing to try here.
        return Err(err(
            Kind::Refused,
            format!(
                "the program pinned in {} (tag {:016x}) is not this zdt-ctl's ({}): it was \
                 loaded by another zdt version, or it is another program. After installing a new \
                 zdt-ctl, run `zdt-ctl upgrade` once: it swaps the program in and keeps roles \
                 and counters. Nothing was changed",
                dir.display(),
                pinned.tag(),
                program::expected_tag(proto)?
            ),
        ));
    }
    Ok(())
}

/// The spec is stored in the control map so every command sees what `attach` was given.
fn encode_control(spec: &PortSpec, active_buf: u32) -> Control {
    let mut c = Control {
        active_buf,
        layout_version: LAYOUT_VERSION,
        port: spec.port,
        ..Default::default()
    };
    match spec.addr {
        None => c.addr_kind = 0,
        Some(std::net::IpAddr::V4(a)) => {
            c.addr_kind = 4;
            c.addr[..4].copy_from_slice(&a.octets());
        }
        Some(std::net::IpAddr::V6(a)) => {
            c.addr_kind = 6;
            c.addr = a.octets();
        }
    }
    if spec.proto == Proto::Udp {
        c.addr_kind |= zdt_common::ADDR_KIND_UDP;
    }
    c
}

fn decode_spec(c: &Control) -> PortSpec {
    let addr = match c.addr_kind & !zdt_common::ADDR_KIND_UDP {
        4 => Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            c.addr[0], c.addr[1], c.addr[2], c.addr[3],
        ))),
        6 => Some(std::net::IpAddr::V6(c.addr.into())),
        _ => None,
    };
    let proto = if c.addr_kind & zdt_common::ADDR_KIND_UDP != 0 {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    PortSpec {
        addr,
        port: c.port,
        proto,
    }
}

/// `union bpf_attr` as BPF_MAP_*_ELEM uses it.
#[repr(C)]
struct BpfMapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` as BPF_MAP_*_BATCH uses it.
#[repr(C)]
struct BpfBatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The bpf(2) syscall with `attr` as its attribute union.
///
/// # Safety
/// `attr` must be the layout the kernel expects for `cmd`, and every pointer in it valid for the
/// call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    libc::syscall(
        libc::SYS_bpf,
        cmd,
        attr as *mut T,
        std::mem::size_of::<T>() as u32,
    )
}
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_GET: libc::c_long = 7;

/// Opens the BPF object pinned at `path`.
fn obj_get(path: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: the kernel reads the attr and the path, both alive for the call.
    let fd = unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("opening pinned program {}", path.display()));
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// SO_ATTACH_REUSEPORT_EBPF: makes `program` the program of `socket`'s reuseport group.
pub fn attach_program(program: impl AsFd, socket: impl AsFd) -> std::io::Result<()> {
    let prog = program.as_fd().as_raw_fd();
    // SAFETY: setsockopt with an int-sized value, as SO_ATTACH_REUSEPORT_EBPF expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_EBPF,
            &prog as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One BPF_MAP_{LOOKUP,UPDATE}_ELEM on a socket array with a u32 key and a u64 value (aya 0.14
/// has no lookup for this map type, and its update passes a 4-byte fd).
fn bpf_map_elem(
    cmd: libc::c_long,
    map: &MapData,
    key: u32,
    value: &mut u64,
) -> std::io::Result<()> {
    let mut attr = BpfMapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value as *mut u64 as u64,
        flags: 0, /* BPF_ANY */
    };
    // SAFETY: the kernel reads the 4-byte key and reads or writes the 8-byte value, both ours
    // and alive for the call.
    let rc = unsafe { sys_bpf(cmd, &mut attr) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts socket `fd` (of zdt-ctl's fd table) into `slot`. Kernel contract: the value of an update
/// is an fd of the caller; 4 or 8 bytes are accepted for a socket array (reuseport_array.c).
///
/// Kernel contract (reuseport_array.c): EBUSY while the socket is in another socket array, which
/// lets its sockets go only when it is freed, after the last program that uses it is gone (past
/// an RCU grace period, from a workqueue). That is the state of a port whose pins were removed
/// while its program stayed attached to the group: attach replaces that program first, and
/// its array lets go of the sockets shortly after. So EBUSY is waited out for a while.
fn sockarray_set(map: &MapData, slot: u32, fd: i32) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut value = fd as u64;
        match bpf_map_elem(BPF_MAP_UPDATE_ELEM, map, slot, &mut value) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if std::time::Instant::now() >= deadline {
                    return Err(err(
                        Kind::Refused,
                        "the socket is in another BPF socket array (another program's, or a \
                         zdt state whose pins were removed while its program stayed attached \
                         and still in use): detach that program from the port's group, or stop \
                         what holds it, then run the command again",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return Ok(r?),
        }
    }
}

/// Waits for an RCU grace period (see [`State::commit`]). If membarrier is unavailable (a
/// nohz_full kernel refuses MEMBARRIER_CMD_GLOBAL), a sleep far longer than any program run
/// (a few hundred nanoseconds) stands in for it.
fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounded wait gives up on a lock someone holds, takes it once released, and says when
    /// the directory is gone.
    #[test]
    fn a_bounded_lock_gives_up_takes_a_free_lock_and_sees_a_missing_dir() {
        let dir = std::env::temp_dir().join(format!("zdt-lock-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let short = Some(std::time::Duration::from_millis(50));
        let held = Lock::take(&dir).unwrap().expect("the directory exists");
        let e = Lock::take_within(&dir, short)
            .err()
            .expect("the lock is held");
        assert!(e.to_string().contains("stayed locked"), "{e}");
        drop(held);
        assert!(Lock::take_within(&dir, short).unwrap().is_some());
        fs::remove_dir(&dir).unwrap();
        assert!(Lock::take_within(&dir, short).unwrap().is_none());
    }
}
