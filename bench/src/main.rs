//! `cargo xtask bench`: the reset-count benchmark (src/handover.rs) and the cold-restart
//! comparison (src/cold.rs). Defaults reproduce the README's tables.
use std::{path::PathBuf, time::Duration};

use clap::Parser;
use zdt_bench::{
    cold::{self, ColdConfig},
    cost,
    handover::{self, Config, Mode, Rate},
    scale,
};

#[derive(Parser)]
struct Args {
    /// Which parts to run: `handover` (the reset-count matrix), `cold` (cold restarts) and/or
    /// `scale` (the program's cost per selection with many sockets), `cost` (what zdt-ctl's own
    /// commands cost).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "handover,cold,scale,cost"
    )]
    parts: Vec<Part>,
    /// Runs of status and of promote in the cost part (attach: a tenth of them, at least 3).
    #[arg(long, default_value_t = 60)]
    cost_runs: usize,
    /// Rounds of the cost part's latency windows (each: a promote, a process start and stop, a
    /// handover, under 1000 req/s).
    #[arg(long, default_value_t = 40)]
    cost_windows: usize,
    /// Sockets of the active member in the scale part.
    #[arg(long, value_delimiter = ',', default_value = "2,64,512")]
    scale_sockets: Vec<usize>,
    /// Runs per size in the scale part (each `--perf-run` long).
    #[arg(long, default_value_t = 3)]
    scale_rounds: usize,
    /// Request rates: numbers (req/s, open loop) and/or `sat` (closed loop).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,sat")]
    rates: Vec<Rate>,
    /// Close gaps G of the old process (SIGTERM to close of its listener).
    #[arg(long, value_delimiter = ',', default_value = "0ms,100ms,1000ms", value_parser = humantime::parse_duration)]
    gaps: Vec<Duration>,
    #[arg(long, value_delimiter = ',', default_value = "new-conn,keep-alive")]
    modes: Vec<Mode>,
    /// Handovers per zdt cell.
    #[arg(long, default_value_t = 300)]
    zdt_handovers: usize,
    /// Handovers per baseline and per migrate-sysctl cell.
    #[arg(long, default_value_t = 50)]
    other_handovers: usize,
    /// Rounds the arms are interleaved in, per cell.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Closed-loop clients (saturation) and keep-alive connections.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    perf_run: Duration,
    #[arg(long, default_value_t = 3)]
    perf_rounds: usize,
    /// Cold restarts per arm.
    #[arg(long, default_value_t = ColdConfig::full().restarts)]
    cold_restarts: usize,
    #[arg(long, default_value_t = ColdConfig::full().rounds)]
    cold_rounds: usize,
    /// New connections per second during the cold restarts.
    #[arg(long, default_value_t = ColdConfig::full().rate)]
    cold_rate: f64,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    cold_warmup: Duration,
    /// Old process's exit to new process's start.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    cold_down: Duration,
    /// Where bench.json, bench.svg, RESULTS.md (handover) and cold.json, COLD.md go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Run nothing: render from the bench.json (RESULTS.md, bench.svg) or cold.json (COLD.md)
    /// of an earlier run.
    #[arg(long)]
    render: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Handover,
    Cold,
    Scale,
    Cost,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(json) = &a.render {
        let text = std::fs::read_to_string(json)?;
        if let Ok(report) = serde_json::from_str::<handover::Report>(&text) {
            handover::write(&report, &a.out)?;
            println!("{}", handover::markdown(&report));
        } else if let Ok((report, w)) =
            serde_json::from_str::<(cost::CostReport, cost::WindowReport)>(&text)
        {
            cost::write(&report, &w, &a.out)?;
            println!("{}", cost::markdown(&report));
        } else if let Ok(report) = serde_json::from_str::<scale::ScaleReport>(&text) {
            scale::write(&report, &a.out)?;
            println!("{}", scale::markdown(&report));
        } else {
            let report: cold::ColdReport = serde_json::from_str(&text)?;
            cold::write(&report, &a.out)?;
            println!("{}", cold::markdown(&report));
        }
        return Ok(());
    }
    if a.parts.contains(&Part::Handover) {
        let cfg = Config {
            rates: a.rates,
            gaps: a.gaps,
            modes: a.modes,
            zdt_handovers: a.zdt_handovers,
            other_handovers: a.other_handovers,
            rounds: a.rounds,
            warmup: a.warmup,
            workers: a.workers,
            perf_run: a.perf_run,
            perf_rounds: a.perf_rounds,
        };
        let report = handover::run(&cfg)?;
        handover::write(&report, &a.out)?;
        println!("{}", handover::markdown(&report));
    }
    if a.parts.contains(&Part::Cold) {
        let cfg = ColdConfig {
            restarts: a.cold_restarts,
            rounds: a.cold_rounds,
            rate: a.cold_rate,
            warmup: a.cold_warmup,
            down: a.cold_down,
        };
        let report = cold::run(&cfg)?;
        cold::write(&report, &a.out)?;
        println!("{}", cold::markdown(&report));
    }
    if a.parts.contains(&Part::Scale) {
        let report = scale::run(&a.scale_sockets, a.perf_run, a.workers, a.scale_rounds)?;
        scale::write(&report, &a.out)?;
        println!("{}", scale::markdown(&report));
    }
    if a.parts.contains(&Part::Cost) {
        let report = cost::run(a.cost_runs, (a.cost_runs / 10).max(3))?;
        let windows = cost::windows(1000.0, a.cost_windows)?;
        cost::write(&report, &windows, &a.out)?;
        println!("{}", cost::markdown(&report));
        println!("{}", cost::windows_markdown(&windows));
    }
    println!("results in {}", a.out.display());
    Ok(())
}
