//! What zdt-ctl's own commands cost the machine they run on, which is the machine serving the
//! deploy: wall time and CPU time (user + system, from the kernel's accounting of the child) of
//! `status`, of `promote` (its own phases, readiness excluded), and of `attach`, each the median
//! of many runs on an attached port with the demo app. `cargo xtask bench -- --parts cost`
//! measures it and `--readme` puts the table in the README.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use zdt_tests::{
    harness::{promote_args, strs, zdt_command, zdt_ok, App, AppOpts},
    netns::Netns,
};

use crate::handover::machine;

const PORT: u16 = 8080;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Costs {
    /// What was measured.
    pub what: String,
    pub runs: usize,
    /// Medians and 90th percentiles, ms.
    pub wall_ms: [f64; 2],
    pub cpu_ms: [f64; 2],
    /// The goal (wall, CPU), ms, if the project set one.
    pub goal_ms: Option<[f64; 2]>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CostReport {
    pub machine: String,
    pub kernel: String,
    pub rows: Vec<Costs>,
    pub seconds: f64,
}

/// CPU time (user + system) of the waited-for children of this process so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Runs zdt-ctl once in `ns`; returns (wall, CPU, stdout). One child at a time, so the change
/// in the children's CPU is this run's.
fn timed(ns: &Netns, args: &[&str]) -> anyhow::Result<(Duration, Duration, String)> {
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let out = zdt_command(ns, args).stderr(Stdio::piped()).output()?;
    let wall = t0.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "zdt-ctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        wall,
        children_cpu() - cpu0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The `qs` quantiles of `v` (nearest rank), NaN for an empty `v`.
fn quantiles<const N: usize>(mut v: Vec<f64>, qs: [f64; N]) -> [f64; N] {
    v.sort_by(f64::total_cmp);
    qs.map(|q| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    })
}

fn row(what: &str, wall: Vec<f64>, cpu: Vec<f64>, goal: Option<[f64; 2]>) -> Costs {
    Costs {
        what: what.into(),
        runs: wall.len(),
        wall_ms: quantiles(wall, [0.5, 0.9]),
        cpu_ms: quantiles(cpu, [0.5, 0.9]),
        goal_ms: goal,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Measures `runs` statuses, `runs` promotes (between two ready apps, back and forth) and
/// `attach_runs` attach + detach cycles.
pub fn run(runs: usize, attach_runs: usize) -> anyhow::Result<CostReport> {
    let t0 = Instant::now();
    let (machine, kernel) = machine();
    let ns = Netns::new()?;
    let a = App::start(&ns, &AppOpts::new(PORT, "a"))?;
    let b = App::start(&ns, &AppOpts::new(PORT, "b"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    zdt_ok(&ns, &strs(&promote_args(&a, &[])))?;
    let mut rows = Vec::new();

    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (w, c, _) = timed(&ns, &["status", "8080"])?;
        wall.push(ms(w));
        cpu.push(ms(c));
    }
    rows.push(row("status", wall, cpu, Some([10.0, 5.0])));

    // The app answers /readyz at once, so the readiness phase is one request; the report's
    // phases separate it from promote's own work.
    let (mut own, mut whole, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let app = if i % 2 == 0 { &b } else { &a };
        let (w, c, out) = timed(&ns, &strs(&promote_args(app, &["--json"])))?;
        let r: serde_json::Value = serde_json::from_str(&out).context("promote --json")?;
        let phase = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        own.push(phase("validate_ms") + phase("switch_ms"));
        whole.push(ms(w));
        cpu.push(ms(c));
    }
    rows.push(row(
        "promote: validate + switch (CPU: the whole command)",
        own,
        cpu.clone(),
        Some([25.0, 10.0]),
    ));
    rows.push(row(
        "promote: the whole command (readiness: one request)",
        whole,
        cpu,
        None,
    ));

    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..attach_runs {
        zdt_ok(&ns, &["detach", ":8080"])?;
        let (w, c, _) = timed(&ns, &["attach", ":8080"])?;
        wall.push(ms(w));
        cpu.push(ms(c));
    }
    rows.push(row("attach (loads the program)", wall, cpu, None));
    drop((a, b));
    Ok(CostReport {
        machine,
        kernel,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The README's table.
pub fn markdown(r: &CostReport) -> String {
    let mut o = format!(
        "Machine: {}, kernel {}; zdt-ctl's own commands on a port with the demo app, each row \
         the median and 90th percentile of its runs (wall: as the caller waits; CPU: user + \
         system time of the zdt-ctl process, from the kernel's accounting). Run time {:.0} s.\n\n\
         | command | runs | wall ms, median / p90 | CPU ms, median / p90 | goal (wall / CPU) |\n\
         |---|---|---|---|---|\n",
        r.machine, r.kernel, r.seconds
    );
    for c in &r.rows {
        o += &format!(
            "| {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} |\n",
            c.what,
            c.runs,
            c.wall_ms[0],
            c.wall_ms[1],
            c.cpu_ms[0],
            c.cpu_ms[1],
            c.goal_ms
                .map(|[w, c]| format!("<= {w:.0} / <= {c:.0} ms"))
                .unwrap_or_else(|| "-".into())
        );
    }
    o
}

pub fn write(r: &CostReport, w: &WindowReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("cost.json"),
        serde_json::to_string_pretty(&(r, w))?,
    )?;
    std::fs::write(
        dir.join("COST.md"),
        format!(
            "{}\nWhere a handover's latency comes from:\n\n{}",
            markdown(r),
            windows_markdown(w)
        ),
    )?;
    Ok(())
}

/// The latency of requests that start while one kind of action runs, against requests that start
/// while nothing runs, under the same open-loop load of new connections: where a handover's
/// extra latency comes from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WindowRow {
    pub action: String,
    pub windows: usize,
    pub requests: u64,
    pub failed: u64,
    /// p50, p99, p99.9 of the requests that started in this action's windows, ms.
    pub latency_ms: [f64; 3],
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WindowReport {
    pub machine: String,
    pub kernel: String,
    pub rate: f64,
    pub rows: Vec<WindowRow>,
    pub seconds: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    /// Nothing: the steady state between the other actions.
    Idle,
    /// `zdt-ctl promote` between two processes that are running and ready already.
    PromoteOnly,
    /// A new process of the app starts beside the serving one (it binds the port but is never
    /// promoted), then gets SIGTERM and exits: process churn without zdt-ctl.
    StartAndStop,
    /// A whole handover as the benchmark's zdt arm does it: a new process, promote --stop-old.
    Handover,
    /// Setting up the next round (not reported; kept out of the steady state).
    Setup,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Idle => "nothing (steady state)",
            Action::PromoteOnly => "zdt-ctl promote only (both processes running and ready)",
            Action::StartAndStop => "a new process starts and stops, no zdt-ctl",
            Action::Handover => "a whole handover (new process, promote --stop-old)",
            Action::Setup => "setup",
        }
    }
}

/// Runs `rounds` of each action under `rate` req/s of new connections, with a quiet second
/// between actions, and compares the latency of requests that started in each action's window.
pub fn windows(rate: f64, rounds: usize) -> anyhow::Result<WindowReport> {
    use zdt_tests::load::{Background, LoadSpec, Outcome};
    let t0 = Instant::now();
    let (machine, kernel) = machine();
    let ns = Netns::new()?;
    let warm = Duration::from_millis(150);
    let mut serving = App::start(&ns, &AppOpts::new(PORT, "w0").warmup(warm))?;
    let mut spare = App::start(&ns, &AppOpts::new(PORT, "w1").warmup(warm))?;
    spare.wait_ready()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    zdt_ok(&ns, &strs(&promote_args(&serving, &[])))?;
    let load = Background::start(
        &ns,
        LoadSpec::open(
            ([127, 0, 0, 1], PORT).into(),
            rate,
            Duration::from_secs(3600),
        ),
    );
    let quiet = Duration::from_secs(1);
    let mut windows: Vec<(Action, Instant, Instant)> = Vec::new();
    let mut generation = 2;
    std::thread::sleep(quiet);
    for _ in 0..rounds {
        for action in [Action::PromoteOnly, Action::StartAndStop, Action::Handover] {
            let start = Instant::now();
            match action {
                Action::Idle | Action::Setup => {}
                Action::PromoteOnly => {
                    zdt_ok(&ns, &strs(&promote_args(&spare, &[])))?;
                    std::mem::swap(&mut serving, &mut spare);
                }
                Action::StartAndStop => {
                    let mut extra = App::start(&ns, &AppOpts::new(PORT, "extra").warmup(warm))?;
                    extra.wait_ready()?;
                    extra.signal(nix::sys::signal::Signal::SIGTERM);
                    extra.wait_exit(Duration::from_secs(5));
                }
                Action::Handover => {
                    let new = App::start(
                        &ns,
                        &AppOpts::new(PORT, &format!("w{generation}")).warmup(warm),
                    )?;
                    generation += 1;
                    // The spare (not serving) is the one that goes: the serving process keeps
                    // serving until the switch, as in a deploy.
                    let mut old = std::mem::replace(&mut serving, new);
                    zdt_tests::harness::replace(&ns, &serving, &mut old)?;
                }
            }
            // Requests that started up to 200 ms after the action count as its own (a request
            // queued behind it).
            windows.push((action, start, Instant::now() + Duration::from_millis(200)));
            std::thread::sleep(quiet);
        }
        // --stop-old stopped the spare (a drained member): a new one for the next round.
        let start = Instant::now();
        spare = App::start(
            &ns,
            &AppOpts::new(PORT, &format!("w{generation}")).warmup(warm),
        )?;
        generation += 1;
        spare.wait_ready()?;
        windows.push((
            Action::Setup,
            start,
            Instant::now() + Duration::from_millis(200),
        ));
        std::thread::sleep(quiet);
    }
    let samples = load.finish();
    drop((serving, spare));
    let mut rows = Vec::new();
    for action in [
        Action::Idle,
        Action::PromoteOnly,
        Action::StartAndStop,
        Action::Handover,
    ] {
        let mut lat: Vec<f64> = Vec::new();
        let mut failed = 0u64;
        for s in &samples {
            let inside = windows
                .iter()
                .find(|(_, a, b)| s.at >= *a && s.at <= *b)
                .map(|(k, _, _)| *k)
                .unwrap_or(Action::Idle);
            if inside != action {
                continue;
            }
            if s.outcome != Outcome::Ok {
                failed += 1;
            }
            lat.push(ms(s.latency));
        }
        rows.push(WindowRow {
            action: action.name().into(),
            windows: windows.iter().filter(|(k, _, _)| *k == action).count(),
            requests: lat.len() as u64,
            failed,
            latency_ms: quantiles(lat, [0.5, 0.99, 0.999]),
        });
    }
    Ok(WindowReport {
        machine,
        kernel,
        rate,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The table of [`windows`].
pub fn windows_markdown(r: &WindowReport) -> String {
    let mut o = format!(
        "Machine: {}, kernel {}; {} req/s of new connections to the demo app on an attached \
         port; each action {} times, interleaved, a quiet second between actions; a request \
         belongs to the action during which (or up to 200 ms after which) it started. Run time \
         {:.0} s.\n\n\
         | requests that started while ... | windows | requests | failed | p50 ms | p99 ms | p99.9 ms |\n\
         |---|---|---|---|---|---|---|\n",
        r.machine,
        r.kernel,
        r.rate,
        r.rows.get(1).map_or(0, |w| w.windows),
        r.seconds
    );
    for w in &r.rows {
        o += &format!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} |\n",
            w.action,
            if w.windows == 0 {
                "-".to_string()
            } else {
                w.windows.to_string()
            },
            w.requests,
            w.failed,
            w.latency_ms[0],
            w.latency_ms[1],
            w.latency_ms[2]
        );
    }
    o
}
