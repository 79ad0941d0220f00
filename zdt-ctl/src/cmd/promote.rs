//! `zdt-ctl promote PID`: wait for PID's readiness, switch new connections to its sockets in one
//! update, demote the previous members, and optionally stop them.
use std::time::{Duration, Instant};

use crate::{
    cmd::resolve_port,
    error::{err, require_root, Kind},
    readiness,
    sockets::{self, PidFd},
    state::State,
};

#[derive(Debug, Clone)]
pub struct PromoteOptions {
    pub pid: i32,
    /// None: the only attached port of this network namespace.
    pub port: Option<u16>,
    /// None only with an explicit `--no-readyz`.
    pub readyz: Option<String>,
    pub timeout: Duration,
    pub stop_old: bool,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stopped {
    pub pid: i32,
    /// exited | still-running | gone (exited or pid reused before the signal)
    pub outcome: &'static str,
    pub after_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteReport {
    pub port: u16,
    pub pid: i32,
    pub slots: Vec<u32>,
    /// Pids that were active before and are draining now.
    pub drained: Vec<i32>,
    pub stopped: Vec<Stopped>,
    pub validate_ms: f64,
    pub readiness_ms: f64,
    /// From taking the lock after readiness to the end of the grace period after the flip.
    pub switch_ms: f64,
    /// Unix time (ms) of the switch: when the new active set became live.
    pub switched_at_ms: u64,
    pub stop_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn promote(
    opts: &PromoteOptions,
    mut progress: impl FnMut(Duration, &str),
) -> anyhow::Result<PromoteReport> {
    require_root()?;
    let t0 = Instant::now();
    // Input checks first, in order of cost; none of them changes anything.
    let url = opts
        .readyz
        .as_deref()
        .map(readiness::check_url)
        .transpose()?;
    let target = PidFd::open(opts.pid)?;
    let port = resolve_port(opts.port)?;
    let spec = State::open_read(port)?
        .ok_or_else(|| crate::state::not_attached(port))?
        .spec;
    // Validate the sockets now so that a wrong pid fails before any wait, then close the
    // duplicates: holding them while the process warms up would keep its listener alive if it
    // crashed (fact: a duplicate fd is a reference).
    drop(sockets::fetch_listeners(&target, &spec)?);

    // Serialize with other commands on this port for the rest of the promote.
    let mut state = State::open_locked(port)?;
    let validate = t0.elapsed();

    let t1 = Instant::now();
    if let Some(url) = &url {
        readiness::wait_ready(url, opts.timeout, || target.alive(), &mut progress)?;
    }
    let readiness = t1.elapsed();

    let t2 = Instant::now();
    // The process that passed readiness must be the one whose sockets we take: the pidfd pins
    // the process, the start time rules out a reused pid number.
    if !target.alive() || sockets::start_time(opts.pid) != Some(target.start) {
        return Err(err(
            Kind::ProcessDied,
            format!(
                "pid {} exited before the switch; nothing was changed",
                opts.pid
            ),
        ));
    }
    let listeners = sockets::fetch_listeners(&target, &spec)?;
    for l in &listeners {
        state.attach_to_group(&l.fd)?;
    }
    let new = state.insert(opts.pid, target.start, &listeners)?;
    let slots = state.slots()?;
    let previous: Vec<_> = slots
        .iter()
        .filter(|s| s.active && !new.contains(&s.index))
        .collect();
    let mut drained: Vec<(i32, u64)> = Vec::new();
    for s in &previous {
        let p = (s.meta.pid as i32, s.meta.pid_start);
        if p.0 != opts.pid && !drained.contains(&p) {
            drained.push(p);
        }
    }
    let switched_at_ms = state.switch(&slots, &new)?;
    state.set_roles(&slots, &new)?;
    // Close our duplicates before anything else: from here on only the processes hold them, so
    // their close() really stops the listeners.
    drop(listeners);
    drop(state);
    let switch = t2.elapsed();
    tracing::info!(port, pid = opts.pid, switch_ms = ms(switch), "switched");

    let t3 = Instant::now();
    let stopped = if opts.stop_old {
        stop_all(&drained, opts.drain_timeout)
    } else {
        Vec::new()
    };
    Ok(PromoteReport {
        port,
        pid: opts.pid,
        slots: new,
        drained: drained.iter().map(|d| d.0).collect(),
        stopped,
        validate_ms: ms(validate),
        readiness_ms: ms(readiness),
        switch_ms: ms(switch),
        switched_at_ms,
        stop_ms: ms(t3.elapsed()),
    })
}

/// SIGTERM to each previous member (only if it is still the process that was promoted then),
/// then wait for all of them to exit, up to one shared deadline.
fn stop_all(pids: &[(i32, u64)], timeout: Duration) -> Vec<Stopped> {
    let start = Instant::now();
    let mut waiting = Vec::new();
    let mut out = Vec::new();
    for &(pid, pid_start) in pids {
        match PidFd::open(pid) {
            Ok(p) if p.start == pid_start && p.signal(rustix::process::Signal::TERM).is_ok() => {
                waiting.push(p)
            }
            _ => out.push(Stopped {
                pid,
                outcome: "gone",
                after_ms: 0,
            }),
        }
    }
    for p in waiting {
        let left = timeout.saturating_sub(start.elapsed());
        let exited = p.wait_exit(left);
        out.push(Stopped {
            pid: p.pid,
            outcome: if exited { "exited" } else { "still-running" },
            after_ms: start.elapsed().as_millis() as u64,
        });
        tracing::info!(pid = p.pid, exited, "stopped");
    }
    out
}
