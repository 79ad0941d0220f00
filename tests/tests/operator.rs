//! How zdt fits a real server: dual stack, several ports, socket activation, metrics.
use std::{net::SocketAddr, process::Stdio, time::Duration};
use zdt_ctl::Step;

use zdt_tests::harness::{kind_of, report, Kind};
use zdt_tests::{
    harness::{
        at_failpoint, bin, connect_when_listening, exec_demo_args, exit_within, status, zdt,
        zdt_command, zdt_ok, App, AppOpts, KillOnDrop,
    },
    load::{self, Background, LoadSpec},
    netns::Netns,
};

const PORT: u16 = 8080;
/// Where `zdt-ctl metrics --listen` serves in these tests.
const METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9814);

fn promote(ns: &Netns, app: &App, extra: &[&str]) -> anyhow::Result<zdt_tests::harness::Ctl> {
    let pid = app.pid.to_string();
    let url = app.readyz();
    let mut args = vec!["promote", &pid, "--readyz", &url];
    args.extend(extra);
    zdt_ok(ns, &args)
}

#[test]
fn dual_stack_is_handed_over_on_both_families() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1").arg("--split"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let st = report(&ns, PORT)?;
    let families: Vec<&str> = st.groups.iter().map(|g| g.family.as_str()).collect();
    assert_eq!(families, ["ipv4", "ipv6"], "{st:?}");
    let v4: SocketAddr = ([127, 0, 0, 1], PORT).into();
    let v6: SocketAddr = "[::1]:8080".parse()?;
    let loads =
        [v4, v6].map(|a| Background::start(&ns, LoadSpec::open(a, 200.0, Duration::from_secs(30))));
    for l in &loads {
        l.see(load::BEFORE_CHANGE);
    }
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2")
            .arg("--split")
            .warmup(Duration::from_millis(500)),
    )?;
    promote(&ns, &v2, &["--stop-old"])?;
    let st = report(&ns, PORT)?;
    assert!(st.attached, "{st:?}");
    for g in &st.groups {
        assert!(g.steering, "{st:?}");
    }
    let active = &st.members[0];
    assert_eq!(active.pid, v2.pid);
    assert_eq!(active.slots.len(), 2, "one slot per family: {st:?}");
    for (family, l) in ["ipv4", "ipv6"].iter().zip(loads) {
        let t = load::tally(&l.finish());
        assert_eq!(t.failures(), 0, "{family}: {t:?}");
        assert!(
            t.versions.contains_key("v1") && t.versions.contains_key("v2"),
            "{family}: {t:?}"
        );
    }
    drop(v1);
    Ok(())
}

#[test]
fn one_promote_hands_over_several_ports() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(
        &ns,
        &AppOpts::new(PORT, "v1").arg("--extra-port").arg("8443"),
    )?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    zdt_ok(&ns, &["attach", ":8443"])?;
    let loads = [8080u16, 8443].map(|p| {
        Background::start(
            &ns,
            LoadSpec::open(([127, 0, 0, 1], p).into(), 200.0, Duration::from_secs(30)),
        )
    });
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").arg("--extra-port").arg("8443"),
    )?;
    let r = promote(
        &ns,
        &v2,
        &["--port", "8080", "--port", "8443", "--stop-old", "--json"],
    )?;
    let reports: serde_json::Value = serde_json::from_str(&r.stdout)?;
    let ports: Vec<u64> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [8080, 8443]);
    for r in reports.as_array().unwrap() {
        assert_eq!(r["drained"], serde_json::json!([v1.pid]), "{reports}");
    }
    for (port, l) in [8080u16, 8443].iter().zip(loads) {
        let st = report(&ns, *port)?;
        assert_eq!(st.members.first().map(|m| m.pid), Some(v2.pid), "{st:?}");
        let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
        assert_eq!(t.failures(), 0, "{port}: {t:?}");
    }
    // Without --port, a promote refuses to guess between two attached ports.
    let r = zdt_tests::harness::zdt(&ns, &["promote", &v2.pid.to_string(), "--no-readyz"]);
    assert_eq!(r.kind(), Some(Kind::BadInput), "{r:?}");
    assert!(
        r.stderr.contains("several ports are attached (8080, 8443)"),
        "{r:?}"
    );
    Ok(())
}

/// A version that serves two attached ports, promoted on one of them with `--stop-old`: the
/// old version still serves the other port (its only serving version there), so it is not
/// signalled, and says so; the promote of the other port then stops it. Before the fix it was
/// stopped, and the other port's live set named a dead process.
#[test]
fn stop_old_never_stops_a_version_another_port_still_serves() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let opts = |v| AppOpts::new(PORT, v).arg("--extra-port").arg("8443");
    let mut v1 = App::start(&ns, &opts("v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    zdt_ok(&ns, &["attach", ":8443"])?;
    let v2 = App::start(&ns, &opts("v2"))?;
    let r = promote(&ns, &v2, &["--port", "8080", "--stop-old", "--json"])?;
    let reports: serde_json::Value = serde_json::from_str(&r.stdout)?;
    // One port: one report, not a list.
    let stopped = &reports["stopped"];
    assert_eq!(stopped[0]["pid"], serde_json::json!(v1.pid), "{reports}");
    assert_eq!(stopped[0]["outcome"], "serves-another-port", "{reports}");
    assert!(!v1.wait_exit(Duration::from_millis(500)), "v1 was stopped");
    let t = requests_to(&ns, ([127, 0, 0, 1], 8443).into(), 50)?;
    assert_eq!(t.versions.get("v1"), Some(&50), "{t:?}");
    promote(&ns, &v2, &["--port", "8443", "--stop-old"])?;
    assert!(v1.wait_exit(Duration::from_secs(10)), "v1 not stopped");
    Ok(())
}

/// A promote over two ports whose second port's switch fails (the new version dropped that
/// port between its readiness check and the switch, as a reload that lost a `listen` line
/// does) changes neither port: the first port's switch is put back with its rollback target,
/// and the old version serves both.
#[test]
fn a_promote_that_fails_on_a_later_port_changes_no_port() -> anyhow::Result<()> {
    use zdt_tests::harness::{assert_invariants, fingerprint, roles, sets};
    let ns = Netns::new()?;
    let both = |o: AppOpts| o.arg("--extra-port").arg("8443");
    let v0 = App::start(&ns, &both(AppOpts::new(PORT, "v0")))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    zdt_ok(&ns, &["attach", ":8443"])?;
    let ports = ["--port", "8080", "--port", "8443"];
    promote(&ns, &v0, &ports)?;
    // v1 serves, v0 (still running) is the rollback target on both ports.
    let v1 = App::start(&ns, &both(AppOpts::new(PORT, "v1")))?;
    promote(&ns, &v1, &ports)?;
    let mut v2 = App::start(
        &ns,
        &both(AppOpts::new(PORT, "v2"))
            .arg("--relisten-on-hup")
            .arg("--drop-extra-on-hup"),
    )?;
    let before_sets = [sets(&ns, 8080)?, sets(&ns, 8443)?];
    let before_roles = [roles(&ns, 8080)?, roles(&ns, 8443)?];
    let before_8443 = fingerprint(&ns, 8443)?;

    // Paused after the readiness checks, before the first switch; v2 drops 8443 meanwhile.
    let pause = load::scaled(Duration::from_secs(5));
    let args = zdt_tests::harness::promote_args(&v2, &ports);
    let paused = at_failpoint(
        &ns,
        &args,
        &format!("{}:{}ms", Step::Readied.name(), pause.as_millis()),
    );
    v2.relisten()?;
    let r = paused.finish()?;
    assert!(!r.ok(), "the promote succeeded without v2 on 8443: {r:?}");
    assert!(r.stderr.contains("8443"), "the error names the port: {r:?}");

    assert_eq!(
        fingerprint(&ns, 8443)?,
        before_8443,
        "the port whose switch failed changed"
    );
    for (i, port) in [8080u16, 8443].into_iter().enumerate() {
        assert_invariants(&ns, port)?;
        assert_eq!(
            sets(&ns, port)?,
            before_sets[i],
            "port {port}: live set, target"
        );
        // v2's sockets may stay in the array as candidates: no set names them.
        let now: std::collections::BTreeSet<_> = roles(&ns, port)?
            .into_iter()
            .filter(|(p, _)| *p != v2.pid)
            .collect();
        assert_eq!(now, before_roles[i], "port {port}: roles");
        let t = load::requests(&ns, port, 50, 200.0);
        assert_eq!(t.failures(), 0, "port {port}: {t:?}");
        assert_eq!(
            t.versions.keys().map(String::as_str).collect::<Vec<_>>(),
            ["v1"],
            "port {port}: {t:?}"
        );
    }
    // And the rollback still goes where it went before: to v0, on both ports.
    for port in ["8080", "8443"] {
        zdt_ok(&ns, &["rollback", port])?;
        assert_eq!(
            report(&ns, port.parse()?)?.pids(zdt_tests::harness::Role::Active),
            [v0.pid]
        );
    }
    Ok(())
}

/// `zdt-ctl exec EXEC_ARGS -- zdt-demo-app APP_ARGS` for `version`, once it has printed
/// `sockets` bound addresses: (the process, the addresses, its readiness URL). Killed on drop.
fn exec_app(
    ns: &Netns,
    exec_args: &[&str],
    app_args: &[&str],
    version: &str,
    sockets: usize,
) -> anyhow::Result<(KillOnDrop, Vec<String>, String)> {
    let mut args = vec!["exec"];
    args.extend(exec_args);
    args.push("--");
    let mut cmd = zdt_command(ns, &args);
    cmd.arg(bin("zdt-demo-app"))
        .args(["--port", "1", "--version", version])
        .args(app_args)
        .stdout(Stdio::piped());
    let mut child = KillOnDrop(cmd.spawn()?);
    let out = child.0.stdout.take().expect("piped");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(out));
    let mut bound = Vec::new();
    let mut admin = String::new();
    while bound.len() < sockets {
        let Some(l) = lines.next().transpose()? else {
            anyhow::bail!("{version} ended after binding {bound:?}");
        };
        if let Some(a) = l.strip_prefix("admin=") {
            admin = a.replace("0.0.0.0", "127.0.0.1");
        }
        if let Some(b) = l.strip_prefix("bound=") {
            bound.push(b.to_string());
        }
    }
    // The rest of its output is not read; keep the pipe open so that it never gets SIGPIPE.
    std::mem::forget(lines);
    Ok((child, bound, format!("http://{admin}/readyz")))
}

/// A deploy script's `zdt-ctl exec --listen :8080 -- APP & zdt-ctl promote $!`: the promote
/// starts while the pid is still zdt-ctl making the sockets, and waits for it to become the app
/// (execve keeps the pid) instead of refusing it as zdt-ctl itself.
#[test]
fn promote_of_an_exec_that_has_not_run_its_app_yet_waits_for_it() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // Held for a while with its sockets made, before it runs the app.
    let args = exec_demo_args(PORT, "v2", 9102);
    let v2 = KillOnDrop(
        at_failpoint(
            &ns,
            &args,
            &Step::ExecListening.pausing(Duration::from_millis(500)),
        )
        .child,
    );
    let pid = v2.0.id().to_string();
    let r = zdt(
        &ns,
        &["promote", &pid, "--readyz", "http://127.0.0.1:9102/readyz"],
    );
    assert!(r.ok(), "{r:?}");
    let t = requests_to(&ns, ([127, 0, 0, 1], PORT).into(), 20)?;
    assert_eq!(t.versions.get("v2"), Some(&20), "{t:?}");
    Ok(())
}

/// `count` requests to `addr` from inside `ns`: the tally.
fn requests_to(ns: &Netns, addr: SocketAddr, count: u64) -> anyhow::Result<load::Tally> {
    let mut spec = LoadSpec::open(addr, 200.0, Duration::from_secs(10));
    spec.max_requests = count;
    ns.run(move || {
        let mut v = Vec::new();
        load::run(&spec, &Default::default(), &mut |s| v.push(s));
        load::tally(&v)
    })
}

#[test]
fn exec_hands_listeners_over_the_systemd_way() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // v2 binds nothing itself: zdt-ctl exec creates :8080 in the layout v1 serves with (split:
    // IPv4 and IPv6-only) and passes the fds.
    let (v2, bound, readyz) = exec_app(&ns, &["--listen", ":8080"], &[], "v2", 2)?;
    assert_eq!(bound, ["0.0.0.0:8080", "[::]:8080"]);
    let pid = v2.0.id().to_string();
    zdt_ok(&ns, &["promote", &pid, "--readyz", &readyz, "--stop-old"])?;
    let t = requests_to(&ns, ([127, 0, 0, 1], PORT).into(), 100)?;
    assert_eq!(t.versions.get("v2"), Some(&100), "{t:?}");
    drop(v1);
    Ok(())
}

#[test]
fn exec_passes_one_dual_stack_socket_unless_told_to_split() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // Nothing listens yet: one [::] socket for both families, as systemd's ListenStream=8080.
    let (v1, bound, readyz) = exec_app(&ns, &["--listen", ":8080"], &[], "v1", 1)?;
    assert_eq!(bound, ["[::]:8080"]);
    let pid = v1.0.id().to_string();
    zdt_ok(&ns, &["promote", &pid, "--readyz", &readyz])?;
    for addr in [
        SocketAddr::from(([127, 0, 0, 1], PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, PORT)),
    ] {
        let t = requests_to(&ns, addr, 20)?;
        assert_eq!(t.versions.get("v1"), Some(&20), "{addr}: {t:?}");
    }
    // Bad input is refused before anything runs: a layout the port does not serve with, a
    // name LISTEN_FDNAMES cannot carry, an address given twice, a backlog listen() refuses.
    for (args, says) in [
        (vec!["--listen", ":8080", "--split"], "is dual-stack"),
        (vec!["--listen", ":8080", "--name", "a:b"], "without ':'"),
        (
            vec!["--listen", ":8080", "--listen", "0.0.0.0:8080"],
            "name the same address",
        ),
        (
            vec!["--listen", ":8080", "--backlog", "-5"],
            "invalid backlog",
        ),
        (
            vec!["--listen", "127.0.0.1:8080", "--dual-stack"],
            "use :8080 or [::]:8080",
        ),
    ] {
        let mut all = vec!["exec"];
        all.extend(&args);
        all.extend(["--", "/bin/sh", "-c", "echo ran"]);
        let r = zdt_tests::harness::zdt(&ns, &all);
        assert_eq!(r.kind(), Some(Kind::BadInput), "{args:?}: {r:?}");
        assert!(r.stderr.contains(says), "{args:?}: {r:?}");
        assert!(!r.stdout.contains("ran"), "{args:?}: {r:?}");
    }
    Ok(())
}

#[test]
fn status_shows_a_taking_socket_nothing_accepts_from() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    // --split gives two fds; an app that serves only the first (as `uvicorn --fd 3` does)
    // never accepts from the IPv6 one, yet it is promoted with both.
    let (v1, _, readyz) = exec_app(
        &ns,
        &["--listen", ":8080", "--split"],
        &["--first-fds", "1"],
        "v1",
        1,
    )?;
    let pid = v1.0.id() as i32;
    zdt_ok(&ns, &["promote", &pid.to_string(), "--readyz", &readyz])?;
    let t = requests_to(&ns, ([127, 0, 0, 1], PORT).into(), 20)?;
    assert_eq!(t.versions.get("v1"), Some(&20), "{t:?}");
    let st = report(&ns, PORT)?;
    assert_eq!(
        st.members.first().map(|m| m.stalled.as_slice()),
        Some(&[][..]),
        "{st:?}"
    );
    // IPv6 clients: the handshake completes in the kernel, and they wait in the queue.
    let waiting = ns.run(|| {
        (0..3)
            .map(|_| std::net::TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, PORT)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    let st = report(&ns, PORT)?;
    let Some(m) = st.members.first() else {
        panic!("no member: {st:?}");
    };
    assert_eq!(m.pid, pid, "{st:?}");
    assert_eq!(m.queued, 3, "{st:?}");
    assert_eq!(m.stalled.len(), 1, "{st:?}");
    let text = zdt_ok(&ns, &["status"])?;
    assert!(
        text.stdout
            .contains(&format!("WARNING: pid {pid} (active) takes connections")),
        "{text:?}"
    );
    drop(waiting);
    Ok(())
}

/// The keys of `value` and the properties of `schema` are the same set, at every level.
fn same_keys(schema: &serde_json::Value, value: &serde_json::Value, at: &str) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let keys: std::collections::BTreeSet<&String> = value.as_object().unwrap().keys().collect();
    let documented: std::collections::BTreeSet<&String> = props.keys().collect();
    assert_eq!(
        keys, documented,
        "{at}: output and docs/status.schema.json differ"
    );
    for (k, sub) in props {
        match (&value[k], sub["type"].as_str()) {
            (serde_json::Value::Array(items), Some("array")) => {
                for i in items {
                    same_keys(&sub["items"], i, &format!("{at}.{k}[]"));
                }
            }
            (v @ serde_json::Value::Object(_), _) => same_keys(sub, v, &format!("{at}.{k}")),
            _ => {}
        }
    }
}

#[test]
fn status_json_matches_its_documented_schema() -> anyhow::Result<()> {
    let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status.schema.json"),
    )?)?;
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1").arg("--split"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").arg("--split"))?;
    promote(&ns, &v2, &[])?;
    let st = status(&ns, PORT)?;
    assert_eq!(st["members"].as_array().unwrap().len(), 2, "{st}");
    same_keys(&schema, &st, "status");
    Ok(())
}

#[test]
fn status_watch_redraws() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut child = zdt_command(&ns, &["status", "--watch", "200ms"])
        .stdout(Stdio::piped())
        .spawn()?;
    // At least 3 frames of 200 ms each; a frame itself takes a while on a loaded machine.
    std::thread::sleep(Duration::from_millis(2500));
    let _ = child.kill();
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Each frame clears the screen and draws the table again.
    let frames = text.matches("\x1b[2J").count();
    assert!(frames >= 3, "{frames} frames: {text}");
    assert_eq!(text.matches("SHARE(34-69s)").count(), frames, "{text}");
    Ok(())
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() -> anyhow::Result<()> {
    let run = |what: &str| -> anyhow::Result<String> {
        let o = std::process::Command::new(bin("zdt-ctl"))
            .args(["generate", what])
            .output()?;
        anyhow::ensure!(o.status.success(), "{o:?}");
        Ok(String::from_utf8(o.stdout)?)
    };
    let man = run("man")?;
    assert!(
        man.starts_with(".ie") || man.contains(".TH zdt-ctl"),
        "{man}"
    );
    for verb in [
        "attach", "promote", "drain", "status", "metrics", "exec", "detach", "hold", "rollback",
    ] {
        assert!(man.contains(verb), "man page lacks {verb}");
        assert!(run("bash")?.contains(verb), "bash completion lacks {verb}");
    }
    assert!(run("fish")?.contains("-l readyz"));
    assert!(run("zsh")?.contains("--stop-old"));
    let bad = std::process::Command::new(bin("zdt-ctl"))
        .args(["generate", "tcsh"])
        .output()?;
    assert_eq!(kind_of(bad.status), Some(Kind::BadInput));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"tcsh\""));
    Ok(())
}

#[test]
fn metrics_and_share_count_what_happened() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    promote(&ns, &v2, &[])?;
    let mut spec = LoadSpec::open(
        ([127, 0, 0, 1], PORT).into(),
        1000.0,
        Duration::from_secs(10),
    );
    spec.max_requests = 250;
    ns.run(move || load::run(&spec, &Default::default(), &mut |_| {}))?;
    let text = zdt_ok(&ns, &["metrics"])?.stdout;
    families_documented_as_emitted(&text)?;
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
    };
    let member = |pid: i32, role: &str| {
        format!("{{port=\"8080\",pid=\"{pid}\",command=\"zdt-demo-app\",role=\"{role}\"}}")
    };
    // metrics checks the program with a connection of its own, which the program refuses:
    // it is counted as a refused probe, never as steered.
    assert_eq!(
        value(&format!(
            "zdt_member_steered_total{}",
            member(v2.pid, "active")
        )),
        250.0
    );
    assert_eq!(value("zdt_steered_total{port=\"8080\"}"), 250.0);
    assert_eq!(value("zdt_probe_refused_total{port=\"8080\"}"), 1.0);
    assert_eq!(
        value(&format!(
            "zdt_member_steered_total{}",
            member(v1.pid, "draining")
        )),
        0.0
    );
    assert_eq!(
        value(&format!(
            "zdt_member_recent_share{}",
            member(v2.pid, "active")
        )),
        1.0
    );
    assert_eq!(value("zdt_attached{port=\"8080\"}"), 1.0);
    // Every sample line is `name{labels} value` or `name value`, after its HELP and TYPE.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, v) = l.rsplit_once(' ').expect("sample");
        assert!(v.parse::<f64>().is_ok(), "{l}");
        let family = name.split('{').next().unwrap();
        assert!(text.contains(&format!("# TYPE {family} ")), "{l}");
    }
    // A port that is not attached is refused at start (exit 3), not served as errors.
    let listen = METRICS.to_string();
    let mut typo = zdt_command(&ns, &["metrics", "8099", "--listen", &listen]).spawn()?;
    let code = exit_within(&mut typo, Duration::from_secs(5))?.and_then(|st| st.code());
    let _ = typo.kill();
    let _ = typo.wait();
    assert_eq!(
        code,
        Some(3),
        "metrics 8099 --listen kept running or failed otherwise"
    );
    // Served over HTTP too.
    let mut server = zdt_command(&ns, &["metrics", "--listen", &METRICS.to_string()]).spawn()?;
    let body = ns.run(|| -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = connect_when_listening(METRICS, Duration::from_secs(5))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let _ = server.kill();
    let _ = server.wait();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("zdt_member_steered_total{"), "{body}");
    Ok(())
}

#[test]
fn metrics_listen_serves_every_scraper_and_times_out_idle_ones() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut server = zdt_command(&ns, &["metrics", "--listen", &METRICS.to_string()]).spawn()?;
    let result = ns.run(|| -> anyhow::Result<(String, Vec<std::time::Duration>)> {
        let connect = || connect_when_listening(METRICS, Duration::from_secs(5));
        // A client that connects and says nothing, and one that sends half a request.
        let idle = connect()?;
        let mut half = connect()?;
        half.write_all(b"GET /metr")?;
        // A scraper behind them is served at once, not after them.
        let mut scrape = connect()?;
        scrape.set_read_timeout(Some(Duration::from_secs(3)))?;
        scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        scrape.read_to_string(&mut text)?;
        // The two stalled ones are closed by the server after its timeout.
        let mut closed_after = Vec::new();
        for mut s in [idle, half] {
            let t = std::time::Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf)?;
            closed_after.push(t.elapsed());
        }
        Ok((text, closed_after))
    })??;
    let (text, closed_after) = result;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("zdt_steered_total"), "{text}");
    for d in &closed_after {
        assert!(
            *d < Duration::from_secs(15),
            "a stalled scraper held on for {d:?}"
        );
    }
    // Still serving.
    assert!(server.try_wait()?.is_none(), "metrics --listen exited");
    let _ = server.kill();
    let _ = server.wait();
    Ok(())
}

#[test]
fn metrics_listen_takes_a_bare_port_for_every_address() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let r = zdt(&ns, &["metrics", "--listen", "9814"]);
    assert_eq!(r.kind(), Some(Kind::BadInput), "{r:?}");
    assert!(r.stderr.contains("write ADDR:PORT or :PORT"), "{r:?}");
    let server = KillOnDrop(zdt_command(&ns, &["metrics", "--listen", ":9814"]).spawn()?);
    for ip in [
        std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ] {
        let text = ns.run(move || -> anyhow::Result<String> {
            let mut s = connect_when_listening(SocketAddr::new(ip, 9814), Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })??;
        assert!(text.contains("zdt_steered_total"), "{ip}: {text}");
    }
    drop(server);
    Ok(())
}

/// The metric families docs/OPERATING.md lists ("Families: ..."), with `{a,b}` expanded and a
/// trailing `{label,...}` dropped, are exactly those `zdt-ctl metrics` declares (`# TYPE`).
fn families_documented_as_emitted(text: &str) -> anyhow::Result<()> {
    use std::collections::BTreeSet;
    let emitted: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATING.md"),
    )?;
    let start = doc
        .find("Families:")
        .ok_or_else(|| anyhow::anyhow!("docs/OPERATING.md lists no metric families"))?;
    // The rest of that bullet: up to the next line that starts a bullet or a blank line.
    let rest = &doc[start..];
    let end = rest
        .find("\n- ")
        .or_else(|| rest.find("\n\n"))
        .unwrap_or(rest.len());
    let mut documented = BTreeSet::new();
    for token in rest[..end].split('`').skip(1).step_by(2) {
        if !token.starts_with("zdt_") {
            continue;
        }
        let mut name = token.to_string();
        if name.ends_with('}') {
            let open = name.rfind('{').expect("a closing brace has an opening one");
            name.truncate(open);
        }
        match (name.find('{'), name.find('}')) {
            (Some(a), Some(b)) => {
                for alt in name[a + 1..b].split(',') {
                    documented.insert(format!("{}{alt}{}", &name[..a], &name[b + 1..]));
                }
            }
            _ => {
                documented.insert(name);
            }
        }
    }
    assert_eq!(
        documented, emitted,
        "docs/OPERATING.md's metric families and `zdt-ctl metrics` differ"
    );
    Ok(())
}

/// The per-namespace directory is shared by the namespace's ports: a detach that removes it
/// once it is empty must not break an attach of another port that is making its own directory
/// inside it at that moment, nor the other way round.
#[test]
fn two_ports_attached_and_detached_at_once_never_fail() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // Fewer under emulation, where each command takes about ten times as long.
    let cycles = if load::emulated() { 12 } else { 60 };
    let failures: Vec<String> = std::thread::scope(|s| {
        let runs = ["8080", "8443"].map(|port| {
            let ns = &ns;
            s.spawn(move || {
                let mut failed = Vec::new();
                for _ in 0..cycles {
                    let addr = format!(":{port}");
                    for args in [["attach", &addr], ["detach", &addr]] {
                        let r = zdt(ns, &args);
                        if !r.ok() {
                            failed.push(format!("{args:?}: exit {}: {}", r.code, r.stderr));
                        }
                    }
                }
                failed
            })
        });
        runs.into_iter()
            .flat_map(|r| r.join().expect("attach/detach thread"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} commands failed, first: {:?}",
        failures.len(),
        4 * cycles,
        failures.first()
    );
    Ok(())
}

#[test]
fn attach_removes_the_pinned_state_of_a_namespace_that_is_gone() -> anyhow::Result<()> {
    let pins = |ns: &Netns| -> anyhow::Result<std::path::PathBuf> {
        Ok(std::path::Path::new("/sys/fs/bpf/zdt").join(ns.cookie()?.to_string()))
    };
    // A namespace (a container, a test) that used zdt, then ended.
    let gone = Netns::new()?;
    let mut app = App::start(&gone, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&gone, &["attach", ":8080"])?;
    let gone_dir = pins(&gone)?;
    assert!(gone_dir.join("8080").exists());
    // One that lives on, attached, with no socket at all (its app stopped): kept.
    let idle = Netns::new()?;
    let mut idle_app = App::start(&idle, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&idle, &["attach", ":8080"])?;
    idle_app.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(idle_app.wait_exit(Duration::from_secs(5)));
    app.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(app.wait_exit(Duration::from_secs(5)));
    gone.abandon();
    // The next attach anywhere removes what the ended namespace left, and only that.
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    let r = zdt_ok(&ns, &["attach", ":8080"])?;
    assert!(!gone_dir.exists(), "{r:?}");
    assert!(r.stdout.contains("removed the pinned state of"), "{r:?}");
    assert!(pins(&idle)?.join("8080").exists());
    assert!(pins(&ns)?.join("8080").exists());
    // The idle namespace's port is still attached and works.
    let st = report(&idle, PORT)?;
    assert_eq!(st.port, PORT, "{st:?}");
    Ok(())
}
