//! `zdt-ctl status [PORT] [--json] [--watch]`: what the program is doing for a port.
//!
//! The JSON form (`--json`) is an interface: its schema is docs/status.schema.json. The types
//! below read it back too (the tests do, with serde_json).
use crate::addr::{Port, Proto};
use std::collections::BTreeSet;

use crate::{sockets, state::State};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Group {
    /// "ipv4" or "ipv6"
    pub family: String,
    /// The app's listeners (of the owner uid of the port's members).
    pub listeners: usize,
    /// Listeners of other users on the same addresses: groups of their own, not zdt's.
    pub foreign: usize,
    /// Whether zdt's program is attached to this group, proven by one probe connection (see
    /// State::probe_attached): false if the group was re-created without it, or if the app
    /// replaced or removed it. Not checked (false) for a family with only foreign listeners.
    pub steering: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub pid: i32,
    pub command: String,
    pub role: crate::plan::sets::Role,
    pub slots: Vec<u32>,
    /// Unix time (ms) since which the member has had its role.
    pub since_ms: u64,
    pub steered: u64,
    pub migrated: u64,
    /// New connections steered to it in the last 34 to 69 seconds.
    pub recent: u64,
    /// Its part of all recent connections (0 to 1).
    pub share: f64,
    /// Connections waiting in its sockets' accept queues.
    pub queued: u64,
    /// Its slots whose socket takes connections (active, canary) and whose accept queue held
    /// connections and never went below that at any look over [`STALL_WINDOW`]: the process does
    /// not accept from that socket (an app that serves only some of the sockets it was given),
    /// or cannot keep up at all.
    pub stalled: Vec<u32>,
    /// A UDP port's flows that its sockets own (datagrams of each go to the socket that got
    /// its first), and of those the ones seen in the last [`LIVE_FLOW_S`] seconds.
    #[serde(default)]
    pub flows: Option<u64>,
    #[serde(default)]
    pub live_flows: Option<u64>,
}

/// The window of a UDP member's live flows in status.
pub const LIVE_FLOW_S: u32 = 30;

/// A UDP port's flow table, in status.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Flows {
    /// Flows in the table now, and its size (`attach --flows`).
    pub entries: u64,
    pub capacity: u32,
    /// Datagrams of known flows sent to their own socket.
    pub known: u64,
    /// New flows recorded, and new flows steered but not recorded (over the per-second bound
    /// that keeps a flood from turning the table over, or a failed insertion).
    pub recorded: u64,
    pub unrecorded: u64,
    /// Known flows whose socket had closed: steered (and recorded) anew.
    pub orphaned: u64,
    /// Flows pushed out of the full table, least recently seen first: recorded - orphaned -
    /// entries (each orphaned flow was recorded again over its old entry).
    pub evicted: u64,
    /// Datagrams no ready socket could take, left to the kernel's hash over the group.
    pub fallback: u64,
}

/// How long status watches a taking socket's non-empty accept queue before it calls it stalled.
/// Only read again when some such queue is non-empty, so a port at rest costs nothing more.
const STALL_WINDOW: std::time::Duration = std::time::Duration::from_millis(250);
/// How many times status looks at such a queue within [`STALL_WINDOW`].
const STALL_SAMPLES: u32 = 5;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// All new connections steered by the active set, over every member that ever was.
    pub steered: u64,
    /// All migrations to an active socket.
    pub migrated: u64,
    pub passthrough: u64,
    pub fallback: u64,
    pub select_failed: u64,
    pub migrate_no_target: u64,
    /// Connections (new, or migrating from a dying member) parked on a `zdt-ctl hold`
    /// placeholder.
    pub held: u64,
    /// zdt-ctl's own connections refused: probes whose candidate could not be selected, and the
    /// status/metrics check that the program runs.
    pub probe_refused: u64,
}

/// Kernel counters of this network namespace that concern zdt (/proc/net/netstat TcpExt):
/// a migration that failed (e.g. the target's accept queue was full) is reset by the kernel,
/// and shows here, not in zdt's own counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct KernelCounters {
    pub migrate_req_success: u64,
    pub migrate_req_failure: u64,
    pub listen_overflows: u64,
    pub listen_drops: u64,
}

impl KernelCounters {
    pub fn read() -> Self {
        let c = |n| sockets::netstat_counter("TcpExt", n).unwrap_or(0);
        KernelCounters {
            migrate_req_success: c("TCPMigrateReqSuccess"),
            migrate_req_failure: c("TCPMigrateReqFailure"),
            listen_overflows: c("ListenOverflows"),
            listen_drops: c("ListenDrops"),
        }
    }
}

/// A listener of a member's process that no slot holds: the process re-created its listener
/// (a Go server restarted in process, nginx reloading changed `listen` lines). The program
/// cannot select it until the next command that takes the port's lock adopts it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Unadopted {
    pub pid: i32,
    /// The role the listener takes when adopted: the process's.
    pub role: crate::plan::sets::Role,
    /// The socket's cookie (`ss -e` shows it as `cookie:`).
    pub cookie: u64,
}

/// A slot whose recorded process is gone while another process holds its socket: it was
/// inherited (a systemd socket unit, nginx's binary upgrade). The next command that takes the
/// port's lock records the heir as the member.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Inherited {
    pub slot: u32,
    /// The pid the slot records, which has exited.
    pub recorded_pid: i32,
    /// The process that holds the socket now.
    pub pid: i32,
}

/// Where the slots and the kernel's listeners part (empty lists when they agree).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Drift {
    pub unadopted: Vec<Unadopted>,
    pub inherited: Vec<Inherited>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub port: u16,
    #[serde(default)]
    pub protocol: Proto,
    pub spec: Option<String>,
    /// The program is pinned for this port and attached to every group that exists on it.
    pub attached: bool,
    /// Something was promoted: the program steers by the active set (else kernel hashing).
    pub promoted: bool,
    /// The kernel's id of zdt's program for this port (`bpftool prog show id N`).
    pub program_id: Option<u32>,
    pub groups: Vec<Group>,
    pub members: Vec<Member>,
    pub drift: Drift,
    pub counters: Counters,
    /// A UDP port's flow table (None for TCP).
    #[serde(default)]
    pub flows: Option<Flows>,
    pub kernel: KernelCounters,
}

impl Status {
    /// The member `pid`, if it is one.
    pub fn member(&self, pid: i32) -> Option<&Member> {
        self.members.iter().find(|m| m.pid == pid)
    }

    /// The role of `pid`, if it is a member.
    pub fn role_of(&self, pid: i32) -> Option<crate::plan::sets::Role> {
        self.member(pid).map(|m| m.role)
    }

    /// The pids of the members in `role`, in the report's order.
    pub fn pids(&self, role: crate::plan::sets::Role) -> Vec<i32> {
        self.members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.pid)
            .collect()
    }
}

/// Show members, roles and counters.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The JSON schema is docs/status.schema.json. Each group is checked with one \
                        connection of zdt-ctl's own to the port, which the program refuses: the app \
                        never sees it. A PORT that is not attached exits 3."
)]
pub struct Args {
    /// The port, `443/udp` for a UDP one (default: every attached port of this network namespace).
    #[arg(value_parser = super::parse_port_arg)]
    pub port: Option<Port>,
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Refresh the view every INTERVAL (default 1s) until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = super::parse_duration_arg)]
    pub watch: Option<std::time::Duration>,
}

/// The shortest `--watch` interval.
const WATCH_MIN: std::time::Duration = std::time::Duration::from_millis(100);

pub fn execute(args: Args) -> anyhow::Result<()> {
    if let Some(every) = args.watch {
        if every < WATCH_MIN {
            return Err(crate::error::bad_input(format!(
                "--watch {}: refresh at most every {} (a shorter interval only burns a core)",
                crate::addr::fmt_duration(every),
                crate::addr::fmt_duration(WATCH_MIN)
            )));
        }
        loop {
            let all = statuses(args.port)?;
            crate::out!("\x1b[2J\x1b[H{}", render_all(&all));
            std::thread::sleep(every);
        }
    }
    let all = statuses(args.port)?;
    if args.json {
        // One port asked for: one object; otherwise an array.
        return super::print_json(&all, args.port.is_some());
    }
    crate::out!("{}", render_all(&all));
    Ok(())
}

/// The human view of every port in `all`.
fn render_all(all: &[Status]) -> String {
    if all.is_empty() {
        return "no port is attached in this network namespace\n".into();
    }
    all.iter().map(render).collect()
}

pub fn status(port: Port) -> anyhow::Result<Status> {
    crate::error::require_root()?;
    let Some(state) = State::open_read(port)? else {
        return Ok(Status {
            flows: None,
            port: port.number,
            protocol: port.proto,
            spec: None,
            attached: false,
            promoted: false,
            program_id: None,
            groups: Vec::new(),
            members: Vec::new(),
            drift: Drift::default(),
            counters: Counters::default(),
            kernel: KernelCounters::read(),
        });
    };
    // The same read a locked command plans from; the queues from a read of their own, which
    // the stall check repeats.
    let (snap, read) = state.read()?;
    let slots = &snap.slots;
    let table = sockets::listen_entries(state.spec.proto)?;
    let mut groups = Vec::new();
    // Whose listeners are the app's, decided as `upgrade` decides it from the same read.
    let owned = crate::plan::port::upgrade(&read.seen, &snap.member_uids());
    for (v4, family) in [(true, "ipv4"), (false, "ipv6")] {
        let of_family = |l: &[crate::plan::port::OnPort]| {
            l.iter().filter(|o| o.listen.local.is_ipv4() == v4).count()
        };
        let (mine, foreign) = (of_family(&owned.mine), of_family(&owned.foreign));
        if mine == 0 && foreign == 0 {
            continue;
        }
        groups.push(Group {
            family: family.into(),
            listeners: mine,
            foreign,
            // Another user's group has another program, or none: not zdt's to check.
            steering: mine > 0 && state.probe_attached(v4)?,
        });
    }
    let queued = |table: &std::collections::BTreeMap<u64, sockets::ListenEntry>, cookie| {
        table
            .values()
            .find(|e| e.cookie == cookie)
            .map_or(0, |e| e.queued)
    };
    let taking = |s: &crate::plan::sets::Slot| s.role().serves();
    // A UDP socket's queue is bytes of datagrams, read in bursts: not a sign of a socket that
    // nothing reads from, as an accept queue that never shrinks is.
    let tcp = state.spec.proto == Proto::Tcp;
    let waiting: Vec<(u32, u32)> = slots
        .iter()
        .filter(|s| tcp && taking(s))
        .map(|s| (s.index, queued(&table, s.meta.cookie)))
        .filter(|&(_, n)| n > 0)
        .collect();
    // Stalled: the queue never went below what it held at first, at any of STALL_SAMPLES looks
    // over STALL_WINDOW. A served queue, however busy, dips between arrivals; one that nothing
    // accepts from only grows.
    let mut stalled: Vec<u32> = waiting.iter().map(|&(index, _)| index).collect();
    for _ in 0..STALL_SAMPLES {
        if stalled.is_empty() {
            break;
        }
        std::thread::sleep(STALL_WINDOW / STALL_SAMPLES);
        let again = sockets::listen_entries(state.spec.proto)?;
        stalled.retain(|&index| {
            let before = waiting.iter().find(|w| w.0 == index).map_or(0, |w| w.1);
            slots
                .iter()
                .find(|s| s.index == index)
                .is_some_and(|s| queued(&again, s.meta.cookie) >= before)
        });
    }
    let table_of_flows = state.flow_table(LIVE_FLOW_S)?;
    let flows_of = |index: u32| {
        table_of_flows
            .as_ref()
            .map(|t| t.by_slot.get(&index).copied().unwrap_or_default())
    };
    let mut members: Vec<Member> = Vec::new();
    for s in slots {
        let f = flows_of(s.index);
        let pid = s.meta.pid as i32;
        let role = s.role();
        let q = u64::from(queued(&table, s.meta.cookie));
        let stall: Vec<u32> = stalled.iter().copied().filter(|&i| i == s.index).collect();
        match members.iter_mut().find(|m| m.pid == pid && m.role == role) {
            Some(m) => {
                m.slots.push(s.index);
                m.steered += s.steered;
                m.migrated += s.migrated;
                m.recent += s.recent;
                m.queued += q;
                m.stalled.extend(stall);
                if let (Some(all), Some(live), Some((a, l))) = (&mut m.flows, &mut m.live_flows, f)
                {
                    *all += a;
                    *live += l;
                }
            }
            None => members.push(Member {
                pid,
                command: sockets::comm(pid).unwrap_or_else(|| "?".into()),
                role,
                slots: vec![s.index],
                since_ms: s.meta.since_ms,
                steered: s.steered,
                migrated: s.migrated,
                recent: s.recent,
                share: 0.0,
                queued: q,
                stalled: stall,
                flows: f.map(|f| f.0),
                live_flows: f.map(|f| f.1),
            }),
        }
    }
    let recent: u64 = members.iter().map(|m| m.recent).sum();
    for m in &mut members {
        m.share = if recent == 0 {
            0.0
        } else {
            m.recent as f64 / recent as f64
        };
    }
    let d = snap.drift();
    let drift = Drift {
        unadopted: d
            .adopt
            .iter()
            .map(|&(cookie, p, role)| Unadopted {
                pid: p.pid,
                role,
                cookie,
            })
            .collect(),
        inherited: d
            .rehome
            .iter()
            .map(|&(slot, p)| Inherited {
                slot,
                recorded_pid: slots
                    .iter()
                    .find(|s| s.index == slot)
                    .map_or(0, |s| s.pid()),
                pid: p.pid,
            })
            .collect(),
    };
    let g = state.global_counters()?;
    let flows = match (state.flow_counters()?, &table_of_flows) {
        (Some(c), Some(t)) => {
            let entries = t.entries;
            Some(Flows {
                entries,
                capacity: state.flow_capacity()?,
                known: c.known,
                recorded: c.recorded,
                unrecorded: c.unrecorded,
                orphaned: c.orphaned,
                evicted: c.recorded.saturating_sub(c.orphaned + entries),
                fallback: c.fallback,
            })
        }
        _ => None,
    };
    Ok(Status {
        flows,
        port: port.number,
        protocol: port.proto,
        spec: Some(state.spec.to_string()),
        attached: groups
            .iter()
            .filter(|g| g.listeners > 0)
            .all(|g| g.steering),
        promoted: state.active_set()?.is_some(),
        program_id: Some(state.program_id()?),
        groups,
        members,
        drift,
        counters: Counters {
            steered: g.steered,
            migrated: g.migrated,
            passthrough: g.passthrough,
            fallback: g.fallback,
            select_failed: g.select_failed,
            migrate_no_target: g.migrate_no_target,
            held: g.held,
            probe_refused: g.probe_refused,
        },
        kernel: KernelCounters::read(),
    })
}

/// Ports that have a state in this network namespace.
pub fn attached_ports() -> anyhow::Result<Vec<Port>> {
    let dir = crate::state::netns_dir()?;
    let mut ports: BTreeSet<Port> = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(Port::from_dir_name) {
                if State::exists(p)? {
                    ports.insert(p);
                }
            }
        }
    }
    Ok(ports.into_iter().collect())
}

/// The status of `port`, or of every attached port.
pub fn statuses(port: Option<Port>) -> anyhow::Result<Vec<Status>> {
    // Before anything is read, also when no port is attached.
    crate::error::require_root()?;
    let ports = match port {
        // A port asked for by name must be attached (exit 3 otherwise, as for every command).
        Some(p) if !State::exists(p)? => return Err(crate::state::not_attached(p)),
        Some(p) => vec![p],
        None => attached_ports()?,
    };
    ports.iter().map(|p| status(*p)).collect()
}

/// "3s", "5m", "2h", "4d": how long ago a Unix time in ms was.
pub fn ago(since_ms: u64) -> String {
    let secs = crate::state::now_ms().saturating_sub(since_ms) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The human view of one port.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let Some(spec) = &s.spec else {
        let port = Port {
            number: s.port,
            proto: s.protocol,
        };
        let _ = writeln!(o, "port {port}: not attached");
        return o;
    };
    let mode = if s.promoted {
        "steering by active set"
    } else {
        "pass-through (nothing promoted yet)"
    };
    let state = if s.attached {
        "attached"
    } else {
        "NOT ATTACHED to every group"
    };
    let prog = s
        .program_id
        .map_or(String::new(), |id| format!(" (program id {id})"));
    let _ = writeln!(o, "{spec}: {state}, {mode}{prog}");
    for g in &s.groups {
        let foreign = if g.foreign > 0 {
            format!(
                "; {} listener(s) of another user, in a group of their own that zdt leaves alone",
                g.foreign
            )
        } else {
            String::new()
        };
        if g.listeners == 0 {
            let _ = writeln!(o, "  group {}: no listener of the app's{foreign}", g.family);
            continue;
        }
        let _ = writeln!(
            o,
            "  group {}: {} listener(s), program {}{foreign}",
            g.family,
            g.listeners,
            if g.steering {
                "attached"
            } else {
                "NOT ATTACHED (group re-created, or the app replaced it; promote re-attaches)"
            }
        );
    }
    // The share's window: two buckets of 2^35 ns (34.4 s), the current one and the one before.
    let _ = writeln!(
        o,
        "  {:<8} {:>8} {:<16} {:<10} {:>6} {:>10} {:>9} {:>13}",
        "SLOTS", "PID", "COMMAND", "ROLE", "SINCE", "STEERED", "MIGRATED", "SHARE(34-69s)"
    );
    for m in &s.members {
        let slots: Vec<String> = m.slots.iter().map(u32::to_string).collect();
        let _ = writeln!(
            o,
            "  {:<8} {:>8} {:<16} {:<10} {:>6} {:>10} {:>9} {:>12.1}%",
            slots.join(","),
            m.pid,
            m.command,
            m.role,
            ago(m.since_ms),
            m.steered,
            m.migrated,
            m.share * 100.0
        );
    }
    for m in s.members.iter().filter(|m| !m.stalled.is_empty()) {
        let slots: Vec<String> = m.stalled.iter().map(u32::to_string).collect();
        let _ = writeln!(
            o,
            "  WARNING: pid {} ({}) takes connections on slot(s) {} whose accept queue holds {} \
             and did not shrink: it does not accept from that socket (does it serve every socket \
             it was given? see `zdt-ctl exec --help`), or it cannot keep up",
            m.pid,
            m.role,
            slots.join(","),
            m.queued
        );
    }
    if s.promoted && !s.members.iter().any(|m| m.role.serves()) {
        let _ = writeln!(
            o,
            "  WARNING: no active or canary member listens (it exited, or re-created its \
             listener): new connections go to the previous version's members (draining) while \
             they listen, else to hold's placeholders, else to the kernel's hash over the group, \
             warming versions included; promote the next version"
        );
    }
    for u in &s.drift.unadopted {
        let _ = writeln!(
            o,
            "  WARNING: pid {} ({}) listens on a socket no slot holds (cookie {}; it re-created its \
             listener): the next zdt-ctl command that takes the port's lock adopts it",
            u.pid, u.role, u.cookie
        );
    }
    for i in &s.drift.inherited {
        let _ = writeln!(
            o,
            "  WARNING: slot {}'s pid {} has exited and pid {} holds its socket (inherited): the \
             next zdt-ctl command that takes the port's lock records pid {}",
            i.slot, i.recorded_pid, i.pid, i.pid
        );
    }
    let k = &s.kernel;
    let _ = writeln!(
        o,
        "  kernel: migrations ok {} failed {}, listen overflows {} drops {}",
        k.migrate_req_success, k.migrate_req_failure, k.listen_overflows, k.listen_drops
    );
    if let Some(f) = &s.flows {
        let _ = writeln!(
            o,
            "  flows: {} of {} in the table; recorded {} unrecorded {} orphaned {} evicted {} \
             fallback {}; datagrams of known flows {}",
            f.entries,
            f.capacity,
            f.recorded,
            f.unrecorded,
            f.orphaned,
            f.evicted,
            f.fallback,
            f.known
        );
        for m in &s.members {
            if let (Some(all), Some(live)) = (m.flows, m.live_flows) {
                let _ = writeln!(
                    o,
                    "  pid {} ({}): {all} flow(s), {live} seen in the last {LIVE_FLOW_S}s",
                    m.pid, m.role
                );
            }
        }
    }
    let c = &s.counters;
    let _ = writeln!(
        o,
        "  counters: steered {} migrated {} passthrough {} fallback {} select_failed {} migrate_no_target {} held {} probe_refused {}",
        c.steered, c.migrated, c.passthrough, c.fallback, c.select_failed, c.migrate_no_target, c.held, c.probe_refused
    );
    o
}
