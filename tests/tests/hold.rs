//! `zdt-ctl hold`: while no process is active (a stop-then-start restart, a crash), connections
//! wait on a placeholder instead of being refused or reset, and move to the next promoted process.
use std::time::Duration;
use zdt_ctl::Step;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use zdt_tests::harness::{kind_of, report, Kind, Role, Status};
use zdt_tests::{
    harness::{
        at_failpoint, exit_within, fingerprint, promote_args, queued, spawn_until, strs, until,
        zdt, zdt_command, zdt_ok, App, AppOpts, Hold,
    },
    load::{self, requests_at, scaled, Background, LoadSpec, Outcome, Tally},
    netns::Netns,
};

const PORT: u16 = 8080;

/// The warm-up of the process that restarts cold: as long as the slow limit, so that a request
/// that comes while nothing is ready waits longer than that, at any time scale.
fn warmup() -> Duration {
    scaled(Duration::from_millis(1000))
}

fn addr() -> std::net::SocketAddr {
    ([127, 0, 0, 1], PORT).into()
}

/// v1 serves under load; v1 stops; only then v2 starts, warms up for 1 s and becomes ready
/// (promoted, with zdt). No overlap: for a while nothing is ready on the port.
fn cold_restart(ns: &Netns, with_zdt: bool) -> anyhow::Result<Tally> {
    let mut v1 = App::start(ns, &AppOpts::new(PORT, "v1").close_gap(Duration::ZERO))?;
    if with_zdt {
        zdt_ok(ns, &strs(&promote_args(&v1, &[])))?;
    }
    let load = Background::start(ns, LoadSpec::open(addr(), 200.0, Duration::from_secs(30)));
    load.see(load::BEFORE_CHANGE);
    if with_zdt {
        v1.stop_behind_hold(ns, scaled(Duration::from_secs(5)))?;
    } else {
        v1.signal(Signal::SIGTERM);
        anyhow::ensure!(
            v1.wait_exit(scaled(Duration::from_secs(5))),
            "v1 did not exit"
        );
    }
    let v2 = App::start(ns, &AppOpts::new(PORT, "v2").warmup(warmup()))?;
    if with_zdt {
        zdt_ok(ns, &strs(&promote_args(&v2, &[])))?;
    } else {
        v2.wait_ready()?;
    }
    Ok(load::tally(&load.finish_after(load::AFTER_LAST_CHANGE)))
}

#[test]
fn a_cold_restart_behind_hold_loses_no_connection() -> anyhow::Result<()> {
    // Control, the same restart without zdt: connections are refused while nothing listens, and
    // the new process answers 503 while it warms up.
    let plain = cold_restart(&Netns::new()?, false)?;
    assert!(plain.count(Outcome::Refused) > 0, "control: {plain:?}");
    assert!(plain.count(Outcome::Http5xx) > 0, "control: {plain:?}");

    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let t = cold_restart(&ns, true)?;
    // Every request got a 200. Those that came while nothing was ready waited on the placeholder
    // (for up to the warm-up: slow is expected) and were then moved to v2.
    assert_eq!(t.failures(), t.count(Outcome::Slow), "{t:?}");
    assert!(t.count(Outcome::Slow) > 0, "nothing waited: {t:?}");
    let st = report(&ns, PORT)?;
    assert!(st.counters.held > 0, "{st:?}");
    // The kernel moved them, none failed. (`held` counts the program's selections, not
    // connections: runs with one selection more than migrations have been seen, so the two
    // are not compared exactly.)
    assert!(st.kernel.migrate_req_success > 0, "{st:?}");
    assert_eq!(st.kernel.migrate_req_failure, 0, "{st:?}");
    // hold says so once it has moved the queue and listens again (registered).
    hold.wait_said("moved", Duration::from_secs(5))?;
    // v2 is gone with cold_restart's end; the placeholder stays, in its own role.
    let roles: Vec<Role> = report(&ns, PORT)?.members.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::Hold], "{st:?}");
    // Detach: the hold process leaves by itself (a placeholder in a group without the program
    // would get a share of new connections and never accept them).
    zdt_ok(&ns, &["detach", ":8080"])?;
    let status = exit_within(&mut hold.child, scaled(Duration::from_secs(2)))?
        .context("hold still runs after detach")?;
    assert!(status.success(), "{status:?}");
    Ok(())
}

/// A process with a full accept queue dies (SIGKILL, no drain): its queue, which nothing else
/// could take, is reset, unless a placeholder holds it until the next process is promoted.
fn crash_with_queue(with_hold: bool) -> anyhow::Result<(Tally, Status)> {
    const QUEUED: u64 = 30;
    let ns = Netns::new()?;
    // v1 never accepts: what it is given stays queued on its listener.
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1").stuck())?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _hold = if with_hold {
        Some(Hold::start(&ns, &["0.0.0.0:8080"])?)
    } else {
        None
    };
    let burst = Background::start(
        &ns,
        LoadSpec::burst(addr(), QUEUED, Duration::from_secs(20)),
    );
    until("the burst queued on v1", Duration::from_secs(5), || {
        Ok(queued(&ns, PORT, Role::Active)? >= QUEUED)
    })?;
    v1.signal(Signal::SIGKILL);
    if with_hold {
        until("v1's queue moved to hold", Duration::from_secs(5), || {
            Ok(queued(&ns, PORT, Role::Hold)? >= QUEUED)
        })?;
    }
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let t = load::tally(&burst.finish_after(load::AFTER_LAST_CHANGE));
    assert_eq!(t.requests, QUEUED, "{t:?}");
    Ok((t, report(&ns, PORT)?))
}

#[test]
fn a_crashed_process_queue_waits_on_the_placeholder() -> anyhow::Result<()> {
    let (plain, _) = crash_with_queue(false)?;
    assert!(plain.count(Outcome::Reset) > 0, "control: {plain:?}");

    let (t, st) = crash_with_queue(true)?;
    assert_eq!(
        t.count(Outcome::Ok) + t.count(Outcome::Slow),
        t.requests,
        "{t:?} {st:?}"
    );
    // They reached the placeholder by migration (v1's listener closed with them queued).
    assert!(st.counters.held > 0, "{st:?}");
    assert_eq!(st.kernel.migrate_req_failure, 0, "{st:?}");
    Ok(())
}

#[test]
fn hold_refuses_a_bad_address_and_changes_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let before = fingerprint(&ns, PORT)?;
    assert!(before.is_some());
    // 192.0.2.1 (TEST-NET-1) is on no interface of the namespace; [::]:8080 is not covered by
    // the attached 0.0.0.0:8080.
    for (spec, says) in [
        ("192.0.2.1:8080", "cannot listen on 192.0.2.1:8080"),
        ("[::]:8080", "does not cover [::]:8080"),
        ("0.0.0.0:99999", "invalid address"),
    ] {
        let out = zdt(&ns, &["hold", spec]);
        assert_eq!(out.kind(), Some(Kind::BadInput), "{spec}: {out:?}");
        assert!(out.stderr.contains(says), "{spec}: {out:?}");
        assert_eq!(fingerprint(&ns, PORT)?, before, "{spec} changed the state");
    }
    // No placeholder was left listening: only v1's listener is on the port.
    let listeners = ns.run(|| {
        zdt_ctl::sockets::listen_entries(zdt_ctl::addr::Proto::Tcp)
            .map(|t| t.values().filter(|e| e.local.port() == PORT).count())
    })??;
    assert_eq!(listeners, 1);
    Ok(())
}

#[test]
fn a_family_no_process_serves_is_reset_after_max_wait() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // The app serves IPv4 only; the hold covers both families (`:8080`).
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _hold = Hold::start(&ns, &[":8080", "--max-wait", "1s"])?;
    zdt_ok(&ns, &strs(&promote_args(&v1, &[])))?;
    let (v6, took, v4) = ns.run(|| {
        use std::io::{Read, Write};
        let ask = |to: &str| -> (std::io::Result<usize>, Duration) {
            let start = std::time::Instant::now();
            let r = (|| {
                let mut s = std::net::TcpStream::connect(to)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf)?;
                Ok(buf.len())
            })();
            (r, start.elapsed())
        };
        let (v6, took) = ask("[::1]:8080");
        let (v4, _) = ask("127.0.0.1:8080");
        (v6.map_err(|e| e.kind()), took, v4.map_err(|e| e.kind()))
    })?;
    // IPv6: the placeholder took the connection (nothing else listens on [::]:8080) and, with no
    // IPv6 member ever ready, reset it after the 1 s maximum wait instead of keeping it until
    // the client gave up (10 s here).
    assert_eq!(
        v6,
        Err(std::io::ErrorKind::ConnectionReset),
        "took {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // IPv4 is served as usual.
    assert!(v4.is_ok_and(|n| n > 0), "{v4:?}");
    Ok(())
}

#[test]
fn a_backlog_above_4096_survives_every_move() -> anyhow::Result<()> {
    const WAITING: u64 = 5;
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let mut hold = Hold::start(&ns, &["0.0.0.0:8080", "--backlog", "8192"])?;
    // Twice: connections wait while nothing is promoted, then move to the next process. The
    // placeholder listens again after each move, with its backlog of 8192.
    for v in ["v1", "v2"] {
        let burst = Background::start(
            &ns,
            LoadSpec::burst(addr(), WAITING, Duration::from_secs(20)),
        );
        until("the burst waiting on hold", Duration::from_secs(5), || {
            Ok(queued(&ns, PORT, Role::Hold)? >= WAITING)
        })?;
        let app = App::start(&ns, &AppOpts::new(PORT, v))?;
        zdt_ok(&ns, &strs(&promote_args(&app, &[])))?;
        let t = load::tally(&burst.finish());
        assert_eq!(
            t.count(Outcome::Ok) + t.count(Outcome::Slow),
            WAITING,
            "{v}: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            hold.child.try_wait()?.is_none(),
            "hold exited after the move to {v}: {:?}",
            hold.lines.try_iter().collect::<Vec<_>>()
        );
        app.signal(Signal::SIGKILL);
        drop(app);
    }
    Ok(())
}

#[test]
fn detach_while_hold_runs_loses_no_connection() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let mut hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let l = Background::start(&ns, LoadSpec::open(addr(), 400.0, Duration::from_secs(30)));
    l.see(requests_at(400.0, Duration::from_millis(500)));
    // The placeholders go before the program does: with the program gone first, kernel hashing
    // gave the placeholder, which never accepts, about half of the new connections until hold
    // noticed and exited, resetting them.
    zdt_ok(&ns, &["detach", "0.0.0.0:8080"])?;
    anyhow::ensure!(
        exit_within(&mut hold.child, scaled(Duration::from_secs(2)))?.is_some(),
        "hold still runs"
    );
    let t = load::tally(&l.finish_after(requests_at(400.0, Duration::from_millis(500))));
    assert!(
        t.requests > requests_at(400.0, Duration::from_millis(750)),
        "{t:?}"
    );
    assert_eq!(t.failures(), 0, "{t:?}");
    Ok(())
}

/// A port attached as `:PORT` and a placeholder on one address of it (`127.0.0.1:PORT`): the
/// kernel puts that socket in a group of its own and prefers it for that address, so every
/// connection to 127.0.0.1 went to the placeholder, which never accepts, while the app served.
/// Refused (exit 2, naming what to hold instead); the wildcards of the attached spec are not.
#[test]
fn hold_on_one_address_of_a_wildcard_port_is_refused() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut hold = zdt_command(&ns, &["hold", "127.0.0.1:8080"])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let Some(kind) = exit_within(&mut hold, scaled(Duration::from_secs(5)))?.map(kind_of) else {
        let _ = hold.kill();
        hold.wait()?;
        let t = load::requests(&ns, PORT, 10, 1000.0);
        anyhow::bail!("hold 127.0.0.1:8080 runs beside :8080; 10 requests then: {t:?}");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut hold.stderr.take().expect("stderr"), &mut err)?;
    assert_eq!(kind, Some(Kind::BadInput), "{err}");
    assert!(err.contains("hold :8080"), "{err}");
    let t = load::requests(&ns, PORT, 10, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&10), "{t:?}");
    Ok(())
}

/// A detach killed after it shut hold's placeholders down leaves the port attached: hold takes
/// its placeholders back into the group, and a crash of the only member then waits on them
/// instead of being refused.
/// `status` reads without the port's lock, so it sees whatever a command has written so far:
/// a placeholder hold has put into the socket array is hold's from that write on, never a
/// "candidate" (which a later promote or rollback would take for an interrupted promote's).
#[test]
fn a_placeholder_is_never_seen_as_a_candidate() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let args = ["hold".to_string(), "0.0.0.0:8080".to_string()];
    let mut hold = at_failpoint(&ns, &args, Step::HoldInserted.name()).child;
    let st = report(&ns, PORT);
    hold.kill()?;
    hold.wait()?;
    let st = st?;
    let pid = hold.id() as i32;
    assert!(st.pids(Role::Candidate).is_empty(), "{st:?}");
    assert_eq!(st.role_of(pid), Some(Role::Hold), "{st:?}");
    Ok(())
}

#[test]
fn a_detach_killed_halfway_leaves_hold_protecting_the_port() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let mut hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let args = ["detach".to_string(), "0.0.0.0:8080".to_string()];
    let mut detach = at_failpoint(&ns, &args, Step::PlaceholdersShut.name()).child;
    detach.kill()?;
    detach.wait()?;
    // Registered again: the live set names hold's placeholder.
    let pid = hold.child.id() as i32;
    until(
        "hold's placeholder registered again",
        Duration::from_secs(3),
        || Ok(report(&ns, PORT)?.role_of(pid) == Some(Role::Hold)),
    )?;
    assert!(hold.child.try_wait()?.is_none(), "hold exited");
    // The only member crashes; a connection made now waits for the next one.
    v1.signal(Signal::SIGKILL);
    anyhow::ensure!(
        v1.wait_exit(scaled(Duration::from_secs(5))),
        "v1 did not die"
    );
    let waiting = Background::start(&ns, LoadSpec::burst(addr(), 5, Duration::from_secs(20)));
    until("the burst waiting on hold", Duration::from_secs(5), || {
        Ok(queued(&ns, PORT, Role::Hold)? >= 5)
    })?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let t = load::tally(&waiting.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.get("v2"), Some(&5), "{t:?}");
    Ok(())
}

/// The load under which the last member is drained, in requests/s.
const DRAIN_RATE: f64 = 200.0;

/// `drain --force PID` of the only active member, under DRAIN_RATE, with or without a
/// `zdt-ctl hold` running; returns drain's output, the load's tally, and whether the state
/// changed.
fn drain_last_member(with_hold: bool) -> anyhow::Result<(zdt_tests::harness::Ctl, Tally, bool)> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    zdt_ok(&ns, &strs(&promote_args(&v1, &[])))?;
    // The default --max-wait (30 s): longer than the load client waits for an answer (5 s).
    let _hold = if with_hold {
        Some(Hold::start(&ns, &["0.0.0.0:8080"])?)
    } else {
        None
    };
    let before = fingerprint(&ns, PORT)?;
    let l = Background::start(
        &ns,
        LoadSpec::open(addr(), DRAIN_RATE, Duration::from_secs(30)),
    );
    l.see(3);
    let r = zdt(&ns, &["drain", &v1.pid.to_string(), "--force"]);
    let t = load::tally(&l.finish_after(requests_at(DRAIN_RATE, Duration::from_millis(1500))));
    Ok((r, t, fingerprint(&ns, PORT)? != before))
}

#[test]
fn drain_force_of_the_last_member_beside_hold_is_refused() -> anyhow::Result<()> {
    // Without hold, `--force` does what it says: new connections go to kernel hashing, which
    // has only v1 to give them to (it still listens), so nothing is lost.
    let enough = requests_at(DRAIN_RATE, Duration::from_secs(1));
    let (r, t, changed) = drain_last_member(false)?;
    assert!(r.ok() && changed, "control: {r:?}");
    assert!(t.requests > enough && t.failures() == 0, "control: {t:?}");

    // With hold, the placeholder would be the only destination: every new connection would wait
    // on it for a promote (up to hold's --max-wait) while v1, which could serve it, listens.
    // Refused, and nothing changes.
    let (r, t, changed) = drain_last_member(true)?;
    assert_eq!(t.failures(), 0, "{t:?} {r:?}");
    assert!(t.requests > enough, "{t:?}");
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(
        r.stderr.contains("zdt-ctl hold") && r.stderr.contains("still listens"),
        "{r:?}"
    );
    assert!(!changed, "the refused drain changed the state");
    Ok(())
}

#[test]
fn hold_registers_while_a_promote_waits_for_readiness() -> anyhow::Result<()> {
    const RATE: f64 = 200.0;
    // Long enough for hold to start and register meanwhile, at any time scale.
    let warmup = scaled(Duration::from_secs(3));
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let l = Background::start(&ns, LoadSpec::open(addr(), RATE, Duration::from_secs(30)));
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").warmup(warmup))?;
    // hold starts while the promote waits for v2's /readyz (3 s).
    let mut cmd = zdt_command(&ns, &strs(&promote_args(&v2, &["--stop-old", "--json"])));
    cmd.env("RUST_LOG", "zdt_ctl=info")
        .stdout(std::process::Stdio::piped());
    let (promote, waiting) = spawn_until(&mut cmd, "waiting for readiness")?;
    assert!(waiting, "the promote ended before it waited for readiness");
    let hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let registered_ms = zdt_ctl::state::now_ms();
    let out = promote.child.wait_with_output()?;
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // It registered before the promote's switch, i.e. during the readiness wait: before the
    // fix it waited for the promote's lock, which the promote held until after its switch.
    let switched_ms = report["switched_at_ms"].as_u64().unwrap_or(0);
    assert!(
        registered_ms < switched_ms,
        "hold registered {} ms after the switch: {report}",
        registered_ms.saturating_sub(switched_ms)
    );
    assert_eq!(
        report["stopped"][0]["pid"],
        serde_json::json!(v1.pid),
        "{report}"
    );
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    assert!(
        t.requests > requests_at(RATE, Duration::from_millis(2500)),
        "{t:?}"
    );
    assert_eq!(t.failures(), 0, "{t:?}");
    // The switch kept hold's placeholder: v2 active, the placeholder held.
    let roles = zdt_tests::harness::roles(&ns, PORT)?;
    let want = BTreeSet::from([(v2.pid, Role::Active), (hold.child.id() as i32, Role::Hold)]);
    assert_eq!(roles, want);
    Ok(())
}
