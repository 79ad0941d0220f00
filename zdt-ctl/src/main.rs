//! The `zdt-ctl` command: parses arguments, calls the library, prints the result.
use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use zdt_ctl::{
    addr::{parse_duration, parse_pid, parse_port, PortSpec},
    cmd::{self, promote::PromoteOptions, status::Status},
    error::{kind_of, Kind},
};

#[derive(Parser)]
#[command(
    name = "zdt-ctl",
    version,
    about = "Zero-downtime deploys on one SO_REUSEPORT port, steered by a BPF program",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 port not attached, \
                  4 readiness timeout, 5 process died, 6 not root, 7 refused, 8 rolled back"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put a port under zdt's control (idempotent). Listeners already on the port keep serving.
    #[command(
        after_help = "Examples:\n  zdt-ctl attach :80\n  zdt-ctl attach 127.0.0.1:8080\n  zdt-ctl attach [::]:80"
    )]
    Attach {
        /// [ADDR]:PORT, e.g. :80, 127.0.0.1:8080, [::]:80
        #[arg(value_parser = parse_spec)]
        addr: PortSpec,
    },
    /// Wait for PID's readiness, then send all new connections to its sockets.
    #[command(
        after_help = "Example:\n  zdt-ctl promote $NEW_PID --readyz http://127.0.0.1:8081/readyz --stop-old"
    )]
    Promote {
        #[arg(value_parser = parse_pid_arg, allow_hyphen_values = true)]
        pid: i32,
        /// Readiness URL; the switch happens once it answers 200.
        #[arg(long, required_unless_present = "no_readyz")]
        readyz: Option<String>,
        /// Skip the readiness check (the process is taken as ready now).
        #[arg(long, conflicts_with = "readyz")]
        no_readyz: bool,
        /// How long to wait for readiness.
        #[arg(long, default_value = "60s", value_parser = parse_duration_arg)]
        timeout: Duration,
        /// After the switch, keep checking that the new process lives and answers 200 this long;
        /// if it does not, restore the previous active set (exit code 8).
        #[arg(long, value_parser = parse_duration_arg)]
        probation: Option<Duration>,
        /// SIGTERM the previous members after the switch (and probation) and wait for them to exit.
        #[arg(long)]
        stop_old: bool,
        /// How long --stop-old waits for the previous members to exit.
        #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
        drain_timeout: Duration,
        /// The attached port (needed only when several are attached).
        #[arg(long, value_parser = parse_port_arg)]
        port: Option<u16>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take PID's sockets out of the active set.
    Drain {
        #[arg(value_parser = parse_pid_arg, allow_hyphen_values = true)]
        pid: i32,
        /// Drain even if no active socket would remain (new connections then go to kernel hashing).
        #[arg(long)]
        force: bool,
        #[arg(long, value_parser = parse_port_arg)]
        port: Option<u16>,
    },
    /// Show members, roles and counters.
    Status {
        /// The port (default: every attached port of this network namespace).
        #[arg(value_parser = parse_port_arg)]
        port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// Remove the program from the port's groups and delete zdt's state for it.
    Detach {
        #[arg(value_parser = parse_spec)]
        addr: PortSpec,
    },
}

// clap value parsers return String errors; ours name the input already.
fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}
fn parse_pid_arg(s: &str) -> Result<i32, String> {
    parse_pid(s).map_err(|e| e.to_string())
}
fn parse_port_arg(s: &str) -> Result<u16, String> {
    parse_port(s).map_err(|e| e.to_string())
}
fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; every bad argument is bad input.
            return if e.use_stderr() {
                ExitCode::from(Kind::BadInput.exit_code() as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zdt-ctl: {e:#}");
            ExitCode::from(kind_of(&e).exit_code() as u8)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Attach { addr } => {
            let r = cmd::attach::attach(addr)?;
            let verb = if r.created {
                "attached"
            } else {
                "already attached"
            };
            println!("{}: {verb}", r.spec);
            if !r.adopted.is_empty() {
                let pids: Vec<String> = r.adopted.iter().map(i32::to_string).collect();
                println!("active: pid {} (already listening)", pids.join(", "));
            }
        }
        Command::Promote {
            pid,
            readyz,
            no_readyz: _,
            timeout,
            probation,
            stop_old,
            drain_timeout,
            port,
            json,
        } => {
            let opts = PromoteOptions {
                pid,
                port,
                readyz,
                timeout,
                probation,
                stop_old,
                drain_timeout,
            };
            let mut last = String::new();
            let r = cmd::promote::promote(&opts, |elapsed, answer| {
                // One line per change of answer: readable in a terminal and in a log.
                if answer != last {
                    eprintln!("readiness: {answer} after {:.1}s", elapsed.as_secs_f64());
                    last = answer.to_string();
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!("port {}: pid {pid} active (slots {:?})", r.port, r.slots);
            if r.drained.is_empty() {
                println!("drained: none");
            } else {
                let pids: Vec<String> = r.drained.iter().map(i32::to_string).collect();
                println!("drained: pid {}", pids.join(", "));
            }
            for s in &r.stopped {
                println!(
                    "stopped: pid {} {} after {} ms",
                    s.pid, s.outcome, s.after_ms
                );
            }
            println!(
                "phases: validate {:.1} ms, readiness {:.1} ms, switch {:.2} ms, probation {:.1} ms, stop {:.1} ms",
                r.validate_ms, r.readiness_ms, r.switch_ms, r.probation_ms, r.stop_ms
            );
            if r.stopped.iter().any(|s| s.outcome == "still-running") {
                eprintln!(
                    "zdt-ctl: warning: some previous members were still running after the drain \
                     timeout; they receive no new connections"
                );
            }
        }
        Command::Drain { pid, force, port } => {
            let port = cmd::resolve_port(port)?;
            let slots = cmd::drain::drain(port, pid, force)?;
            println!("port {port}: pid {pid} draining (slots {slots:?})");
        }
        Command::Status { port, json } => {
            let ports = match port {
                Some(p) => vec![p],
                None => cmd::status::attached_ports()?,
            };
            let all: Vec<Status> = ports
                .iter()
                .map(|p| cmd::status::status(*p))
                .collect::<anyhow::Result<_>>()?;
            if json {
                // One port asked for: one object; otherwise an array.
                let text = match (port, all.as_slice()) {
                    (Some(_), [one]) => serde_json::to_string_pretty(one)?,
                    _ => serde_json::to_string_pretty(&all)?,
                };
                println!("{text}");
            } else if all.is_empty() {
                println!("no port is attached in this network namespace");
            } else {
                for s in &all {
                    print_status(s);
                }
            }
        }
        Command::Detach { addr } => {
            let groups = cmd::detach::detach(addr)?;
            println!("{addr}: detached ({groups} group(s) back to kernel hashing)");
        }
    }
    Ok(())
}

fn print_status(s: &Status) {
    let Some(spec) = &s.spec else {
        println!("port {}: not attached", s.port);
        return;
    };
    let mode = if s.promoted {
        "steering by active set"
    } else {
        "pass-through (nothing promoted yet)"
    };
    println!(
        "{spec}: {}, {mode}",
        if s.attached {
            "attached"
        } else {
            "NOT ATTACHED to every group"
        }
    );
    for g in &s.groups {
        println!(
            "  group {}: {} listener(s), program {}",
            g.family,
            g.listeners,
            if g.steering {
                "attached"
            } else {
                "NOT ATTACHED (group re-created, or the app replaced it; promote re-attaches)"
            }
        );
    }
    println!(
        "  {:<10} {:>8} {:<16} {:<10} {:>10} {:>10}",
        "SLOTS", "PID", "COMMAND", "ROLE", "STEERED", "MIGRATED"
    );
    for m in &s.members {
        let slots: Vec<String> = m.slots.iter().map(u32::to_string).collect();
        println!(
            "  {:<10} {:>8} {:<16} {:<10} {:>10} {:>10}",
            slots.join(","),
            m.pid,
            m.command,
            m.role,
            m.steered,
            m.migrated
        );
    }
    let k = &s.kernel;
    println!(
        "  kernel: migrations ok {} failed {}, listen overflows {} drops {}",
        k.migrate_req_success, k.migrate_req_failure, k.listen_overflows, k.listen_drops
    );
    let c = &s.counters;
    println!(
        "  counters: steered {} migrated {} passthrough {} fallback {} select_failed {} migrate_no_target {}",
        c.steered, c.migrated, c.passthrough, c.fallback, c.select_failed, c.migrate_no_target
    );
}
