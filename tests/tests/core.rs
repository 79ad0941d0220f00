//! The core behaviour of zdt, each test in its own network namespace with real processes (the
//! demo service, zdt-ctl), real sockets, the real BPF program and the real kernel.
//!
//! Where a test claims that zdt prevents something, a control runs the same scenario without
//! zdt in the same test and must show the failure, so the test can fail.
use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use zdt_tests::harness::{kind_of, report, Kind, Role};
use zdt_tests::{
    harness::{fingerprint, promote_args, replace, strs, zdt, zdt_command, zdt_ok, App, AppOpts},
    load::{self, Background, LoadSpec, Outcome, Sample, Tally},
    netns::Netns,
};

const PORT: u16 = 8080;

fn addr(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

#[test]
fn warming_process_gets_nothing_until_promoted() -> anyhow::Result<()> {
    let ns = Netns::new()?;

    // Control, on another port without zdt: the kernel hashes new connections over every
    // listener of the group, the warming one included, which answers 503.
    let _c1 = App::start(&ns, &AppOpts::new(PORT + 1, "c1"))?;
    let _c2 = App::start(
        &ns,
        &AppOpts::new(PORT + 1, "c2").warmup(Duration::from_secs(3600)),
    )?;
    let control = load::requests(&ns, PORT + 1, 200, 1000.0);
    assert!(
        control.count(Outcome::Http5xx) > 0,
        "control: without zdt the warming process should get connections: {control:?}"
    );

    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_secs(2)),
    )?;
    let before = load::requests(&ns, PORT, 300, 1000.0);
    assert_eq!(before.count(Outcome::Ok), 300, "{before:?}");
    assert_eq!(before.versions.get("v1"), Some(&300), "{before:?}");
    assert_eq!(
        before.versions.get("v2"),
        None,
        "warming v2 got connections: {before:?}"
    );

    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let after = load::requests(&ns, PORT, 300, 1000.0);
    assert_eq!(after.versions.get("v2"), Some(&300), "{after:?}");
    assert_eq!(after.count(Outcome::Ok), 300, "{after:?}");

    // zdt's own counters agree: every one of those connections was steered to v2's slot.
    let st = report(&ns, PORT)?;
    assert_eq!(st.member(v2.pid).map(|m| m.steered), Some(300), "{st:?}");
    assert_eq!(st.role_of(v2.pid), Some(Role::Active), "{st:?}");
    assert_eq!(st.role_of(v1.pid), Some(Role::Draining), "{st:?}");
    assert_eq!(st.counters.fallback, 0, "{st:?}");
    Ok(())
}

/// Connections that sit un-accepted in the old listener's queue when it closes.
fn queued_then_close(with_zdt: bool) -> anyhow::Result<(Tally, u64, u64)> {
    const QUEUED: u64 = 40;
    let ns = Netns::new()?;
    // v1 never accepts: every connection it gets stays in its accept queue.
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1").stuck())?;
    if with_zdt {
        zdt_ok(&ns, &["attach", ":8080"])?;
    }
    let load = Background::start(
        &ns,
        LoadSpec::burst(addr(PORT), QUEUED, Duration::from_secs(20)),
    );
    // Wait until all of them are queued on v1's listener (the accept queue length is rx_queue
    // of a LISTEN socket in /proc/net/tcp).
    let queued = || {
        ns.run(|| {
            zdt_ctl::sockets::tcp_entries()
                .map(|t| {
                    t.iter()
                        .filter(|e| {
                            e.local_address.port() == PORT
                                && e.state == procfs::net::TcpState::Listen
                        })
                        .map(|e| u64::from(e.rx_queue))
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0)
        })
        .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued() < QUEUED && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(queued(), QUEUED, "connections did not queue on v1");

    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    if with_zdt {
        zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    }
    // v1 closes its listener with the connections still queued.
    v1.signal(Signal::SIGTERM);
    let samples: Vec<Sample> = load.finish();
    let migrated = ns.counter("TcpExt", "TCPMigrateReqSuccess")?;
    let zdt_migrated = if with_zdt {
        report(&ns, PORT)?.member(v2.pid).map_or(0, |m| m.migrated)
    } else {
        0
    };
    Ok((load::tally(&samples), migrated, zdt_migrated))
}

#[test]
fn queued_connections_migrate_to_the_new_listener() -> anyhow::Result<()> {
    // Control: without zdt the kernel resets everything queued on a closing listener.
    let (plain, _, _) = queued_then_close(false)?;
    assert!(
        plain.count(Outcome::Reset) > 0,
        "control: closing a listener with a queue should reset connections: {plain:?}"
    );

    let (t, kernel_migrated, zdt_migrated) = queued_then_close(true)?;
    assert_eq!(t.requests, 40);
    assert_eq!(t.count(Outcome::Reset), 0, "{t:?}");
    assert_eq!(t.count(Outcome::Ok), 40, "{t:?}");
    assert_eq!(
        t.versions.get("v2"),
        Some(&40),
        "all answered by the new process: {t:?}"
    );
    // The kernel and zdt's program both saw the migrations.
    assert!(
        kernel_migrated >= 40,
        "TCPMigrateReqSuccess = {kernel_migrated}"
    );
    assert_eq!(zdt_migrated, 40);
    Ok(())
}

#[test]
fn readiness_never_reached_changes_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_secs(3600)),
    )?;
    let before = fingerprint(&ns, PORT)?.expect("state");
    let mut args = promote_args(&v2, &[]);
    args.extend(["--timeout".into(), "1s".into()]);
    let r = zdt(&ns, &strs(&args));
    assert_eq!(
        r.kind(),
        Some(Kind::ReadinessTimeout),
        "readiness timeout has exit code 4: {r:?}"
    );
    assert!(
        r.stderr.contains(&v2.readyz()),
        "message names the URL: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("503"),
        "message gives the last answer: {}",
        r.stderr
    );
    assert_eq!(
        fingerprint(&ns, PORT)?.expect("state"),
        before,
        "state changed"
    );
    // The process that did not get ready is not a member, and serves nothing.
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn bad_input_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // Processes with the wrong kind of socket.
    let wrong_port = App::start(&ns, &AppOpts::new(PORT + 5, "w"))?;
    zdt_ok(&ns, &["attach", ":9090"])?;
    let no_reuseport = App::start(&ns, &AppOpts::new(9090, "n").arg("--no-reuseport"))?;
    let mut sleeper = std::process::Command::new("sleep");
    sleeper.arg("60");
    ns.command(&mut sleeper);
    let mut sleeper = sleeper.spawn()?;
    let sleeper_pid = sleeper.id().to_string();

    let before = (fingerprint(&ns, PORT)?, fingerprint(&ns, 9090)?);
    let ready = v1.readyz();
    let wp = wrong_port.pid.to_string();
    let nr = no_reuseport.pid.to_string();
    let p1 = v1.pid.to_string();
    // (arguments, exit code, text the message must contain)
    let cases: Vec<(Vec<&str>, Kind, &str)> = vec![
        (
            vec!["promote", "2147483647", "--readyz", &ready],
            Kind::BadInput,
            "pid 2147483647 does not exist",
        ),
        (
            vec!["promote", "0", "--readyz", &ready],
            Kind::BadInput,
            "\"0\"",
        ),
        (
            vec!["promote", "-5", "--readyz", &ready],
            Kind::BadInput,
            "\"-5\"",
        ),
        (
            vec!["promote", "abc", "--readyz", &ready],
            Kind::BadInput,
            "\"abc\"",
        ),
        // A process that does not listen on the port (yet) is waited for, within --timeout:
        // exit 4, saying what it does listen on.
        (
            vec![
                "promote",
                &sleeper_pid,
                "--readyz",
                &ready,
                "--port",
                "8080",
                "--timeout",
                "1s",
            ],
            Kind::ReadinessTimeout,
            "has no listening TCP socket on :8080",
        ),
        (
            vec![
                "promote",
                &wp,
                "--readyz",
                &ready,
                "--port",
                "8080",
                "--timeout",
                "1s",
            ],
            Kind::ReadinessTimeout,
            "listens on port 8085",
        ),
        (
            vec!["promote", &nr, "--readyz", &ready, "--port", "9090"],
            Kind::BadInput,
            "has no SO_REUSEPORT",
        ),
        (
            vec!["promote", &wp, "--readyz", &ready, "--port", "8085"],
            Kind::NotAttached,
            "port 8085 is not attached",
        ),
        (
            vec![
                "promote",
                &wp,
                "--readyz",
                "ftp://x/readyz",
                "--port",
                "8080",
            ],
            Kind::BadInput,
            "ftp://x/readyz",
        ),
        (
            vec!["promote", &wp, "--port", "8080"],
            Kind::BadInput,
            "--readyz",
        ),
        (
            vec!["promote", &wp, "--readyz", &ready, "--timeout", "soon"],
            Kind::BadInput,
            "\"soon\"",
        ),
        (
            vec!["promote", &wp, "--readyz", &ready],
            Kind::BadInput,
            "several ports are attached",
        ),
        // A duration beyond what the clock holds (it panicked, exit 101), a URL without a
        // host (read as the host "readyz": a DNS error), a negative backlog (taken for a flag).
        (
            vec![
                "promote",
                &wp,
                "--readyz",
                &ready,
                "--timeout",
                "300000000000years",
                "--port",
                "8080",
            ],
            Kind::BadInput,
            "\"300000000000years\"",
        ),
        (
            vec![
                "promote",
                &wp,
                "--readyz",
                "http:///readyz",
                "--port",
                "8080",
            ],
            Kind::BadInput,
            "\"http:///readyz\": it has no host",
        ),
        (
            vec!["hold", ":8080", "--backlog", "-5"],
            Kind::BadInput,
            "invalid backlog \"-5\"",
        ),
        (vec!["attach", "x:80"], Kind::BadInput, "\"x:80\""),
        (vec!["attach", ":0"], Kind::BadInput, "\":0\""),
        (
            vec!["attach", "127.0.0.1:8080"],
            Kind::BadInput,
            "already attached as :8080",
        ),
        (
            vec!["drain", "2147483647", "--port", "8080"],
            Kind::BadInput,
            "pid 2147483647 is not a member",
        ),
        (
            vec!["drain", &p1, "--port", "8080"],
            Kind::Refused,
            "would leave port 8080 with no active socket",
        ),
        (
            vec!["detach", ":8085"],
            Kind::NotAttached,
            "port 8085 is not attached",
        ),
        (vec!["status", "nope"], Kind::BadInput, "\"nope\""),
    ];
    for (args, code, text) in &cases {
        let r = zdt(&ns, args);
        assert_eq!(r.kind(), Some(*code), "zdt-ctl {}: {r:?}", args.join(" "));
        assert!(
            r.stderr.contains(text),
            "zdt-ctl {}: message {:?} lacks {text:?}",
            args.join(" "),
            r.stderr
        );
    }
    // Not root: refused before anything is read or changed.
    let mut cmd = zdt_command(
        &ns,
        &[
            "promote",
            &v1.pid.to_string(),
            "--no-readyz",
            "--port",
            "8080",
        ],
    );
    // After the setns of zdt_command (std would apply Command::uid before pre_exec hooks, and
    // setns needs root).
    // SAFETY: setuid is a plain syscall, fine between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setuid(nix::unistd::Uid::from_raw(65534)).map_err(std::io::Error::from)
        });
    }
    let r: zdt_tests::harness::Ctl = cmd.output()?.into();
    assert_eq!(r.kind(), Some(Kind::PermissionDenied), "{r:?}");
    assert!(r.stderr.contains("must run as root"), "{r:?}");

    assert_eq!(
        (fingerprint(&ns, PORT)?, fingerprint(&ns, 9090)?),
        before,
        "state changed"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    Ok(())
}

#[test]
fn concurrent_promotes_are_serialized() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_millis(500)),
    )?;
    let v3 = App::start(
        &ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_millis(500)),
    )?;
    let load = Background::start(
        &ns,
        LoadSpec::open(addr(PORT), 300.0, Duration::from_secs(30)),
    );
    let spawn = |app: &App| {
        let mut args = promote_args(app, &[]);
        args.push("--json".into());
        zdt_command(&ns, &strs(&args))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let (a, b) = (spawn(&v2)?, spawn(&v3)?);
    let (a, b) = (a.wait_with_output()?, b.wait_with_output()?);
    let promoted = |o: &std::process::Output| -> Option<serde_json::Value> {
        serde_json::from_slice(&o.stdout).ok()
    };
    // One of them switched first and drained v1; the other switched after it and drained the
    // first one (interleaved promotes would both have drained v1, or neither). The first one
    // either finished before the second switched (both exit 0), or saw its process no longer
    // active when it finished, and said so (exit 7): never "active" for a process that is not.
    let (first, second) = match (a.status.success(), b.status.success()) {
        (true, true) => {
            let (ra, rb) = (
                promoted(&a).expect("a report"),
                promoted(&b).expect("a report"),
            );
            if ra["drained"] == serde_json::json!([v1.pid]) {
                (ra["pid"].clone(), rb)
            } else {
                (rb["pid"].clone(), ra)
            }
        }
        (ok_a, ok_b) => {
            assert!(ok_a != ok_b, "both failed: {a:?} {b:?}");
            let (won, lost, lost_pid) = if ok_a {
                (&a, &b, v3.pid)
            } else {
                (&b, &a, v2.pid)
            };
            let said = String::from_utf8_lossy(&lost.stderr);
            assert_eq!(kind_of(lost.status), Some(Kind::Refused), "{said}");
            assert!(said.contains("no longer active"), "{said}");
            (
                serde_json::json!(lost_pid),
                promoted(won).expect("a report"),
            )
        }
    };
    assert_eq!(second["drained"], serde_json::json!([first]), "{second}");
    // Exactly one active member, the one promoted last, as soon as both promotes are done.
    let st = report(&ns, PORT)?;
    let active = st.pids(Role::Active);
    assert_eq!(active.len(), 1, "{st:?}");
    assert_eq!(second["pid"], active[0], "{st:?}");
    let t = load::tally(&load.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    Ok(())
}

#[test]
fn detach_restores_kernel_hashing_and_attach_is_idempotent() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    let r = zdt_ok(&ns, &["attach", ":8080"])?;
    assert!(r.stdout.contains("attached"), "{r:?}");
    let before = fingerprint(&ns, PORT)?;
    let again = zdt_ok(&ns, &["attach", ":8080"])?;
    assert!(again.stdout.contains("already attached"), "{again:?}");
    assert_eq!(
        fingerprint(&ns, PORT)?,
        before,
        "a second attach changed the state"
    );

    // v2 listens but is never promoted: with zdt it gets nothing...
    let _v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_secs(3600)),
    )?;
    let steered = load::requests(&ns, PORT, 200, 1000.0);
    assert_eq!(steered.versions.get("v1"), Some(&200), "{steered:?}");

    // ...and after detach the kernel hashes over both again, and the pinned state is gone.
    let r = zdt_ok(&ns, &["detach", ":8080"])?;
    assert!(r.stdout.contains("detached"), "{r:?}");
    let hashed = load::requests(&ns, PORT, 200, 1000.0);
    assert!(
        hashed.versions.get("v2").copied().unwrap_or(0) > 0,
        "{hashed:?}"
    );
    assert!(
        hashed.versions.get("v1").copied().unwrap_or(0) > 0,
        "{hashed:?}"
    );
    assert_eq!(fingerprint(&ns, PORT)?, None);
    // A port that is not attached (any more) is exit 3, for status as for every command.
    let st = zdt(&ns, &["status", "8080", "--json"]);
    assert_eq!(st.kind(), Some(Kind::NotAttached), "{st:?}");
    assert!(st.stderr.contains("zdt-ctl attach :8080"), "{st:?}");
    drop(v1);
    Ok(())
}

#[test]
fn several_deploys_under_load_lose_nothing() -> anyhow::Result<()> {
    const DEPLOYS: usize = 5;
    let ns = Netns::new()?;
    let mut old = App::start(&ns, &AppOpts::new(PORT, "v0"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    const RATE: f64 = 500.0;
    let load = Background::start(
        &ns,
        LoadSpec::open(addr(PORT), RATE, Duration::from_secs(60)),
    );
    for i in 1..=DEPLOYS {
        let new = App::start(
            &ns,
            &AppOpts::new(PORT, &format!("v{i}")).warmup(Duration::from_millis(400)),
        )?;
        replace(&ns, &new, &mut old)?;
        old = new;
    }
    let t = load::tally(&load.finish_after(load::AFTER_LAST_CHANGE));
    // Two seconds' worth of requests at least.
    assert!(
        t.requests > load::requests_at(RATE, Duration::from_secs(2)),
        "{t:?}"
    );
    assert_eq!(t.failures(), 0, "{t:?}");
    for i in 0..=DEPLOYS {
        assert!(
            t.versions.contains_key(&format!("v{i}")),
            "v{i} never answered: {t:?}"
        );
    }
    Ok(())
}
