//! `zdt-ctl promote PID`: wait for PID's readiness, switch new connections to its sockets in one
//! update, demote the previous members, watch the new one for a probation period, and
//! optionally stop the previous members.
use std::time::{Duration, Instant};

use zdt_common::ActiveSet;

use crate::{
    addr::{Port, PortSpec, Proto},
    cmd::resolve_port,
    error::{bad_input, err, require_root, Kind},
    failpoint,
    plan::{
        sets::{self, Process, Role},
        snapshot::Snapshot,
    },
    readiness,
    sockets::{self, Listener, PidFd},
    state::State,
};

/// How often promote looks whether PID listens yet.
const LISTEN_POLL: Duration = Duration::from_millis(50);
/// How often, while PID does not listen, promote looks for a child of PID that does (a scan of
/// /proc, so not at every poll).
const CHILD_CHECK: Duration = Duration::from_secs(1);

/// What a promote is waiting for, for a progress display.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// PID has not started listening on `spec` yet.
    Listening { elapsed: Duration, spec: PortSpec },
    /// The readiness check answered `answer` (Ready ends the wait).
    Answer {
        elapsed: Duration,
        answer: &'a readiness::Answer,
    },
}

/// Wait for PID to listen on the port and be ready, then send all new connections to it.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "PID is the service's own process (with `exec` in a start script; under socket \
                  activation its MainPID). It may bind the port some time after it starts: promote \
                  waits for that, and fails at once if it binds another address, without \
                  SO_REUSEPORT, as another uid, or laid out otherwise than the running version \
                  (split IPv4/IPv6 vs one dual-stack socket).\n\n\
                  Example:\n  ./myapp & zdt-ctl promote $! --readyz http://127.0.0.1:8081/readyz --stop-old"
)]
pub struct Args {
    #[arg(value_parser = super::parse_pid_arg, allow_hyphen_values = true)]
    pub pid: i32,
    /// Readiness URL; the switch happens once it answers 200. Only PID (or a process it
    /// started) may serve its address, checked at every probe and at the switch;
    /// `localhost` means 127.0.0.1 and ::1.
    #[arg(long, required_unless_present_any = ["no_readyz", "probe"])]
    pub readyz: Option<String>,
    /// Check readiness at PATH through the public port itself, for apps without a separate
    /// readiness port: zdt's probes (marked connections from loopback) reach PID and no one else.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["readyz", "no_readyz"], value_parser = super::parse_probe_path)]
    pub probe: Option<String>,
    /// Skip the readiness check (the process is taken as ready now).
    #[arg(long, conflicts_with = "readyz")]
    pub no_readyz: bool,
    /// How long to wait for PID to listen on the port and then answer 200, in all.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration_arg)]
    pub timeout: Duration,
    #[command(flatten)]
    pub rollout: Rollout,
    /// The attached port, `443/udp` for a UDP one (needed only when several are attached). May repeat: PID is
    /// promoted on each, after one readiness wait, atomically per port.
    #[arg(long = "port", value_parser = super::parse_port_arg)]
    pub ports: Vec<Port>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a new process takes over, after it is ready: `promote`'s and `watch`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct Rollout {
    /// Canary: send N % (1-99) of new connections to PID, by flow hash; the rest stay with
    /// the active members. `promote PID` without --weight completes the rollout.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=99), conflicts_with = "stop_old")]
    pub weight: Option<u32>,
    /// After the switch, keep checking that the new process lives and answers 200 this long;
    /// if it does not, restore the previous active set (exit code 8), unless a rollback or
    /// another promote switched meanwhile (the port's lock is not held while it watches).
    #[arg(long, value_parser = super::parse_duration_arg)]
    pub probation: Option<Duration>,
    /// SIGTERM the previous members after the switch (and probation) and wait for them to exit.
    /// Checked first under the lock: if PID no longer serves (a rollback or another promote
    /// switched during the probation), nothing is stopped (exit code 7); a member that serves
    /// again, or that another attached port still serves, is never stopped.
    #[arg(long)]
    pub stop_old: bool,
    /// How long --stop-old waits for the previous members to exit (and, with
    /// --stop-when-idle, as long again for their flows to go idle).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration_arg)]
    pub drain_timeout: Duration,
    /// With --stop-old on a UDP port: SIGTERM the previous members only once their flows have
    /// had no datagram for this long (whole seconds, at least 1 s), or --drain-timeout passed.
    /// For apps that cut their flows at SIGTERM (hypercorn 0.18 answers no new request on a
    /// connection after it); an app with a graceful stop (GOAWAY) needs SIGTERM at once.
    #[arg(long, value_name = "DURATION", requires = "stop_old", value_parser = super::parse_duration_arg)]
    pub stop_when_idle: Option<Duration>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let opts = PromoteOptions {
        pid: args.pid,
        ports: args.ports,
        readyz: args.readyz,
        probe: args.probe,
        weight: args.rollout.weight,
        timeout: args.timeout,
        probation: args.rollout.probation,
        stop_old: args.rollout.stop_old,
        drain_timeout: args.rollout.drain_timeout,
        stop_when_idle: args.rollout.stop_when_idle,
        newest_wins: false,
        superseded: None,
    };
    // Progress only on a terminal: one line, redrawn. In scripts and under systemd the log
    // lines (RUST_LOG=info) tell the story.
    let mut line = ProgressLine::default();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let reports = promote(&opts, |p| {
        if tty {
            line.show(opts.pid, p)
        }
    });
    if line.printed {
        eprintln!();
    }
    let reports = reports?;
    if args.json {
        return super::print_json(&reports, true);
    }
    crate::out!("{}", render(&reports, opts.weight));
    if reports
        .iter()
        .flat_map(|r| &r.stopped)
        .any(|s| s.outcome == StopOutcome::StillRunning)
    {
        eprintln!(
            "zdt-ctl: warning: some previous members were still running after the drain \
             timeout; they receive no new connections"
        );
    }
    Ok(())
}

/// The progress line on a terminal, with the readiness answers seen so far.
#[derive(Default)]
struct ProgressLine {
    seen: Vec<(String, u32)>,
    printed: bool,
}

impl ProgressLine {
    fn show(&mut self, pid: i32, p: Progress<'_>) {
        self.printed = true;
        match p {
            Progress::Listening { elapsed, spec } => eprint!(
                "\r\x1b[2Kwaiting for pid {pid} to listen on {spec}: {:.1}s",
                elapsed.as_secs_f64()
            ),
            Progress::Answer { elapsed, answer } => {
                let text = answer.to_string();
                match self.seen.iter_mut().find(|(a, _)| *a == text) {
                    Some((_, n)) => *n += 1,
                    None => self.seen.push((text, 1)),
                }
                let answers: Vec<String> =
                    self.seen.iter().map(|(a, n)| format!("{a} x{n}")).collect();
                eprint!(
                    "\r\x1b[2Kwaiting for readiness: {:.1}s, answers: {}",
                    elapsed.as_secs_f64(),
                    answers.join(", ")
                );
            }
        }
    }
}

/// The text report: per port, who is active (or canary) and who drains; then what was
/// stopped and how long each phase took.
fn render(reports: &[PromoteReport], weight: Option<u32>) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for r in reports {
        let _ = match weight {
            Some(w) => writeln!(
                o,
                "port {}: pid {} canary at {w} % (slots {:?})",
                r.key(),
                r.pid,
                r.slots
            ),
            None => writeln!(
                o,
                "port {}: pid {} active (slots {:?})",
                r.key(),
                r.pid,
                r.slots
            ),
        };
        let _ = if r.drained.is_empty() {
            writeln!(o, "drained: none")
        } else {
            writeln!(o, "drained: pid {}", super::pid_list(&r.drained))
        };
    }
    let Some(r) = reports.first() else {
        return o;
    };
    for s in &r.stopped {
        let _ = writeln!(
            o,
            "stopped: pid {} {} after {} ms",
            s.pid,
            s.outcome.as_str(),
            s.after_ms
        );
    }
    let switch: Vec<String> = reports
        .iter()
        .map(|r| format!("{:.2} ms", r.switch_ms))
        .collect();
    let _ = writeln!(
        o,
        "phases: validate {:.1} ms, readiness {:.1} ms, switch {}, probation {:.1} ms, stop {:.1} ms",
        r.validate_ms,
        r.readiness_ms,
        switch.join(" + "),
        r.probation_ms,
        r.stop_ms
    );
    o
}

#[derive(Debug, Clone)]
pub struct PromoteOptions {
    pub pid: i32,
    /// The ports to promote PID on; empty: the only attached port of this network namespace.
    pub ports: Vec<Port>,
    /// None only with an explicit `--no-readyz`.
    pub readyz: Option<String>,
    pub timeout: Duration,
    /// Check readiness at this path through the public port itself (with zdt-ctl's own marked
    /// connections, which the program sends to the candidate only) instead of a URL.
    pub probe: Option<String>,
    /// Canary: send this share (1-99 %) of new connections to PID, the rest to the current
    /// active members. None: PID takes all (a full promote, or the end of a canary).
    pub weight: Option<u32>,
    /// After the switch, keep checking that the new process lives (and answers 200, with
    /// --readyz) this long; restore the previous active set if it does not.
    pub probation: Option<Duration>,
    pub stop_old: bool,
    pub drain_timeout: Duration,
    /// Signal the previous members of UDP ports only once their flows are idle this long.
    pub stop_when_idle: Option<Duration>,
    /// Refuse the switch when a process that started after PID already takes new connections
    /// (`watch`: of processes started one after the other, the newest ready one serves, never
    /// an older one that got ready later).
    pub newest_wins: bool,
    /// Set by `watch` when a newer process listens: the readiness wait ends, PID stays a
    /// candidate (before the switch only; a switched promote goes on to its end).
    pub superseded: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What became of a previous member that `--stop-old` stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopOutcome {
    /// It exited within the drain timeout.
    Exited,
    /// It still ran at the drain timeout (it takes no new connection).
    StillRunning,
    /// It had exited, or its pid was reused, before the signal: nothing was signalled.
    Gone,
    /// pid 1 or zdt-ctl, recorded by an older zdt-ctl: never signalled.
    NotAService,
    /// It still serves (active or canary) another attached port of this network namespace,
    /// which this promote did not name: not signalled (the promote of that port stops it).
    ServesAnotherPort,
}

impl StopOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StopOutcome::Exited => "exited",
            StopOutcome::StillRunning => "still-running",
            StopOutcome::Gone => "gone",
            StopOutcome::NotAService => "not-a-service",
            StopOutcome::ServesAnotherPort => "serves-another-port",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stopped {
    pub pid: i32,
    pub outcome: StopOutcome,
    pub after_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PromoteReport {
    pub port: u16,
    pub protocol: Proto,
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
    pub probation_ms: f64,
    pub stop_ms: f64,
}

impl PromoteReport {
    pub fn key(&self) -> Port {
        Port {
            number: self.port,
            proto: self.protocol,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the switch on one port did.
struct Switched {
    port: Port,
    /// The set this promote made live: a failed watch restores only while it still is.
    written: ActiveSet,
    new: Vec<u32>,
    /// The set that was live before: what a failed watch restores.
    before: ActiveSet,
    /// The rollback target before the switch: put back by a failed watch's restore.
    target: Option<ActiveSet>,
    drained: Vec<Process>,
    to_stop: Vec<Process>,
    switched_at_ms: u64,
    switch: Duration,
}

/// Promotes `opts.pid` on every port of `opts.ports` (or the only attached one): one readiness
/// wait, then one atomic switch per port. Returns one report per port.
pub fn promote(
    opts: &PromoteOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> anyhow::Result<Vec<PromoteReport>> {
    require_root()?;
    let t0 = Instant::now();
    // Input checks first, in order of cost; none of them changes anything.
    let prober = opts
        .readyz
        .as_deref()
        .map(|u| readiness::check_url(u).and_then(|u| readiness::Prober::new(&u)))
        .transpose()?;
    let target = PidFd::open(opts.pid)?;
    sockets::refuse_non_app(&target)?;
    tracing::info!(pid = opts.pid, ports = ?opts.ports, "promote started");
    let mut ports = if opts.ports.is_empty() {
        vec![resolve_port(None)?]
    } else {
        opts.ports.clone()
    };
    if let (Some(path), Some(udp)) = (&opts.probe, ports.iter().find(|p| p.proto == Proto::Udp)) {
        return Err(probe_on_udp(path, udp));
    }
    if let (Some(idle), false) = (
        opts.stop_when_idle,
        ports.iter().any(|p| p.proto == Proto::Udp),
    ) {
        return Err(bad_input(format!(
            "--stop-when-idle {}: it waits for a UDP port's flows, and no port of this promote \
             is UDP (pass --port PORT/udp); a TCP port's queue moves to the new version by \
             itself; nothing was changed",
            crate::addr::fmt_duration(idle)
        )));
    }
    // Locks are taken in port order, so two multi-port promotes never wait on each other.
    ports.sort_unstable();
    ports.dedup();
    let mut read = Vec::new();
    for &port in &ports {
        read.push(State::open_read(port)?.ok_or_else(|| crate::state::not_attached(port))?);
    }
    // A process may bind its port some time after it starts (a JVM, an app that loads its
    // configuration first): wait for it, and fail as soon as what it binds cannot be used.
    let specs: Vec<PortSpec> = read.iter().map(|s| s.spec).collect();
    // --timeout covers both waits: for PID to listen, then for it to be ready.
    let deadline = Instant::now() + opts.timeout;
    let found = wait_listening(&target, &specs, deadline, &mut progress)?;
    for (state, listeners) in read.iter().zip(&found) {
        sockets::check_serves(opts.pid, listeners)?;
        check_fits(state, opts.pid, listeners)?;
    }
    // Close the duplicates before the readiness wait: holding them while the process warms up
    // would keep its listener alive if it crashed (a duplicate fd is a reference to the socket).
    drop(found);
    drop(read);
    // Alive, and (with a readiness URL) the only process serving it: before the wait, at every
    // probe, and at the switch.
    // While polling, listeners seen at a passed check are not looked up again (OwnerCache); the
    // check at the switch is made in full.
    let owner_cache = sockets::OwnerCache::default();
    let valid = |cache: Option<&sockets::OwnerCache>| -> anyhow::Result<()> {
        if !target.alive() {
            return Err(readiness::exited_while_waiting());
        }
        if let Some(why) = superseded(opts) {
            return Err(why);
        }
        match &prober {
            Some(p) => sockets::check_url_owner(&target, &p.url, &p.addrs, cache),
            None => Ok(()),
        }
    };
    let still_valid = || valid(Some(&owner_cache));
    still_valid()?;
    failpoint(crate::Step::Validated);
    let validate = t0.elapsed();

    // The readiness wait takes no lock: other commands (a `zdt-ctl hold` that starts, status)
    // go on meanwhile, and the switch below re-reads and re-checks under the lock whatever
    // it relies on.
    let t1 = Instant::now();
    let mut answered = |elapsed: Duration, answer: &readiness::Answer| {
        progress(Progress::Answer { elapsed, answer })
    };
    if let Some(p) = &prober {
        tracing::info!(pid = opts.pid, url = %p.url, "waiting for readiness");
        let left = deadline.saturating_duration_since(t1);
        readiness::wait_until(
            p.url.as_str(),
            left,
            still_valid,
            |limit| p.probe(limit),
            &mut answered,
        )?;
        tracing::info!(pid = opts.pid, ms = ms(t1.elapsed()), "ready");
    }
    let mut readiness = t1.elapsed();

    // Serialize with other commands on these ports for the rest of the promote.
    let mut states = lock_all(&ports)?;
    failpoint(crate::Step::Locked);
    // --probe writes the probe lists under the lock, then waits without it.
    if let Some(path) = &opts.probe {
        let t2 = Instant::now();
        let left = deadline.saturating_duration_since(t2);
        states = probe_through_port(
            states,
            &ports,
            &target,
            path,
            left,
            &still_valid,
            &mut answered,
        )?;
        readiness += t2.elapsed();
    }
    failpoint(crate::Step::Readied);

    // The process that passed readiness must be the one whose sockets we take: the pidfd pins
    // the process, the start time rules out a reused pid number. And its readiness URL must
    // still be its own alone.
    if !target.alive() || sockets::start_time(opts.pid) != Some(target.start) {
        return Err(err(
            Kind::ProcessDied,
            format!(
                "pid {} exited before the switch; nothing was changed",
                opts.pid
            ),
        ));
    }
    valid(None)?;
    if opts.newest_wins {
        for i in 0..states.len() {
            let Some(newer) = states[i].snapshot()?.newer_serving(target.start) else {
                continue;
            };
            let port = states[i].spec.port;
            // --probe's lists name PID's sockets (one prober at a time, and we hold the lock):
            // PID stays a candidate that no connection reaches.
            for state in &mut states {
                drop_probe(state)?;
            }
            return Err(err(
                Kind::Refused,
                format!(
                    "pid {} started after pid {} and already serves port {}: pid {} stays a \
                     candidate (the newest ready process serves)",
                    newer.pid, opts.pid, port, opts.pid
                ),
            ));
        }
    }
    let mut done: Vec<Switched> = Vec::new();
    let mut locked: Vec<State> = Vec::new();
    for state in states {
        match switch_port(state, opts.pid, &target, opts.weight) {
            Ok((state, s)) => {
                locked.push(state);
                done.push(s);
            }
            Err(e) => {
                // A later port failed: the earlier ones go back, so the command changed nothing.
                for (state, s) in locked.iter_mut().zip(&done) {
                    if let Ok(snap) = state.snapshot() {
                        let _ = restore(state, &snap, &s.before, s.target.as_ref());
                    }
                }
                return Err(e);
            }
        }
    }

    // --probe with --probation: the probation asks PATH through the public port as the
    // readiness wait did, so the probe lists name PID's sockets again while it lasts.
    let in_probation = match (&opts.probe, opts.probation) {
        (Some(path), Some(p)) if !p.is_zero() => {
            Some(probe_in_probation(&mut locked, &done, path)?)
        }
        _ => None,
    };
    // The switch is made on every port: the locks go now. The probation and the stop wait on
    // the app, and other commands (a rollback, another deploy) must not wait on them; what
    // follows takes the locks again and decides from what is live then.
    drop(locked);

    // The new process must still be there once our references are gone; then, with
    // --probation, stay alive and ready for that long.
    let t3 = Instant::now();
    let asker = match (&prober, &in_probation) {
        (Some(p), _) => Some(Asker::Url(p)),
        (None, Some(p)) => Some(Asker::Port(p)),
        (None, None) => None,
    };
    let watched = watch(&target, asker, opts.probation.unwrap_or_default());
    if let Some(p) = in_probation {
        p.take_out(&mut lock_all(&ports)?)?;
    }
    if let Err(why) = watched {
        tracing::warn!(pid = opts.pid, why, "rolling back");
        let mut restored = Vec::new();
        let mut moved_on = Vec::new();
        for s in &done {
            let mut state = State::open_locked(s.port)?;
            // Only while the set this promote wrote is still what serves: a rollback or
            // another promote since decided otherwise, and that stands.
            let snap = state.snapshot()?;
            if !sets::same_members(&snap.slots, &snap.live_set(), &s.written) {
                moved_on.push(s.port);
                continue;
            }
            restored.extend(restore(&mut state, &snap, &s.before, s.target.as_ref())?);
        }
        restored.sort_unstable();
        restored.dedup();
        return Err(rolled_back(&why, &restored, &moved_on));
    }
    let probation = t3.elapsed();

    let t4 = Instant::now();
    if let (true, Some(idle)) = (opts.stop_old, opts.stop_when_idle) {
        wait_idle(&done, idle, opts.drain_timeout)?;
    }
    failpoint(crate::Step::Stopping);
    // Under the locks again: PID must still be what serves (a rollback or another promote may
    // have switched during the probation), and only members that still serve no port are
    // stopped. The signals go under the locks, the wait for the exits without them.
    let states = lock_all(&ports)?;
    let mut serving: Vec<Process> = Vec::new();
    for (state, s) in states.iter().zip(&done) {
        let snap = state.snapshot()?;
        let (slots, live) = (&snap.slots, snap.live_set());
        let named = |x: &sets::Slot| live.contains(x.index) || live.is_canary(x.index);
        let me = Process {
            pid: opts.pid,
            start: target.start,
        };
        if !slots.iter().any(|x| named(x) && x.process() == me) {
            let now = sets::pids_where(slots, named);
            return Err(err(
                Kind::Refused,
                format!(
                    "pid {} is no longer {} on port {}: a rollback or another promote switched since (serving now: {}); nothing was stopped",
                    opts.pid,
                    if opts.weight.is_some() { "the canary" } else { "active" },
                    s.port,
                    if now.is_empty() {
                        "none".to_string()
                    } else {
                        format!("pid {now:?}")
                    }
                ),
            ));
        }
        serving.extend(slots.iter().filter(|x| named(x)).map(sets::Slot::process));
    }
    let mut to_stop: Vec<Process> = Vec::new();
    for s in &done {
        for p in &s.to_stop {
            if !to_stop.contains(p) && !serving.contains(p) {
                to_stop.push(*p);
            }
        }
    }
    let reports_base: Vec<_> = done
        .into_iter()
        .map(|s| (s.port, s.new, s.drained, s.switch, s.switched_at_ms))
        .collect();
    let stopped = if opts.stop_old {
        // A process the other attached ports still serve is their only version there, maybe:
        // stopping it would leave them to fallback (the previous version, hold, or hashing).
        let elsewhere = serving_elsewhere(&ports)?;
        let (kept, to_stop): (Vec<Process>, Vec<Process>) =
            to_stop.into_iter().partition(|p| elsewhere.contains(p));
        let mut signalled = signal_all(&to_stop);
        drop(states);
        signalled.2.extend(kept.iter().map(|p| Stopped {
            pid: p.pid,
            outcome: StopOutcome::ServesAnotherPort,
            after_ms: 0,
        }));
        wait_all(signalled, opts.drain_timeout)
    } else {
        Vec::new()
    };
    let stop_ms = ms(t4.elapsed());
    Ok(reports_base
        .into_iter()
        .map(
            |(port, new, drained, switch, switched_at_ms)| PromoteReport {
                port: port.number,
                protocol: port.proto,
                pid: opts.pid,
                slots: new,
                drained: drained.iter().map(|d| d.pid).collect(),
                stopped: stopped.clone(),
                validate_ms: ms(validate),
                readiness_ms: ms(readiness),
                switch_ms: ms(switch),
                switched_at_ms,
                probation_ms: ms(probation),
                stop_ms,
            },
        )
        .collect())
}

/// The switch on one port: take PID's sockets, check them against the group, insert them, and
/// make them the active set (or, with a weight, the canary) in one update.
fn switch_port(
    mut state: State,
    pid: i32,
    target: &PidFd,
    weight: Option<u32>,
) -> anyhow::Result<(State, Switched)> {
    let t = Instant::now();
    let port = state.spec.key();
    let listeners = sockets::fetch_listeners(target, &state.spec)?;
    // Again at the switch: PID may have bound more sockets since the validation.
    check_fits(&state, pid, &listeners)?;
    for l in &listeners {
        state.attach_to_group(&l.fd)?;
    }
    let new = state.insert(pid, target.start, &listeners, Role::Candidate)?;
    failpoint(crate::Step::Inserted);
    let snap = state.snapshot()?;
    let (before, rollback_target) = (snap.live_set(), snap.target);
    let plan = snap.promote(pid, &new, weight)?;
    // The rollback target (the set before this promote), the switch, then the roles.
    let switched_at_ms = state.apply_steps(&plan, failpoint)?;
    // Close our duplicates before anything else: from here on only the processes hold them, so
    // their close() really stops the listeners (and a dead process's listener really goes).
    drop(listeners);
    let switch = t.elapsed();
    tracing::info!(%port, pid, weight, switch_ms = ms(switch), "{}", crate::SWITCHED);
    if !plan.drained.is_empty() {
        let pids: Vec<i32> = plan.drained.iter().map(|d| d.pid).collect();
        tracing::info!(%port, ?pids, "drained");
    }
    Ok((
        state,
        Switched {
            port,
            written: plan.set,
            new,
            before,
            target: rollback_target,
            drained: plan.drained,
            to_stop: plan.to_stop,
            switched_at_ms,
            switch,
        },
    ))
}

/// Waits until PID listens on every spec of `specs` (see [`sockets::find_listeners`]) and
/// returns its listeners per spec. Fails at once when PID exits, binds something unusable, or
/// does not listen itself while a child of it does (a start script that does not exec).
fn wait_listening(
    target: &PidFd,
    specs: &[PortSpec],
    deadline: Instant,
    progress: &mut impl FnMut(Progress<'_>),
) -> anyhow::Result<Vec<Vec<Listener>>> {
    let pid = target.pid;
    let start = Instant::now();
    let mut next_child_check = start;
    let exited = |spec: &PortSpec| {
        err(
            Kind::ProcessDied,
            format!("pid {pid} exited before it listened on {spec}; nothing was changed"),
        )
    };
    loop {
        let mut found = Vec::new();
        let mut missing = None;
        // A read that met an fd in flux: reported if the process is still at it at the deadline.
        let mut changed: Option<anyhow::Error> = None;
        for spec in specs {
            match sockets::find_listeners(target, spec) {
                Ok(Some(l)) => found.push(l),
                Ok(None) => {
                    missing = Some(*spec);
                    break;
                }
                Err(_) if !target.alive() => return Err(exited(spec)),
                // The process is still setting its sockets up: it closed an fd while zdt read
                // it, and reused the number (FdChanged) or not (pidfd_getfd finds no fd there:
                // ProcessDied, though the process lives, as checked above). Go's
                // net.FileListener duplicates a passed socket and the app closes the passed fd.
                // Read again at the next poll.
                Err(e)
                    if e.downcast_ref::<sockets::FdChanged>().is_some()
                        || crate::error::kind_of(&e) == Kind::ProcessDied =>
                {
                    tracing::info!(pid, error = %e, "an fd changed while zdt read it");
                    changed = Some(e);
                    missing = Some(*spec);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let Some(spec) = missing else {
            if start.elapsed() > LISTEN_POLL {
                tracing::info!(pid, ms = ms(start.elapsed()), "listening");
            }
            return Ok(found);
        };
        drop(found);
        if Instant::now() >= next_child_check {
            next_child_check = Instant::now() + CHILD_CHECK;
            if let Some((child, comm)) = sockets::listening_descendant(pid, &spec) {
                return Err(bad_input(format!(
                    "pid {pid} does not listen on {spec}, its child pid {child} ({comm}) does: \
                     pass pid {child}, or start the service with `exec` so that it keeps the pid \
                     you pass; nothing was changed"
                )));
            }
        }
        if Instant::now() >= deadline {
            if let Some(e) = changed {
                return Err(e);
            }
            return Err(err(
                Kind::ReadinessTimeout,
                format!(
                    "{} after waiting {} for it (--timeout); nothing was changed",
                    sockets::not_listening(pid, &spec),
                    crate::addr::fmt_duration(start.elapsed())
                ),
            ));
        }
        if start.elapsed() < LISTEN_POLL {
            tracing::info!(pid, %spec, "waiting for the process to listen");
        }
        progress(Progress::Listening {
            elapsed: start.elapsed(),
            spec,
        });
        let left = deadline.saturating_duration_since(Instant::now());
        if target.wait_exit(LISTEN_POLL.min(left)) {
            return Err(exited(&spec));
        }
    }
}

/// Checks that PID's `listeners` can take the port over from its current sockets (members and
/// placeholders) without a loss, as [`Snapshot::fits`] decides; at most as many per family as
/// the program steers ([`sets::admit`]). Changes nothing.
fn check_fits(state: &State, pid: i32, listeners: &[Listener]) -> anyhow::Result<()> {
    sets::admit(
        &[pid],
        state.spec.port,
        listeners.iter().map(Listener::family),
    )?;
    let new: Vec<_> = listeners.iter().map(|l| l.listen(None)).collect();
    state.snapshot()?.fits(pid, &new, sockets::interface_name)
}

/// The states of `ports`, locked, in port order (so two multi-port promotes never wait on each
/// other).
fn lock_all(ports: &[Port]) -> anyhow::Result<Vec<State>> {
    ports.iter().map(|&p| State::open_locked(p)).collect()
}

/// `--probe`: PID's sockets go in as candidates and into the probe lists under the locks
/// (`states`); then the locks go while PATH is asked through the public port, so other commands
/// (a rollback, hold, status) do not wait on the app. A claim in ZDT_PROBES tells them the probe
/// lists are this zdt-ctl's while it lives (zdt-ctl's own marked connections reach them, nothing
/// else does). Returns the states locked again, the probe lists
/// still live on success (the switch replaces them), taken out on failure.
fn probe_through_port(
    mut states: Vec<State>,
    ports: &[Port],
    target: &PidFd,
    path: &str,
    timeout: Duration,
    check: &impl Fn() -> anyhow::Result<()>,
    progress: &mut impl FnMut(Duration, &readiness::Answer),
) -> anyhow::Result<Vec<State>> {
    // One prober at a time: the probe lists are one per family.
    for state in &states {
        if let Some(pid) = state.probe_claimant()? {
            return Err(err(
                Kind::Refused,
                format!(
                    "zdt-ctl pid {pid} is probing a candidate through port {} (promote --probe); \
                     wait for it to end; nothing was changed",
                    state.spec.port
                ),
            ));
        }
    }
    // The probe goes to the first port; the family of its wildcard is that of PID's sockets
    // on that port.
    let mut family_v4 = None;
    let mut news = Vec::new();
    for state in states.iter_mut() {
        let listeners = sockets::fetch_listeners(target, &state.spec)?;
        family_v4.get_or_insert(listeners.first().is_none_or(|l| l.local.is_ipv4()));
        sets::admit(
            &[target.pid],
            state.spec.port,
            listeners.iter().map(Listener::family),
        )?;
        for l in &listeners {
            state.attach_to_group(&l.fd)?;
        }
        news.push(state.insert(target.pid, target.start, &listeners, Role::Candidate)?);
    }
    let probing = start_probing(&mut states, &news, family_v4.unwrap_or(true), path)?;
    drop(states);
    let what = format!("{} (probed through the public port)", probing.what);
    let waited = readiness::wait_until(
        &what,
        timeout,
        check,
        |limit| probing.prober.probe(limit),
        |e, a| progress(e, a),
    );
    let mut states = lock_all(ports)?;
    if waited.is_err() {
        probing.take_out(&mut states)?;
    }
    drop(probing);
    waited.map(|_| states)
}

/// `--probe PATH` with a UDP port (promote's or the watcher's): bad input.
pub fn probe_on_udp(path: &str, udp: &Port) -> anyhow::Error {
    bad_input(format!(
        "--probe {path}: a probe is an HTTP request through the public port, and port {udp} is \
         UDP; check the new process's readiness with --readyz URL (or the watcher's \
         --readyz-path) on its TCP admin port; nothing was changed"
    ))
}

/// Err when `watch` has seen a newer process since it started this promote.
pub fn superseded(opts: &PromoteOptions) -> Option<anyhow::Error> {
    let newer = opts
        .superseded
        .as_ref()
        .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
    newer.then(|| {
        err(
            Kind::Refused,
            format!(
                "a newer process listens on the port: pid {} stays a candidate; nothing was \
                 changed",
                opts.pid
            ),
        )
    })
}

/// Takes every slot out of the live set's probe lists.
fn drop_probe(state: &mut State) -> anyhow::Result<()> {
    if let Some(mut live) = state.active_set()? {
        if live.probe.iter().any(|l| l.len > 0) {
            live.probe = [zdt_common::SlotList::EMPTY; 2];
            state.write_set(&live)?;
        }
    }
    Ok(())
}

/// The probe lists of a `--probe` promote (for its readiness wait, and for its probation),
/// with their claim in ZDT_PROBES and the prober whose marked connections reach them.
struct Probing {
    prober: readiness::PortProber,
    what: String,
    /// Per port, the probe lists written.
    written: Vec<[zdt_common::SlotList; 2]>,
    _claims: Vec<readiness::ProbeMark>,
}

impl Probing {
    /// Takes the probe lists out of the live sets of `states` (locked, in the order they were
    /// written), where they are still the ones written: a switch meanwhile (a rollback,
    /// another promote) replaced them with its own set, which stands.
    fn take_out(&self, states: &mut [State]) -> anyhow::Result<()> {
        for (state, probe) in states.iter_mut().zip(&self.written) {
            if let Some(mut live) = state.active_set()? {
                if live.probe == *probe {
                    live.probe = [zdt_common::SlotList::EMPTY; 2];
                    state.write_set(&live)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes the probe lists of each port (`states`, locked) to name PID's slots there (`news`),
/// and claims them: zdt-ctl's marked connections to PATH on the first port (its IPv4 or IPv6
/// address, `v4`) reach PID and no other process.
fn start_probing(
    states: &mut [State],
    news: &[Vec<u32>],
    v4: bool,
    path: &str,
) -> anyhow::Result<Probing> {
    let mut written = Vec::new();
    for (state, new) in states.iter_mut().zip(news) {
        let probing = state.snapshot()?.probe(new)?;
        state.write_set(&probing)?;
        written.push(probing.probe);
    }
    let claims = states
        .iter()
        .map(State::claim_probe)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let to = states[0].spec.reach(v4);
    Ok(Probing {
        prober: readiness::PortProber::new(to, path).marked(&states[0].dir),
        what: format!("{path} on {to}"),
        written,
        _claims: claims,
    })
}

/// After the switch of a `--probe` promote with `--probation`: the probe lists name PID's new
/// sockets again (the switch cleared them), so the probation asks PATH as the readiness wait
/// did.
fn probe_in_probation(
    states: &mut [State],
    done: &[Switched],
    path: &str,
) -> anyhow::Result<Probing> {
    let v4 = states[0]
        .snapshot()?
        .slots
        .iter()
        .any(|x| done[0].new.contains(&x.index) && x.meta.family == zdt_common::AF_INET);
    let news: Vec<Vec<u32>> = done.iter().map(|s| s.new.clone()).collect();
    start_probing(states, &news, v4, path)
}

/// How a probation asks the new process whether it is still ready: its readiness URL (which
/// it must still serve alone), or `--probe`'s path through the public port.
enum Asker<'a> {
    Url(&'a readiness::Prober),
    Port(&'a Probing),
}

/// Consecutive failed readiness answers that end a probation (one can be a blip).
const PROBATION_FAILURES: u32 = 2;

/// Checks the new process right after the switch and then for `probation`: alive (pidfd) and,
/// with a readiness URL or `--probe`, answering 200 there ([`Asker`]). Err(what happened)
/// ends it.
fn watch(target: &PidFd, asker: Option<Asker<'_>>, probation: Duration) -> Result<(), String> {
    let died = || format!("pid {} exited right after the switch", target.pid);
    if !target.alive() {
        return Err(died());
    }
    if probation.is_zero() {
        return Ok(());
    }
    let start = Instant::now();
    let mut failures = 0;
    let cache = sockets::OwnerCache::default();
    while start.elapsed() < probation {
        if target.wait_exit(readiness::POLL_INTERVAL) {
            return Err(format!(
                "pid {} exited {:.1}s into its probation",
                target.pid,
                start.elapsed().as_secs_f64()
            ));
        }
        if let Some(asker) = &asker {
            let limit = probation.saturating_sub(start.elapsed());
            let (answer, what) = match asker {
                Asker::Url(p) => (
                    match sockets::check_url_owner(target, &p.url, &p.addrs, Some(&cache)) {
                        Ok(()) => p.probe(limit),
                        Err(e) => readiness::Answer::Error(e.to_string()),
                    },
                    p.url.as_str(),
                ),
                Asker::Port(p) => (p.prober.probe(limit), p.what.as_str()),
            };
            match answer {
                readiness::Answer::Ready => failures = 0,
                answer => {
                    failures += 1;
                    if failures >= PROBATION_FAILURES {
                        return Err(format!(
                            "pid {} stopped being ready {:.1}s into its probation ({} answered: {answer})",
                            target.pid,
                            start.elapsed().as_secs_f64(),
                            what
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Makes the set that was live before the switch live again on one port (read as `snap`), as
/// far as its sockets still listen; returns the pids restored.
fn restore(
    state: &mut State,
    snap: &Snapshot,
    before: &ActiveSet,
    target: Option<&ActiveSet>,
) -> anyhow::Result<Vec<i32>> {
    let Some(plan) = snap.restore(before, target)? else {
        return Ok(Vec::new());
    };
    state.apply(&plan)?;
    Ok(plan.serving(&snap.slots))
}

fn rolled_back(why: &str, restored: &[i32], moved_on: &[Port]) -> anyhow::Error {
    if !moved_on.is_empty() {
        return err(
            Kind::RolledBack,
            format!(
                "{why}; a rollback or another promote switched port(s) {moved_on:?} since, so \
                 this promote restored nothing there{}; nothing was stopped",
                if restored.is_empty() {
                    String::new()
                } else {
                    format!(" (elsewhere it restored pid {restored:?})")
                }
            ),
        );
    }
    if restored.is_empty() {
        return err(
            Kind::RolledBack,
            format!(
                "{why}; the previous members no longer listen, so there was nothing to restore: \
                 new connections go to kernel hashing over the listeners that remain"
            ),
        );
    }
    let pids: Vec<String> = restored.iter().map(i32::to_string).collect();
    err(
        Kind::RolledBack,
        format!(
            "{why}; restored the previous active set (pid {}), nothing was stopped",
            pids.join(", ")
        ),
    )
}

/// Waits (without the locks) until no process that `done` is to stop owns a flow seen in the last
/// `idle` on its UDP ports, or `timeout` passed. A draining process keeps its flows until its
/// socket closes; an app that cuts them at SIGTERM loses none if it is signalled only then.
fn wait_idle(done: &[Switched], idle: Duration, timeout: Duration) -> anyhow::Result<()> {
    let recent = idle.as_secs_f64().ceil().max(1.0) as u32;
    let deadline = Instant::now() + timeout;
    for s in done.iter().filter(|s| s.port.proto == Proto::Udp) {
        let Some(state) = State::open_read(s.port)? else {
            continue;
        };
        loop {
            let slots = state.slots()?;
            let by_slot = state.flow_table(recent)?.unwrap_or_default().by_slot;
            let live: u64 = slots
                .iter()
                .filter(|x| s.to_stop.contains(&x.process()))
                .filter_map(|x| by_slot.get(&x.index))
                .map(|&(_, live)| live)
                .sum();
            if live == 0 || Instant::now() >= deadline {
                tracing::info!(port = %s.port, live, "flows idle, or the drain timeout passed");
                break;
            }
            // The flow table's clock counts whole seconds: a finer poll learns nothing more.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// The processes the live sets of the attached ports other than `ports` name (active or
/// canary), read without those ports' locks: a switch there meanwhile makes a process serve it
/// or not a moment later, and `--stop-old` errs on the side of not stopping.
fn serving_elsewhere(ports: &[Port]) -> anyhow::Result<Vec<Process>> {
    let mut out = Vec::new();
    for port in super::status::attached_ports()? {
        if ports.contains(&port) {
            continue;
        }
        let Some(state) = State::open_read(port)? else {
            continue;
        };
        // The maps alone say who serves: no read of the kernel's listeners or of /proc.
        let slots = state.slots()?;
        out.extend((slots.iter().filter(|x| x.active || x.canary)).map(sets::Slot::process));
    }
    Ok(out)
}

/// SIGTERM to each previous member (only if it is still the process that was promoted then):
/// the processes to wait for, and the outcomes of the others.
fn signal_all(pids: &[Process]) -> (Instant, Vec<PidFd>, Vec<Stopped>) {
    let mut waiting = Vec::new();
    let mut out = Vec::new();
    for &Process { pid, start } in pids {
        match PidFd::open(pid) {
            // Members are the app's processes only (never pid 1 nor zdt-ctl: see plan::member);
            // a state recorded by an older zdt-ctl may still name one, and it is not signalled.
            Ok(p) if sockets::refuse_non_app(&p).is_err() => out.push(Stopped {
                pid,
                outcome: StopOutcome::NotAService,
                after_ms: 0,
            }),
            Ok(p) if p.start == start && p.signal(rustix::process::Signal::TERM).is_ok() => {
                waiting.push(p)
            }
            _ => out.push(Stopped {
                pid,
                outcome: StopOutcome::Gone,
                after_ms: 0,
            }),
        }
    }
    (Instant::now(), waiting, out)
}

/// Waits for the signalled processes to exit, up to one shared deadline.
fn wait_all(
    (start, waiting, mut out): (Instant, Vec<PidFd>, Vec<Stopped>),
    timeout: Duration,
) -> Vec<Stopped> {
    for p in waiting {
        let left = timeout.saturating_sub(start.elapsed());
        let exited = p.wait_exit(left);
        out.push(Stopped {
            pid: p.pid,
            outcome: if exited {
                StopOutcome::Exited
            } else {
                StopOutcome::StillRunning
            },
            after_ms: start.elapsed().as_millis() as u64,
        });
        tracing::info!(pid = p.pid, exited, "stopped");
    }
    out
}
