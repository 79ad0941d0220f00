//! `zdt-ctl watch`: new processes promoted once ready, with no deploy script, under load.
use anyhow::Context as _;
use std::time::{Duration, Instant};
use zdt_ctl::Step;
use zdt_tests::harness::{report, until_active, Role};

use zdt_tests::{
    harness::{
        active_pids, assert_invariants, at_failpoint, exec_demo_args,
        relistening_member_beside_a_warming_version, within, zdt_command, zdt_ok, App, AppOpts,
        KillOnDrop,
    },
    load::{self, scaled, Background, LoadSpec},
    netns::Netns,
};

const PORT: u16 = 8080;

fn active(ns: &Netns) -> anyhow::Result<Vec<i64>> {
    active_pids(ns, PORT)
}

/// v1 serves under load; the watcher runs; v2 starts (warming up 1 s) and nothing else is
/// done: the watcher promotes v2 once ready and stops v1. v3 never gets ready: it is never
/// promoted, and v2 keeps serving. Not one request fails.
#[test]
fn the_watcher_promotes_what_starts_once_ready_and_never_a_warming_one() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // Longer than v2's warm-up at any time scale (a VM stretches the warm-up, not a flag).
    let timeout = format!("{}ms", scaled(Duration::from_secs(4)).as_millis());
    let args = [
        "watch",
        ":8080",
        "--probe",
        "/readyz",
        "--stop-old",
        "--timeout",
        &timeout,
    ];
    let _watcher = KillOnDrop(zdt_command(&ns, &args).spawn()?);
    const RATE: f64 = 300.0;
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    l.see(load::BEFORE_CHANGE);
    let warmup = scaled(Duration::from_secs(1));
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").warmup(warmup))?;
    let started = Instant::now();
    let deadline = started + scaled(Duration::from_secs(15));
    while active(&ns)? != [i64::from(v2.pid)] {
        anyhow::ensure!(
            Instant::now() < deadline,
            "v2 not promoted: {:?}",
            report(&ns, PORT)?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not before it was ready.
    assert!(
        started.elapsed() >= warmup,
        "promoted after {:?}",
        started.elapsed()
    );
    assert!(
        v1.wait_exit(scaled(Duration::from_secs(10))),
        "v1 was not stopped"
    );
    assert_invariants(&ns, PORT)?;

    // A version that never gets ready: left a candidate, never served.
    let _v3 = App::start(
        &ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_secs(3600)),
    )?;
    std::thread::sleep(scaled(Duration::from_secs(5)));
    assert_eq!(active(&ns)?, [i64::from(v2.pid)]);
    let t = load::tally(&l.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.get("v3"), None, "{t:?}");
    assert!(t.versions.get("v2").copied().unwrap_or(0) > 0, "{t:?}");
    Ok(())
}

/// Two versions start one after the other; the older one warms up for 3 s, the newer one is
/// ready at once. Run with `readiness` (`--probe /readyz` or `--readyz-path /readyz`): the
/// newer one is promoted while the older still warms up (one newcomer's wait does not hold up
/// the next), and the older one, ready later, is never promoted over it.
fn newest_ready_serves(readiness: &[&str]) -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let timeout = format!("{}ms", scaled(Duration::from_secs(10)).as_millis());
    let mut args = vec!["watch", ":8080", "--stop-old", "--timeout", &timeout];
    args.extend(readiness);
    let log = tempfile::NamedTempFile::new()?;
    let watcher = KillOnDrop(zdt_command(&ns, &args).stderr(log.reopen()?).spawn()?);
    let l = Background::start(
        &ns,
        LoadSpec::open(
            ([127, 0, 0, 1], PORT).into(),
            300.0,
            Duration::from_secs(60),
        ),
    );
    l.see(load::BEFORE_CHANGE);
    let warmup = scaled(Duration::from_secs(3));
    let older = App::start(&ns, &AppOpts::new(PORT, "older").warmup(warmup))?;
    let older_ready = Instant::now() + warmup;
    std::thread::sleep(scaled(Duration::from_millis(300)));
    let newer = App::start(&ns, &AppOpts::new(PORT, "newer"))?;
    until_active(&ns, PORT, newer.pid, scaled(Duration::from_secs(10)))?;
    assert!(
        Instant::now() < older_ready,
        "the newer version waited for the older one's warm-up"
    );
    assert!(
        v1.wait_exit(scaled(Duration::from_secs(10))),
        "v1 not stopped"
    );
    // Past the older one's warm-up, with time for the watcher to act on it.
    std::thread::sleep(
        older_ready.saturating_duration_since(Instant::now()) + scaled(Duration::from_secs(2)),
    );
    assert_eq!(
        active(&ns)?,
        [i64::from(newer.pid)],
        "{:?}",
        report(&ns, PORT)?
    );
    assert_invariants(&ns, PORT)?;
    let t = load::tally(&l.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.get("older"), None, "{t:?}");
    assert!(t.versions.get("newer").copied().unwrap_or(0) > 0, "{t:?}");
    drop(watcher);
    let said = std::fs::read_to_string(log.path())?;
    let given_up = format!(
        "pid {} not promoted: a newer process listens on the port",
        older.pid
    );
    assert!(said.contains(&given_up), "{said}");
    Ok(())
}

#[test]
fn the_newest_ready_process_serves_whatever_order_they_get_ready_in() -> anyhow::Result<()> {
    newest_ready_serves(&["--probe", "/readyz"])
}

/// Each process's readiness URL is found per process: its own admin port.
#[test]
fn the_watcher_checks_each_process_on_its_own_admin_port() -> anyhow::Result<()> {
    newest_ready_serves(&["--readyz-path", "/readyz"])
}

/// The watcher is killed (SIGKILL) while a new version warms up, and started again: the new one
/// finds the port as the pinned maps say and promotes the waiting version once it is ready;
/// nothing was lost meanwhile.
#[test]
fn a_watcher_killed_during_a_readiness_wait_and_restarted_loses_nothing() -> anyhow::Result<()> {
    killed_during_a_readiness_wait("--readyz-path")
}

/// The same with `--probe`, whose wait has put the new version's sockets into slots as
/// candidates: the restarted watcher takes that candidate on, though its listeners are in slots
/// already and so are no newcomer's.
#[test]
fn a_watcher_killed_during_a_probe_and_restarted_loses_nothing() -> anyhow::Result<()> {
    killed_during_a_readiness_wait("--probe")
}

fn killed_during_a_readiness_wait(readiness: &str) -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let timeout = format!("{}ms", scaled(Duration::from_secs(10)).as_millis());
    let args = [
        "watch",
        ":8080",
        readiness,
        "/readyz",
        "--stop-old",
        "--timeout",
        &timeout,
    ];
    let first = KillOnDrop(zdt_command(&ns, &args).spawn()?);
    let l = Background::start(
        &ns,
        LoadSpec::open(
            ([127, 0, 0, 1], PORT).into(),
            300.0,
            Duration::from_secs(60),
        ),
    );
    l.see(load::BEFORE_CHANGE);
    let warmup = scaled(Duration::from_secs(2));
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").warmup(warmup))?;
    let ready_at = Instant::now() + warmup;
    // The first watcher has taken v2 on (it looks every 100 ms) and waits for its readiness.
    std::thread::sleep(scaled(Duration::from_millis(500)));
    drop(first);
    assert_eq!(active(&ns)?, [i64::from(v1.pid)], "promoted while warming");
    let _second = KillOnDrop(zdt_command(&ns, &args).spawn()?);
    until_active(&ns, PORT, v2.pid, scaled(Duration::from_secs(15)))?;
    assert!(
        Instant::now() >= ready_at,
        "v2 promoted before it was ready"
    );
    assert!(
        v1.wait_exit(scaled(Duration::from_secs(10))),
        "v1 not stopped"
    );
    assert_invariants(&ns, PORT)?;
    let t = load::tally(&l.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.versions.get("v2").copied().unwrap_or(0) > 0, "{t:?}");
    Ok(())
}

/// `watch --weight 30`: a new process becomes a canary with 30 % of new connections, beside the
/// active version, as `promote --weight 30` makes it.
#[test]
fn the_watcher_makes_a_canary_with_weight() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let args = ["watch", ":8080", "--no-readyz", "--weight", "30"];
    let _watcher = KillOnDrop(zdt_command(&ns, &args).spawn()?);
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let st = report(&ns, PORT)?;
        if st.role_of(v2.pid) == Some(Role::Canary) {
            assert_eq!(st.role_of(v1.pid), Some(Role::Active), "{st:?}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "v2 not a canary: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut spec = LoadSpec::open(
        ([127, 0, 0, 1], PORT).into(),
        500.0,
        Duration::from_secs(20),
    );
    spec.max_requests = 1000;
    let t = ns.run(move || {
        let mut v = Vec::new();
        load::run(&spec, &Default::default(), &mut |s| v.push(s));
        load::tally(&v)
    })?;
    assert_eq!(t.failures(), 0, "{t:?}");
    // 30 % of 1000 by flow hash: 300, with a standard deviation of about 14.5.
    let canary = t.versions.get("v2").copied().unwrap_or(0);
    assert!((240..=360).contains(&canary), "{t:?}");
    Ok(())
}

/// A member that re-creates its listener (a Go server restarted in process, nginx reloading
/// changed `listen` lines) leaves the active set naming a dead socket: until a command takes
/// the port's lock, SYNs are hashed over the whole group, a version still warming beside it
/// included. The watcher takes the lock when the listeners change, so it adopts the new
/// listener by itself; without it (the control, same run) the warming version keeps answering.
#[test]
fn the_watcher_adopts_a_recreated_listener_by_itself() -> anyhow::Result<()> {
    // Requests sent once the watcher had time to look (or, in the control, as long after the
    // re-listen): how many the warming version answered (503).
    let run = |with_watch: bool| -> anyhow::Result<(load::Tally, Option<Duration>)> {
        let ns = Netns::new()?;
        let (mut v1, _v2) = relistening_member_beside_a_warming_version(&ns, PORT)?;
        let _watcher = if with_watch {
            let args = ["watch", ":8080", "--probe", "/readyz"];
            Some(KillOnDrop(zdt_command(&ns, &args).spawn()?))
        } else {
            None
        };
        // The port as the watcher found it: v1 active, v2 a newcomer it waits for.
        let t = load::requests(&ns, PORT, 50, 200.0);
        assert_eq!(
            t.versions.get("v1"),
            Some(&50),
            "before the re-listen: {t:?}"
        );
        v1.relisten()?;
        let took = within(Duration::from_secs(3), || {
            let st = report(&ns, PORT)?;
            Ok(st.drift.unadopted.is_empty() && st.role_of(v1.pid) == Some(Role::Active))
        })?;
        let t = load::requests(&ns, PORT, 100, 200.0);
        Ok((t, took))
    };
    let (plain, plain_took) = run(false)?;
    assert_eq!(plain_took, None, "adopted with no watcher and no command");
    assert!(
        plain.count(load::Outcome::Http5xx) > 0,
        "control: the warming version answered nothing: {plain:?}"
    );
    let (t, took) = run(true)?;
    let took = took.context("the watcher did not adopt v1's new listener")?;
    println!("the watcher adopted the re-created listener {took:?} after the re-listen");
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.get("v1"), Some(&100), "{t:?}");
    Ok(())
}

/// The watcher's promotes keep the options of `promote`: with `--probation`, a version that
/// stops being ready within it is rolled back by the watcher itself (and not tried again).
/// With `--probe`, the probation asks through the public port: before that, it checked only
/// that the process lived, and this version stayed active while answering 503.
/// Members that exit leave the port as the kernel closes their sockets: the promoted version
/// crashing (SIGKILL) leaves the old one, still listening, taking the connections, and the
/// watcher promotes the next version that starts. Only what the crashed process was answering
/// fails.
#[test]
fn the_watcher_rolls_back_in_probation_and_goes_on_after_a_crash() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let probation = scaled(Duration::from_secs(3));
    let p = format!("{}ms", probation.as_millis());
    let args = ["watch", ":8080", "--probe", "/readyz", "--probation", &p];
    // Its stderr says when a promote of its has ended: a rollback's roles are written by then.
    let (watcher, started) =
        zdt_tests::harness::spawn_until(&mut zdt_command(&ns, &args), "watching")?;
    anyhow::ensure!(started, "the watcher did not start");
    let zdt_tests::harness::Paused { child, stderr } = watcher;
    let _watcher = KillOnDrop(child);
    const RATE: f64 = 300.0;
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    l.see(load::BEFORE_CHANGE);

    // v2 is ready, promoted, then its /readyz turns 503 within the probation: v1 comes back.
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    until_active(&ns, PORT, v2.pid, scaled(Duration::from_secs(10)))?;
    v2.signal(Signal::SIGUSR1);
    let said = |what: String| -> anyhow::Result<String> {
        let timeout = probation + scaled(Duration::from_secs(10));
        zdt_tests::harness::wait_for_line(&stderr, timeout, |l| {
            l.contains(&what).then(|| l.to_string())
        })
        .map_err(|_| anyhow::anyhow!("the watcher did not say {what:?}: {:?}", report(&ns, PORT)))
    };
    let line = said(format!("pid {} not promoted", v2.pid))?;
    assert!(line.contains("stopped being ready"), "{line}");
    assert_eq!(active(&ns)?, [i64::from(v1.pid)]);
    let st = report(&ns, PORT)?;
    assert_eq!(st.role_of(v2.pid), Some(Role::Draining), "{st:?}");
    assert_invariants(&ns, PORT)?;
    // Past another probation: v2 was not tried again.
    std::thread::sleep(probation);
    assert_eq!(active(&ns)?, [i64::from(v1.pid)]);

    // v3 is promoted; then it crashes. v1, draining but listening, takes the connections.
    let v3 = App::start(&ns, &AppOpts::new(PORT, "v3"))?;
    // Through its probation, so that the crash is a crash of a member, not a rollback.
    said(format!("pid {} is active", v3.pid))?;
    assert_eq!(active(&ns)?, [i64::from(v3.pid)]);
    // The probe lists the probation asked through are gone with it.
    assert_eq!(zdt_tests::harness::probe_list_len(&ns, PORT)?, 0);
    v3.signal(Signal::SIGKILL);
    let gone = within(scaled(Duration::from_secs(5)), || {
        Ok(report(&ns, PORT)?.member(v3.pid).is_none())
    })?;
    anyhow::ensure!(gone.is_some(), "v3 still a member after its crash");
    let spell = load::requests_at(RATE, Duration::from_millis(500));
    let t = load::tally(&l.finish_after(spell));
    // SIGKILL resets the connections v3 had accepted and was answering (the kernel closes
    // them with the process; zdt moves only what waits in a queue): at 300 req/s, answered in
    // well under a millisecond, one or two. Nothing else may fail.
    assert!(
        t.failures() == t.count(load::Outcome::Reset) && t.failures() <= 2,
        "{t:?}"
    );
    for v in ["v1", "v2", "v3"] {
        assert!(t.versions.contains_key(v), "{v} served nothing: {t:?}");
    }
    // The next version is promoted as the first was. (Until it is, nothing promoted listens:
    // the program hashes over the group, where a version that starts then is reached too;
    // see ARCHITECTURE, "Membership follows the kernel". The load is over by then.)
    let v4 = App::start(&ns, &AppOpts::new(PORT, "v4"))?;
    said(format!("pid {} is active", v4.pid))?;
    assert_invariants(&ns, PORT)?;
    let t = load::requests(&ns, PORT, 100, 300.0);
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.get("v4"), Some(&100), "{t:?}");
    Ok(())
}

/// A process of the app's user but another group joins the port's SO_REUSEPORT group (the
/// kernel groups by uid alone): the watcher says why and leaves it alone, ready as it is, and
/// then promotes the app's next version, of the app's group, as usual.
#[test]
fn the_watcher_leaves_a_process_of_another_group_alone() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let log = tempfile::NamedTempFile::new()?;
    let args = ["watch", ":8080", "--probe", "/readyz"];
    let watcher = KillOnDrop(zdt_command(&ns, &args).stderr(log.reopen()?).spawn()?);
    let other = App::start(&ns, &AppOpts::new(PORT, "other").gid(4242))?;
    let said = format!(
        "pid {} runs as gid 4242, not as the app's group (gid 0)",
        other.pid
    );
    let noticed = within(Duration::from_secs(5), || {
        Ok(std::fs::read_to_string(log.path())?.contains(&said))
    })?;
    anyhow::ensure!(
        noticed.is_some(),
        "{}",
        std::fs::read_to_string(log.path())?
    );
    assert_eq!(active(&ns)?, [i64::from(v1.pid)]);
    let t = load::requests(&ns, PORT, 50, 200.0);
    assert_eq!(t.versions.get("v1"), Some(&50), "{t:?}");
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    until_active(&ns, PORT, v2.pid, scaled(Duration::from_secs(10)))?;
    assert_invariants(&ns, PORT)?;
    drop(watcher);
    Ok(())
}

/// A unit's `zdt-ctl exec --listen :8080 -- APP`, which the watcher looks at while the pid is
/// still zdt-ctl making the sockets (no process serves them yet). Once exec runs the app the
/// port's listeners are the same sockets, so nothing changes that the watcher would see: it
/// looks again while a listener is unserved, and promotes the app.
#[test]
fn the_watcher_promotes_an_exec_it_first_saw_before_the_app_ran() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _watcher = KillOnDrop(zdt_command(&ns, &["watch", ":8080", "--no-readyz"]).spawn()?);
    let args = exec_demo_args(PORT, "v2", 9102);
    // Paused with its sockets made for several of the watcher's looks (one every 100 ms).
    let pause = Step::ExecListening.pausing(scaled(Duration::from_secs(1)));
    let v2 = KillOnDrop(at_failpoint(&ns, &args, &pause).child);
    until_active(&ns, PORT, v2.0.id() as i32, scaled(Duration::from_secs(10)))?;
    assert_eq!(report(&ns, PORT)?.role_of(v1.pid), Some(Role::Draining));
    Ok(())
}

/// Of two new processes, the older one (started first) binds its port after the newer one: the
/// newer one, warming up, is being taken on when the older one shows, ready at once. The newest
/// wins by start time, not by when the watcher noticed it: the older one is left a candidate and
/// the newer one promoted once ready.
#[test]
fn the_newest_by_start_wins_though_it_listened_first() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let (_v1, _watcher) = v1_under_a_probing_watcher(&ns)?;
    let older = App::start(
        &ns,
        &AppOpts::new(PORT, "older").bind_delay(scaled(Duration::from_millis(1500))),
    )?;
    // Start times count clock ticks (10 ms): several apart, so that one is newer.
    std::thread::sleep(Duration::from_millis(100));
    let newer = App::start(
        &ns,
        &AppOpts::new(PORT, "newer").warmup(scaled(Duration::from_secs(3))),
    )?;
    until_active(&ns, PORT, newer.pid, scaled(Duration::from_secs(15)))?;
    assert_eq!(
        report(&ns, PORT)?.role_of(older.pid),
        None,
        "the older one was taken on"
    );
    Ok(())
}

/// The port's listeners change while the watcher's `--probe` waits for a new version (a process of
/// another group listens, which the watcher leaves alone): the watcher takes the port's lock
/// for the change while its own probe waits without it, and the probe goes on: the new version
/// is promoted once ready.
#[test]
fn a_change_of_the_port_during_the_watchers_probe_leaves_the_probe_alone() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let (_v1, _watcher) = v1_under_a_probing_watcher(&ns)?;
    let warmup = scaled(Duration::from_secs(2));
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").warmup(warmup))?;
    std::thread::sleep(warmup / 4);
    let _other = App::start(&ns, &AppOpts::new(PORT, "other").gid(65534))?;
    until_active(&ns, PORT, v2.pid, scaled(Duration::from_secs(15)))
}

/// v1 serving the attached port, and `watch --probe /readyz` (a 10 s timeout) beside it.
fn v1_under_a_probing_watcher(ns: &Netns) -> anyhow::Result<(App, KillOnDrop)> {
    let v1 = App::start(ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(ns, &["attach", ":8080"])?;
    let timeout = format!("{}ms", scaled(Duration::from_secs(10)).as_millis());
    let args = [
        "watch",
        ":8080",
        "--probe",
        "/readyz",
        "--timeout",
        &timeout,
    ];
    Ok((v1, KillOnDrop(zdt_command(ns, &args).spawn()?)))
}

/// `watch PORT/udp --probe PATH` is refused at start (a probe is an HTTP request through the
/// public port), as `promote --probe` is: not taken for a watcher that would then refuse every
/// new process.
#[test]
fn a_probe_on_a_udp_port_is_refused_when_the_watcher_starts() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let r = zdt_tests::harness::zdt(&ns, &["watch", ":8080/udp", "--probe", "/readyz"]);
    assert_eq!(r.kind(), Some(zdt_tests::harness::Kind::BadInput), "{r:?}");
    assert!(r.stderr.contains("is UDP"), "{r:?}");
    Ok(())
}
