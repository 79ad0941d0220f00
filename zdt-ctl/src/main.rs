//! The `zdt-ctl` command: parses the command line and hands it to its verb (`cmd::VERB::execute`,
//! which runs the library and prints the outcome).
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use zdt_ctl::{
    cmd::{attach, detach, drain, exec, hold, metrics, promote, rollback, status, upgrade, watch},
    error::{bad_input, kind_of, Kind},
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

/// Each verb's help is its `Args`' doc comment (cmd/VERB.rs).
#[derive(Subcommand)]
enum Command {
    Attach(attach::Args),
    Promote(promote::Args),
    Drain(drain::Args),
    Rollback(rollback::Args),
    Status(status::Args),
    Metrics(metrics::Args),
    Exec(exec::Args),
    Hold(hold::Args),
    Watch(watch::Args),
    /// Shell completions or the man page (used by `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        /// bash, zsh, fish, elvish, powershell, or man
        what: String,
    },
    Upgrade(upgrade::Args),
    Detach(detach::Args),
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
    let done = match cli.command {
        Command::Attach(a) => attach::execute(a),
        Command::Promote(a) => promote::execute(a),
        Command::Drain(a) => drain::execute(a),
        Command::Rollback(a) => rollback::execute(a),
        Command::Status(a) => status::execute(a),
        Command::Metrics(a) => metrics::execute(a),
        Command::Exec(a) => exec::execute(a),
        Command::Hold(a) => hold::execute(a),
        Command::Watch(a) => watch::execute(a),
        Command::Generate { what } => generate(&what),
        Command::Upgrade(a) => upgrade::execute(a),
        Command::Detach(a) => detach::execute(a),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zdt-ctl: {e:#}");
            ExitCode::from(kind_of(&e).exit_code() as u8)
        }
    }
}

/// The man page or a shell's completions, made from the command line's own definition.
fn generate(what: &str) -> anyhow::Result<()> {
    let mut c = Cli::command();
    // Rendered whole, then written: a failed write is an error, not a panic.
    let mut text = Vec::new();
    if what == "man" {
        clap_mangen::Man::new(c).render(&mut text)?;
        zdt_ctl::out!("{}", String::from_utf8_lossy(&text));
        return Ok(());
    }
    let shell: clap_complete::Shell = what.parse().map_err(|_| {
        bad_input(format!(
            "unknown shell {what:?}: bash, zsh, fish, elvish, powershell, or man"
        ))
    })?;
    clap_complete::generate(shell, &mut c, "zdt-ctl", &mut text);
    zdt_ctl::out!("{}", String::from_utf8_lossy(&text));
    Ok(())
}
