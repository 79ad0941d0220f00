//! `cargo xtask bench`: the reset-count benchmark (see tests/src/bench.rs and BENCHMARK notes in
//! the README). Defaults reproduce the README's table.
use std::{path::PathBuf, time::Duration};

use clap::Parser;
use zdt_tests::bench::{self, Config, Mode, Rate};

#[derive(Parser)]
struct Args {
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
    /// Where bench.json, bench.svg and RESULTS.md go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Run nothing: render RESULTS.md and bench.svg from the bench.json of an earlier run.
    #[arg(long)]
    render: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(json) = &a.render {
        let report: bench::Report = serde_json::from_str(&std::fs::read_to_string(json)?)?;
        bench::write(&report, &a.out)?;
        println!("{}", bench::markdown(&report));
        return Ok(());
    }
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
    let report = bench::run(&cfg)?;
    bench::write(&report, &a.out)?;
    println!("{}", bench::markdown(&report));
    println!(
        "results: {}/bench.json, bench.svg, RESULTS.md",
        a.out.display()
    );
    Ok(())
}
