//! `zdt-ctl watch [ADDR]:PORT`: promote what a deploy tool starts, with no deploy script.
//!
//! Tools that only start and stop processes (`systemctl restart`, a supervisor, a container
//! runtime) never call `promote`. The watcher looks at the port's listeners every
//! [`POLL`]; when they change it takes the port's lock, which puts membership right as every
//! locked command does (a re-created or inherited listener is adopted, a member that exited
//! leaves), and promotes each new process that serves a listener of the port, once it is ready,
//! as `zdt-ctl promote` does (the same code, the same lock, the same checks: another uid, hold
//! or zdt-ctl itself is refused there). It keeps no state of its own: killed and restarted, it
//! finds the port as the pinned maps say.
use std::{collections::BTreeSet, time::Duration};

use crate::{
    addr::PortSpec,
    cmd::promote::{promote, PromoteOptions, Rollout},
    error::{bad_input, require_root},
    plan::sets::Process,
    sockets,
    state::State,
};

/// How often the watcher looks at the port's listeners (one sock_diag dump).
const POLL: Duration = Duration::from_millis(100);

/// Promote each new process that listens on the port once it is ready (runs until stopped).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example, a unit restarted by systemd (a new instance started beside the old \
                  one, or behind `zdt-ctl hold`), served without a deploy script:\n  \
                  zdt-ctl watch :8080 --probe /readyz --stop-old"
)]
pub struct Args {
    /// The attached address of the port, [ADDR]:PORT.
    #[arg(value_parser = super::parse_spec)]
    pub addr: PortSpec,
    /// Check each new process's readiness at PATH through the public port (as `promote
    /// --probe`): zdt's marked connections reach that process and no one else.
    #[arg(long, value_name = "PATH", required_unless_present = "no_readyz", value_parser = super::parse_probe_path)]
    pub probe: Option<String>,
    /// Take a new process as ready as soon as it listens.
    #[arg(long, conflicts_with = "probe")]
    pub no_readyz: bool,
    /// How long a new process may take to be ready; one that is not is left a candidate
    /// (it takes no connection) and not tried again.
    #[arg(long, default_value = "60s", value_parser = super::parse_duration_arg)]
    pub timeout: Duration,
    /// As `promote`'s.
    #[command(flatten)]
    pub rollout: Rollout,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    require_root()?;
    let spec = args.addr;
    let state =
        State::open_read(spec.port)?.ok_or_else(|| crate::state::not_attached(spec.port))?;
    if state.spec != spec {
        return Err(bad_input(format!(
            "port {} is attached as {}, not {spec}: run `zdt-ctl watch {}`",
            spec.port, state.spec, state.spec
        )));
    }
    drop(state);
    let opts = |pid| PromoteOptions {
        pid,
        ports: vec![spec.port],
        readyz: None,
        probe: args.probe.clone(),
        weight: args.rollout.weight,
        timeout: args.timeout,
        probation: args.rollout.probation,
        stop_old: args.rollout.stop_old,
        drain_timeout: args.rollout.drain_timeout,
    };
    eprintln!("zdt-ctl watch: watching {spec}");
    // Processes already decided on (promoted, refused or never ready): not tried again.
    let mut tried: BTreeSet<Process> = BTreeSet::new();
    let mut last: Option<BTreeSet<u64>> = None;
    loop {
        let now = listener_cookies(&spec)?;
        if last.as_ref() != Some(&now) {
            for p in newcomers(spec.port)? {
                if !tried.insert(p) {
                    continue;
                }
                eprintln!(
                    "zdt-ctl watch: pid {} listens on {spec}: promoting it",
                    p.pid
                );
                match promote(&opts(p.pid), |_| {}) {
                    Ok(_) => eprintln!("zdt-ctl watch: pid {} active on {spec}", p.pid),
                    Err(e) => eprintln!("zdt-ctl watch: pid {} not promoted: {e:#}", p.pid),
                }
            }
            // What the promotes and stops changed is looked at on the next round.
            last = Some(listener_cookies(&spec)?);
        }
        std::thread::sleep(POLL);
    }
}

/// The cookies of the listeners `spec` names: they change when a process listens, re-creates
/// its listener, or exits.
fn listener_cookies(spec: &PortSpec) -> anyhow::Result<BTreeSet<u64>> {
    let table = sockets::listen_entries()?;
    Ok(table
        .values()
        .filter(|e| spec.matches(&e.local))
        .map(|e| e.cookie)
        .collect())
}

/// Takes the port's lock (which re-adopts and re-homes members' listeners) and returns the
/// processes with no role that serve a listener in no slot.
fn newcomers(port: u16) -> anyhow::Result<Vec<Process>> {
    let state = State::open_locked(port)?;
    let slots = state.slots()?;
    Ok(state.drift(&slots)?.newcomers)
}
