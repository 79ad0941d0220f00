//! Real servers handed over by zdt under load: nginx (`listen ... reuseport`, 4 workers), HAProxy
//! (master-worker) and gunicorn (`--reuse-port`), each started the way its users start it, with
//! its own config and its own admin port for /readyz, and stopped with its own graceful signal.
//!
//! Two loads run at once during every handover: wrk, a real load generator, with a new
//! connection per request (`Connection: close`), and the project's classifying client at
//! 300 req/s. Their failures are checked against the kernel's TCP counters of the namespace.
//! Each test runs the control first: the same handovers without zdt, the new instance sharing
//! the port by plain SO_REUSEPORT and the old one stopped gracefully once the new one is ready.
use std::{net::SocketAddr, time::Duration};

use zdt_tests::{
    harness::{print_tally, report, zdt_ok},
    load::{self, requests_at, scaled, Background, LoadSpec, Outcome, Tally},
    netns::{Counters, Netns},
    servers::{nginx_conf, Kind, Server, Wrk, WrkReport, PORT},
};

/// The classifying client's open-loop rate, new connection per request.
const RATE: f64 = 300.0;
/// wrk's connections: it runs closed loop, each connection's next request (on a new TCP
/// connection) as soon as the last is answered, which keeps the accept queues busy.
const WRK_CONNECTIONS: u32 = 4;
/// Upper bound of either load (stretched by the time scale); both are stopped as soon as the
/// handovers are done. A load that ended before them would miss instances, and wrk's end drops
/// the connections it has in flight, with RSTs, in the middle of a stop.
const MAX_LOAD: Duration = Duration::from_secs(50);
/// The keep-alive client's rate over all its connections, and its connections.
const KEEPALIVE_RATE: f64 = 100.0;
const KEEPALIVE_CONNECTIONS: usize = 8;
/// Steady state between handovers, and before the first one.
const SETTLE: Duration = Duration::from_millis(300);
/// How long an instance may take to start, or to stop (stretched by the time scale).
const STARTUP: Duration = Duration::from_secs(20);
const STOP: Duration = Duration::from_secs(30);

fn addr() -> SocketAddr {
    ([127, 0, 0, 1], PORT).into()
}

/// Keep-alive clients: [`KEEPALIVE_CONNECTIONS`] connections reused request after request, at
/// [`KEEPALIVE_RATE`] in all. A connection the server closes while idle (an old instance's
/// graceful stop closes its idle ones) is replaced, and a request that found it closed before any
/// answer is sent again on a new connection, as HTTP clients do for idempotent requests: counted
/// apart (`retried`), not as a failure.
fn keepalive_load() -> LoadSpec {
    let mut spec = LoadSpec::open(addr(), KEEPALIVE_RATE, MAX_LOAD);
    spec.keepalive = true;
    spec.workers = KEEPALIVE_CONNECTIONS;
    spec
}

/// One arm of a test: what both loads saw, and what the kernel counted meanwhile.
struct Run {
    handovers: u16,
    tally: Tally,
    /// The keep-alive client's ([`keepalive_load`]).
    keepalive: Tally,
    wrk: WrkReport,
    /// The kernel's counters summed over the stops: from the moment the old instance is sent
    /// its signal (the new one ready, and with zdt promoted) to a moment after it exited.
    stops: Counters,
    /// The same from just before the first handover to the end of the last stop, warm-ups
    /// included. (The loads' own start and end, when wrk drops the connections it has in
    /// flight, are outside both.)
    whole: Counters,
    /// zdt's program counters after the run (zdt arm only): connections steered and migrated.
    program: Option<zdt_ctl::cmd::status::Counters>,
    /// zdt arm only: each promote's `phases:` line.
    phases: Vec<String>,
}

impl Run {
    /// Resets the clients were hit by: the classifying client's, and wrk's read and write
    /// errors (each of those here is a connection reset by the closing listener; the
    /// control's are checked to be resets by the kernel's count).
    fn client_resets(&self) -> u64 {
        self.tally.count(Outcome::Reset)
            + self.keepalive.count(Outcome::Reset)
            + self.wrk.read
            + self.wrk.write
    }

    fn print(&self, kind: Kind, arm: &str) {
        print_tally(
            &format!(
                "== {} {arm}: {} handovers; classifying client:",
                kind.name(),
                self.handovers
            ),
            &self.tally,
        );
        print_tally("  keep-alive client:", &self.keepalive);
        println!(
            "  keep-alive: {} requests sent again after their idle connection closed ({} of \
             them after a reset)",
            self.keepalive.retried, self.keepalive.retried_after_reset
        );
        let w = &self.wrk;
        println!(
            "  wrk: requests {} socket errors: connect {} read {} write {} timeout {}; \
             non-2xx/3xx {}; max latency {:?}",
            w.requests, w.connect, w.read, w.write, w.timeout, w.non_2xx_3xx, w.latency_max
        );
        for (what, k) in [("stops", &self.stops), ("whole run", &self.whole)] {
            println!(
                "  kernel, {what}: OutRsts {} EstabResets {} AttemptFails {} ListenOverflows {} \
                 ListenDrops {} TCPMigrateReqSuccess {} TCPMigrateReqFailure {} PAWS {}",
                k.out_rsts,
                k.estab_resets,
                k.attempt_fails,
                k.listen_overflows,
                k.listen_drops,
                k.migrate_req_success,
                k.migrate_req_failure,
                k.paws_rejected
            );
        }
        if let Some(p) = &self.program {
            println!("  zdt counters: {p:?}");
        }
        for p in &self.phases {
            println!("  promote {p}");
        }
    }
}

/// v1 serves under both loads; then `count` times, a new instance starts and takes over and
/// the old one stops gracefully. With zdt: `promote` once the new one is ready (zdt steers new
/// connections to it alone, and moves what is queued on the old listeners when they close).
/// Without: the new one binds the port beside the old one, and the old one is stopped as soon as
/// the new one is ready.
fn handovers(kind: Kind, with_zdt: bool, warmup: Duration, count: u16) -> anyhow::Result<Run> {
    let ns = Netns::new()?;
    let mut old = Server::start(&ns, kind, 1, warmup)?;
    old.wait_ready(&ns, scaled(STARTUP))?;
    if with_zdt {
        // Adopts v1, already serving, as the active member.
        zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    }
    let client = Background::start(&ns, LoadSpec::open(addr(), RATE, MAX_LOAD));
    let keepalive = Background::start(&ns, keepalive_load());
    let wrk = Wrk::start(&ns, addr(), WRK_CONNECTIONS, scaled(MAX_LOAD))?;
    std::thread::sleep(SETTLE);
    let start = Counters::read(&ns)?;
    let mut stops = Counters::default();
    let mut phases = Vec::new();
    for n in 2..=count + 1 {
        let mut new = Server::start(&ns, kind, n, warmup)?;
        if with_zdt {
            // Waits for the new instance to listen and answer 200 on its own /readyz, then
            // switches every new connection to it.
            let pid = new.serving_pid(scaled(STARTUP))?.to_string();
            let timeout = format!("{}ms", scaled(STARTUP).as_millis());
            let readiness = new.readiness();
            let mut args = vec!["promote", &pid, "--timeout", &timeout];
            args.extend(readiness.iter().map(String::as_str));
            let r = zdt_ok(&ns, &args)?;
            phases.extend(
                r.stdout
                    .lines()
                    .filter(|l| l.starts_with("phases:"))
                    .map(String::from),
            );
        } else {
            new.wait_ready(&ns, scaled(STARTUP))?;
        }
        // The new instance is ready (with zdt: and has every new connection). The old one stops
        // the way its users stop it, with its graceful signal, sent by the test in both arms.
        // (For nginx and HAProxy, --stop-old's SIGTERM would be their fast or hard stop; for
        // gunicorn SIGTERM is the graceful stop, which --stop-old would send just the same.)
        let before = Counters::read(&ns)?;
        old.stop_gracefully();
        let st = old.wait_exit(scaled(STOP))?;
        anyhow::ensure!(st.success(), "{} {} exited {st}", kind.name(), old.version);
        std::thread::sleep(SETTLE);
        stops.add_delta(&Counters::read(&ns)?, &before);
        old = new;
    }
    let whole = Counters::delta(&Counters::read(&ns)?, &start);
    let program = if with_zdt {
        Some(report(&ns, PORT)?.counters)
    } else {
        None
    };
    let wrk = wrk.finish()?;
    let tally = load::tally(&client.finish());
    let keepalive = load::tally(&keepalive.finish());
    Ok(Run {
        handovers: count,
        tally,
        keepalive,
        wrk,
        stops,
        whole,
        program,
        phases,
    })
}

/// The control, then zdt: zdt loses nothing, where the control loses requests (unless
/// `control_loses` is false: a server whose own graceful stop lost nothing in the control).
fn control_then_zdt(
    kind: Kind,
    warmup: Duration,
    count: u16,
    control_loses: bool,
) -> anyhow::Result<()> {
    let plain = handovers(kind, false, warmup, count)?;
    plain.print(kind, "without zdt (control)");
    let z = handovers(kind, true, warmup, count)?;
    z.print(kind, "with zdt");

    // Both loads ran through every handover.
    for r in [&plain, &z] {
        assert!(
            r.tally.requests > requests_at(RATE, Duration::from_secs(5) / 3),
            "{:?}",
            r.tally
        );
        assert!(
            r.keepalive.requests > requests_at(KEEPALIVE_RATE, Duration::from_secs(5) / 3),
            "{:?}",
            r.keepalive
        );
        // wrk runs closed loop: its count falls with the machine's pace (the time scale).
        assert!(
            r.wrk.requests as f64 > 500.0 / load::time_scale(),
            "{:?}",
            r.wrk
        );
    }
    // With zdt: not one failure, by either client, and, by the kernel's count, not one
    // connection in the namespace ended by a RST while the old instances stopped: no
    // established connection reset (EstabResets, which counts the clients' sockets too), and no
    // connect refused (AttemptFails) but zdt-ctl's own that the program refused
    // (`probe_refused`: a probe of the public port while no candidate can take it, or status's
    // check that the program runs; the kernel answers a SYN the program drops with a RST).
    assert_eq!(z.tally.failures(), 0, "{:?}", z.tally);
    assert_eq!(z.keepalive.failures(), 0, "{:?}", z.keepalive);
    assert_eq!(z.wrk.failures(), 0, "{:?}", z.wrk);
    // A graceful stop closes the idle keep-alive connections; the client learns it only when it
    // sends its next request on one, which reaches a closed socket and draws a RST (OutRsts; the
    // reset counted on each side, EstabResets). The client then sends the request again on a
    // new connection (`retried`): keep-alive's own way, with or without zdt. Nothing else may
    // reset.
    let keepalive_rsts = z.keepalive.retried;
    let refused = z.program.as_ref().map_or(0, |p| p.probe_refused);
    assert!(
        z.stops.estab_resets <= 2 * keepalive_rsts,
        "{:?}, keep-alive resets {keepalive_rsts}",
        z.stops
    );
    assert!(
        z.stops.attempt_fails <= refused,
        "{:?}, probes refused {refused}",
        z.stops
    );
    // OutRsts itself is printed, not held: beyond the keep-alive RSTs and the refusals above,
    // the kernel answers with a RST segments that reach a connection both sides have already
    // closed (a late pure ACK or a retransmitted FIN meeting a TIME_WAIT or FIN_WAIT2 socket
    // out of window: tcp_timewait_state_process()). Such a RST ends no live connection, so it
    // fails no request; how many there are depends on the host's timing (counted as PAWS only
    // when the ACK is a millisecond older than the FIN before it). Any RST that ends a live
    // connection or a connect in the namespace, the clients' included, is in EstabResets or
    // AttemptFails, which the two checks above bound.
    assert_eq!(z.whole.migrate_req_failure, 0, "{:?}", z.whole);
    // Every instance answered: the handovers did happen under the load.
    assert_eq!(
        z.tally.versions.len(),
        usize::from(count) + 1,
        "{:?}",
        z.tally
    );
    let program = z.program.as_ref().expect("zdt arm");
    assert_eq!(program.fallback, 0, "{program:?}");

    // Every reset a client saw is a RST the kernel sent while an old instance stopped. (One for
    // one in every run so far, but not required to be: a connection whose ACK and request both
    // reach a listener that is gone draws a RST for each.)
    assert!(
        plain.client_resets() <= plain.stops.out_rsts,
        "{:?} {:?} {:?}",
        plain.tally,
        plain.wrk,
        plain.stops
    );
    if control_loses {
        // The control: the same handovers lose requests, seen by the clients and by the kernel.
        assert!(
            plain.tally.failures() + plain.wrk.failures() > 0,
            "control lost nothing: {:?} {:?}",
            plain.tally,
            plain.wrk
        );
        // A server that is ready at once loses only by resets: what is queued on a listener
        // as it closes. A warming one loses mostly by its 503s (or slow answers), and whether a
        // queue is non-empty at the instant its predecessor closes is timing: Go's control once
        // lost 793 requests, every one a 503, and none reset.
        if warmup.is_zero() {
            assert!(
                plain.client_resets() > 0,
                "{:?} {:?}",
                plain.tally,
                plain.wrk
            );
        }
    }
    Ok(())
}

#[test]
fn nginx_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // nginx is ready as soon as it runs. Its control loses few requests per handover (about one
    // in the runs so far: a SIGQUIT worker resets what is queued on its own listener when it
    // closes it), hence 15 handovers.
    control_then_zdt(Kind::Nginx(4), Duration::ZERO, 15, true)
}

#[test]
fn nginx_with_64_workers_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // `worker_processes auto` on a 64-core machine: 64 listeners per instance, two instances at
    // once in the socket array during each handover. With 64 listeners closing, the control
    // loses a few requests in every handover (7 to 13 over 4 in the runs so far). Under
    // emulation (Debian 12's 6.1 in a TCG VM, ZDT_TEST_TIME_SCALE 10) it lost nothing once (782
    // requests, wrk 478): at the guest's pace each worker may have drained its queue before it
    // closes its listener (another run there: 17 reset of 1200). There the control is run,
    // printed and checked against the kernel's RSTs, but not required to lose; zdt's arm is held
    // to the same zero failures everywhere.
    control_then_zdt(Kind::Nginx(64), Duration::ZERO, 4, !load::emulated())
}

#[test]
fn haproxy_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // HAProxy's own soft stop (SIGUSR1) rarely loses anything: in the control, 7 resets in 135
    // handovers over 20 runs (none in 16 of them), under the same loads and with up to 64 wrk
    // connections, against about one per handover for nginx. (It accepts on one listener
    // from an event loop per thread, and closes it as soon as the signal arrives: its queue is
    // seldom non-empty then.) So its control is run and printed, and its resets are checked
    // against the kernel's, but it is not required to lose anything.
    control_then_zdt(Kind::Haproxy, Duration::ZERO, 10, false)
}

#[test]
fn gunicorn_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // Each worker imports the app for 1 s after the master has bound the port, as an app that
    // loads its framework does: in the control the kernel gives the new master's listener its
    // share of connections before any worker accepts them (slow), and the old workers reset what
    // is queued on their listener when they exit.
    control_then_zdt(Kind::Gunicorn, Duration::from_secs(1), 5, true)
}

// Apps on common runtimes, each taking its socket the socket-activation way from `zdt-ctl exec
// --listen :8080` (one dual-stack listener on fd 3, LISTEN_FDS=1), as a unit with
// `ExecStart=zdt-ctl exec --listen :8080 -- APP` runs them. Each answers 503 for its first
// second (a warm-up: a cache, a connection pool), so in the control the kernel's hashing gives
// the warming instance its share; the old one stops on SIGTERM the runtime's graceful way.

#[test]
fn runtime_go_net_http_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    control_then_zdt(Kind::Go, Duration::from_secs(1), 5, true)
}

#[test]
fn runtime_node_http_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    control_then_zdt(Kind::Node, Duration::from_secs(1), 5, true)
}

#[test]
fn runtime_uvicorn_fd_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // zdt asks /readyz through the public port (--probe), as for an app with no admin port.
    control_then_zdt(Kind::Uvicorn, Duration::from_secs(1), 5, true)
}

#[test]
fn caddy_handed_over_by_zdt_loses_no_request() -> anyhow::Result<()> {
    // Caddy binds its own listeners (SO_REUSEPORT, one dual-stack socket) and is ready as soon
    // as it runs. Its control is run and printed, not required to lose: its graceful stop
    // closes the listener at once, like HAProxy's.
    control_then_zdt(Kind::Caddy, Duration::ZERO, 5, false)
}

/// nginx run as Debian's nginx.service runs it (`daemon on`, see [`nginx_conf`]), from its
/// absolute path (the binary upgrade execs it again), in `dir`.
struct DaemonNginx {
    dir: std::path::PathBuf,
}

impl DaemonNginx {
    fn start(ns: &Netns, name: &str, workers: u16, admin: u16) -> anyhow::Result<DaemonNginx> {
        let dir = std::env::temp_dir().join(format!("zdt-nginx-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let n = DaemonNginx { dir };
        n.configure(workers, admin)?;
        let mut cmd = std::process::Command::new("/usr/sbin/nginx");
        cmd.arg("-p")
            .arg(&n.dir)
            .arg("-c")
            .arg(n.dir.join("nginx.conf"));
        cmd.arg("-e").arg(n.dir.join("error.log"));
        ns.command(&mut cmd);
        // The command returns once the master has detached.
        let st = cmd.status()?;
        anyhow::ensure!(st.success(), "nginx exited {st}:\n{}", n.log());
        Ok(n)
    }

    fn configure(&self, workers: u16, admin: u16) -> anyhow::Result<()> {
        let conf = nginx_conf(&self.dir, true, workers, 1, admin);
        Ok(std::fs::write(self.dir.join("nginx.conf"), conf)?)
    }

    /// The pid in `file` (nginx.pid, or nginx.pid.oldbin during a binary upgrade).
    fn pid(&self, file: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for DaemonNginx {
    fn drop(&mut self) {
        // Each master's session (nginx calls setsid when it detaches), workers included.
        for file in ["nginx.pid", "nginx.pid.oldbin"] {
            if let Some(pid) = self.pid(file) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nginx's own ways of changing itself in place, under load, with zdt attached: the binary
/// upgrade (SIGUSR2: a new master inherits every listener, then the old one quits) and a reload
/// that adds a worker (SIGHUP: with `reuseport` the master opens one more listener). zdt follows
/// both: the heir takes the active role (status names it at once; the next locked command
/// records it), the new listener is adopted into the member's slots, no request fails, and the
/// next deploy drains the heir.
#[test]
fn nginx_binary_upgrade_and_reload_are_followed_by_zdt() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use zdt_tests::harness::{assert_invariants, poll_for, running, Role};
    let ns = Netns::new()?;
    let v1 = DaemonNginx::start(&ns, "v1", 2, 9001)?;
    let pid_of = |n: &DaemonNginx, file: &str| {
        poll_for(STARTUP, || Ok(n.pid(file)))?.with_context(|| format!("no {file}:\n{}", n.log()))
    };
    let old = pid_of(&v1, "nginx.pid")?;
    let ready = "--readyz=http://127.0.0.1:9001/readyz";
    zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    zdt_ok(&ns, &["promote", &old.to_string(), ready])?;
    let client = Background::start(&ns, LoadSpec::open(addr(), RATE, MAX_LOAD));
    std::thread::sleep(SETTLE);

    // The binary upgrade, as nginx's documentation gives it: USR2, WINCH, QUIT.
    kill(Pid::from_raw(old), Signal::SIGUSR2)?;
    let heir = poll_for(STARTUP, || {
        Ok(v1
            .pid("nginx.pid.oldbin")
            .and(v1.pid("nginx.pid"))
            .filter(|&p| p != old))
    })?
    .with_context(|| format!("no new master:\n{}", v1.log()))?;
    // Its workers run once it has some children.
    poll_for(STARTUP, || {
        Ok(
            std::fs::read_to_string(format!("/proc/{heir}/task/{heir}/children"))
                .ok()
                .filter(|c| !c.trim().is_empty()),
        )
    })?
    .with_context(|| format!("the new master started no worker:\n{}", v1.log()))?;
    kill(Pid::from_raw(old), Signal::SIGWINCH)?;
    std::thread::sleep(SETTLE);
    kill(Pid::from_raw(old), Signal::SIGQUIT)?;
    poll_for(STOP, || Ok((!running(old)).then_some(())))?
        .with_context(|| format!("the old master did not exit:\n{}", v1.log()))?;
    // Without the lock, status sees the heir at once.
    let st = report(&ns, PORT)?;
    assert!(
        !st.drift.inherited.is_empty() && st.drift.inherited.iter().all(|i| i.pid == heir),
        "status does not name the heir {heir}: {st:?}"
    );
    // The next locked command records it.
    zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    let st = report(&ns, PORT)?;
    assert_eq!(st.pids(Role::Active), [heir], "{st:?}");
    assert!(st.drift.inherited.is_empty(), "{st:?}");
    assert_invariants(&ns, PORT)?;

    // A reload that adds a worker: the master (the member) opens one more `reuseport` listener.
    let slots = |st: &zdt_ctl::cmd::status::Status| st.member(heir).map_or(0, |m| m.slots.len());
    let before = slots(&report(&ns, PORT)?);
    v1.configure(3, 9001)?;
    kill(Pid::from_raw(heir), Signal::SIGHUP)?;
    let st = poll_for(STARTUP, || {
        Ok(report(&ns, PORT)
            .ok()
            .filter(|st| !st.drift.unadopted.is_empty()))
    })?
    .with_context(|| format!("status saw no new listener:\n{}", v1.log()))?;
    assert!(
        st.drift
            .unadopted
            .iter()
            .all(|u| u.pid == heir && u.role == Role::Active),
        "{st:?}"
    );
    zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    let st = report(&ns, PORT)?;
    assert_eq!(slots(&st), before + 1, "{st:?}");
    assert!(st.drift.unadopted.is_empty(), "{st:?}");
    assert_invariants(&ns, PORT)?;

    // The next deploy drains the heir, as it would have drained the master it replaced.
    let v2 = DaemonNginx::start(&ns, "v2", 2, 9002)?;
    let new = pid_of(&v2, "nginx.pid")?;
    let r = zdt_ok(
        &ns,
        &[
            "promote",
            &new.to_string(),
            "--readyz=http://127.0.0.1:9002/readyz",
        ],
    )?;
    assert!(r.stdout.contains(&format!("drained: pid {heir}")), "{r:?}");
    assert_eq!(report(&ns, PORT)?.role_of(heir), Some(Role::Draining));
    kill(Pid::from_raw(heir), Signal::SIGQUIT)?;
    poll_for(STOP, || Ok((!running(heir)).then_some(())))?
        .with_context(|| format!("the heir did not exit:\n{}", v1.log()))?;
    std::thread::sleep(SETTLE);
    let t = load::tally(&client.finish());
    print_tally("nginx: binary upgrade, reload, deploy", &t);
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.requests >= requests_at(RATE, SETTLE), "{t:?}");
    Ok(())
}
