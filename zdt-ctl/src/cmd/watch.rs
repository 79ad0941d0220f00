//! `zdt-ctl watch [ADDR]:PORT`: promote what a deploy tool starts, with no deploy script.
//!
//! Tools that only start and stop processes (`systemctl restart`, a supervisor, a container
//! runtime) never call `promote`. The watcher looks at the port's listeners every
//! [`POLL`]; when they change it takes the port's lock, which puts membership right as every
//! locked command does (a re-created or inherited listener is adopted, a member that exited
//! leaves), and promotes each new process that serves a listener of the port, once it is ready,
//! as `zdt-ctl promote` does (the same code, the same lock, the same checks: another uid, hold
//! or zdt-ctl itself is refused there). A process of another uid or another group, or bound to
//! a device the members are not, is not even taken on: it must not make the watcher give up a version of the
//! app's that is warming up. It keeps no state of its own: killed and restarted, it
//! finds the port as the pinned maps say, candidates a `--probe` wait left in slots included.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    addr::{Port, PortSpec},
    cmd::promote::{promote, superseded, PromoteOptions, Rollout},
    error::{bad_input, err, require_root, Kind},
    plan::{sets::Process, snapshot::Snapshot},
    sockets,
    state::State,
};

/// How often the watcher looks at the port's listeners (one sock_diag dump).
const POLL: Duration = Duration::from_millis(100);

/// How soon the watcher looks again at a listener no process served (each look takes the lock
/// and scans /proc, so less often than [`POLL`]).
const UNSERVED_AGAIN: Duration = Duration::from_millis(500);

/// Promote each new process that listens on the port once it is ready (runs until stopped).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each new process is taken on in its own thread: one that never gets ready does \
                  not hold up the next. Of processes started one after the other, the newest \
                  ready one serves (newest by start time, whichever listens first): an older one that gets ready after a newer one was promoted \
                  stays a candidate. A process whose listeners belong to another user than the \
                  members', that runs with a group none of the serving processes has, or whose \
                  listeners are bound to a device theirs are not, is left alone (and said so).\n\n\
                  Example, a unit restarted by systemd (a new instance started beside the old \
                  one, or behind `zdt-ctl hold`), served without a deploy script:\n  \
                  zdt-ctl watch :8080 --probe /readyz --stop-old\n\
                  Each instance on an admin port of its own (a container's, a port chosen at \
                  start):\n  zdt-ctl watch :8080 --readyz-path /readyz --stop-old"
)]
pub struct Args {
    /// The attached address of the port, [ADDR]:PORT.
    #[arg(value_parser = super::parse_spec)]
    pub addr: PortSpec,
    /// Check each new process's readiness at PATH through the public port (as `promote
    /// --probe`): zdt's marked connections reach that process and no one else. TCP ports
    /// only.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["no_readyz", "readyz_path"], value_parser = super::parse_probe_path)]
    pub probe: Option<String>,
    /// Check each new process's readiness at http://ADMIN PATH, where ADMIN is the one TCP
    /// listener the process holds outside the watched port (its own admin port; a wildcard
    /// address is reached through loopback). A process with several is not promoted.
    #[arg(long, value_name = "PATH", conflicts_with = "probe", value_parser = super::parse_probe_path)]
    pub readyz_path: Option<String>,
    /// Take a new process as ready as soon as it listens.
    #[arg(long, conflicts_with_all = ["probe", "readyz_path"])]
    pub no_readyz: bool,
    /// How long a new process may take to be ready; one that is not is left a candidate
    /// (it takes no connection) and not tried again.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration_arg)]
    pub timeout: Duration,
    /// As `promote`'s.
    #[command(flatten)]
    pub rollout: Rollout,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    require_root()?;
    let spec = args.addr;
    if let (Some(_), crate::addr::Proto::Tcp) = (args.rollout.stop_when_idle, spec.proto) {
        return Err(bad_input(format!(
            "--stop-when-idle waits for a UDP port's flows, and {spec} is TCP; a TCP port's \
             queue moves to the new version by itself"
        )));
    }
    if let (Some(path), crate::addr::Proto::Udp) = (&args.probe, spec.proto) {
        return Err(super::promote::probe_on_udp(path, &spec.key()));
    }
    let state =
        State::open_read(spec.key())?.ok_or_else(|| crate::state::not_attached(spec.key()))?;
    if state.spec != spec {
        return Err(bad_input(format!(
            "port {} is attached as {}, not {spec}: run `zdt-ctl watch {}`",
            spec.port, state.spec, state.spec
        )));
    }
    drop(state);
    let base = PromoteOptions {
        superseded: None,
        pid: 0,
        ports: vec![spec.key()],
        readyz: None,
        probe: args.probe.clone(),
        weight: args.rollout.weight,
        timeout: args.timeout,
        probation: args.rollout.probation,
        stop_old: args.rollout.stop_old,
        drain_timeout: args.rollout.drain_timeout,
        stop_when_idle: args.rollout.stop_when_idle,
        newest_wins: true,
    };
    eprintln!("zdt-ctl watch: watching {spec}");
    // Processes already taken on (promoted, refused or never ready): not tried again.
    let mut tried: BTreeSet<Process> = BTreeSet::new();
    let mut last: Option<BTreeSet<u64>> = None;
    // When a listener no process served yet was seen: looked at again after UNSERVED_AGAIN.
    let mut again: Option<Instant> = None;
    // The newest process taken on, its flag (set when a newer one comes) and its thread.
    let mut current: Option<(Process, Arc<AtomicBool>, std::thread::JoinHandle<()>)> = None;
    loop {
        let now = listener_cookies(&spec)?;
        if last.as_ref() != Some(&now) || again.is_some_and(|t| Instant::now() >= t) {
            let Look {
                mut found,
                unserved,
                snap: read,
            } = look(spec.key())?;
            again = unserved.then(|| Instant::now() + UNSERVED_AGAIN);
            found.sort_unstable_by_key(|p| p.start);
            for p in found {
                if !tried.insert(p) {
                    continue;
                }
                if let Some(why) = read.foreign(&p, sockets::egid, sockets::interface_name) {
                    eprintln!("zdt-ctl watch: port {}: {why}: left alone", spec.key());
                    continue;
                }
                // Newest by start time, not by when it was noticed: a process that started
                // before the one being taken on (it bound its port later) gives way to it.
                if let Some((newer, ..)) =
                    (current.as_ref()).filter(|(q, _, t)| q.start > p.start && !t.is_finished())
                {
                    eprintln!(
                        "zdt-ctl watch: pid {} listens on {spec}, but pid {} started after it \
                         and is being taken on: left a candidate",
                        p.pid, newer.pid
                    );
                    continue;
                }
                eprintln!(
                    "zdt-ctl watch: pid {} listens on {spec}: promoting it once ready",
                    p.pid
                );
                // The newest process wins: one still waiting to be ready is given up (it stays
                // a candidate), and the new one's promote starts once that one's has ended, so
                // one promote runs at a time (--probe's lists are one per family). The wait
                // takes no lock: every verb goes on meanwhile.
                let previous = current.take();
                if let Some((_, flag, _)) = &previous {
                    flag.store(true, Ordering::SeqCst);
                }
                let flag = Arc::new(AtomicBool::new(false));
                let opts = PromoteOptions {
                    pid: p.pid,
                    superseded: Some(flag.clone()),
                    ..base.clone()
                };
                let path = args.readyz_path.clone();
                let thread = std::thread::spawn(move || {
                    if let Some((.., t)) = previous {
                        let _ = t.join();
                    }
                    let role = match opts.weight {
                        Some(w) => format!("a canary ({w} % of new connections)"),
                        None => "active".to_string(),
                    };
                    match take_on(opts, path.as_deref()) {
                        Ok(()) => eprintln!("zdt-ctl watch: pid {} is {role} on {spec}", p.pid),
                        Err(e) => eprintln!("zdt-ctl watch: pid {} not promoted: {e:#}", p.pid),
                    }
                });
                current = Some((p, flag, thread));
            }
            // The promotes run in their threads: what they and the stops change shows as a
            // change from this table on a later round.
            last = Some(now);
        }
        std::thread::sleep(POLL);
    }
}

/// Promotes one new process: with `readyz_path`, first finds its admin listener (within the
/// same timeout).
fn take_on(mut opts: PromoteOptions, readyz_path: Option<&str>) -> anyhow::Result<()> {
    if let Some(path) = readyz_path {
        let deadline = Instant::now() + opts.timeout;
        opts.readyz = Some(admin_url(&opts, path, deadline)?);
        opts.timeout = deadline.saturating_duration_since(Instant::now());
    }
    promote(&opts, |_| {}).map(drop)
}

/// `http://ADMIN PATH` for the one TCP listener `pid` holds outside `port`, waiting until
/// `deadline` for it to listen (an app may open its admin port after its public one).
fn admin_url(opts: &PromoteOptions, path: &str, deadline: Instant) -> anyhow::Result<String> {
    let (pid, port) = (opts.pid, opts.ports[0]);
    loop {
        if let Some(why) = superseded(opts) {
            return Err(why);
        }
        let admin = sockets::other_listeners(pid, port.number)?;
        match admin.len() {
            0 if Instant::now() < deadline => std::thread::sleep(POLL),
            0 => {
                return Err(err(
                    Kind::ReadinessTimeout,
                    format!(
                        "pid {pid} listens on no port besides {port}: --readyz-path needs its \
                         admin port; it stays a candidate"
                    ),
                ))
            }
            1 => {
                let a = admin.into_iter().next().expect("one");
                // A wildcard takes connections on loopback: reach it there.
                let ip = match a.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                    IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
                    ip => ip,
                };
                return Ok(format!("http://{}{path}", SocketAddr::new(ip, a.port())));
            }
            _ => {
                return Err(bad_input(format!(
                    "pid {pid} listens on {} besides port {port}: --readyz-path cannot tell its \
                     admin port; use --probe PATH; it stays a candidate",
                    admin
                        .iter()
                        .map(SocketAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
    }
}

/// The cookies of the listeners `spec` names: they change when a process listens, re-creates
/// its listener, or exits.
fn listener_cookies(spec: &PortSpec) -> anyhow::Result<BTreeSet<u64>> {
    let table = sockets::listen_entries(spec.proto)?;
    Ok(table
        .values()
        .filter(|e| spec.matches(&e.local))
        .map(|e| e.cookie)
        .collect())
}

/// What one locked look at the port found.
struct Look {
    /// The processes to take on: those with no role that serve a listener in no slot, and
    /// candidates a promote that ended before its switch left in slots (a watcher killed during
    /// `--probe`'s wait: [`Snapshot::waiting`]).
    found: Vec<Process>,
    /// A listener in no slot that no process serves yet: `zdt-ctl exec` before it runs the
    /// app, a socket unit's before the service starts. Its process shows with no change of
    /// the port's listeners, so the watcher looks again.
    unserved: bool,
    /// The read, to tell which processes are not the app's ([`Snapshot::foreign`]).
    snap: Snapshot,
}

/// Takes the port's lock (which re-adopts and re-homes members' listeners) and looks, from one
/// read.
fn look(port: Port) -> anyhow::Result<Look> {
    let snap = State::open_locked(port)?.snapshot()?;
    let mut found = snap.drift().newcomers;
    let waiting: Vec<Process> = (snap.waiting().into_iter())
        .filter(|p| !found.contains(p))
        .collect();
    found.extend(waiting);
    let claimed = |cookie| snap.slots.iter().any(|s| s.meta.cookie == cookie);
    let unserved = (snap.listeners.iter()).any(|l| l.member.is_none() && !claimed(l.cookie));
    Ok(Look {
        found,
        unserved,
        snap,
    })
}
