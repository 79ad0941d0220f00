//! The cold-restart benchmark: a stop-then-start restart (no overlap: the old process exits
//! before the new one starts, which then warms up) under a steady load of new connections, four
//! ways, in the same run:
//!
//! - **plain restart**: the app binds its own SO_REUSEPORT socket at start and answers 503
//!   while it warms up (as the demo app, and most apps, do). Nothing listens between the two
//!   processes.
//! - **socket activation**: a supervisor keeps one listener open across restarts and hands it
//!   to each process the systemd way (fd 3, LISTEN_FDS=1). The app accepts at start, so it
//!   answers 503 while it warms up.
//! - **socket activation, accept after warm-up**: the same, with an app that accepts only once
//!   warm. The best case of socket activation; it needs an app written for it.
//! - **zdt hold**: the app binds its own socket at start, unchanged; `zdt-ctl hold` keeps a
//!   placeholder in the group; the new process is promoted once its /readyz says 200.
//!
//! Arms are interleaved in rounds, each round of each arm in a fresh network namespace.
use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use zdt_tests::{
    harness::{promote_args, strs, zdt_ok, App, AppOpts, Hold},
    load::{self, Background, LoadSpec, Outcome, Tally},
    netns::{Counters, Netns},
};

use crate::handover::{fmt_rate, histogram, machine, Latency};

const PORT: u16 = 8080;
/// Load before the first restart and after each new process is ready.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ColdArm {
    Plain,
    Activation,
    ActivationDeferred,
    Hold,
}

impl ColdArm {
    pub const ALL: [ColdArm; 4] = [
        ColdArm::Plain,
        ColdArm::Activation,
        ColdArm::ActivationDeferred,
        ColdArm::Hold,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ColdArm::Plain => "plain restart",
            ColdArm::Activation => "socket activation",
            ColdArm::ActivationDeferred => "socket activation, accept after warm-up",
            ColdArm::Hold => "zdt hold",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ColdConfig {
    /// Restarts per arm, spread over `rounds`.
    pub restarts: usize,
    pub rounds: usize,
    /// New connections per second (open loop), one request each.
    pub rate: f64,
    /// Warm-up of each new process (/readyz 503, `/` 503 if it accepts).
    pub warmup: Duration,
    /// From the old process's exit to the new one's start (a service manager's restart delay).
    pub down: Duration,
}

impl ColdConfig {
    pub fn full() -> Self {
        ColdConfig {
            restarts: 40,
            rounds: 4,
            rate: 500.0,
            warmup: Duration::from_secs(1),
            down: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ColdArmResult {
    pub arm: ColdArm,
    pub restarts: usize,
    pub tally: Tally,
    pub failures: u64,
    /// Answered 200 after waiting a second or more (Outcome::Slow): the price of not failing.
    pub waited: u64,
    pub failure_rate_upper95: Option<f64>,
    /// Every request that got a 200 (timely or not).
    pub answered: Latency,
    pub kernel: Counters,
    /// zdt hold only: the program's selections of the placeholder.
    pub held: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ColdReport {
    pub machine: String,
    pub kernel: String,
    pub config: ColdConfig,
    pub arms: Vec<ColdArmResult>,
    pub seconds: f64,
}

/// The listener a socket-activating supervisor keeps across restarts (no SO_REUSEPORT: it is the
/// only one).
fn supervisor_listener(ns: &Netns) -> anyhow::Result<OwnedFd> {
    ns.run(|| -> anyhow::Result<OwnedFd> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], PORT)).into())?;
        s.listen(4096)?;
        Ok(s.into())
    })?
}

/// One round of one arm: `n` restarts under load, in a fresh namespace.
fn round(cfg: &ColdConfig, arm: ColdArm, n: usize, acc: &mut Acc) -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let activation = match arm {
        ColdArm::Activation | ColdArm::ActivationDeferred => Some(supervisor_listener(&ns)?),
        _ => None,
    };
    let _hold = match arm {
        ColdArm::Hold => {
            zdt_ok(&ns, &["attach", ":8080"])?;
            Some(Hold::start(&ns, &["0.0.0.0:8080"])?)
        }
        _ => None,
    };
    let opts = |version: usize| {
        let mut o = AppOpts::new(PORT, &format!("g{version}"))
            .warmup(cfg.warmup)
            .close_gap(Duration::ZERO);
        if let Some(fd) = &activation {
            o = o.inherit(fd.as_raw_fd());
        }
        if arm == ColdArm::ActivationDeferred {
            o = o.bind_after_warmup();
        }
        o
    };
    let ready = |app: &App| -> anyhow::Result<()> {
        if arm == ColdArm::Hold {
            zdt_ok(&ns, &strs(&promote_args(app, &[])))?;
            Ok(())
        } else {
            app.wait_ready()
        }
    };
    let mut serving = App::start(&ns, &opts(0))?;
    ready(&serving)?;
    let before = Counters::read(&ns)?;
    let mut spec = LoadSpec::open(
        ([127, 0, 0, 1], PORT).into(),
        cfg.rate,
        Duration::from_secs(3600),
    );
    // A request may wait for a whole restart: allow it, so that waiting shows as slow, not as
    // a timeout.
    spec.request_timeout = Duration::from_secs(10);
    let load = Background::start(&ns, spec);
    std::thread::sleep(SETTLE);
    for i in 1..=n {
        if arm == ColdArm::Hold {
            serving.stop_behind_hold(&ns, Duration::from_secs(10))?;
        } else {
            serving.signal(Signal::SIGTERM);
            anyhow::ensure!(
                serving.wait_exit(Duration::from_secs(10)),
                "{}: g{} did not exit",
                arm.name(),
                i - 1
            );
        }
        std::thread::sleep(cfg.down);
        serving = App::start(&ns, &opts(i))?;
        ready(&serving)?;
        std::thread::sleep(SETTLE);
    }
    acc.samples.extend(load.finish());
    acc.kernel.add_delta(&Counters::read(&ns)?, &before);
    acc.restarts += n;
    if arm == ColdArm::Hold {
        let st = zdt_tests::harness::status(&ns, PORT)?;
        *acc.held.get_or_insert(0) += st["counters"]["held"].as_u64().unwrap_or(0);
    }
    Ok(())
}

#[derive(Default)]
struct Acc {
    restarts: usize,
    samples: Vec<load::Sample>,
    kernel: Counters,
    held: Option<u64>,
}

impl Acc {
    fn finish(self, arm: ColdArm) -> ColdArmResult {
        let tally = load::tally(&self.samples);
        let mut answered = histogram();
        for s in self
            .samples
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Ok | Outcome::Slow))
        {
            answered.saturating_record((s.latency.as_micros() as u64).max(1));
        }
        let failures = tally.failures() - tally.count(Outcome::Slow);
        ColdArmResult {
            arm,
            restarts: self.restarts,
            failures,
            waited: tally.count(Outcome::Slow),
            failure_rate_upper95: (failures == 0 && tally.requests > 0)
                .then(|| 3.0 / tally.requests as f64),
            answered: Latency::of(&answered),
            kernel: self.kernel,
            held: self.held,
            tally,
        }
    }
}

/// Runs every arm, interleaved in rounds.
pub fn run(cfg: &ColdConfig) -> anyhow::Result<ColdReport> {
    let t = Instant::now();
    let (machine, kernel) = machine();
    let mut accs: Vec<Acc> = ColdArm::ALL.iter().map(|_| Acc::default()).collect();
    let rounds = cfg.rounds.max(1);
    for r in 0..rounds {
        // Spread the restarts evenly; the first rounds take the remainder.
        let n = cfg.restarts / rounds + usize::from(r < cfg.restarts % rounds);
        for (arm, acc) in ColdArm::ALL.iter().zip(accs.iter_mut()) {
            eprintln!(
                "bench: cold restart, round {}/{rounds}, {} ({:.0}s so far)",
                r + 1,
                arm.name(),
                t.elapsed().as_secs_f64()
            );
            round(cfg, *arm, n, acc)?;
        }
    }
    Ok(ColdReport {
        machine,
        kernel,
        config: cfg.clone(),
        arms: ColdArm::ALL
            .iter()
            .zip(accs)
            .map(|(arm, acc)| acc.finish(*arm))
            .collect(),
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The results table (also the README's), in Markdown.
pub fn markdown(r: &ColdReport) -> String {
    let c = &r.config;
    let mut s = format!(
        "Machine: {}, kernel {}. Stop-then-start restarts under {} new connections/s (one \
         request each, 10 s timeout): the old process exits, {} ms later the new one starts and \
         warms up for {} ms. {} restarts per arm, arms interleaved in {} rounds. Run time \
         {:.0} min.\n\n",
        r.machine,
        r.kernel,
        c.rate,
        c.down.as_millis(),
        c.warmup.as_millis(),
        c.restarts,
        c.rounds,
        r.seconds / 60.0
    );
    s += "| arm | restarts | requests | failed | refused | reset | 5xx | timeout | eof | 95% bound | waited ≥ 1 s, then 200 | p50 | p99 | max (ms, answered) | kernel RSTs |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for a in &r.arms {
        let t = &a.tally;
        s += &format!(
            "| {} | {} | {} | **{}** | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {} |\n",
            a.arm.name(),
            a.restarts,
            t.requests,
            a.failures,
            t.count(Outcome::Refused),
            t.count(Outcome::Reset),
            t.count(Outcome::Http5xx),
            t.count(Outcome::Timeout),
            t.count(Outcome::Eof),
            a.failure_rate_upper95.map_or("-".to_string(), fmt_rate),
            a.waited,
            a.answered.p50_ms,
            a.answered.p99_ms,
            a.answered.max_ms,
            a.kernel.out_rsts,
        );
    }
    s
}

/// Writes cold.json and COLD.md into `dir`.
pub fn write(r: &ColdReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("cold.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("COLD.md"), markdown(r))?;
    Ok(())
}
