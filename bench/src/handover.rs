//! The reset-count benchmark: zdt against a plain SO_REUSEPORT handover (and against the kernel's
//! own migration sysctl), with the same load, in the same run.
//!
//! Each cell (rate x close gap x connection mode) runs in a fresh network namespace, so the kernel
//! counters read there belong to that cell alone. Within a cell the arms are interleaved in
//! rounds (zdt, baseline, migrate-sysctl, zdt, ...), each under its own load phase, and the
//! counters are read around every phase.
//!
//! - **zdt**: the new process binds at start and warms up; `zdt-ctl promote --readyz
//!   --stop-old` switches to it, then SIGTERMs the old one. The next handover starts as soon as
//!   the switch is done, so the previous old process may still be in its close gap: several
//!   generations can be draining at once, which is harder for zdt, not easier.
//! - **baseline**: plain SO_REUSEPORT as practised today: the new process binds after warm-up,
//!   the old one gets SIGTERM, stops accepting, closes its listener after the gap G and exits.
//!   Each handover finishes (the old process exits) before the next starts: the baseline's best
//!   case.
//! - **migrate-sysctl**: the baseline with `net.ipv4.tcp_migrate_req=1` in the cell's namespace.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use nix::sys::signal::Signal;

use zdt_tests::{
    harness::{zdt_handover, zdt_ok, App, AppOpts, Pending},
    load::{self, Background, LoadSpec, Outcome, Sample, Tally},
    netns::{Counters, Netns},
};

const PORT: u16 = 8080;
/// Load before the first and after the last handover of a phase (steady state).
const SETTLE: Duration = Duration::from_millis(300);
/// A handover's window: from its start to this long after its old process closed its listener.
const WINDOW_SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Rate {
    /// Open loop at this many requests per second.
    Fixed(f64),
    /// Closed loop: `workers` clients, each sending its next request when the last is answered.
    Saturation,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sat" | "saturation" => Ok(Rate::Saturation),
            n => n
                .parse::<f64>()
                .ok()
                .filter(|r| *r > 0.0)
                .map(Rate::Fixed)
                .ok_or_else(|| format!("invalid rate {s:?}: a number of req/s, or `sat`")),
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::Fixed(r) => write!(f, "{r}/s"),
            Rate::Saturation => f.write_str("sat"),
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A new TCP connection per request (the hard case for the accept path).
    NewConn,
    /// HTTP/1.1 keep-alive connections.
    KeepAlive,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    Zdt,
    Baseline,
    MigrateSysctl,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Zdt => "zdt",
            Arm::Baseline => "baseline",
            Arm::MigrateSysctl => "migrate-sysctl",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub rates: Vec<Rate>,
    pub gaps: Vec<Duration>,
    pub modes: Vec<Mode>,
    /// Handovers per zdt cell (spread over `rounds`).
    pub zdt_handovers: usize,
    /// Handovers per baseline and per migrate-sysctl cell.
    pub other_handovers: usize,
    pub rounds: usize,
    /// Warm-up of every new process.
    pub warmup: Duration,
    /// Clients of the closed loop, and connections of the keep-alive open loop.
    pub workers: usize,
    /// Length of each throughput run (zdt attached vs no program), and how many of each.
    pub perf_run: Duration,
    pub perf_rounds: usize,
}

impl Config {
    /// The full benchmark (`cargo xtask bench`): every cell, >= 300 handovers per zdt cell.
    pub fn full() -> Self {
        Config {
            rates: vec![Rate::Fixed(100.0), Rate::Fixed(1000.0), Rate::Saturation],
            gaps: vec![
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(1000),
            ],
            modes: vec![Mode::NewConn, Mode::KeepAlive],
            zdt_handovers: 300,
            other_handovers: 50,
            rounds: 10,
            warmup: Duration::from_millis(150),
            workers: 16,
            perf_run: Duration::from_secs(3),
            perf_rounds: 3,
        }
    }
}

/// Latency summary of a set of requests (milliseconds).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// A latency histogram in microseconds. Explicit bounds, 1 us to 60 s: a histogram made with
/// `new(3)` starts with a tiny range, and saturating_record clamps to that range rather than
/// growing it.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// zdt's own global counters over the zdt phases of a cell.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Program {
    pub steered: u64,
    pub migrated: u64,
    pub passthrough: u64,
    pub fallback: u64,
    pub migrate_no_target: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ArmResult {
    pub arm: Arm,
    pub handovers: usize,
    pub tally: Tally,
    pub failures: u64,
    /// Rule of three: with 0 failures in n requests, the failure rate is below 3/n with 95 %
    /// confidence.
    pub failure_rate_upper95: Option<f64>,
    pub steady: Latency,
    pub handover: Latency,
    pub kernel: Counters,
    /// The RSTs the client caused or saw (reset + refused + retried keep-alive requests: each
    /// was written to a connection the server had closed, which the kernel answers with a RST)
    /// against the RSTs the kernel sent (Tcp OutRsts).
    pub client_rsts: u64,
    pub rsts_agree: bool,
    /// zdt arm only: the program's counters, and the connections the client opened.
    pub program: Option<Program>,
    pub client_connections: u64,
    /// zdt arm only: promote's own timing (command start to the completed switch), and the time
    /// from the switch to the last connection the old process accepted.
    pub promote_to_switch_ms: Vec<f64>,
    pub switch_to_last_accept_ms: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CellResult {
    pub rate: Rate,
    pub gap_ms: u64,
    pub mode: Mode,
    pub arms: Vec<ArmResult>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Perf {
    /// Saturated new connections per second, zdt attached and promoted, per run.
    pub zdt_conn_per_s: Vec<f64>,
    /// The same with no program on the group, per run (interleaved with the above).
    pub none_conn_per_s: Vec<f64>,
    pub ratio: f64,
    /// Kernel run-time stats of the program during the zdt runs.
    pub bpf_runs: u64,
    pub bpf_ns_per_run: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub machine: String,
    pub kernel: String,
    pub config: Config,
    pub cells: Vec<CellResult>,
    pub perf: Perf,
    pub seconds: f64,
}

/// Accumulates one arm of one cell over its phases.
struct ArmAcc {
    arm: Arm,
    handovers: usize,
    samples: Vec<Sample>,
    windows: Vec<(Instant, Instant)>,
    kernel: Counters,
    program: Program,
    promote_to_switch_ms: Vec<f64>,
    switch_to_last_accept_ms: Vec<f64>,
}

impl ArmAcc {
    fn new(arm: Arm) -> Self {
        ArmAcc {
            arm,
            handovers: 0,
            samples: Vec::new(),
            windows: Vec::new(),
            kernel: Counters::default(),
            program: Program::default(),
            promote_to_switch_ms: Vec::new(),
            switch_to_last_accept_ms: Vec::new(),
        }
    }

    fn finish(self, mode: Mode) -> ArmResult {
        let tally = load::tally(&self.samples);
        let (mut steady, mut handover) = (histogram(), histogram());
        for s in &self.samples {
            let us = s.latency.as_micros() as u64;
            let in_window = self.windows.iter().any(|(a, b)| s.at >= *a && s.at <= *b);
            let h = if in_window {
                &mut handover
            } else {
                &mut steady
            };
            h.saturating_record(us.max(1));
        }
        let failures = tally.failures();
        let client_rsts =
            tally.count(Outcome::Reset) + tally.count(Outcome::Refused) + tally.retried;
        let client_connections = match mode {
            Mode::NewConn => tally.requests,
            // Keep-alive: not one connection per request; not compared.
            Mode::KeepAlive => 0,
        };
        ArmResult {
            arm: self.arm,
            handovers: self.handovers,
            failures,
            failure_rate_upper95: (failures == 0 && tally.requests > 0)
                .then(|| 3.0 / tally.requests as f64),
            steady: Latency::of(&steady),
            handover: Latency::of(&handover),
            rsts_agree: client_rsts == self.kernel.out_rsts,
            client_rsts,
            kernel: self.kernel,
            program: (self.arm == Arm::Zdt).then_some(self.program),
            client_connections,
            promote_to_switch_ms: self.promote_to_switch_ms,
            switch_to_last_accept_ms: self.switch_to_last_accept_ms,
            tally,
        }
    }
}

fn load_spec(rate: Rate, mode: Mode, workers: usize) -> LoadSpec {
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    let mut spec = LoadSpec::open(addr, 1.0, Duration::from_secs(3600));
    // A fixed rate is lowered on a slower machine as every open-loop load is (load::open_rate):
    // a guest under emulation serves about 300 connections/s, and 500/s would bury every arm in
    // its own backlog (answers after 10 s and more, connections the apps close unanswered).
    spec.rate = match rate {
        Rate::Fixed(r) => Some(load::open_rate(r)),
        Rate::Saturation => None,
    };
    spec.workers = workers;
    spec.keepalive = mode == Mode::KeepAlive;
    spec.max_requests = u64::MAX;
    spec
}

fn set_migrate_sysctl(ns: &Netns, on: bool) -> anyhow::Result<()> {
    // /proc/sys/net is per network namespace: this changes the benchmark's namespace only.
    ns.run(move || {
        std::fs::write(
            "/proc/sys/net/ipv4/tcp_migrate_req",
            if on { "1" } else { "0" },
        )
    })?
    .context("writing net.ipv4.tcp_migrate_req in the benchmark's namespace")
}

/// Reaps background promotes; records their timing. A promote that failed fails the run:
/// a benchmark whose deploys did not happen measures nothing.
fn reap(pending: Vec<Pending>, acc: &mut ArmAcc) -> anyhow::Result<()> {
    for p in pending {
        let (r, old_lines) = p.finish()?;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        acc.promote_to_switch_ms
            .push(f("validate_ms") + f("readiness_ms") + f("switch_ms"));
        if let Some(last) = old_lines
            .iter()
            .find_map(|l| l.strip_prefix("last_accept_ms=")?.parse::<f64>().ok())
        {
            acc.switch_to_last_accept_ms
                .push(last - f("switched_at_ms"));
        }
    }
    Ok(())
}

fn app_opts(version: usize, warmup: Duration, gap: Duration, bind_at_start: bool) -> AppOpts {
    let o = AppOpts::new(PORT, &format!("g{version}"))
        .warmup(warmup)
        .close_gap(gap);
    if bind_at_start {
        o
    } else {
        o.bind_after_warmup()
    }
}

/// One phase: `n` handovers of one arm under load. Returns the process serving at the end.
#[allow(clippy::too_many_arguments)]
fn phase(
    ns: &Netns,
    cfg: &Config,
    rate: Rate,
    mode: Mode,
    gap: Duration,
    n: usize,
    mut current: App,
    generation: &mut usize,
    acc: &mut ArmAcc,
) -> anyhow::Result<App> {
    let arm = acc.arm;
    match arm {
        Arm::Zdt => {
            zdt_ok(ns, &["attach", &format!(":{PORT}")])?;
        }
        Arm::MigrateSysctl => set_migrate_sysctl(ns, true)?,
        Arm::Baseline => {}
    }
    let before = Counters::read(ns)?;
    let load = Background::start(ns, load_spec(rate, mode, cfg.workers));
    std::thread::sleep(SETTLE);
    let mut pending = Vec::new();
    for _ in 0..n {
        *generation += 1;
        let start = Instant::now();
        let window_end = start + cfg.warmup + gap + WINDOW_SLACK;
        acc.windows.push((start, window_end));
        current = match arm {
            Arm::Zdt => {
                let new = App::start(ns, &app_opts(*generation, cfg.warmup, gap, true))?;
                pending.push(zdt_handover(ns, &new, current, gap)?);
                new
            }
            Arm::Baseline | Arm::MigrateSysctl => {
                let mut new = App::start(ns, &app_opts(*generation, cfg.warmup, gap, false))?;
                new.wait_line("bound=", cfg.warmup + Duration::from_secs(10))?;
                current.signal(Signal::SIGTERM);
                anyhow::ensure!(
                    current.wait_exit(gap + Duration::from_secs(15)),
                    "old process did not exit"
                );
                new
            }
        };
        acc.handovers += 1;
    }
    reap(pending, acc)?;
    std::thread::sleep(SETTLE);
    acc.samples.extend(load.finish());
    let after = Counters::read(ns)?;
    acc.kernel.add_delta(&after, &before);
    match arm {
        Arm::Zdt => {
            // Read the program's counters directly: `zdt-ctl status` would add its own probe
            // connection to them.
            let g = ns.run(|| {
                zdt_ctl::state::State::open_read(PORT.into())?
                    .context("zdt state vanished")?
                    .global_counters()
            })??;
            acc.program.steered += g.steered;
            acc.program.migrated += g.migrated;
            acc.program.passthrough += g.passthrough;
            acc.program.fallback += g.fallback;
            acc.program.migrate_no_target += g.migrate_no_target;
            zdt_ok(ns, &["detach", &format!(":{PORT}")])?;
        }
        Arm::MigrateSysctl => set_migrate_sysctl(ns, false)?,
        Arm::Baseline => {}
    }
    Ok(current)
}

/// One cell: a fresh namespace, the arms interleaved in rounds.
pub fn cell(cfg: &Config, rate: Rate, gap: Duration, mode: Mode) -> anyhow::Result<CellResult> {
    let ns = Netns::new()?;
    let mut generation = 0;
    let mut current = App::start(&ns, &app_opts(0, Duration::ZERO, gap, true))?;
    let mut accs = [
        ArmAcc::new(Arm::Zdt),
        ArmAcc::new(Arm::Baseline),
        ArmAcc::new(Arm::MigrateSysctl),
    ];
    let rounds = cfg.rounds.max(1);
    for round in 0..rounds {
        for acc in accs.iter_mut() {
            let total = if acc.arm == Arm::Zdt {
                cfg.zdt_handovers
            } else {
                cfg.other_handovers
            };
            // Spread `total` over the rounds (the first rounds take the remainder).
            let n = total / rounds + usize::from(round < total % rounds);
            if n == 0 {
                continue;
            }
            current = phase(&ns, cfg, rate, mode, gap, n, current, &mut generation, acc)?;
        }
    }
    drop(current);
    Ok(CellResult {
        rate,
        gap_ms: gap.as_millis() as u64,
        mode,
        arms: accs.into_iter().map(|a| a.finish(mode)).collect(),
    })
}

/// Saturated new connections per second with the program attached vs none, interleaved, and
/// the program's run time per selection from the kernel's BPF stats.
pub fn perf(cfg: &Config) -> anyhow::Result<Perf> {
    let ns = Netns::new()?;
    let _app = App::start(&ns, &AppOpts::new(PORT, "perf"))?;
    let spec = {
        let mut s = load_spec(Rate::Saturation, Mode::NewConn, cfg.workers);
        s.duration = cfg.perf_run;
        s
    };
    let measure = |spec: &LoadSpec| -> anyhow::Result<f64> {
        let secs = spec.duration.as_secs_f64();
        let spec = spec.clone();
        let samples = ns.run(move || {
            let mut out = Vec::new();
            load::run(&spec, &Default::default(), &mut |s| out.push(s));
            out
        })?;
        let t = load::tally(&samples);
        Ok(t.count(Outcome::Ok) as f64 / secs)
    };
    let (mut zdt, mut none) = (Vec::new(), Vec::new());
    let (mut runs, mut time) = (0u64, Duration::ZERO);
    for _ in 0..cfg.perf_rounds.max(1) {
        none.push(measure(&spec)?);
        zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
        let (rate, r, t) = with_program_stats(&ns, PORT, || measure(&spec))?;
        zdt.push(rate);
        runs += r;
        time += t;
        zdt_ok(&ns, &["detach", &format!(":{PORT}")])?;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(Perf {
        ratio: mean(&zdt) / mean(&none),
        zdt_conn_per_s: zdt,
        none_conn_per_s: none,
        bpf_runs: runs,
        bpf_ns_per_run: ns_per_run(runs, time),
    })
}

/// Mean run time of `runs` runs that took `time` in all, ns (0 without runs).
pub(crate) fn ns_per_run(runs: u64, time: Duration) -> f64 {
    if runs > 0 {
        time.as_nanos() as f64 / runs as f64
    } else {
        0.0
    }
}

/// Runs `f` with the kernel's BPF run-time stats on, and returns what it returned with the runs
/// of `port`'s program meanwhile and their total run time.
pub(crate) fn with_program_stats<T>(
    ns: &Netns,
    port: impl Into<zdt_ctl::addr::Port>,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64, Duration)> {
    let port = port.into();
    with_stats(
        || {
            ns.run(move || {
                zdt_ctl::state::State::open_read(port)?
                    .context("not attached")?
                    .program_stats()
            })?
        },
        f,
    )
}

/// Runs `f` with the kernel's BPF run-time stats on, and returns what it returned with the
/// growth of `stats` (a program's runs and total run time) meanwhile.
pub(crate) fn with_stats<T>(
    stats: impl Fn() -> anyhow::Result<(u64, Duration)>,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64, Duration)> {
    // Run-time stats are on only while this fd is open (the same switch as
    // kernel.bpf_stats_enabled); dropping it restores the previous state.
    let enabled =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let (r0, t0) = stats()?;
    let out = f()?;
    let (r1, t1) = stats()?;
    drop(enabled);
    Ok((out, r1 - r0, t1 - t0))
}

pub(crate) fn machine() -> (String, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    (format!("{cores} x {cpu}"), kernel)
}

/// Runs every cell and the performance comparison; prints progress and the table.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    let t = Instant::now();
    let (machine, kernel) = machine();
    let mut cells = Vec::new();
    for &mode in &cfg.modes {
        for &rate in &cfg.rates {
            for &gap in &cfg.gaps {
                eprintln!(
                    "bench: cell {rate} G={}ms {mode:?} ({:.0}s so far)",
                    gap.as_millis(),
                    t.elapsed().as_secs_f64()
                );
                cells.push(cell(cfg, rate, gap, mode)?);
            }
        }
    }
    eprintln!("bench: throughput, program vs none");
    let perf = perf(cfg)?;
    Ok(Report {
        machine,
        kernel,
        config: cfg.clone(),
        cells,
        perf,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The results table (also the README's), in Markdown.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "Machine: {}, kernel {}. Warm-up {} ms per new process; {} clients at saturation. \
         {} handovers per zdt cell, {} per baseline and migrate-sysctl cell, arms interleaved \
         in {} rounds. Run time {:.0} min.\n\n",
        r.machine,
        r.kernel,
        r.config.warmup.as_millis(),
        r.config.workers,
        r.config.zdt_handovers,
        r.config.other_handovers,
        r.config.rounds,
        r.seconds / 60.0
    );
    s += "| mode | rate | G | arm | handovers | requests | failed | reset | refused | eof | timeout | 5xx | slow | 95% bound | p99 steady | p50 | p99 | p99.9 | max (ms, handover windows) | retried | kernel RSTs / client | migrated |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for c in &r.cells {
        for a in &c.arms {
            let t = &a.tally;
            let mode = match c.mode {
                Mode::NewConn => "new conn",
                Mode::KeepAlive => "keep-alive",
            };
            let bound = a.failure_rate_upper95.map_or("-".to_string(), fmt_rate);
            let migrated = match a.arm {
                Arm::Zdt => a.program.map_or(0, |p| p.migrated),
                _ => a.kernel.migrate_req_success,
            };
            s += &format!(
                "| {mode} | {} | {} ms | {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {bound} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} / {}{} | {migrated} |\n",
                c.rate,
                c.gap_ms,
                a.arm.name(),
                a.handovers,
                t.requests,
                a.failures,
                t.count(Outcome::Reset),
                t.count(Outcome::Refused),
                t.count(Outcome::Eof),
                t.count(Outcome::Timeout),
                t.count(Outcome::Http5xx),
                t.count(Outcome::Slow),
                a.steady.p99_ms,
                a.handover.p50_ms,
                a.handover.p99_ms,
                a.handover.p999_ms,
                a.handover.max_ms,
                t.retried,
                a.kernel.out_rsts,
                a.client_rsts,
                if a.rsts_agree { "" } else { " (differ)" },
            );
        }
    }
    s += &verdicts(r);
    let p = &r.perf;
    s += &format!(
        "\nThroughput at saturation, new connection per request, same run, interleaved: \
         {:.0} conn/s with zdt's program vs {:.0} conn/s with no program: ratio **{:.3}**. \
         Program run time {:.0} ns per selection over {} runs (kernel BPF stats).\n",
        p.zdt_conn_per_s.iter().sum::<f64>() / p.zdt_conn_per_s.len().max(1) as f64,
        p.none_conn_per_s.iter().sum::<f64>() / p.none_conn_per_s.len().max(1) as f64,
        p.ratio,
        p.bpf_ns_per_run,
        p.bpf_runs
    );
    let all: Vec<f64> = r
        .cells
        .iter()
        .flat_map(|c| c.arms.iter())
        .flat_map(|a| a.promote_to_switch_ms.iter().copied())
        .collect();
    let last: Vec<f64> = r
        .cells
        .iter()
        .flat_map(|c| c.arms.iter())
        .flat_map(|a| a.switch_to_last_accept_ms.iter().copied())
        .collect();
    s += &format!(
        "Promote, command start to completed switch (includes the wait for /readyz, warm-up {} ms): \
         median {:.0} ms, max {:.0} ms over {} promotes. Switch to the old process's last accept(): \
         median {:.0} ms, max {:.0} ms.\n",
        r.config.warmup.as_millis(),
        quantile(&all, 0.5),
        quantile(&all, 1.0),
        all.len(),
        quantile(&last, 0.5),
        quantile(&last, 1.0),
    );
    s
}

/// A failure rate bound, readable at any size ("< 0.0379 %", "< 1.3e-7").
pub(crate) fn fmt_rate(rate: f64) -> String {
    if rate * 100.0 >= 0.0001 {
        format!("< {:.4} %", rate * 100.0)
    } else {
        format!("< {rate:.1e}")
    }
}

/// The claims, checked against this run, in words.
fn verdicts(r: &Report) -> String {
    let arms = |arm: Arm| {
        r.cells.iter().flat_map(move |c| {
            c.arms
                .iter()
                .filter(move |a| a.arm == arm)
                .map(move |a| (c, a))
        })
    };
    let zdt_fail: u64 = arms(Arm::Zdt).map(|(_, a)| a.failures).sum();
    let zdt_req: u64 = arms(Arm::Zdt).map(|(_, a)| a.tally.requests).sum();
    let zdt_handovers: usize = arms(Arm::Zdt).map(|(_, a)| a.handovers).sum();
    let min_handovers = arms(Arm::Zdt).map(|(_, a)| a.handovers).min().unwrap_or(0);
    let base_fail: u64 = arms(Arm::Baseline).map(|(_, a)| a.failures).sum();
    let quiet: Vec<String> = arms(Arm::Baseline)
        .filter(|(_, a)| a.failures == 0)
        .map(|(c, _)| {
            format!(
                "{} {} G={} ms",
                match c.mode {
                    Mode::NewConn => "new conn",
                    Mode::KeepAlive => "keep-alive",
                },
                c.rate,
                c.gap_ms
            )
        })
        .collect();
    let disagree: Vec<String> = r
        .cells
        .iter()
        .flat_map(|c| {
            c.arms.iter().filter(|a| !a.rsts_agree).map(move |a| {
                format!(
                    "{} {} G={} ms {}",
                    match c.mode {
                        Mode::NewConn => "new conn",
                        Mode::KeepAlive => "keep-alive",
                    },
                    c.rate,
                    c.gap_ms,
                    a.arm.name()
                )
            })
        })
        .collect();
    let mut s = String::new();
    s += &format!(
        "\n**zdt: {zdt_fail} failed requests of {zdt_req}, over {zdt_handovers} handovers** (at least {min_handovers} per cell){}. \
         Baseline: {base_fail} failed requests in the same run.\n",
        if zdt_fail == 0 && zdt_req > 0 {
            format!(
                "; 95 % upper bound on the failure rate {} (3/n)",
                fmt_rate(3.0 / zdt_req as f64)
            ) } else { String::new() }
    );
    if quiet.is_empty() {
        s += "Every baseline cell lost requests.\n";
    } else {
        s += &format!(
            "Baseline cells with no failed request, which stressed nothing: {}.\n",
            quiet.join("; ")
        );
    }
    if disagree.is_empty() {
        s += "In every cell and arm the kernel's RST count equals the client's.\n";
    } else {
        s += &format!(
            "Kernel and client RST counts differ in: {}.\n",
            disagree.join("; ")
        );
    }
    s += &format!(
        "Throughput ratio zdt / no program {:.3}: {} the 0.97 bar.\n",
        r.perf.ratio,
        if r.perf.ratio >= 0.97 {
            "meets"
        } else {
            "misses"
        }
    );
    s
}

fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A bar chart of failed requests per arm and cell, and of the p99 latency in handover windows.
pub fn svg(r: &Report) -> String {
    let arms = [Arm::Zdt, Arm::Baseline, Arm::MigrateSysctl];
    let colors = ["#2a9d8f", "#e76f51", "#e9c46a"];
    let n = r.cells.len().max(1);
    let (w, h, top, left, band) = (40 + n * 60, 640, 40, 60, 180.0);
    let max_fail = r
        .cells
        .iter()
        .flat_map(|c| c.arms.iter().map(|a| a.failures))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let max_p99 = r
        .cells
        .iter()
        .flat_map(|c| c.arms.iter().map(|a| a.handover.p99_ms))
        .fold(1.0f64, f64::max);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{h}' font-family='sans-serif' font-size='11'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='{left}' y='20' font-size='14'>failed requests per cell (top, log scale) and p99 latency in handover windows (bottom)</text>\n",
        w + left
    );
    let log = |v: f64| (1.0 + v).ln() / (1.0 + max_fail).ln();
    for (i, c) in r.cells.iter().enumerate() {
        let x0 = left + i * 60;
        for (j, arm) in arms.iter().enumerate() {
            let Some(a) = c.arms.iter().find(|a| a.arm == *arm) else {
                continue;
            };
            let x = x0 + j * 16;
            let fh = log(a.failures as f64) * band;
            let ph = a.handover.p99_ms / max_p99 * band;
            s += &format!(
                "<rect x='{x}' y='{:.1}' width='14' height='{fh:.1}' fill='{}'><title>{} {}: {} failed</title></rect>\n",
                top as f64 + band - fh,
                colors[j],
                arm.name(),
                c.rate,
                a.failures
            );
            s += &format!(
                "<rect x='{x}' y='{:.1}' width='14' height='{ph:.1}' fill='{}'><title>{} p99 {:.2} ms</title></rect>\n",
                top as f64 + 2.0 * band + 60.0 - ph,
                colors[j],
                arm.name(),
                a.handover.p99_ms
            );
            if *arm == Arm::Zdt && a.failures == 0 {
                s += &format!(
                    "<text x='{x}' y='{}' fill='{}'>0</text>\n",
                    top as f64 + band - 2.0,
                    colors[j]
                );
            }
        }
        let label = format!(
            "{} {}ms {}",
            c.rate,
            c.gap_ms,
            if c.mode == Mode::NewConn { "nc" } else { "ka" }
        );
        s += &format!(
            "<text x='{x0}' y='{}' transform='rotate(40 {x0} {})'>{label}</text>\n",
            top as f64 + 2.0 * band + 75.0,
            top as f64 + 2.0 * band + 75.0
        );
    }
    s += &format!(
        "<text x='4' y='{}'>{max_fail:.0}</text><text x='4' y='{}'>{max_p99:.1} ms</text>\n",
        top + 10,
        top as f64 + band + 70.0
    );
    for (j, arm) in arms.iter().enumerate() {
        s += &format!(
            "<rect x='{}' y='{}' width='10' height='10' fill='{}'/><text x='{}' y='{}'>{}</text>\n",
            left + j * 130,
            h - 16,
            colors[j],
            left + j * 130 + 14,
            h - 7,
            arm.name()
        );
    }
    s += "</svg>\n";
    s
}

/// Writes bench.json, bench.svg and RESULTS.md into `dir`.
pub fn write(r: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("bench.svg"), svg(r))?;
    std::fs::write(dir.join("RESULTS.md"), markdown(r))?;
    Ok(())
}

/// Failures per arm over all cells of a report.
pub fn failures_by_arm(r: &Report) -> BTreeMap<Arm, u64> {
    let mut m = BTreeMap::new();
    for a in r.cells.iter().flat_map(|c| c.arms.iter()) {
        *m.entry(a.arm).or_default() += a.failures;
    }
    m
}
