//! The tests' load client (`zdt_tests::load`) as a command, for a place where a test cannot run
//! it in its own process: inside the VM of tests/tests/systemd_vm.rs. Sends `GET /` on a new
//! connection each at `--rate` per second until SIGTERM or SIGINT (at most `--duration`), then
//! prints the tally as JSON: every request classified as the tests classify it.
//!
//! Usage: zdt-load --addr 127.0.0.1:80 [--rate 100] [--duration 120s]
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use zdt_tests::load::{self, LoadSpec};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    /// Requests per second (open loop), divided by the square root of ZDT_TEST_TIME_SCALE as
    /// in the tests.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// The longest run: the load stops then even without a signal.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Blocked before any other thread exists, so that every thread inherits the mask and only
    // the sigwait below takes the signal (the default action would end the run untallied).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block()?;
    let progress = Arc::new(load::Progress::default());
    let shared = progress.clone();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            shared.stop.store(true, Ordering::Relaxed);
        }
    });
    let spec = LoadSpec::open(args.addr, args.rate, args.duration);
    let mut samples = Vec::new();
    load::run(&spec, &progress, &mut |s| samples.push(s));
    println!("{}", serde_json::to_string(&load::tally(&samples))?);
    Ok(())
}
