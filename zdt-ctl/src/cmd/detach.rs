//! `zdt-ctl detach [ADDR]:PORT`: take the program off the port's groups and remove the state.
use std::{collections::BTreeSet, os::fd::AsRawFd};

use anyhow::Context as _;

use aya::programs::SkReuseport;

use crate::{
    addr::PortSpec,
    error::{bad_input, require_root},
    sockets,
    state::State,
};

/// Remove the program from the port's groups and delete zdt's state for it.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(value_parser = super::parse_spec)]
    pub addr: PortSpec,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let groups = detach(args.addr)?;
    crate::outln!(
        "{}: detached ({groups} group(s) back to kernel hashing)",
        args.addr
    );
    Ok(())
}

pub fn detach(spec: PortSpec) -> anyhow::Result<usize> {
    require_root()?;
    let mut state = State::open_locked(spec.key())?;
    crate::failpoint(crate::Step::DetachLocked);
    if state.spec != spec {
        return Err(bad_input(format!(
            "port {} is attached as {}, not {spec}; run `zdt-ctl detach {}`",
            spec.port, state.spec, state.spec
        )));
    }
    let found = sockets::matching_listeners(&spec)?;
    // The placeholders of `zdt-ctl hold` go first, while the program still steers
    // (Snapshot::detach): no new connection parks on them any more, then shutdown(SHUT_RD)
    // stops them for every holder at once and migrates what waits in their queues through the
    // program to the active members. The hold process sees the state gone and exits.
    let plan = state.snapshot()?.detach();
    let held = plan.placeholders;
    if let Some(switch) = &plan.plan {
        state.apply(switch)?;
    }
    if !held.is_empty() {
        for f in found.iter().filter(|f| held.contains(&f.entry.cookie)) {
            nix::sys::socket::shutdown(f.fd.as_raw_fd(), nix::sys::socket::Shutdown::Read)
                .context("shutting a placeholder of zdt-ctl hold down")?;
        }
        crate::failpoint(crate::Step::PlaceholdersShut);
    }
    // One member of each group is enough: the program belongs to the group. Detach first, then
    // remove the pins: if this is interrupted, the state still says "attached" and a second
    // detach finishes the job.
    let mut families_done = BTreeSet::new();
    for found in found.iter().filter(|f| !held.contains(&f.entry.cookie)) {
        if families_done.insert(found.entry.group_kind()) {
            // ENOENT means the group has no program (re-created since): nothing to detach.
            let _ = SkReuseport::detach(&found.fd);
        }
    }
    state.remove()?;
    tracing::info!(port = spec.port, groups = families_done.len(), "detached");
    Ok(families_done.len())
}
