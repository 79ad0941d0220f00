//! Canary weights and readiness probes through the public port.
use std::time::Duration;

use zdt_tests::harness::{report, Kind, Member, Role, Status};
use zdt_tests::{
    harness::{promote_args, strs, wait_probing, zdt, zdt_command, zdt_ok, App, AppOpts},
    load::{self, scaled, Background, LoadSpec, Outcome},
    netns::Netns,
};

const PORT: u16 = 8080;

fn member(st: &Status, pid: i32) -> &Member {
    st.member(pid)
        .unwrap_or_else(|| panic!("no member {pid}: {st:?}"))
}

#[test]
fn a_canary_gets_its_share_then_the_rollout_completes() -> anyhow::Result<()> {
    const N: u64 = 3000;
    const WEIGHT: f64 = 0.20;
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    let r = zdt_ok(&ns, &strs(&promote_args(&v2, &["--weight", "20"])))?;
    assert!(r.stdout.contains("canary at 20 %"), "{r:?}");

    let t = load::requests(&ns, PORT, N, 1500.0);
    assert_eq!(t.failures(), 0, "{t:?}");
    // The share by flow hash matches the weight within statistical error: 4 standard deviations
    // of a binomial share over N connections.
    let share = t.versions.get("v2").copied().unwrap_or(0) as f64 / N as f64;
    let sigma = (WEIGHT * (1.0 - WEIGHT) / N as f64).sqrt();
    assert!(
        (share - WEIGHT).abs() < 4.0 * sigma,
        "v2 share {share:.4}, want {WEIGHT} +- {:.4}: {t:?}",
        4.0 * sigma
    );
    // status measures the same share from the program's own counters.
    let st = report(&ns, PORT)?;
    assert_eq!(member(&st, v1.pid).role, Role::Active, "{st:?}");
    assert_eq!(member(&st, v2.pid).role, Role::Canary, "{st:?}");
    let measured = member(&st, v2.pid).share;
    assert!(
        (measured - share).abs() < 0.01,
        "status share {measured} vs client {share}: {st:?}"
    );

    // promote without a weight completes the rollout.
    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let st = report(&ns, PORT)?;
    assert_eq!(member(&st, v2.pid).role, Role::Active, "{st:?}");
    assert_eq!(member(&st, v1.pid).role, Role::Draining, "{st:?}");
    let t = load::requests(&ns, PORT, 300, 1500.0);
    assert_eq!(t.versions.get("v2"), Some(&300), "{t:?}");
    // A weight outside 1-99 is bad input.
    for bad in ["0", "100", "x"] {
        let r = zdt(&ns, &strs(&promote_args(&v2, &["--weight", bad])));
        assert_eq!(r.kind(), Some(Kind::BadInput), "{bad}: {r:?}");
    }
    Ok(())
}

#[test]
fn a_probe_through_the_public_port_reaches_only_the_candidate() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let l = Background::start(
        &ns,
        LoadSpec::open(
            ([127, 0, 0, 1], PORT).into(),
            300.0,
            Duration::from_secs(60),
        ),
    );
    // v2 warms up for 1.5 s (stretched by the time scale, so that it outlasts v2's own start
    // and the promote's validation on a slower machine too): its /readyz on the public port
    // says 503 until then, while v1's, on the same port, says 200 all along. A probe that
    // reached v1 would switch too early, and users would get v2's 503s.
    let warmup = scaled(Duration::from_millis(1500));
    let started_ms = zdt_ctl::state::now_ms();
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").warmup(warmup))?;
    let r = zdt_ok(
        &ns,
        &[
            "promote",
            &v2.pid.to_string(),
            "--probe",
            "/readyz",
            "--json",
        ],
    )?;
    let r: serde_json::Value = serde_json::from_str(&r.stdout)?;
    // v2 cannot have been ready before its warm-up, counted from before it started.
    let switched = r["switched_at_ms"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(started_ms);
    assert!(
        u128::from(switched) >= warmup.as_millis(),
        "switched {switched} ms after v2 started, warming up for {warmup:?}: the probe did not \
         wait for v2: {r}"
    );
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.versions.contains_key("v2"), "{t:?}");

    // A candidate that never gets ready: exit 4, and the candidate still gets nothing.
    let v3 = App::start(
        &ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_secs(3600)),
    )?;
    let r = zdt(
        &ns,
        &[
            "promote",
            &v3.pid.to_string(),
            "--probe",
            "/readyz",
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(r.kind(), Some(Kind::ReadinessTimeout), "{r:?}");
    assert!(r.stderr.contains("probed through the public port"), "{r:?}");
    assert!(r.stderr.contains("last answer: 503"), "{r:?}");
    let t = load::requests(&ns, PORT, 200, 1000.0);
    assert_eq!(t.versions.get("v2"), Some(&200), "{t:?}");
    Ok(())
}

/// One GET / from `from` to `to`, on a socket bound to `from`: the answer's status line and
/// x-zdt-version, or the error.
/// `GET /` from `from` to `to`: "STATUS-LINE VERSION". `marked`: with zdt-ctl's mark on the SYN
/// (the MSS option of readiness::probe_socket), as zdt-ctl's own connections have it.
fn get_from(
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    marked: bool,
) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if marked {
        s.set_tcp_mss(u32::from(zdt_common::PROBE_MSS))?;
    }
    s.bind(&from.into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.lines().next().unwrap_or("").to_string();
    let version = buf
        .lines()
        .find_map(|l| l.strip_prefix("x-zdt-version: "))
        .unwrap_or("?");
    Ok(format!("{status} {version}"))
}

#[test]
fn only_zdt_ctl_own_connections_are_taken_for_probes() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // A second address, not loopback: connections from it stand for remote clients.
    let mut ip = std::process::Command::new("ip");
    ip.args(["addr", "add", "10.77.0.1/32", "dev", "lo"]);
    ns.command(&mut ip);
    anyhow::ensure!(ip.status()?.success(), "ip addr add");
    let remote: std::net::IpAddr = [10, 77, 0, 1].into();
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let st = report(&ns, PORT)?;
    let (steered, refused) = (member(&st, v1.pid).steered, st.counters.probe_refused);
    // status checked the program with a connection of its own, which the program refused:
    // v1 never got it.
    assert_eq!(steered, 0, "{st:?}");
    assert!(refused >= 1, "{st:?}");

    // Busy servers widen the ephemeral port range; here every ordinary local client gets a
    // source port of 61000-61999, the range zdt-ctl once reserved for its probes (the program
    // then refused all of them). /proc/sys/net is per namespace.
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "61000 61999"))??;
    let t = load::requests(&ns, PORT, 300, 1000.0);
    assert_eq!(t.count(Outcome::Ok), 300, "{t:?}");
    assert_eq!(t.versions.get("v1"), Some(&300), "{t:?}");

    // A never-ready candidate is being probed through the public port for 3 s (stretched by the
    // time scale: the connections below are made meanwhile).
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_secs(3600)),
    )?;
    let timeout = format!("{}ms", scaled(Duration::from_secs(3)).as_millis());
    let mut promote = zdt_command(
        &ns,
        &[
            "promote",
            &v2.pid.to_string(),
            "--probe",
            "/readyz",
            "--timeout",
            &timeout,
        ],
    )
    .spawn()?;
    wait_probing(&ns, PORT, Duration::from_secs(3))?;
    let answers = ns.run(move || {
        let to = std::net::SocketAddr::new(remote, PORT);
        // Ephemeral source ports for all: the mark is in the SYN's options, not in the port.
        let ask = |ip: std::net::IpAddr, marked| {
            get_from((ip, 0).into(), to, marked).map_err(|e| e.kind())
        };
        let loopback = std::net::Ipv4Addr::LOCALHOST.into();
        (0..20)
            .map(|_| {
                (
                    ask(remote, false),
                    ask(loopback, false),
                    ask(loopback, true),
                )
            })
            .collect::<Vec<_>>()
    })?;
    assert!(!promote.wait()?.success(), "v2 can never be ready");
    for (remote_answer, local_answer, marked_answer) in &answers {
        // Remote and local clients, whatever their ports, are served by the active version.
        for a in [remote_answer, local_answer] {
            assert_eq!(a.as_deref().ok(), Some("HTTP/1.1 200 OK v1"), "{answers:?}");
        }
        // So is a loopback connection with zdt-ctl's MSS that zdt-ctl did not make (any local
        // user can set an MSS): only a source zdt-ctl wrote into ZDT_PROBES is a probe. It
        // reached the candidate before.
        assert_eq!(
            marked_answer.as_deref().ok(),
            Some("HTTP/1.1 200 OK v1"),
            "{answers:?}"
        );
    }
    Ok(())
}

/// With SYN cookies, the ACK that completes a handshake runs the program again, without the
/// SYN's MSS option: a `--probe` connection must still be made on the candidate alone (and a
/// connection counted once).
#[test]
fn a_probe_under_syn_cookies_reaches_only_the_candidate() -> anyhow::Result<()> {
    probe_under_syn_cookies(true)
}

/// The same without TCP timestamps: the cookie's ACK then carries no option at all (a bare
/// 20-byte header).
#[test]
fn a_probe_under_syn_cookies_without_timestamps_reaches_only_the_candidate() -> anyhow::Result<()> {
    probe_under_syn_cookies(false)
}

fn probe_under_syn_cookies(timestamps: bool) -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // 2: a cookie for every SYN (per namespace), as is tcp_timestamps.
    ns.run(move || -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "2")?;
        let ts = if timestamps { "1" } else { "0" };
        std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", ts)
    })??;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let steered = || -> anyhow::Result<u64> {
        Ok(report(&ns, PORT)?.member(v1.pid).map_or(0, |m| m.steered))
    };
    let v2 = App::start(
        &ns,
        &AppOpts::new(PORT, "v2").warmup(Duration::from_secs(3600)),
    )?;
    let timeout = format!("{}ms", scaled(Duration::from_secs(2)).as_millis());
    let pid2 = v2.pid.to_string();
    let r = zdt(
        &ns,
        &[
            "promote",
            &pid2,
            "--probe",
            "/readyz",
            "--timeout",
            &timeout,
        ],
    );
    assert_eq!(
        r.kind(),
        Some(Kind::ReadinessTimeout),
        "v2 is never ready: {r:?}"
    );
    assert!(r.stderr.contains("503"), "the probe reached v2: {r:?}");
    let before = steered()?;
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&100), "{t:?}");
    assert_eq!(steered()? - before, 100, "each connection counted once");
    Ok(())
}

/// A zdt-ctl killed while a probe connection was open leaves its source in ZDT_PROBES: the
/// next command that takes the port's lock removes it (an ordinary client may use that
/// address and port later), and keeps a live zdt-ctl's.
#[test]
fn a_probe_mark_left_by_a_killed_zdt_ctl_is_removed() -> anyhow::Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use zdt_common::{names, ProbeKey, ProbeValue, PROBE_CANDIDATE};
    fn probes() -> anyhow::Result<HashMap<MapData, ProbeKey, ProbeValue>> {
        let path = zdt_ctl::state::port_dir(PORT.into())?.join(names::PROBES);
        Ok(Map::HashMap(MapData::from_pin(path)?).try_into()?)
    }
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut gone = std::process::Command::new("true").spawn()?;
    gone.wait()?;
    let writers = [(40000, gone.id()), (40001, std::process::id())];
    ns.run(move || -> anyhow::Result<()> {
        let mut map = probes()?;
        for (port, pid) in writers {
            let key = ProbeKey {
                family: zdt_common::AF_INET as u16,
                port,
                addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            };
            let kind = PROBE_CANDIDATE;
            map.insert(key, ProbeValue { kind, pid }, 0)?;
        }
        Ok(())
    })??;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let left: Vec<u16> = ns.run(|| -> anyhow::Result<Vec<u16>> {
        Ok(probes()?
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.port)
            .collect())
    })??;
    assert_eq!(left, [40001], "only the live writer's entry stays");
    Ok(())
}
