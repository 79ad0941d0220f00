//! UDP ports (`:PORT/udp`): a datagram service handed over with every flow kept by the process
//! that has it, and no datagram for a process that is not ready, each beside a plain
//! SO_REUSEPORT control in the same run that must lose.
use std::time::Duration;

use zdt_tests::{
    h3::{self, H3},
    harness::{wait_for_200, zdt_ok, Proc},
    load::scaled,
    netns::Netns,
    udp::{self, Echo, UdpTally},
};

const PORT: u16 = 8053;
/// 20 flows, a request every 20 ms each: 1000 datagrams/s (fewer under emulation, where each
/// answer takes longer).
const FLOWS: usize = 20;
const INTERVAL: Duration = Duration::from_millis(20);
/// Each flow starts over after 50 requests (about a second): new flows arrive all the time.
const RENEW: u64 = 50;

/// Three handovers of a DNS-like echo service under 1000 datagrams/s, each new version warming
/// up for a second beside the old one. With zdt (`promote --stop-old` after /readyz): no request
/// lost, no flow answered by another process than its own, none by a warming one; the old
/// process tells its flows to move on (as QUIC's GOAWAY does) and exits once they are idle. The
/// same handovers with plain SO_REUSEPORT (start, wait for /readyz, SIGTERM the old one): the
/// kernel's hash sends part of every flow's datagrams to the warming process.
#[test]
fn a_udp_service_is_handed_over_three_times_without_a_lost_or_moved_datagram() -> anyhow::Result<()>
{
    let warming = |zdt| Arm {
        zdt,
        echo: &[],
        warmup: Duration::from_secs(1),
    };
    let control = handovers(warming(None))?;
    print("plain SO_REUSEPORT", &control);
    let zdt = handovers(warming(Some(&[])))?;
    print("zdt", &zdt);
    assert!(
        control.failed() > 0,
        "the control lost nothing, so this run proves nothing: {control:?}"
    );
    // A request whose datagram a full receive buffer dropped (under emulation the echo can fall
    // behind) is the app's capacity, not the handover's: the kernel counts those drops.
    assert_eq!(zdt.failed_by_handover(), 0, "{zdt:?}");
    assert!(
        zdt.byes > 0,
        "no old process told its flows to move on: {zdt:?}"
    );
    assert_eq!(zdt.pids.len(), 4, "every version answered: {zdt:?}");
    Ok(())
}

/// The plain SO_REUSEPORT way: once the new version (admin port `admin`) is ready, SIGTERM the
/// old one and wait for it to exit.
fn plain_handover(ns: &Netns, admin: std::net::SocketAddr, old: &mut Proc) -> anyhow::Result<()> {
    wait_for_200(
        ns,
        admin,
        "/readyz",
        scaled(Duration::from_secs(20)),
        || true,
    )
    .map_err(|last| anyhow::anyhow!("the new version never got ready: {last}"))?;
    old.signal(nix::sys::signal::Signal::SIGTERM);
    anyhow::ensure!(
        old.wait_exit(scaled(Duration::from_secs(10))),
        "the old one still runs"
    );
    Ok(())
}

/// `zdt-ctl promote PID --port PORT/udp --readyz URL --stop-old EXTRA...`.
fn promote(
    ns: &Netns,
    pid: i32,
    port: u16,
    readyz: &str,
    extra: &[&str],
) -> anyhow::Result<zdt_tests::harness::Ctl> {
    let (pid, port) = (pid.to_string(), format!("{port}/udp"));
    let mut args = vec![
        "promote",
        &pid,
        "--port",
        &port,
        "--readyz",
        readyz,
        "--stop-old",
    ];
    args.extend(extra);
    zdt_ok(ns, &args)
}

fn print(arm: &str, t: &UdpTally) {
    eprintln!(
        "{arm}: sent {} answered {} lost {} (full-buffer drops {}) moved {} warming {} byes {} \
         flows {} slowest {:?}",
        t.sent, t.answered, t.lost, t.buffer_drops, t.moved, t.warming, t.byes, t.flows, t.slowest
    );
}

/// How one arm of the echo tests hands over.
#[derive(Clone, Copy)]
struct Arm<'a> {
    /// None: plain SO_REUSEPORT (wait for /readyz, then SIGTERM the old version); Some: zdt,
    /// `promote --stop-old` with these options more.
    zdt: Option<&'a [&'a str]>,
    /// The echo's options (`--abrupt`: it exits at SIGTERM, dropping its flows).
    echo: &'a [&'a str],
    /// Each new version's warm-up.
    warmup: Duration,
}

/// Three handovers of the echo service under the UDP load.
fn handovers(arm: Arm) -> anyhow::Result<UdpTally> {
    let ns = Netns::new()?;
    let mut old = Echo::start(&ns, PORT, Duration::ZERO, None, arm.echo)?;
    if arm.zdt.is_some() {
        zdt_ok(&ns, &["attach", &format!(":{PORT}/udp")])?;
    }
    let drops_before = socket_buffer_drops(&ns)?;
    let load = udp::start(&ns, PORT, FLOWS, INTERVAL, RENEW);
    load.see(200);
    for _ in 0..3 {
        let new = Echo::start(&ns, PORT, scaled(arm.warmup), None, arm.echo)?;
        match arm.zdt {
            Some(extra) => {
                promote(&ns, new.pid, PORT, &new.readyz(), extra)?;
                anyhow::ensure!(
                    old.wait_exit(scaled(Duration::from_secs(1))),
                    "old still runs"
                );
            }
            None => plain_handover(&ns, new.admin, &mut old)?,
        }
        old = new;
        load.see(200);
    }
    let mut t = load.stop();
    t.buffer_drops = socket_buffer_drops(&ns)? - drops_before;
    Ok(t)
}

/// The UDP port of the HTTP/3 tests.
const H3_PORT: u16 = 8443;

/// HTTP/3 on hypercorn (with aioquic, from PyPI), started by `zdt-ctl exec --listen :8443/udp`
/// (`--quic-bind fd://3`), handed over three times while 10 connections each make a request every
/// 100 ms and new connections arrive (5/s). hypercorn 0.18 answers no new request on a connection
/// once it has SIGTERM, and tells no client so: its clients here keep a connection for 2 s and
/// then open the next (as a browser does), and `promote --stop-old --stop-when-idle 1s` holds
/// SIGTERM back until the old version's flows are idle. With zdt: no request failed or stalled
/// over a second, none reached a warming version, every connection was answered only by the
/// process that answered it first, and every connection opened after a switch by the new
/// version. The same handovers with plain SO_REUSEPORT (SIGTERM once the new one is ready) lose.
#[test]
fn http3_on_hypercorn_through_exec_is_handed_over_three_times_without_a_failed_request(
) -> anyhow::Result<()> {
    http3(h3::Server::Hypercorn)
}

/// As above, with a small aioquic server on a SO_REUSEPORT socket it makes itself (an app that
/// knows nothing of zdt), whose clients keep their connections until told: after SIGTERM (sent
/// at once) it answers `bye` (its GOAWAY), the clients move to new connections, which reach
/// the new version, and it exits once idle.
#[test]
fn http3_on_an_aioquic_server_with_its_own_socket_is_handed_over_three_times_without_a_failed_request(
) -> anyhow::Result<()> {
    http3(h3::Server::Aioquic)
}

fn http3(server: h3::Server) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = h3::certificate(dir.path())?;
    let (control, _) = h3_handovers(server, false, (&cert, &key))?;
    eprintln!("{server:?}, plain SO_REUSEPORT: {}", summary(&control));
    let (zdt, switches) = h3_handovers(server, true, (&cert, &key))?;
    eprintln!("{server:?}, zdt: {}", summary(&zdt));
    assert!(
        control.bad() > 0,
        "the control lost nothing, so this run proves nothing: {}",
        summary(&control)
    );
    assert_eq!(zdt.bad(), 0, "{}", summary(&zdt));
    assert!(zdt.ok > 0, "{}", summary(&zdt));
    // A connection opened after a switch (by the client's clock, taken before it builds its
    // first datagram; whole milliseconds, so one more) was answered by the version switched
    // in, or by one switched in later: never by an older one. A later one only if it was
    // switched in before that first datagram can have left: the client builds its Initial
    // (TLS included) in Python among ten busy sessions, which took 4 ms once (a connection
    // "opened" 4 ms before a switch went to the version it switched in). Unless its source
    // port is one an earlier connection had: that is the same flow to zdt (its 4-tuple),
    // which goes to the process that has it while that one lives (docs/FAULTS.md).
    let first_datagram = scaled(Duration::from_millis(100)).as_millis() as u64;
    let mut checked = 0;
    let mut ports = std::collections::BTreeSet::new();
    for &(opened, pid, port) in &zdt.connections {
        if !ports.insert(port) {
            continue;
        }
        if let Some(&(_, want)) = switches.iter().rev().find(|(at, _)| *at < opened) {
            let later = switches
                .iter()
                .any(|&(at, p)| p == pid && at >= opened && at < opened + first_datagram);
            assert!(
                pid == want || later,
                "a connection opened at {opened} ms was answered by pid {pid}, not by pid \
                 {want} (switched in before it) nor by one switched in within {first_datagram} \
                 ms after: {switches:?}"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no connection opened after a switch: {switches:?}"
    );
    Ok(())
}

fn summary(t: &h3::H3Tally) -> String {
    format!(
        "requests {} ok {} failed {} warming {} moved {} stalls {} slowest {:.1} ms byes {} \
         closed {} cut {} connections {}",
        t.requests,
        t.ok,
        t.failed,
        t.warming,
        t.moved,
        t.stalls,
        t.slowest_ms,
        t.byes,
        t.closed,
        t.cut,
        t.connections.len()
    )
}

/// Three handovers of `server` under the HTTP/3 load; with zdt, also each switch's time (unix
/// ms) and the pid it switched in.
fn h3_handovers(
    server: h3::Server,
    with_zdt: bool,
    cert: (&std::path::Path, &std::path::Path),
) -> anyhow::Result<(h3::H3Tally, Vec<(u64, i32)>)> {
    let ns = Netns::new()?;
    let mut old = H3::start(&ns, server, H3_PORT, 9101, Duration::ZERO, cert)?;
    if with_zdt {
        zdt_ok(&ns, &["attach", &format!(":{H3_PORT}/udp")])?;
    }
    let lifetime = match server {
        h3::Server::Hypercorn => Some(Duration::from_secs(2)),
        h3::Server::Aioquic => None,
    };
    let load = h3::H3Load::start(&ns, H3_PORT, 10, 5.0, lifetime)?;
    load.see(100);
    let mut switches = Vec::new();
    for i in 0..3 {
        let new = H3::start(
            &ns,
            server,
            H3_PORT,
            9102 + i,
            scaled(Duration::from_secs(1)),
            cert,
        )?;
        if with_zdt {
            // hypercorn cuts its connections at SIGTERM: it waits until they are idle. The
            // aioquic server tells its clients to move on: SIGTERM at once.
            let extra: &[&str] = match server {
                h3::Server::Hypercorn => &["--json", "--stop-when-idle", "1s"],
                h3::Server::Aioquic => &["--json"],
            };
            let out = promote(&ns, new.pid, H3_PORT, &new.readyz(), extra)?;
            let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
            switches.push((report["switched_at_ms"].as_u64().unwrap_or(0), new.pid));
            anyhow::ensure!(
                old.wait_exit(scaled(Duration::from_secs(10))),
                "the old server still runs"
            );
        } else {
            plain_handover(&ns, ([127, 0, 0, 1], new.admin).into(), &mut old)?;
        }
        old = new;
        load.see(100);
    }
    Ok((load.stop()?, switches))
}

/// An app that drops its flows at SIGTERM (here an echo that exits at once) loses the datagrams
/// its flows send after it: `promote --stop-old` alone sends them to nobody that knows them (the
/// flow's socket is gone, so the next datagram is a new flow, answered by the new version, and
/// what was queued is freed). `--stop-when-idle` holds SIGTERM until the old version's flows
/// are idle: nothing lost. docs/FAULTS.md.
#[test]
fn an_app_that_cuts_its_flows_at_sigterm_loses_none_when_sigterm_waits_for_them_to_idle(
) -> anyhow::Result<()> {
    let abrupt = |stop| Arm {
        zdt: Some(stop),
        echo: &["--abrupt"],
        warmup: Duration::ZERO,
    };
    let at_once = handovers(abrupt(&[]))?;
    print("abrupt app, --stop-old", &at_once);
    let idle = handovers(abrupt(&["--stop-when-idle", "1s"]))?;
    print("abrupt app, --stop-old --stop-when-idle 1s", &idle);
    assert!(
        at_once.failed() > 0,
        "SIGTERM at once lost nothing, so this run proves nothing: {at_once:?}"
    );
    assert_eq!(idle.failed(), 0, "{idle:?}");
    Ok(())
}

/// What zdt cannot promise, shown: a client whose address changes while its process drains (a
/// NAT rebinding, QUIC connection migration) is a new flow, which goes to the new version,
/// which does not know it (for QUIC, the client stalls until its idle timeout). docs/FAULTS.md.
#[test]
fn a_client_that_changes_its_port_while_its_process_drains_is_a_new_flow() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
    zdt_ok(&ns, &["attach", &format!(":{PORT}/udp")])?;
    let target: std::net::SocketAddr = ([127, 0, 0, 1], PORT).into();
    let ask = move |s: &std::net::UdpSocket| -> anyhow::Result<u32> {
        s.send_to(b"hello", target)?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .split(' ')
            .next()
            .unwrap_or("")
            .parse()?)
    };
    let (first, v2_pid, again, moved) = {
        let v2 = Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
        let (pid, readyz) = (v2.pid.to_string(), v2.readyz());
        // The flow starts on v1, which then drains (no --stop-old: it keeps its flows).
        let asked = ns.run(move || -> anyhow::Result<(std::net::UdpSocket, u32)> {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let first = ask(&s)?;
            Ok((s, first))
        })??;
        let (s, first) = asked;
        zdt_ok(
            &ns,
            &[
                "promote",
                &pid,
                "--port",
                &format!("{PORT}/udp"),
                "--readyz",
                &readyz,
            ],
        )?;
        let (again, moved) = ns.run(move || -> anyhow::Result<(u32, u32)> {
            let again = ask(&s)?;
            // The same client from another port: a NAT rebinding.
            let other = std::net::UdpSocket::bind("127.0.0.1:0")?;
            other.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok((again, ask(&other)?))
        })??;
        (first, v2.pid as u32, again, moved)
    };
    let v1_pid = v1.pid as u32;
    assert_eq!((first, again), (v1_pid, v1_pid), "the flow stays with v1");
    assert_eq!(moved, v2_pid, "from another port it is a new flow: v2's");
    Ok(())
}

/// A flood of new flows (a client from thousands of source ports, as a scan or spoofed traffic
/// would be) cannot push live flows out unnoticed: the program records at most the table's size
/// / 4 new flows a second (the rest are steered but not recorded, and counted), so a flow that
/// sends at least every 4 s keeps its entry; and the flows the full table pushes out are counted.
/// Live flows keep their process through a handover during the flood. docs/FAULTS.md. (A live
/// request may still be lost where the app's socket buffer overflows, as under emulation: the
/// kernel counts those drops, and the test holds the losses to them.)
#[test]
fn a_flood_of_new_flows_is_bounded_and_counted_and_live_flows_keep_their_process(
) -> anyhow::Result<()> {
    const CAPACITY: u32 = 4096;
    let ns = Netns::new()?;
    let _v1 = Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
    zdt_ok(
        &ns,
        &[
            "attach",
            &format!(":{PORT}/udp"),
            "--flows",
            &CAPACITY.to_string(),
        ],
    )?;
    let drops_before = socket_buffer_drops(&ns)?;
    // Live flows that never start over.
    let load = udp::start(&ns, PORT, 10, INTERVAL, u64::MAX);
    load.see(100);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        ns.spawn_thread(move || -> u64 {
            let mut sent = 0;
            let target: std::net::SocketAddr = ([127, 0, 0, 1], PORT).into();
            // 5000 new flows a second: five times what the table records, and few enough for
            // the app to answer (beyond that its socket's buffer drops datagrams, live ones too);
            // fewer on a slower (emulated) machine.
            let per_new = Duration::from_secs_f64(1.0 / zdt_tests::load::open_rate(5000.0));
            let start = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(s) = std::net::UdpSocket::bind("127.0.0.1:0") {
                    let _ = s.send_to(b"flood", target);
                    sent += 1;
                }
                let due = start + per_new * sent as u32;
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            }
            sent
        })
    };
    // Long enough for the bound to fill the table (its size / (size / 4 per second)) and more.
    std::thread::sleep(Duration::from_secs(3));
    let v2 = Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
    zdt_ok(
        &ns,
        &[
            "promote",
            &v2.pid.to_string(),
            "--port",
            &format!("{PORT}/udp"),
            "--readyz",
            &v2.readyz(),
        ],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = flood.join().expect("flood thread");
    load.see(100);
    let live = load.stop();
    let status: serde_json::Value =
        serde_json::from_str(&zdt_ok(&ns, &["status", &format!("{PORT}/udp"), "--json"])?.stdout)?;
    let flows = &status["flows"];
    let drops = socket_buffer_drops(&ns)? - drops_before;
    eprintln!(
        "flood of {flooded} new flows; live flows {live:?}; table {flows}; datagrams the app's \
         full socket buffer dropped: {drops}"
    );
    let n = |k: &str| flows[k].as_u64().unwrap_or(0);
    assert!(n("unrecorded") > 0, "the bound never held: {flows}");
    assert!(
        n("recorded") < flooded,
        "every flood flow was recorded: {flows}"
    );
    assert!(n("entries") <= u64::from(CAPACITY), "{flows}");
    assert!(n("evicted") > 0, "the table never filled: {flows}");
    assert_eq!(
        (live.moved, live.warming),
        (0, 0),
        "a live flow lost its process: {live:?}"
    );
    assert!(
        live.lost <= drops,
        "{} live requests lost, {drops} dropped by a full socket buffer: {live:?}",
        live.lost
    );
    assert!(live.answered > 0);
    Ok(())
}

/// Datagrams the namespace's UDP sockets dropped because their receive buffer was full (IPv4's
/// and IPv6's counters: a dual-stack socket's IPv4 datagrams count in IPv4's).
fn socket_buffer_drops(ns: &Netns) -> anyhow::Result<u64> {
    let v4 = ns.counter("Udp", "RcvbufErrors")?;
    let v6 = ns.run(|| -> anyhow::Result<u64> {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp6")?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("Udp6RcvbufErrors"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    })??;
    Ok(v4 + v6)
}

/// What a UDP port refuses, changing nothing (exit 2): `hold` (a closing UDP socket's queue is
/// freed; nothing could move it), `promote --probe` (a probe is an HTTP request), and `--flows`
/// and `--stop-when-idle` for a TCP port. And what it shows: status's and metrics' flows, per member and for the table,
/// with the port labelled `PORT/udp`.
#[test]
fn a_udp_port_refuses_hold_and_probe_and_shows_its_flows() -> anyhow::Result<()> {
    use zdt_ctl::error::Kind;
    use zdt_tests::harness::zdt;
    let ns = Netns::new()?;
    let v1 = Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
    let spec = format!(":{PORT}/udp");
    zdt_ok(&ns, &["attach", &spec])?;
    let load = udp::start(&ns, PORT, 4, INTERVAL, u64::MAX);
    load.see(20);
    let refused = [
        zdt(&ns, &["hold", &spec]),
        zdt(
            &ns,
            &[
                "promote",
                &v1.pid.to_string(),
                "--port",
                &format!("{PORT}/udp"),
                "--probe",
                "/readyz",
            ],
        ),
        zdt(&ns, &["attach", ":8054", "--flows", "1024"]),
        zdt(
            &ns,
            &[
                "promote",
                &v1.pid.to_string(),
                "--port",
                "8054",
                "--no-readyz",
                "--stop-old",
                "--stop-when-idle",
                "1s",
            ],
        ),
    ];
    for r in &refused {
        assert_eq!(r.kind(), Some(Kind::BadInput), "{r:?}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&zdt_ok(&ns, &["status", &format!("{PORT}/udp"), "--json"])?.stdout)?;
    assert_eq!(status["protocol"], "udp", "{status}");
    // Proven by an empty datagram the program ran for (and refused).
    assert_eq!(status["attached"], true, "{status}");
    assert_eq!(status["members"][0]["flows"], 4, "{status}");
    assert_eq!(status["members"][0]["live_flows"], 4, "{status}");
    assert_eq!(status["flows"]["entries"], 4, "{status}");
    let metrics = zdt_ok(&ns, &["metrics"])?.stdout;
    let live = format!(
        "zdt_member_live_flows{{port=\"{PORT}/udp\",pid=\"{}\"",
        v1.pid
    );
    assert!(metrics.contains(&live), "{metrics}");
    assert!(
        metrics.contains(&format!("zdt_flows{{port=\"{PORT}/udp\"}} 4")),
        "{metrics}"
    );
    let tally = load.stop();
    assert_eq!(tally.failed(), 0, "{tally:?}");
    Ok(())
}
