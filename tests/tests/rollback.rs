//! `zdt-ctl rollback`: the previous active set back in one update, under load.
use std::time::Duration;
use zdt_ctl::Step;

use nix::sys::signal::Signal;
use zdt_tests::harness::{kind_of, Kind};
use zdt_tests::{
    harness::{
        active_pids, at_failpoint, checked, fingerprint, promote_args, strs, zdt, zdt_ok, App,
        AppOpts,
    },
    load::{self, Background, LoadSpec},
    netns::Netns,
};

const PORT: u16 = 8080;

/// A promote or rollback of PORT that must succeed, run with the invariants that compare its
/// before and after ([`checked`]).
fn ok(ns: &Netns, args: &[&str]) -> anyhow::Result<zdt_tests::harness::Ctl> {
    let r = checked(ns, PORT, args)?;
    anyhow::ensure!(r.ok(), "zdt-ctl {}: {r:?}", args.join(" "));
    Ok(r)
}

fn active(ns: &Netns) -> Vec<i64> {
    active_pids(ns, PORT).expect("status")
}

/// `zdt-ctl rollback`, which must say that `back` is active again and `from` draining.
fn rolled_back(ns: &Netns, back: &App, from: &App) -> anyhow::Result<zdt_tests::harness::Ctl> {
    let r = checked(ns, PORT, &["rollback"])?;
    let said = format!("pid {} active again; pid {} draining", back.pid, from.pid);
    anyhow::ensure!(r.ok() && r.stdout.contains(&said), "{r:?}");
    Ok(r)
}

#[test]
fn rollback_goes_back_and_forth_without_losing_a_request() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // Nothing was switched yet: nothing to go back to.
    let r = checked(&ns, PORT, &["rollback"])?;
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    const RATE: f64 = 400.0;
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let spell = load::requests_at(RATE, Duration::from_millis(400));
    l.see(spell);
    assert_eq!(active(&ns), [i64::from(v2.pid)]);

    // v2 turns out bad: back to v1, drained but still running.
    rolled_back(&ns, &v1, &v2)?;
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    l.see(spell);
    // A rollback of the rollback goes forward again.
    ok(&ns, &["rollback"])?;
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    let t = load::tally(&l.finish_after(spell));
    assert_eq!(t.failures(), 0, "{t:?}");
    // Each version served for 0.8 s at least, in two spells: a quarter second's load each.
    let enough = load::requests_at(RATE, Duration::from_millis(250));
    assert!(
        t.versions["v1"] > enough && t.versions["v2"] > enough,
        "{t:?}"
    );

    // Once the previous version is gone there is nothing to go back to: refused, unchanged.
    v1.signal(Signal::SIGKILL);
    anyhow::ensure!(
        v1.wait_exit(load::scaled(Duration::from_secs(5))),
        "v1 did not die"
    );
    let before = fingerprint(&ns, PORT)?;
    let r = checked(&ns, PORT, &["rollback"])?;
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("no longer listen"), "{r:?}");
    assert_eq!(fingerprint(&ns, PORT)?, before);
    // v1's slots are free again (a closed socket never comes back), and a new socket may take
    // them: the rollback target stops naming them first. A version still warming that a
    // `--probe` promote put in (v3, never ready) must never be what a rollback restores.
    let _v3 = never_ready_probed(&ns)?;
    let r = checked(&ns, PORT, &["rollback"])?;
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v2"), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn rollback_restores_the_set_before_the_last_promote_whatever_switched_since() -> anyhow::Result<()>
{
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    // Switches that are not promotes: hold registers its placeholder, and a --probe promote of
    // a version that never gets ready puts its probe lists in and takes them out again.
    let hold = zdt_tests::harness::Hold::start(&ns, &["0.0.0.0:8080"])?;
    let _v3 = never_ready_probed(&ns)?;
    // Rollback goes back to the set before v2's promote: v1, and names no one else.
    let r = rolled_back(&ns, &v1, &v2)?;
    assert!(!r.stdout.contains(&hold.child.id().to_string()), "{r:?}");
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn a_rollback_says_which_restored_process_is_a_canary() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &["--weight", "10"])))?;
    let v3 = App::start(&ns, &AppOpts::new(PORT, "v3"))?;
    ok(&ns, &strs(&promote_args(&v3, &[])))?;
    // The set restored is v1 active with v2 its canary: v2 is named as the canary, not as
    // active.
    let r = ok(&ns, &["rollback"])?;
    let said = format!(
        "pid {} active again (pid {} canary again); pid {} draining",
        v1.pid, v2.pid, v3.pid
    );
    assert!(r.stdout.contains(&said), "{r:?}");
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    zdt_tests::harness::assert_invariants(&ns, PORT)?;
    Ok(())
}

#[test]
fn a_retried_promote_keeps_the_rollback_target() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    // A retry of the promote (what a deploy script does after a promote it thinks failed), then
    // a promote of the active pid again: neither switches anything, so neither may make the
    // live set the rollback target.
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    zdt_ok(&ns, &["promote", &v2.pid.to_string(), "--no-readyz"])?;
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    zdt_tests::harness::assert_invariants(&ns, PORT)?;
    rolled_back(&ns, &v1, &v2)?;
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    let t = load::requests(&ns, PORT, 50, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&50), "{t:?}");
    Ok(())
}

/// A rollback killed before its switch changed nothing a retry needs: the retry goes back, and
/// a rollback after it goes forward again.
#[test]
fn a_rollback_killed_before_its_switch_keeps_its_target() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let mut killed = at_failpoint(&ns, &["rollback".to_string()], Step::Staged.name()).child;
    killed.kill()?;
    killed.wait()?;
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    rolled_back(&ns, &v1, &v2)?;
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    rolled_back(&ns, &v2, &v1)?;
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    let t = load::requests(&ns, PORT, 50, 1000.0);
    assert_eq!(t.versions.get("v2"), Some(&50), "{t:?}");
    Ok(())
}

/// v3, which never gets ready, through `promote --probe` (exit 4): a switch that puts its probe
/// lists in and takes them out again, and is not a promote.
fn never_ready_probed(ns: &Netns) -> anyhow::Result<App> {
    let v3 = App::start(
        ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_secs(3600)),
    )?;
    let pid3 = v3.pid.to_string();
    let r = zdt(
        ns,
        &["promote", &pid3, "--probe", "/readyz", "--timeout", "1s"],
    );
    assert_eq!(r.kind(), Some(Kind::ReadinessTimeout), "{r:?}");
    Ok(v3)
}

/// A rollback during a promote's `--probation --stop-old` neither waits for the probation (the
/// promote holds no lock while it watches the app) nor loses to it: once the probation ends,
/// the promote sees that its process no longer serves, says so (exit 7) and stops no one. The
/// port keeps serving from the version the rollback restored.
#[test]
fn a_rollback_during_probation_is_not_undone_by_the_promote() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    let probation = format!("{}ms", load::scaled(Duration::from_secs(3)).as_millis());
    let args = promote_args(&v2, &["--probation", &probation, "--stop-old"]);
    let mut promote = zdt_tests::harness::at_log_event(&ns, &args, zdt_ctl::SWITCHED);
    assert_eq!(active(&ns), [i64::from(v2.pid)]);
    rolled_back(&ns, &v1, &v2)?;
    assert!(
        promote.child.try_wait()?.is_none(),
        "the rollback waited for the promote's probation"
    );
    let r = promote.finish()?;
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("no longer active"), "{r:?}");
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(
        t.versions.get("v1"),
        Some(&100),
        "v1 was not stopped: {t:?}"
    );
    Ok(())
}

/// A `promote --probe` holds no lock while it asks through the public port: a rollback meanwhile
/// runs at once, and the probe lists the promote claims survive it; when the candidate never
/// gets ready, the promote takes them out of whatever is live then, and the rollback stands.
#[test]
fn a_rollback_during_a_probe_wait_runs_at_once() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let v3 = App::start(
        &ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_secs(3600)),
    )?;
    let timeout = format!("{}ms", load::scaled(Duration::from_secs(3)).as_millis());
    let pid3 = v3.pid.to_string();
    let mut promote = zdt_tests::harness::zdt_command(
        &ns,
        &[
            "promote",
            &pid3,
            "--probe",
            "/readyz",
            "--timeout",
            &timeout,
        ],
    )
    .stderr(std::process::Stdio::null())
    .spawn()?;
    zdt_tests::harness::wait_probing(&ns, PORT, Duration::from_secs(3))?;
    rolled_back(&ns, &v1, &v2)?;
    assert!(
        promote.try_wait()?.is_none(),
        "the rollback waited for the promote's probe"
    );
    assert!(
        zdt_tests::harness::probe_list_len(&ns, PORT)? > 0,
        "the rollback took the probe lists of a promote that still waits"
    );
    assert_eq!(kind_of(promote.wait()?), Some(Kind::ReadinessTimeout));
    assert_eq!(zdt_tests::harness::probe_list_len(&ns, PORT)?, 0);
    assert_eq!(active(&ns), [i64::from(v1.pid)]);
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&100), "{t:?}");
    Ok(())
}
