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

use crate::{
    bench::machine,
    harness::{promote_args, strs, zdt_command, zdt_ok, App, AppOpts},
    netns::Netns,
};

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

fn percentiles(mut v: Vec<f64>) -> [f64; 2] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.9)]
}

fn row(what: &str, wall: Vec<f64>, cpu: Vec<f64>, goal: Option<[f64; 2]>) -> Costs {
    Costs {
        what: what.into(),
        runs: wall.len(),
        wall_ms: percentiles(wall),
        cpu_ms: percentiles(cpu),
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

pub fn write(r: &CostReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("cost.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("COST.md"), markdown(r))?;
    Ok(())
}
