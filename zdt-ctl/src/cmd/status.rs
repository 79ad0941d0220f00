//! `zdt-ctl status [PORT] [--json]`: what the program is doing for a port.
use std::collections::BTreeSet;

use crate::{sockets, state::State};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// "ipv4" or "ipv6"
    pub family: &'static str,
    pub listeners: usize,
    /// Whether zdt's program is attached to this group, proven by one probe connection (see
    /// State::probe_attached): false if the group was re-created without it, or if the app
    /// replaced or removed it.
    pub steering: bool,
}

/// Kernel counters of this network namespace that concern zdt (/proc/net/netstat TcpExt):
/// a migration that failed (e.g. the target's accept queue was full) is reset by the kernel,
/// and shows here, not in zdt's own counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
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

#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    pub pid: i32,
    pub command: String,
    pub role: &'static str,
    pub slots: Vec<u32>,
    pub since_ms: u64,
    pub steered: u64,
    pub migrated: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    /// All new connections steered by the active set, over every member that ever was.
    pub steered: u64,
    /// All migrations to an active socket.
    pub migrated: u64,
    pub passthrough: u64,
    pub fallback: u64,
    pub select_failed: u64,
    pub migrate_no_target: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub port: u16,
    pub spec: Option<String>,
    /// The program is pinned for this port and attached to every group that exists on it.
    pub attached: bool,
    /// Something was promoted: the program steers by the active set (else kernel hashing).
    pub promoted: bool,
    pub groups: Vec<Group>,
    pub members: Vec<Member>,
    pub counters: Counters,
    pub kernel: KernelCounters,
}

pub fn status(port: u16) -> anyhow::Result<Status> {
    crate::error::require_root()?;
    let Some(state) = State::open_read(port)? else {
        return Ok(Status {
            port,
            spec: None,
            attached: false,
            promoted: false,
            groups: Vec::new(),
            members: Vec::new(),
            counters: Counters::default(),
            kernel: KernelCounters::read(),
        });
    };
    let slots = state.slots()?;
    let table = sockets::listen_entries()?;
    let mut groups = Vec::new();
    for (v4, family) in [(true, "ipv4"), (false, "ipv6")] {
        let listeners = table
            .values()
            .filter(|e| state.spec.matches(&e.local) && e.local.is_ipv4() == v4)
            .count();
        if listeners == 0 {
            continue;
        }
        groups.push(Group {
            family,
            listeners,
            steering: state.probe_attached(v4)?,
        });
    }
    let mut members: Vec<Member> = Vec::new();
    for s in &slots {
        let pid = s.meta.pid as i32;
        let role = s.role();
        match members.iter_mut().find(|m| m.pid == pid && m.role == role) {
            Some(m) => {
                m.slots.push(s.index);
                m.steered += s.counters.steered;
                m.migrated += s.counters.migrated;
            }
            None => members.push(Member {
                pid,
                command: sockets::comm(pid).unwrap_or_else(|| "?".into()),
                role,
                slots: vec![s.index],
                since_ms: s.meta.since_ms,
                steered: s.counters.steered,
                migrated: s.counters.migrated,
            }),
        }
    }
    let g = state.global_counters()?;
    Ok(Status {
        port,
        spec: Some(state.spec.to_string()),
        attached: groups.iter().all(|g| g.steering),
        promoted: state.active_set()?.is_some(),
        groups,
        members,
        counters: Counters {
            steered: g.steered,
            migrated: g.migrated,
            passthrough: g.passthrough,
            fallback: g.fallback,
            select_failed: g.select_failed,
            migrate_no_target: g.migrate_no_target,
        },
        kernel: KernelCounters::read(),
    })
}

/// Ports that have a state in this network namespace.
pub fn attached_ports() -> anyhow::Result<Vec<u16>> {
    let dir = crate::state::netns_dir()?;
    let mut ports: BTreeSet<u16> = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                if State::exists(p)? {
                    ports.insert(p);
                }
            }
        }
    }
    Ok(ports.into_iter().collect())
}
