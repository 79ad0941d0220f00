//! `cargo xtask demo`: a live demonstration of zdt in a fresh network namespace.
//!
//! Starts demo v1, attaches zdt to its port, puts load on the port (a new connection per
//! request), deploys v2 and v3 with `zdt-ctl promote --stop-old` while each new version warms up
//! for a while, and prints per deploy: requests, ok, failures by kind, which version answered.
//! Exits non-zero if any request failed.
use std::{net::SocketAddr, time::Duration};

use zdt_tests::{
    harness::{print_tally, zdt, zdt_ok, App, AppOpts},
    load::{self, Background, LoadSpec},
    netns::Netns,
};

const PORT: u16 = 8080;
const RATE: f64 = 300.0;
const WARMUP: Duration = Duration::from_millis(1500);

fn main() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    println!("== zdt demo: fresh network namespace, service on :{PORT}, load {RATE} req/s, new connection per request\n");

    let mut old = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    println!("$ zdt-ctl attach :{PORT}");
    print!("{}", zdt_ok(&ns, &["attach", &format!(":{PORT}")])?.stdout);

    let mut failed = 0;
    for version in ["v2", "v3"] {
        let load = Background::start(&ns, LoadSpec::open(addr, RATE, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(500));
        let new = App::start(&ns, &AppOpts::new(PORT, version).warmup(WARMUP))?;
        println!(
            "\n== deploy {version}: started pid {} (warming up {} ms; bound to :{PORT} already, gets no traffic yet)",
            new.pid,
            WARMUP.as_millis()
        );
        let args = [
            "promote",
            &new.pid.to_string(),
            "--readyz",
            &new.readyz(),
            "--stop-old",
        ];
        println!("$ zdt-ctl {}", args.join(" "));
        let r = zdt(&ns, &args);
        print!("{}{}", r.stderr, r.stdout);
        anyhow::ensure!(r.ok(), "promote failed with exit code {}", r.code);
        old.wait_exit(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
        let samples = load.finish();
        let t = load::tally(&samples);
        print_tally(&format!("-- load during the {version} deploy:"), &t);
        failed += t.failures();
        old = new;
    }
    println!("\n$ zdt-ctl status");
    print!("{}", zdt_ok(&ns, &["status"])?.stdout);
    drop(old);
    if failed > 0 {
        anyhow::bail!("{failed} request(s) failed during the deploys");
    }
    println!("\nzero failed requests across both deploys");
    Ok(())
}
