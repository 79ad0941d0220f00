//! The program's cost per selection as the active list grows: the same saturating load of new
//! connections on a port whose active member has 2, 64 or 512 sockets (nginx's `reuseport` gives
//! each worker one), measured by the kernel's BPF run-time stats. The flow hash picks the slot
//! directly, so the cost should not grow with the list; `cargo xtask bench -- --parts scale`
//! measures it and `--readme` puts the table in the README.
use std::time::{Duration, Instant};

use anyhow::Context as _;

use zdt_tests::{
    harness::{zdt_ok, App, AppOpts},
    load::{self, LoadSpec, Outcome},
    netns::Netns,
    programs,
};

use crate::handover::{machine, ns_per_run, with_program_stats, with_stats};

const PORT: u16 = 8080;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScalePoint {
    /// Sockets of the active member (one family).
    pub sockets: usize,
    /// Requests answered 200 per second, and all requests (any other outcome is a failure).
    pub ok_per_s: f64,
    pub requests: u64,
    pub failed: u64,
    pub bpf_runs: u64,
    pub bpf_ns_per_run: f64,
    /// The same load with a two-instruction program (`return SK_PASS`) in zdt's place: what
    /// running any sk_reuseport program with run-time stats costs on this machine.
    #[serde(default)]
    pub floor_ns_per_run: f64,
    /// The same load with a program that only selects one socket (bpf_sk_select_reuseport)
    /// in zdt's place: the least that steering costs here.
    #[serde(default)]
    pub select_ns_per_run: f64,
    /// The same load with a program that selects the socket the flow hash picks among the
    /// member's sockets (as zdt does) and does nothing else: what the kernel's selection costs
    /// when connections spread over this many sockets, zdt's bookkeeping apart.
    #[serde(default)]
    pub select_hash_ns_per_run: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScaleReport {
    pub machine: String,
    pub kernel: String,
    /// Length of each measured run, and closed-loop clients.
    pub run_ms: u64,
    pub workers: usize,
    /// Runs per size, interleaved (2, 64, 512, 2, 64, 512, ...).
    pub rounds: usize,
    pub points: Vec<ScalePoint>,
    /// A UDP port's program per datagram (absent in reports made before UDP ports).
    #[serde(default)]
    pub udp: Option<UdpCost>,
    pub seconds: f64,
}

/// The UDP program's cost per datagram: a UDP echo service with one socket, attached as
/// `:PORT/udp`, under closed-loop datagrams from `workers` clients, each for `run`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct UdpCost {
    /// Every datagram of a known flow (each client keeps its socket): a flow-table lookup and
    /// one selection.
    pub known_ns: f64,
    pub known_runs: u64,
    /// Every datagram a new flow (each one from a new socket): the active set's selection and
    /// an insertion into the table (within the per-second bound; beyond it, none).
    pub new_ns: f64,
    pub new_runs: u64,
    /// New flows the table recorded and did not (over the bound) during the new-flow run.
    pub recorded: u64,
    pub unrecorded: u64,
    /// The references under the known-flow load: selecting one socket and nothing else, and
    /// `return SK_PASS`.
    pub select_ns: f64,
    pub floor_ns: f64,
}

/// Measures every size of `sizes`, `rounds` times each, interleaved.
pub fn run(
    sizes: &[usize],
    run: Duration,
    workers: usize,
    rounds: usize,
) -> anyhow::Result<ScaleReport> {
    let t0 = Instant::now();
    let (machine, kernel) = machine();
    let mut points: Vec<ScalePoint> = Vec::new();
    for _ in 0..rounds.max(1) {
        for &n in sizes {
            let p = measure(n, run, workers)?;
            eprintln!(
                "scale: {n} sockets: {:.0} ns/selection over {} runs (select only {:.0} ns, \
                 select by hash {:.0} ns, floor {:.0} ns), {:.0} ok/s, {} failed",
                p.bpf_ns_per_run,
                p.bpf_runs,
                p.select_ns_per_run,
                p.select_hash_ns_per_run,
                p.floor_ns_per_run,
                p.ok_per_s,
                p.failed
            );
            match points.iter_mut().find(|q| q.sockets == n) {
                Some(q) => {
                    let time =
                        q.bpf_ns_per_run * q.bpf_runs as f64 + p.bpf_ns_per_run * p.bpf_runs as f64;
                    q.bpf_runs += p.bpf_runs;
                    q.bpf_ns_per_run = time / q.bpf_runs.max(1) as f64;
                    q.ok_per_s = (q.ok_per_s * q.requests as f64 + p.ok_per_s * p.requests as f64)
                        / (q.requests + p.requests).max(1) as f64;
                    q.floor_ns_per_run = (q.floor_ns_per_run + p.floor_ns_per_run) / 2.0;
                    q.select_ns_per_run = (q.select_ns_per_run + p.select_ns_per_run) / 2.0;
                    q.select_hash_ns_per_run =
                        (q.select_hash_ns_per_run + p.select_hash_ns_per_run) / 2.0;
                    q.requests += p.requests;
                    q.failed += p.failed;
                }
                None => points.push(p),
            }
        }
    }
    let udp = measure_udp(run, workers)?;
    eprintln!(
        "scale: UDP: known flow {:.0} ns/datagram over {} runs, new flow {:.0} ns over {} \
         (recorded {}, unrecorded {}); select only {:.0} ns, floor {:.0} ns",
        udp.known_ns,
        udp.known_runs,
        udp.new_ns,
        udp.new_runs,
        udp.recorded,
        udp.unrecorded,
        udp.select_ns,
        udp.floor_ns
    );
    Ok(ScaleReport {
        machine,
        kernel,
        run_ms: run.as_millis() as u64,
        workers,
        rounds,
        points,
        udp: Some(udp),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// One run: a fresh namespace, an app with `n` sockets on 0.0.0.0, attached (they become the
/// active set), saturated with new connections.
fn measure(n: usize, run: Duration, workers: usize) -> anyhow::Result<ScalePoint> {
    let ns = Netns::new()?;
    let _app = App::start(
        &ns,
        &AppOpts::new(PORT, "scale")
            .arg("--sockets")
            .arg(&n.to_string()),
    )?;
    zdt_ok(&ns, &["attach", &format!(":{PORT}")])?;
    let spec = spec_for(run, workers);
    let (samples, runs, time) = with_program_stats(&ns, PORT, || {
        ns.run(move || {
            let mut out = Vec::new();
            load::run(&spec, &Default::default(), &mut |s| out.push(s));
            out
        })
    })?;
    let t = load::tally(&samples);
    let select = reference(&ns, spec_for(run, workers), Reference::SelectOnly)?;
    let select_hash = reference(&ns, spec_for(run, workers), Reference::SelectByHash(n))?;
    zdt_ok(&ns, &["detach", &format!(":{PORT}")])?;
    let floor = reference(&ns, spec_for(run, workers), Reference::Pass)?;
    Ok(ScalePoint {
        sockets: n,
        ok_per_s: t.count(Outcome::Ok) as f64 / run.as_secs_f64(),
        requests: t.requests,
        failed: t.failures(),
        bpf_runs: runs,
        bpf_ns_per_run: ns_per_run(runs, time),
        floor_ns_per_run: floor,
        select_ns_per_run: select,
        select_hash_ns_per_run: select_hash,
    })
}

/// The UDP program's cost per datagram ([`UdpCost`]).
fn measure_udp(run: Duration, workers: usize) -> anyhow::Result<UdpCost> {
    let ns = Netns::new()?;
    let _echo = zdt_tests::udp::Echo::start(&ns, PORT, Duration::ZERO, None, &[])?;
    let spec = format!(":{PORT}/udp");
    // A table whose per-second bound (its size / 4 / CPUs) is above what the new-flow run sends:
    // every new flow is recorded, so its cost is a selection and an insertion.
    zdt_ok(&ns, &["attach", &spec, "--flows", &UDP_FLOWS.to_string()])?;
    let port = zdt_ctl::addr::Port::udp(PORT);
    let ((), known_runs, known) =
        with_program_stats(&ns, port, || udp_load(&ns, workers, run, false))?;
    let ((), new_runs, new) = with_program_stats(&ns, port, || udp_load(&ns, workers, run, true))?;
    let flows = ns.run(move || -> anyhow::Result<_> {
        let state = zdt_ctl::state::State::open_read(port)?.context("not attached")?;
        Ok(state.flow_counters()?.unwrap_or_default())
    })??;
    let reference = |which: Reference| -> anyhow::Result<f64> {
        let parsed: zdt_ctl::addr::PortSpec = spec.parse()?;
        let prog = ns.run(move || -> anyhow::Result<_> {
            let prog = load_reference(port, which)?;
            programs::attach_to_spec(&prog, &parsed)?;
            Ok(prog)
        })??;
        let ((), runs, time) = with_stats(
            || programs::run_stats(&prog),
            || udp_load(&ns, workers, run, false),
        )?;
        Ok(ns_per_run(runs, time))
    };
    let select_ns = reference(Reference::SelectOnly)?;
    zdt_ok(&ns, &["detach", &spec])?;
    let floor_ns = reference(Reference::Pass)?;
    Ok(UdpCost {
        known_ns: ns_per_run(known_runs, known),
        known_runs,
        new_ns: ns_per_run(new_runs, new),
        new_runs,
        recorded: flows.recorded,
        unrecorded: flows.unrecorded,
        select_ns,
        floor_ns,
    })
}

/// The UDP cost run's flow table: 1 Mi flows (about 100 MiB of kernel memory while it runs).
const UDP_FLOWS: u32 = 1 << 20;

/// Closed-loop datagrams to the echo on PORT from `workers` clients for `run`: each keeps one
/// socket (known flows), or takes a new socket for every datagram (`new_flows`), bound to an
/// address of 127.0.0.0/8 no datagram came from before (a reused source port would be a known
/// flow).
fn udp_load(ns: &Netns, workers: usize, run: Duration, new_flows: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + run;
    let threads: Vec<_> = (0..workers.max(1))
        .map(|w| {
            ns.spawn_thread(move || -> std::io::Result<()> {
                let target: std::net::SocketAddr = ([127, 0, 0, 1], PORT).into();
                let mut n: u32 = 0;
                let mut bind = || -> std::io::Result<std::net::UdpSocket> {
                    // 127.(1 + w).x.y: workers apart, 65,536 sources each, then ports repeat
                    // (a run sends fewer).
                    n = n.wrapping_add(1);
                    let [_, _, x, y] = n.to_be_bytes();
                    let ip = std::net::Ipv4Addr::new(127, 1 + (w % 250) as u8, x, y);
                    let s = std::net::UdpSocket::bind((ip, 0))?;
                    s.set_read_timeout(Some(Duration::from_millis(200)))?;
                    Ok(s)
                };
                let mut s = bind()?;
                let mut buf = [0u8; 256];
                while Instant::now() < deadline {
                    if new_flows {
                        s = bind()?;
                    }
                    s.send_to(b"cost", target)?;
                    // A lost answer only ends this round early: the run time is the kernel's.
                    let _ = s.recv(&mut buf);
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a UDP load thread panicked"))??;
    }
    Ok(())
}

/// Saturating new connections to PORT for `run`.
fn spec_for(run: Duration, workers: usize) -> LoadSpec {
    LoadSpec {
        rate: None,
        workers,
        duration: run,
        max_requests: u64::MAX,
        ..LoadSpec::open(([127, 0, 0, 1], PORT).into(), 1.0, run)
    }
}

enum Reference {
    /// `return SK_PASS`.
    Pass,
    /// Select slot 0 of zdt's socket array, return SK_PASS.
    SelectOnly,
    /// Select the slot the flow hash picks among slots 0..n of zdt's socket array (where a
    /// fresh port's attach records the app's n sockets), return SK_PASS.
    SelectByHash(usize),
}

/// Loads reference program `which`, its selections in the socket array pinned for `port`. Call
/// inside the port's network namespace.
fn load_reference(
    port: zdt_ctl::addr::Port,
    which: Reference,
) -> anyhow::Result<std::os::fd::OwnedFd> {
    let sockets = || -> anyhow::Result<aya::maps::MapData> {
        let dir = zdt_ctl::state::port_dir(port)?;
        Ok(aya::maps::MapData::from_pin(
            dir.join(zdt_common::names::SOCKETS),
        )?)
    };
    match which {
        Reference::Pass => programs::load_pass_program(),
        Reference::SelectOnly => programs::load_select_only(&sockets()?),
        Reference::SelectByHash(n) => programs::load_select_by_hash(&sockets()?, u32::try_from(n)?),
    }
}

/// ns per run of a reference program in zdt's place on the port's groups, under the same load.
fn reference(ns: &Netns, spec: LoadSpec, which: Reference) -> anyhow::Result<f64> {
    let prog = ns.run(move || -> anyhow::Result<_> {
        let prog = load_reference(PORT.into(), which)?;
        programs::attach_to_port(&prog, PORT)?;
        Ok(prog)
    })??;
    let ((), runs, time) = with_stats(
        || programs::run_stats(&prog),
        || ns.run(move || load::run(&spec, &Default::default(), &mut |_| {})),
    )?;
    Ok(ns_per_run(runs, time))
}

/// The README's table.
pub fn markdown(r: &ScaleReport) -> String {
    let mut o = format!(
        "Machine: {}, kernel {}. Saturated new connections ({} closed-loop clients, {} ms per \
         run, {} runs per size, interleaved); the program's run time from the kernel's BPF \
         stats. Run time {:.0} s.\n\n\
         Three reference programs ran in zdt's place under the same load: *select only* selects \
         one socket (bpf_sk_select_reuseport) and nothing else, the least any steering costs \
         here; *select by hash* selects the socket the flow hash picks among the member's \
         sockets, as zdt does, and nothing else: the kernel's own cost of spreading \
         connections over that many sockets; *floor* is `return SK_PASS`, what the kernel's \
         dispatch and its run-time stats cost per run on this machine whatever the program \
         does.\n\n\
         | sockets in the active list | zdt, ns per selection | select by hash, ns | select only, ns | floor, ns | selections | answered 200 per s | failed |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.machine,
        r.kernel,
        r.workers,
        r.run_ms,
        r.rounds,
        r.seconds
    );
    for p in &r.points {
        o += &format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {} |\n",
            p.sockets,
            p.bpf_ns_per_run,
            p.select_hash_ns_per_run,
            p.select_ns_per_run,
            p.floor_ns_per_run,
            p.bpf_runs,
            p.ok_per_s,
            p.failed
        );
    }
    if let Some(u) = &r.udp {
        o += &udp_markdown(u);
    }
    o
}

/// The UDP table of [`markdown`].
fn udp_markdown(u: &UdpCost) -> String {
    format!(
        "\nA UDP port (`:PORT/udp`, one echo socket), closed-loop datagrams from the same clients, \
         each run as long: ns per datagram.\n\n\
         | datagrams | zdt, ns | select only, ns | floor, ns | runs |\n\
         |---|---|---|---|---|\n\
         | of known flows (a table lookup, one selection) | {:.0} | {:.0} | {:.0} | {} |\n\
         | each a new flow (a selection, an insertion: {} recorded, {} over the bound) | {:.0} | | | {} |\n",
        u.known_ns,
        u.select_ns,
        u.floor_ns,
        u.known_runs,
        u.recorded,
        u.unrecorded,
        u.new_ns,
        u.new_runs
    )
}

pub fn write(r: &ScaleReport, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("scale.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("SCALE.md"), markdown(r))?;
    Ok(())
}
