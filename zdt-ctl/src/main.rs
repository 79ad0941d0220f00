//! The `zdt-ctl` command: parses arguments, calls the library, prints the result.
use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand};
use zdt_ctl::{
    addr::{parse_duration, parse_pid, parse_port, PortSpec},
    cmd::{self, promote::PromoteOptions},
    error::{kind_of, Kind},
};

#[derive(Parser)]
#[command(
    name = "zdt-ctl",
    // ZDT_COMMIT comes from build.rs: the checkout's commit, or "unknown" outside git.
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ZDT_COMMIT"), ")"),
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
    /// Wait for PID to listen on the port and be ready, then send all new connections to it.
    #[command(
        after_help = "PID is the service's own process (with `exec` in a start script; under socket \
                      activation its MainPID). It may bind the port some time after it starts: promote \
                      waits for that, and fails at once if it binds another address, without \
                      SO_REUSEPORT, as another uid, or laid out otherwise than the running version \
                      (split IPv4/IPv6 vs one dual-stack socket).\n\n\
                      Example:\n  ./myapp & zdt-ctl promote $! --readyz http://127.0.0.1:8081/readyz --stop-old"
    )]
    Promote {
        #[arg(value_parser = parse_pid_arg, allow_hyphen_values = true)]
        pid: i32,
        /// Readiness URL; the switch happens once it answers 200. Only PID (or a process it
        /// started) may serve its address, checked at every probe and at the switch;
        /// `localhost` means 127.0.0.1 and ::1.
        #[arg(long, required_unless_present_any = ["no_readyz", "probe"])]
        readyz: Option<String>,
        /// Check readiness at PATH through the public port itself, for apps without a separate
        /// readiness port: zdt's probes (marked connections from loopback) reach PID and no one else.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["readyz", "no_readyz"])]
        probe: Option<String>,
        /// Skip the readiness check (the process is taken as ready now).
        #[arg(long, conflicts_with = "readyz")]
        no_readyz: bool,
        /// Canary: send N % (1-99) of new connections to PID, by flow hash; the rest stay with
        /// the active members. `promote PID` without --weight completes the rollout.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=99), conflicts_with = "stop_old")]
        weight: Option<u32>,
        /// How long to wait for PID to listen on the port and then answer 200, in all.
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
        /// The attached port (needed only when several are attached). May repeat: PID is
        /// promoted on each, after one readiness wait, atomically per port.
        #[arg(long = "port", value_parser = parse_port_arg)]
        ports: Vec<u16>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take PID's sockets out of the active set.
    Drain {
        #[arg(value_parser = parse_pid_arg, allow_hyphen_values = true)]
        pid: i32,
        /// Drain even if no active socket would remain (new connections then go to kernel
        /// hashing). Refused all the same while `zdt-ctl hold` runs: its placeholder would take
        /// them, to wait for a promote, while PID still listens.
        #[arg(long)]
        force: bool,
        #[arg(long, value_parser = parse_port_arg)]
        port: Option<u16>,
    },
    /// Make the active set from before the last switch active again (while its sockets listen).
    #[command(
        after_help = "Example, right after a deploy that turns out bad (before --stop-old stopped the old version):\n  zdt-ctl rollback"
    )]
    Rollback {
        #[arg(value_parser = parse_port_arg)]
        port: Option<u16>,
    },
    /// Show members, roles and counters.
    #[command(
        after_help = "The JSON schema is docs/status.schema.json. Each group is checked with one \
                            connection of zdt-ctl's own to the port, which the program refuses: the app \
                            never sees it. A PORT that is not attached exits 3."
    )]
    Status {
        /// The port (default: every attached port of this network namespace).
        #[arg(value_parser = parse_port_arg)]
        port: Option<u16>,
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh the view every INTERVAL (default 1s) until interrupted.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = parse_duration_arg)]
        watch: Option<Duration>,
    },
    /// Print zdt's counters in the Prometheus text format, or serve them.
    #[command(
        after_help = "Examples:\n  zdt-ctl metrics > /var/lib/node_exporter/textfile/zdt.prom\n  zdt-ctl metrics --listen 127.0.0.1:9814"
    )]
    Metrics {
        #[arg(value_parser = parse_port_arg)]
        port: Option<u16>,
        /// Serve GET /metrics on this address instead of printing once.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Run CMD with SO_REUSEPORT listeners handed over the systemd way (LISTEN_FDS).
    #[command(
        after_help = "Example:\n  zdt-ctl exec --listen :80 -- /usr/bin/myapp --socket-activation"
    )]
    Exec {
        /// [ADDR]:PORT to listen on (`:80` = 0.0.0.0:80 and [::]:80); may repeat.
        #[arg(long = "listen", required = true, value_parser = parse_spec)]
        listen: Vec<PortSpec>,
        #[arg(long, default_value_t = 4096)]
        backlog: i32,
        /// The name passed in LISTEN_FDNAMES.
        #[arg(long, default_value = "zdt")]
        name: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Keep the port's connections waiting while no promoted process is active (runs until stopped)
    ///
    /// A placeholder listener that never accepts stays in the port's group. While no promoted
    /// process can take a connection (a crash, a stop-then-start restart), new connections and
    /// a dying member's queue wait on it instead of being refused or reset, and move to the next
    /// promoted process. Meant as a systemd service (examples/zdt-hold.service); ends when the
    /// port is detached.
    Hold {
        /// The address your app binds, [ADDR]:PORT: `:PORT` holds both wildcards (0.0.0.0 and
        /// [::]); use 0.0.0.0:PORT for an app that serves IPv4 only.
        #[arg(value_parser = parse_spec)]
        addr: PortSpec,
        /// Accept-queue limit of each placeholder: how many connections can wait at once
        /// (also capped by net.core.somaxconn).
        #[arg(long, default_value_t = 4096)]
        backlog: i32,
        /// How long connections may wait for a ready process of their address family; after
        /// that they are reset (a family no process serves must not keep clients forever).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        max_wait: std::time::Duration,
        /// Owner of the placeholder (user name or uid): the app's user, e.g. www-data. The
        /// kernel shares a port only between sockets of one uid. Default: the owner of the
        /// port's listeners, or root when there are none.
        #[arg(long, value_name = "NAME|UID")]
        user: Option<String>,
        /// One [::] placeholder with IPV6_V6ONLY=0, for an app that listens on one dual-stack
        /// socket (Go, Java and Node do by default). Default: the layout of the port's
        /// listeners, or split when there are none.
        #[arg(long, conflicts_with = "split")]
        dual_stack: bool,
        /// An IPv4 and an IPv6-only placeholder (the default when the port has no listener).
        #[arg(long)]
        split: bool,
    },
    /// Shell completions or the man page (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        /// bash, zsh, fish, elvish, powershell, or man
        what: String,
    },
    /// After installing a new zdt-ctl: swap its program in, keeping roles, sets and counters.
    #[command(
        after_help = "Every other command refuses a port whose pinned program another zdt-ctl \
                      loaded (exit 7). upgrade loads this zdt-ctl's program against the port's \
                      pinned maps and attaches it to each of the port's SO_REUSEPORT groups, \
                      which the kernel swaps in one step: no connection is refused or reset, \
                      and members, roles, the rollback target and counters stay. It refuses \
                      (exit 7, nothing changed) when the pinned maps have another layout than \
                      this zdt-ctl's; then detach with the old zdt-ctl and attach with the new \
                      one. Running it again is harmless.\n\n\
                      Example, in a package's postinst:\n  zdt-ctl upgrade"
    )]
    Upgrade {
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
    zdt_ctl::raise_nofile_limit();
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
            for w in &r.warnings {
                eprintln!("zdt-ctl: warning: {w}");
            }
            if !r.adopted.is_empty() {
                let pids: Vec<String> = r.adopted.iter().map(i32::to_string).collect();
                println!("active: pid {} (already listening)", pids.join(", "));
            }
        }
        Command::Promote {
            pid,
            readyz,
            probe,
            no_readyz: _,
            weight,
            timeout,
            probation,
            stop_old,
            drain_timeout,
            ports,
            json,
        } => {
            let opts = PromoteOptions {
                pid,
                ports,
                readyz,
                probe,
                weight,
                timeout,
                probation,
                stop_old,
                drain_timeout,
            };
            // Progress only on a terminal: one line, redrawn, with the answers seen so far.
            // In scripts and under systemd the log lines (RUST_LOG=info) tell the story.
            let tty = std::io::stderr().is_terminal();
            let mut seen: Vec<(String, u32)> = Vec::new();
            let mut printed = false;
            let r = cmd::promote::promote(&opts, |p| {
                use cmd::promote::Progress;
                if !tty {
                    return;
                }
                printed = true;
                match p {
                    Progress::Listening { elapsed, spec } => eprint!(
                        "\r\x1b[2Kwaiting for pid {pid} to listen on {spec}: {:.1}s",
                        elapsed.as_secs_f64()
                    ),
                    Progress::Answer { elapsed, answer } => {
                        match seen.iter_mut().find(|(a, _)| a == answer) {
                            Some((_, n)) => *n += 1,
                            None => seen.push((answer.to_string(), 1)),
                        }
                        let answers: Vec<String> =
                            seen.iter().map(|(a, n)| format!("{a} x{n}")).collect();
                        eprint!(
                            "\r\x1b[2Kwaiting for readiness: {:.1}s, answers: {}",
                            elapsed.as_secs_f64(),
                            answers.join(", ")
                        );
                    }
                }
            });
            if printed {
                eprintln!();
            }
            let reports = r?;
            if json {
                // One port: the report; several: an array of them.
                let text = match reports.as_slice() {
                    [one] => serde_json::to_string_pretty(one)?,
                    many => serde_json::to_string_pretty(many)?,
                };
                println!("{text}");
                return Ok(());
            }
            for r in &reports {
                match weight {
                    Some(w) => println!(
                        "port {}: pid {pid} canary at {w} % (slots {:?})",
                        r.port, r.slots
                    ),
                    None => println!("port {}: pid {pid} active (slots {:?})", r.port, r.slots),
                }
                if r.drained.is_empty() {
                    println!("drained: none");
                } else {
                    let pids: Vec<String> = r.drained.iter().map(i32::to_string).collect();
                    println!("drained: pid {}", pids.join(", "));
                }
            }
            let Some(r) = reports.first() else {
                return Ok(());
            };
            for s in &r.stopped {
                println!(
                    "stopped: pid {} {} after {} ms",
                    s.pid, s.outcome, s.after_ms
                );
            }
            let switch: Vec<String> = reports
                .iter()
                .map(|r| format!("{:.2} ms", r.switch_ms))
                .collect();
            println!(
                "phases: validate {:.1} ms, readiness {:.1} ms, switch {}, probation {:.1} ms, stop {:.1} ms",
                r.validate_ms,
                r.readiness_ms,
                switch.join(" + "),
                r.probation_ms,
                r.stop_ms
            );
            if r.stopped.iter().any(|s| s.outcome == "still-running") {
                eprintln!(
                    "zdt-ctl: warning: some previous members were still running after the drain \
                     timeout; they receive no new connections"
                );
            }
        }
        Command::Upgrade { port, json } => {
            let reports = cmd::upgrade::upgrade(port)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
                return Ok(());
            }
            for r in &reports {
                if r.upgraded {
                    println!(
                        "port {}: program upgraded (tag {} -> {}), attached through {} socket(s)",
                        r.port, r.from_tag, r.to_tag, r.sockets
                    );
                } else {
                    println!(
                        "port {}: already runs this zdt-ctl's program (tag {})",
                        r.port, r.to_tag
                    );
                }
            }
        }
        Command::Drain { pid, force, port } => {
            let port = cmd::resolve_port(port)?;
            let slots = cmd::drain::drain(port, pid, force)?;
            println!("port {port}: pid {pid} draining (slots {slots:?})");
        }
        Command::Rollback { port } => {
            let port = cmd::resolve_port(port)?;
            let r = cmd::rollback::rollback(port)?;
            let list = |v: &[i32]| v.iter().map(i32::to_string).collect::<Vec<_>>().join(", ");
            println!(
                "port {port}: pid {} active again; pid {} draining",
                list(&r.restored),
                if r.demoted.is_empty() {
                    "-".into()
                } else {
                    list(&r.demoted)
                }
            );
        }
        Command::Status {
            port,
            json: _,
            watch: Some(every),
        } => loop {
            let all = cmd::status::statuses(port)?;
            let mut text = String::from("\x1b[2J\x1b[H");
            for s in &all {
                text += &cmd::status::render(s);
            }
            if all.is_empty() {
                text += "no port is attached in this network namespace\n";
            }
            print!("{text}");
            std::thread::sleep(every);
        },
        Command::Status { port, json, .. } => {
            let all = cmd::status::statuses(port)?;
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
                    print!("{}", cmd::status::render(s));
                }
            }
        }
        Command::Metrics { port, listen } => match listen {
            Some(addr) => cmd::metrics::serve(addr, port)?,
            None => print!("{}", cmd::metrics::render(&cmd::status::statuses(port)?)),
        },
        Command::Exec {
            listen,
            backlog,
            name,
            command,
        } => match cmd::exec::exec(&listen, backlog, &name, &command)? {},
        Command::Hold {
            addr,
            backlog,
            max_wait,
            user,
            dual_stack,
            split,
        } => {
            use cmd::hold::{HoldLayout, HoldOptions};
            cmd::hold::hold(&HoldOptions {
                spec: addr,
                backlog,
                max_wait,
                user,
                layout: match (dual_stack, split) {
                    (true, _) => Some(HoldLayout::DualStack),
                    (_, true) => Some(HoldLayout::Split),
                    _ => None,
                },
            })?
        }
        Command::Generate { what } => {
            let mut c = Cli::command();
            if what == "man" {
                clap_mangen::Man::new(c).render(&mut std::io::stdout())?;
            } else {
                let shell: clap_complete::Shell = what.parse().map_err(|_| {
                    zdt_ctl::error::bad_input(format!(
                        "unknown shell {what:?}: bash, zsh, fish, elvish, powershell, or man"
                    ))
                })?;
                clap_complete::generate(shell, &mut c, "zdt-ctl", &mut std::io::stdout());
            }
        }
        Command::Detach { addr } => {
            let groups = cmd::detach::detach(addr)?;
            println!("{addr}: detached ({groups} group(s) back to kernel hashing)");
        }
    }
    Ok(())
}
