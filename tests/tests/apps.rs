//! Real apps, the way they start and run: an app that binds its port late, an app running as
//! another user beside `zdt-ctl hold`, apps with one dual-stack socket, a supervisor that keeps
//! the listening socket it handed over, and a port served on one address only.
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use zdt_tests::harness::{report, Kind};
use zdt_tests::{
    harness::{
        at_log_event, bin, fingerprint, promote_args, replace, strs, zdt, zdt_ok, App, AppOpts,
        Ctl, Hold,
    },
    load::{self, requests_at, scaled, Background, LoadSpec, Outcome, Tally},
    netns::Netns,
};

const PORT: u16 = 8080;
/// The uid of `nobody` on Debian (and most distributions).
const NOBODY: u32 = 65534;

fn v4() -> SocketAddr {
    ([127, 0, 0, 1], PORT).into()
}

fn v6() -> SocketAddr {
    (std::net::Ipv6Addr::LOCALHOST, PORT).into()
}

/// One open-loop load per address, new connection per request.
fn loads(ns: &Netns, to: &[SocketAddr], rate: f64) -> Vec<Background> {
    to.iter()
        .map(|a| Background::start(ns, LoadSpec::open(*a, rate, Duration::from_secs(60))))
        .collect()
}

/// Stops every load once each has seen the state the test left ([`load::AFTER_LAST_CHANGE`]).
fn finish(loads: Vec<Background>) -> Vec<Tally> {
    loads
        .into_iter()
        .map(|l| load::tally(&l.finish_after(load::AFTER_LAST_CHANGE)))
        .collect()
}

/// The listeners of the port in the namespace: (address, owner uid, IPV6_V6ONLY).
fn listeners(ns: &Netns) -> anyhow::Result<Vec<(SocketAddr, u32, bool)>> {
    ns.run(|| {
        zdt_ctl::sockets::listen_entries(zdt_ctl::addr::Proto::Tcp).map(|t| {
            t.values()
                .filter(|e| e.local.port() == PORT)
                .map(|e| (e.local, e.uid, e.v6only))
                .collect()
        })
    })?
}

#[test]
fn promote_waits_for_a_process_that_binds_late() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    const RATE: f64 = 300.0;
    let mut old = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let l = loads(&ns, &[v4()], RATE);
    for v in ["v2", "v3"] {
        // The deploy script's way: start the app, pass its pid to promote at once. The app binds
        // its port 3 s after it starts (a JVM, an app that loads its configuration first).
        let new = App::start(
            &ns,
            &AppOpts::new(PORT, v)
                .bind_delay(Duration::from_secs(3))
                .warmup(Duration::from_millis(300)),
        )?;
        let t = Instant::now();
        let r = replace(&ns, &new, &mut old)?;
        // It could not have switched before the app listened: it waited.
        assert!(t.elapsed() >= Duration::from_millis(2500), "{r:?}");
        old = new;
    }
    let t = finish(l).remove(0);
    assert!(
        t.requests > requests_at(RATE, Duration::from_secs(5)),
        "{t:?}"
    );
    assert_eq!(t.failures(), 0, "{t:?}");
    assert_eq!(t.versions.len(), 3, "{t:?}");
    Ok(())
}

/// Runs `zdt-ctl ARGS` and checks that it failed with `kind` saying `says`, without waiting out
/// its 60 s timeout, and without changing the state.
fn fails_fast(ns: &Netns, args: &[&str], kind: Kind, says: &str) -> anyhow::Result<()> {
    ends_fast(ns, &format!("{args:?}"), || Ok(zdt(ns, args)), kind, says)
}

/// Runs the zdt-ctl command that `run` runs (`what`) and checks what [`fails_fast`] does.
fn ends_fast(
    ns: &Netns,
    what: &str,
    run: impl FnOnce() -> anyhow::Result<Ctl>,
    kind: Kind,
    says: &str,
) -> anyhow::Result<()> {
    let before = fingerprint(ns, PORT)?;
    let t = Instant::now();
    let r = run()?;
    assert_eq!(r.kind(), Some(kind), "{what}: {r:?}");
    assert!(r.stderr.contains(says), "{what}: {r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "{what} waited its timeout: {r:?}"
    );
    assert_eq!(fingerprint(ns, PORT)?, before, "{what} changed the state");
    Ok(())
}

#[test]
fn promote_fails_at_once_for_what_waiting_cannot_fix() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let late = || AppOpts::new(PORT, "v2").bind_delay(Duration::from_millis(700));

    // It binds the port on another address than the attached one.
    let other = App::start(&ns, &late().arg("--addr").arg("127.0.0.1"))?;
    fails_fast(
        &ns,
        &strs(&promote_args(&other, &[])),
        Kind::BadInput,
        "listens on 127.0.0.1:8080, not on :8080",
    )?;
    // It exits before it binds: killed once the promote has started waiting for it.
    let dies = App::start(&ns, &late())?;
    let args = ["promote", &dies.pid.to_string(), "--no-readyz"].map(String::from);
    ends_fast(
        &ns,
        "a promote of a process that dies",
        || {
            let waiting = at_log_event(&ns, &args, "promote started");
            dies.signal(Signal::SIGKILL);
            waiting.finish()
        },
        Kind::ProcessDied,
        "exited before it listened on :8080",
    )?;
    // A start script that runs the app as its child instead of exec'ing it.
    let mut script = Command::new("sh");
    script
        .args(["-c", r#""$0" "$@"; true"#])
        .arg(bin("zdt-demo-app"))
        .args(["--port", "8080", "--version", "v2"])
        .stdout(Stdio::null());
    ns.command(&mut script);
    let mut script = script.spawn()?;
    let sh = script.id().to_string();
    fails_fast(
        &ns,
        &["promote", &sh, "--no-readyz"],
        Kind::BadInput,
        "its child pid",
    )?;
    let _ = Command::new("pkill").args(["-P", &sh]).status();
    let _ = script.kill();
    let _ = script.wait();
    // pid 1 is never a service process.
    fails_fast(
        &ns,
        &["promote", "1", "--no-readyz"],
        Kind::BadInput,
        "init process",
    )?;
    // Never listening within --timeout: exit 4, the readiness timeout, after that long.
    let never = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").bind_delay(Duration::from_secs(3600)),
    )?;
    let r = zdt(&ns, &strs(&promote_args(&never, &["--timeout", "1s"])));
    assert_eq!(r.kind(), Some(Kind::ReadinessTimeout), "{r:?}");
    assert!(
        r.stderr.contains("has no listening TCP socket on :8080") && r.stderr.contains("--timeout"),
        "{r:?}"
    );

    // On a port with no member yet, a socket without SO_REUSEPORT binds, and is refused as soon
    // as it listens.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let plain = App::start(&ns, &late().arg("--no-reuseport"))?;
    fails_fast(
        &ns,
        &strs(&promote_args(&plain, &[])),
        Kind::BadInput,
        "has no SO_REUSEPORT",
    )?;
    Ok(())
}

/// The warm-up of the apps that restart cold. With their bind delay (as long again), a request
/// that comes when the old process has gone waits longer than the slow limit, at any time scale.
fn cold_warmup() -> Duration {
    scaled(Duration::from_millis(500))
}

/// A restart without overlap behind `zdt-ctl hold`, the way examples/app.service runs it: the
/// app is started, and promoted at once (ExecStartPost), before it has bound its port.
fn cold_restart(ns: &Netns, o: &AppOpts, to: &[SocketAddr]) -> anyhow::Result<Vec<Tally>> {
    const RATE: f64 = 200.0;
    let start = |v: &str| -> anyhow::Result<App> {
        let mut o = o.clone();
        o.version = v.into();
        let app = App::start(ns, &o.bind_delay(cold_warmup()))?;
        zdt_ok(ns, &strs(&promote_args(&app, &[])))?;
        Ok(app)
    };
    let mut v1 = start("v1")?;
    let l = loads(ns, to, RATE);
    std::thread::sleep(Duration::from_millis(500));
    v1.stop_behind_hold(ns, scaled(Duration::from_secs(5)))?;
    let _v2 = start("v2")?;
    std::thread::sleep(Duration::from_millis(500));
    let tallies = finish(l);
    // Every request answered 200; some waited on the placeholder (slow), none failed otherwise.
    for t in &tallies {
        let st = report(ns, PORT)?;
        assert!(
            t.requests > requests_at(RATE, Duration::from_secs(1)),
            "{t:?}"
        );
        assert_eq!(t.failures(), t.count(Outcome::Slow), "{t:?} {st:?}");
        assert!(t.versions.contains_key("v2"), "{t:?}");
    }
    Ok(tallies)
}

#[test]
fn a_non_root_app_beside_hold_restarts_cold_without_a_loss() -> anyhow::Result<()> {
    // Control: a placeholder of root's, as hold made before `--user`. The kernel shares a port
    // only between sockets of one uid: the app, run as nobody, cannot bind at all.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let root_hold = Hold::start(&ns, &["0.0.0.0:8080", "--user", "0"])?;
    let mut app = App::start(
        &ns,
        &AppOpts::new(PORT, "v1")
            .uid(NOBODY)
            .bind_delay(Duration::from_millis(100)),
    )?;
    assert!(
        app.wait_exit(scaled(Duration::from_secs(5))),
        "nobody's app bound"
    );
    drop(root_hold);

    // The placeholder made for the app's user before any app runs (`--user`), as
    // examples/zdt-hold.service does.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let _hold = Hold::start(&ns, &["0.0.0.0:8080", "--user", "nobody"])?;
    let nobody = AppOpts::new(PORT, "v").uid(NOBODY).warmup(cold_warmup());
    let t = cold_restart(&ns, &nobody, &[v4()])?.remove(0);
    assert!(t.count(Outcome::Slow) > 0, "nothing waited: {t:?}");

    // Without --user, hold takes the uid of the app that listens already.
    let ns = Netns::new()?;
    let _v0 = App::start(&ns, &AppOpts::new(PORT, "v0").uid(NOBODY))?;
    zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    let _hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let found = listeners(&ns)?;
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|(_, uid, _)| *uid == NOBODY), "{found:?}");
    // A --user that is not the app's is refused: its placeholder would be in a group of its own.
    let r = zdt(&ns, &["hold", "0.0.0.0:8080", "--user", "0"]);
    assert_eq!(r.kind(), Some(Kind::BadInput), "{r:?}");
    assert!(r.stderr.contains("belong to uid 65534"), "{r:?}");
    Ok(())
}

#[test]
fn dual_stack_apps_hand_over_on_both_families() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let dual = |v: &str| AppOpts::new(PORT, v).arg("--dual-stack");
    let mut old = App::start(&ns, &dual("v1"))?;
    let found = listeners(&ns)?;
    let any6: SocketAddr = "[::]:8080".parse()?;
    assert_eq!(found, [(any6, 0, false)]);
    zdt_ok(&ns, &["attach", ":8080"])?;
    const RATE: f64 = 200.0;
    let l = loads(&ns, &[v4(), v6()], RATE);
    for v in ["v2", "v3"] {
        let new = App::start(&ns, &dual(v).warmup(Duration::from_millis(300)))?;
        replace(&ns, &new, &mut old)?;
        old = new;
    }
    for t in finish(l) {
        assert!(
            t.requests > requests_at(RATE, Duration::from_secs(1)),
            "{t:?}"
        );
        assert_eq!(t.failures(), 0, "{t:?}");
        assert_eq!(t.versions.len(), 3, "{t:?}");
    }
    Ok(())
}

#[test]
fn dual_stack_and_split_apps_behind_hold_restart_cold_on_both_families() -> anyhow::Result<()> {
    // Dual-stack, hold started before any app: --dual-stack.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _hold = Hold::start(&ns, &[":8080", "--dual-stack"])?;
    let dual = AppOpts::new(PORT, "v")
        .arg("--dual-stack")
        .warmup(cold_warmup());
    cold_restart(&ns, &dual, &[v4(), v6()])?;
    // Split, the same restart: hold's default layout when no app listens.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _hold = Hold::start(&ns, &[":8080"])?;
    let split = AppOpts::new(PORT, "v").arg("--split").warmup(cold_warmup());
    cold_restart(&ns, &split, &[v4(), v6()])?;
    Ok(())
}

#[test]
fn a_layout_change_is_refused_before_anything_changes() -> anyhow::Result<()> {
    for (from, to) in [("--split", "--dual-stack"), ("--dual-stack", "--split")] {
        let ns = Netns::new()?;
        let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1").arg(from))?;
        zdt_ok(&ns, &["attach", ":8080"])?;
        let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").arg(to))?;
        fails_fast(
            &ns,
            &strs(&promote_args(&v2, &["--stop-old"])),
            Kind::Refused,
            "SO_REUSEPORT group of its own",
        )?;
        // v1 still serves IPv6. IPv4 too, unless v2 has an IPv4 socket beside v1's dual-stack
        // one: the kernel gives every IPv4 client to it as soon as it listens, before any
        // promote, in a group of its own (the README says so).
        let [on_v4, on_v6] = ns.run(|| {
            [v4(), v6()].map(|a| {
                let mut spec = LoadSpec::open(a, 100.0, Duration::from_secs(5));
                spec.max_requests = 20;
                let mut out = Vec::new();
                load::run(&spec, &Default::default(), &mut |s| out.push(s));
                load::tally(&out)
            })
        })?;
        let v4_to = if to == "--split" { "v2" } else { "v1" };
        for (t, by) in [(on_v4, v4_to), (on_v6, "v1")] {
            assert_eq!(t.count(Outcome::Ok), 20, "{from} -> {to}: {t:?}");
            assert_eq!(
                t.versions.keys().collect::<Vec<_>>(),
                [by],
                "{from} -> {to}: {t:?}"
            );
        }
        // hold takes the app's layout, and refuses another one.
        let refused = if from == "--split" {
            vec![(vec!["hold", ":8080", "--dual-stack"], "are split")]
        } else {
            vec![
                (vec!["hold", ":8080", "--split"], "is dual-stack"),
                (vec!["hold", "0.0.0.0:8080"], "Use :8080 instead"),
            ]
        };
        for (args, says) in refused {
            fails_fast(&ns, &args, Kind::BadInput, says)?;
        }
        let hold = Hold::start(&ns, &[":8080"])?;
        let layout = if from == "--split" {
            "split"
        } else {
            "one dual-stack"
        };
        assert!(hold.registered.contains(layout), "{}", hold.registered);
    }
    // The failure this prevents: split placeholders (hold's default before any app) beside a
    // dual-stack app take every IPv4 client into a group nothing moves them out of.
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let _hold = Hold::start(&ns, &[":8080"])?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1").arg("--dual-stack"))?;
    fails_fast(
        &ns,
        &strs(&promote_args(&v1, &[])),
        Kind::Refused,
        "--dual-stack",
    )?;
    Ok(())
}

/// A service started by a supervisor that made its listener and keeps a copy (systemd's socket
/// activation): (the supervisor, the service's pid). The service's admin port is `admin`.
fn supervised(ns: &Netns, version: &str, admin: u16) -> anyhow::Result<(std::process::Child, i32)> {
    use std::io::BufRead as _;
    let mut cmd = Command::new(bin("zdt-supervisor"));
    cmd.args(["--listen", "0.0.0.0:8080", "--"])
        .arg(bin("zdt-demo-app"))
        .args(["--port", "8080", "--version", version])
        .args(["--admin-port", &admin.to_string()])
        .stdout(Stdio::piped());
    ns.command(&mut cmd);
    let mut sup = cmd.spawn()?;
    let out = sup.stdout.take().expect("piped");
    let mut lines = std::io::BufReader::new(out).lines();
    let pid = loop {
        let line = lines.next().transpose()?.unwrap_or_default();
        if let Some(p) = line.strip_prefix("child=") {
            break p.parse()?;
        }
        anyhow::ensure!(!line.is_empty(), "zdt-supervisor said no child=");
    };
    // Keep reading (and dropping) what the service prints, so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((sup, pid))
}

#[test]
fn a_supervisor_that_keeps_the_socket_is_never_a_member() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let (mut sup, v1) = supervised(&ns, "v1", 9101)?;
    // The attach adopts the service, not the supervisor that holds the socket too.
    let r = zdt_ok(&ns, &["attach", "0.0.0.0:8080"])?;
    assert!(r.stdout.contains(&format!("active: pid {v1} (")), "{r:?}");
    let st = report(&ns, PORT)?;
    let pids: Vec<i32> = st.members.iter().map(|m| m.pid).collect();
    assert_eq!(pids, [v1], "{st:?}");
    // The supervisor, and zdt-ctl itself, are refused as PID.
    let sup_pid = sup.id().to_string();
    fails_fast(
        &ns,
        &["promote", &sup_pid, "--no-readyz"],
        Kind::BadInput,
        &format!("pass pid {v1}"),
    )?;
    let hold = Hold::start(&ns, &["0.0.0.0:8080"])?;
    let hold_pid = hold.child.id().to_string();
    fails_fast(
        &ns,
        &["promote", &hold_pid, "--no-readyz"],
        Kind::BadInput,
        "zdt-ctl itself",
    )?;

    let l = loads(&ns, &[v4()], 200.0);
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_millis(300)),
    )?;
    let r = zdt_ok(&ns, &strs(&promote_args(&v2, &["--stop-old"])))?;
    // --stop-old stopped the service, never the supervisor nor hold.
    assert!(
        r.stdout.contains(&format!("stopped: pid {v1} exited")),
        "{r:?}"
    );
    assert!(
        sup.try_wait()?.is_none(),
        "the supervisor was stopped: {r:?}"
    );
    l[0].see(load::BEFORE_CHANGE);
    // The socket outlives the service while the supervisor keeps it; what was still queued on
    // it moves to v2 when the supervisor closes it.
    sup.kill()?;
    sup.wait()?;
    let t = finish(l).remove(0);
    assert_eq!(t.failures(), 0, "{t:?}");
    drop(hold);
    Ok(())
}

#[test]
fn attach_names_listeners_on_another_address_and_status_says_not_attached() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(
        &ns,
        &AppOpts::new(PORT, "v1").arg("--addr").arg("127.0.0.1"),
    )?;
    let r = zdt(&ns, &["attach", ":8080"]);
    assert_eq!(r.kind(), Some(Kind::BadInput), "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("127.0.0.1:8080 (pid {})", v1.pid))
            && r.stderr.contains("zdt-ctl attach 127.0.0.1:8080"),
        "{r:?}"
    );
    assert_eq!(
        fingerprint(&ns, PORT)?,
        None,
        "the failed attach created state"
    );
    // A port never attached: exit 3, as the exit-code table says.
    let r = zdt(&ns, &["status", "8080"]);
    assert_eq!(r.kind(), Some(Kind::NotAttached), "{r:?}");
    let r = zdt_ok(&ns, &["attach", "127.0.0.1:8080"])?;
    assert!(
        r.stdout.contains(&format!("active: pid {}", v1.pid)),
        "{r:?}"
    );
    Ok(())
}
