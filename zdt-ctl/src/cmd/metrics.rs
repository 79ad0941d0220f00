//! `zdt-ctl metrics [PORT] [--listen ADDR]`: zdt's counters in the Prometheus text exposition
//! format (version 0.0.4), for node_exporter's textfile collector or, with --listen, a scraper.
use crate::addr::Port;
use std::{fmt::Write as _, net::SocketAddr};

use crate::cmd::status::{statuses, Status};

/// Print zdt's counters in the Prometheus text format, or serve them.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  zdt-ctl metrics > /var/lib/node_exporter/textfile/zdt.prom\n  zdt-ctl metrics --listen 127.0.0.1:9814"
)]
pub struct Args {
    /// The port, `443/udp` for a UDP one (default: every attached port).
    #[arg(value_parser = super::parse_port_arg)]
    pub port: Option<Port>,
    /// Serve GET /metrics on ADDR:PORT instead of printing once; `:PORT` is every address of
    /// both families.
    #[arg(long, value_name = "[ADDR]:PORT", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
}

/// `--listen`: ADDR:PORT, or `:PORT` for `[::]:PORT` (bound dual-stack by `serve`).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let parsed = match s.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), p)),
        None => s.parse().ok(),
    };
    parsed.ok_or_else(|| {
        format!(
            "invalid address {s:?}: write ADDR:PORT or :PORT, e.g. 127.0.0.1:9814, [::1]:9814 or \
             :9814 (every address)"
        )
    })
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    match args.listen {
        Some(addr) => serve(addr, args.port),
        None => {
            crate::out!("{}", render(&statuses(args.port)?));
            Ok(())
        }
    }
}

/// A listener on `addr`; `[::]` takes IPv4 clients too, whatever net.ipv6.bindv6only says.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        s.set_only_v6(false)?;
    }
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Label values escaped as the exposition format wants (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        let _ = writeln!(self.text, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Renders the statuses of all ports; kernel counters (per network namespace) once.
pub fn render(all: &[Status]) -> String {
    let mut o = Out {
        text: String::new(),
    };
    // `443` for a TCP port, `443/udp` for a UDP one.
    let port = |s: &Status| {
        let p = Port {
            number: s.port,
            proto: s.protocol,
        };
        ("port", p.to_string())
    };
    type StatusValue = fn(&Status) -> f64;
    let gauges: [(&str, &str, StatusValue); 2] = [
        (
            "zdt_attached",
            "1 if zdt's program is attached to every SO_REUSEPORT group of the port.",
            |s| f64::from(u8::from(s.attached)),
        ),
        (
            "zdt_promoted",
            "1 if the program steers by an active set (0: kernel hashing).",
            |s| f64::from(u8::from(s.promoted)),
        ),
    ];
    for (name, help, f) in gauges {
        o.family(name, "gauge", help);
        for s in all {
            o.sample(name, &[port(s)], f(s));
        }
    }
    o.family(
        "zdt_group_steering",
        "gauge",
        "1 if the program is attached to this group (proven by a probe connection).",
    );
    for s in all {
        // A family with only another user's listeners has no group of the app's to steer.
        for g in s.groups.iter().filter(|g| g.listeners > 0) {
            o.sample(
                "zdt_group_steering",
                &[port(s), ("family", g.family.clone())],
                u8::from(g.steering),
            );
        }
    }
    let member = |s: &Status, m: &crate::cmd::status::Member| {
        [
            port(s),
            ("pid", m.pid.to_string()),
            ("command", m.command.clone()),
            ("role", m.role.as_str().into()),
        ]
    };
    type MemberValue = fn(&crate::cmd::status::Member) -> f64;
    let per_member: [(&str, &str, &str, MemberValue); 5] = [
        (
            "zdt_member_steered_total",
            "counter",
            "New connections the program steered to this member.",
            |m| m.steered as f64,
        ),
        (
            "zdt_member_migrated_total",
            "counter",
            "Queued connections migrated to this member from a closing listener.",
            |m| m.migrated as f64,
        ),
        (
            "zdt_member_recent_share",
            "gauge",
            "This member's share of the new connections of the last 34 to 69 seconds.",
            |m| m.share,
        ),
        (
            "zdt_member_queued",
            "gauge",
            "Connections waiting in this member's accept queues.",
            |m| m.queued as f64,
        ),
        (
            "zdt_member_stalled_sockets",
            "gauge",
            "This member's taking sockets whose accept queue did not shrink (nothing accepts from them).",
            |m| m.stalled.len() as f64,
        ),
    ];
    for (name, kind, help, f) in per_member {
        o.family(name, kind, help);
        for s in all {
            for m in &s.members {
                o.sample(name, &member(s, m), f(m));
            }
        }
    }
    // A UDP port's flows: per member, and its table.
    type FlowsOf = fn(&crate::cmd::status::Member) -> Option<u64>;
    let member_flows: [(&str, &str, FlowsOf); 2] = [
        (
            "zdt_member_flows",
            "A UDP port's flows this member's sockets own (their datagrams go to it).",
            |m| m.flows,
        ),
        (
            "zdt_member_live_flows",
            "Of those, the flows seen in the last 30 seconds.",
            |m| m.live_flows,
        ),
    ];
    for (name, help, f) in member_flows {
        o.family(name, "gauge", help);
        for s in all {
            for m in &s.members {
                if let Some(v) = f(m) {
                    o.sample(name, &member(s, m), v);
                }
            }
        }
    }
    type TableValue = fn(&crate::cmd::status::Flows) -> u64;
    let table: [(&str, &str, &str, TableValue); 8] = [
        ("zdt_flows", "gauge", "Flows in a UDP port's table.", |f| f.entries),
        (
            "zdt_flows_capacity",
            "gauge",
            "The size of a UDP port's flow table (attach --flows).",
            |f| u64::from(f.capacity),
        ),
        (
            "zdt_flow_datagrams_total",
            "counter",
            "Datagrams of known flows sent to their own socket.",
            |f| f.known,
        ),
        (
            "zdt_flows_recorded_total",
            "counter",
            "New flows recorded.",
            |f| f.recorded,
        ),
        (
            "zdt_flows_unrecorded_total",
            "counter",
            "New flows steered but not recorded (over the per-second bound, or a failed insertion).",
            |f| f.unrecorded,
        ),
        (
            "zdt_flows_orphaned_total",
            "counter",
            "Known flows whose socket had closed, steered anew.",
            |f| f.orphaned,
        ),
        (
            "zdt_flows_evicted_total",
            "counter",
            "Flows pushed out of the full table, least recently seen first.",
            |f| f.evicted,
        ),
        (
            "zdt_flow_fallback_total",
            "counter",
            "Datagrams no ready socket could take, left to the kernel's hash over the group.",
            |f| f.fallback,
        ),
    ];
    for (name, kind, help, f) in table {
        o.family(name, kind, help);
        for s in all {
            if let Some(flows) = &s.flows {
                o.sample(name, &[port(s)], f(flows));
            }
        }
    }
    type CounterValue = fn(&crate::cmd::status::Counters) -> u64;
    let counters: [(&str, &str, CounterValue); 8] = [
        (
            "zdt_steered_total",
            "New connections steered to an active socket.",
            |c| c.steered,
        ),
        (
            "zdt_migrated_total",
            "Queued connections migrated to an active socket.",
            |c| c.migrated,
        ),
        (
            "zdt_passthrough_total",
            "New connections passed to kernel hashing because nothing was promoted.",
            |c| c.passthrough,
        ),
        (
            "zdt_fallback_total",
            "New connections passed to kernel hashing because no active socket could be selected.",
            |c| c.fallback,
        ),
        (
            "zdt_select_failed_total",
            "Socket selections that failed (a closed slot).",
            |c| c.select_failed,
        ),
        (
            "zdt_migrate_no_target_total",
            "Migrations for which no active socket could be selected.",
            |c| c.migrate_no_target,
        ),
        (
            "zdt_held_total",
            "Connections (new, or from a dying member's queue) parked on a zdt-ctl hold placeholder while no member was ready.",
            |c| c.held,
        ),
        (
            "zdt_probe_refused_total",
            "zdt-ctl's own connections refused by the program: probes whose candidate could not be selected, and the status/metrics self-check.",
            |c| c.probe_refused,
        ),
    ];
    for (name, help, f) in counters {
        o.family(name, "counter", help);
        for s in all {
            o.sample(name, &[port(s)], f(&s.counters));
        }
    }
    if let Some(k) = all.first().map(|s| &s.kernel) {
        let kernel = [
            (
                "zdt_kernel_migrate_req_success_total",
                "TcpExt TCPMigrateReqSuccess of the network namespace.",
                k.migrate_req_success,
            ),
            (
                "zdt_kernel_migrate_req_failure_total",
                "TcpExt TCPMigrateReqFailure of the network namespace.",
                k.migrate_req_failure,
            ),
            (
                "zdt_kernel_listen_overflows_total",
                "TcpExt ListenOverflows of the network namespace.",
                k.listen_overflows,
            ),
            (
                "zdt_kernel_listen_drops_total",
                "TcpExt ListenDrops of the network namespace.",
                k.listen_drops,
            ),
        ];
        for (name, help, v) in kernel {
            o.family(name, "counter", help);
            let _ = writeln!(o.text, "{name} {v}");
        }
    }
    o.text
}

/// Serves `GET /metrics` on `addr` until killed; every scrape reads the maps afresh.
/// How long one scraper's connection may stay open, whatever it does (an idle keep-alive, a
/// request sent halfway): the server serves every scraper at once, and this bounds what one of
/// them can hold.
pub const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub fn serve(addr: SocketAddr, port: Option<Port>) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::{body::Bytes, server::conn::http1, service::service_fn, Response};
    use hyper_util::rt::TokioIo;

    crate::error::require_root()?;
    // A port asked for must be attached now (as `metrics PORT` says): a typo would otherwise
    // serve errors to every scrape. It may be detached later; scrapes then say so.
    if let Some(port) = port {
        if !crate::state::State::exists(port)? {
            return Err(crate::state::not_attached(port));
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind(addr)
            .map_err(|e| crate::error::bad_input(format!("cannot listen on {addr}: {e}")))?;
        tracing::info!(%addr, "serving metrics");
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of fds, a connection reset before it was accepted...: the next one may
                // well work, and the scrapers must not lose their endpoint over it.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let svc = service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| async move {
                    let (code, body) = if req.uri().path() != "/metrics" {
                        (404, "only /metrics here\n".to_string())
                    } else {
                        // Reading the state is blocking work (map reads, status's own probe
                        // connection): off the thread that serves the other scrapers.
                        match tokio::task::spawn_blocking(move || statuses(port)).await {
                            Ok(Ok(all)) => (200, render(&all)),
                            Ok(Err(e)) => (500, format!("zdt-ctl metrics: {e:#}\n")),
                            Err(e) => (500, format!("zdt-ctl metrics: {e}\n")),
                        }
                    };
                    Response::builder()
                        .status(code)
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                },
            );
            // Every scraper on its own task, each connection closed after SCRAPE_TIMEOUT.
            tokio::spawn(async move {
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await;
            });
        }
    })
}
