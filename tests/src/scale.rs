//! The program's cost per selection as the active list grows: the same saturating load of new
//! connections on a port whose active member has 2, 64 or 512 sockets (nginx's `reuseport` gives
//! each worker one), measured by the kernel's BPF run-time stats. The flow hash picks the slot
//! directly, so the cost should not grow with the list; `cargo xtask bench -- --parts scale`
//! measures it and `--readme` puts the table in the README.
use std::time::{Duration, Instant};

use crate::{
    bench::{machine, with_program_stats},
    harness::{zdt_ok, App, AppOpts},
    load::{self, LoadSpec, Outcome},
    netns::Netns,
};

const PORT: u16 = 8080;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScalePoint {
    /// Sockets of the active member (one family).
    pub sockets: usize,
    /// Requests answered 200 per second, and all requests (any other outcome is a failure).
    pub ok_per_s: f64,
    pub requests: u64,
    pub failed: u64,
    pub bpf_runs: u64,
    pub bpf_ns_per_run: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScaleReport {
    pub machine: String,
    pub kernel: String,
    /// Length of each measured run, and closed-loop clients.
    pub run_ms: u64,
    pub workers: usize,
    /// Runs per size, interleaved (2, 64, 512, 2, 64, 512, ...).
    pub rounds: usize,
    pub points: Vec<ScalePoint>,
    pub seconds: f64,
}

/// Measures every size of `sizes`, `rounds` times each, interleaved.
pub fn run(
    sizes: &[usize],
    run: Duration,
    workers: usize,
    rounds: usize,
) -> anyhow::Result<ScaleReport> {
    let t0 = Instant::now();
    let (machine, kernel) = machine();
    let mut points: Vec<ScalePoint> = Vec::new();
    for _ in 0..rounds.max(1) {
        for &n in sizes {
            let p = measure(n, run, workers)?;
            eprintln!(
                "scale: {n} sockets: {:.0} ns/selection over {} runs, {:.0} ok/s, {} failed",
                p.bpf_ns_per_run, p.bpf_runs, p.ok_per_s, p.failed
            );
            match points.iter_mut().find(|q| q.sockets == n) {
                Some(q) => {
                    let time =
                        q.bpf_ns_per_run * q.bpf_runs as f64 + p.bpf_ns_per_run * p.bpf_runs as f64;
                    q.bpf_runs += p.bpf_runs;
                    q.bpf_ns_per_run = time / q.bpf_runs.max(1) as f64;
                    q.ok_per_s = (q.ok_per_s * q.requests as f64 + p.ok_per_s * p.requests as f64)
                        / (q.requests + p.requests).max(1) as f64;
                    q.requests += p.requests;
                    q.failed += p.failed;
                }
                None => points.push(p),
            }
        }
    }
    Ok(ScaleReport {
        machine,
        kernel,
        run_ms: run.as_millis() as u64,
        workers,
        rounds,
        points,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One run: a fresh namespace, an app with `n` sockets on 0.0.0.0, attached (they become the
/// active set), saturated with new connections.
fn measure(n: usize, run: Duration, workers: usize) -> anyhow::Result<ScalePoint> {
    let ns = Netns::new()?;
    let _app = App::start(
        &ns,
        &AppOpts::new(PORT, "scale")
            .arg("--sockets")
            .arg(&n.to_string()),
    )?;
    zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    let spec = LoadSpec {
        rate: None,
        workers,
        duration: run,
        max_requests: u64::MAX,
        ..LoadSpec::open(([127, 0, 0, 1], PORT).into(), 1.0, run)
    };
    let (samples, runs, time) = with_program_stats(&ns, PORT, || {
        ns.run(move || {
            let mut out = Vec::new();
            load::run(&spec, &Default::default(), &mut |s| out.push(s));
            out
        })
    })?;
    let t = load::tally(&samples);
    Ok(ScalePoint {
        sockets: n,
        ok_per_s: t.count(Outcome::Ok) as f64 / run.as_secs_f64(),
        requests: t.requests,
        failed: t.failures(),
        bpf_runs: runs,
        bpf_ns_per_run: if runs > 0 {
            time.as_nanos() as f64 / runs as f64
        } else {
            0.0
        },
    })
}

/// The README's table.
pub fn markdown(r: &ScaleReport) -> String {
    let mut o = format!(
        "Machine: {}, kernel {}. Saturated new connections ({} closed-loop clients, {} ms per \
         run, {} runs per size, interleaved); the program's run time from the kernel's BPF \
         stats. Run time {:.0} s.\n\n\
         | sockets in the active list | ns per selection | selections | answered 200 per s | failed |\n\
         |---|---|---|---|---|\n",
        r.machine,
        r.kernel,
        r.workers,
        r.run_ms,
        r.rounds,
        r.seconds
    );
    for p in &r.points {
        o += &format!(
            "| {} | {:.0} | {} | {:.0} | {} |\n",
            p.sockets, p.bpf_ns_per_run, p.bpf_runs, p.ok_per_s, p.failed
        );
    }
    o
}

pub fn write(r: &ScaleReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("scale.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("SCALE.md"), markdown(r))?;
    Ok(())
}
