//! `zdt-ctl attach [ADDR]:PORT`: load and pin the program; take over listeners already there.
use crate::{
    addr::{PortSpec, Proto},
    error::{bad_input, require_root},
    sockets,
    state::State,
};

/// Put a port under zdt's control (idempotent). Listeners already on the port keep serving.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Every attach also removes the pinned state that network namespaces which no \
                  longer exist left behind (a container's, a test's).\n\n\
                  Examples:\n  zdt-ctl attach :80\n  zdt-ctl attach 127.0.0.1:8080\n  zdt-ctl attach [::]:80"
)]
pub struct Args {
    /// [ADDR]:PORT[/udp], e.g. :80, 127.0.0.1:8080, [::]:80, or :443/udp for a UDP port
    #[arg(value_parser = super::parse_spec)]
    pub addr: PortSpec,
    /// A UDP port's flow table: how many flows (remote address and port) it remembers, each
    /// sent to the socket that got its first datagram. When it is full the flows seen least
    /// recently go first (counted in status and metrics). About 100 bytes of kernel memory each.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    pub flows: Option<u32>,
    /// The app's user (a name or uid), when listeners of several users are on the port and
    /// none is a member yet: the others' are left alone, with a warning. Once there are
    /// members, it must be their user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

pub fn execute(args: Args) -> anyhow::Result<()> {
    let r = attach_as(args.addr, args.user.as_deref(), args.flows)?;
    let verb = if r.created {
        "attached"
    } else {
        "already attached"
    };
    crate::outln!("{}: {verb}", r.spec);
    for w in &r.warnings {
        eprintln!("zdt-ctl: warning: {w}");
    }
    if !r.adopted.is_empty() {
        crate::outln!(
            "active: pid {} (already listening)",
            super::pid_list(&r.adopted)
        );
    }
    if !r.swept.is_empty() {
        crate::outln!(
            "removed the pinned state of {} network namespace(s) that no longer exist",
            r.swept.len()
        );
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
pub struct AttachReport {
    pub spec: String,
    /// False when the port was already attached (attach is idempotent).
    pub created: bool,
    /// Pids whose sockets became the active set (only when the port had no active set).
    pub adopted: Vec<i32>,
    /// What the operator should know: listeners of the port that zdt does not manage.
    pub warnings: Vec<String>,
    /// Cookies of the network namespaces, gone, whose pinned state this attach removed.
    pub swept: Vec<u64>,
}

pub fn attach(spec: PortSpec) -> anyhow::Result<AttachReport> {
    attach_as(spec, None, None)
}

/// `attach`, with the app's user named (`--user`) and a UDP port's flow table's size
/// (`--flows`).
pub fn attach_as(
    spec: PortSpec,
    user: Option<&str>,
    flows: Option<u32>,
) -> anyhow::Result<AttachReport> {
    require_root()?;
    if let (Proto::Tcp, Some(n)) = (spec.proto, flows) {
        return Err(bad_input(format!(
            "--flows {n}: a TCP port has no flow table (the kernel keeps each connection on its \
             socket); pass --flows with a UDP port ({}/udp); nothing was changed",
            spec
        )));
    }
    let members = match State::open_read(spec.key())? {
        Some(s) if s.spec != spec => return Err(crate::state::attached_as(spec, s.spec)),
        Some(s) => s.member_uids()?,
        None => Vec::new(),
    };
    let user = user.map(crate::cmd::hold::uid_of).transpose()?;
    // One read of the port's listeners and one pure decision from it (a refusal changes
    // nothing); then the app's listeners duplicated and validated, still before anything is
    // created, so a listener without SO_REUSEPORT fails the attach cleanly.
    let read = sockets::PortRead::read(&spec)?;
    let plan = crate::plan::port::attach(&spec.to_string(), &read.seen, &members, user)?;
    let listeners = (plan.owned.mine.iter())
        .filter_map(|o| Some((o.pid, read.dup(o.listen.cookie)?)))
        .map(|(pid, f)| sockets::listener_from(pid.unwrap_or(0), f.fd, &f.entry))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut warnings = plan.warnings.clone();
    // Every attach removes what namespaces that are gone left pinned (a container, a test's
    // namespace): nothing else would, and each port's maps stay in kernel memory until reboot.
    let swept = crate::sweep::sweep_dead_namespaces().unwrap_or_else(|e| {
        warnings.push(format!(
            "could not look for the pinned state of namespaces that are gone: {e:#}"
        ));
        Vec::new()
    });
    let (mut state, created) = State::create(spec, flows.unwrap_or(zdt_common::DEFAULT_FLOWS))?;
    crate::failpoint(crate::Step::AttachLocked);
    // The app's listeners by the process attach adopts (none if the port has a live set
    // already), and the rest (no process serves them: systemd's, a placeholder).
    let mut rest = listeners;
    let mut adopt = Vec::new();
    if state.active_set()?.is_none() {
        for (p, cookies) in &plan.adopt {
            let (mine, others): (Vec<_>, Vec<_>) =
                (rest.into_iter()).partition(|l: &sockets::Listener| cookies.contains(&l.cookie));
            rest = others;
            if !mine.is_empty() {
                adopt.push((*p, mine));
            }
        }
    }
    let adopted: Vec<i32> = adopt.iter().map(|(p, _)| p.pid).collect();
    // The adopted sockets become the active lists, which hold at most MAX_ACTIVE per family:
    // refused before anything is attached or inserted, and a state made by this attach is
    // removed, so the port is exactly as it was.
    let families = adopt
        .iter()
        .flat_map(|(_, ls)| ls.iter().map(|l| l.family()));
    if let Err(e) = crate::plan::sets::admit(&adopted, spec.port, families) {
        if created {
            state.remove()?;
        }
        return Err(e);
    }
    // (Re)attach to every group present: harmless if already attached, and it repairs a group
    // that was re-created without the program.
    for l in adopt.iter().flat_map(|(_, ls)| ls).chain(&rest) {
        state.attach_to_group(&l.fd)?;
    }
    if !adopt.is_empty() {
        // The listeners already serving keep serving: they become the active set, so from now
        // on the program steers exactly where kernel hashing did before. Each process's
        // sockets in one insert: its slots are all chosen before any is written.
        let mut slots = Vec::new();
        for (p, mine) in &adopt {
            let role = crate::plan::sets::Role::Candidate;
            slots.extend(state.insert(p.pid, p.start, mine, role)?);
        }
        let plan = state.snapshot()?.adopt(&slots)?;
        state.apply(&plan)?;
    }
    tracing::info!(port = spec.port, created, ?adopted, "attached");
    Ok(AttachReport {
        spec: spec.to_string(),
        created,
        adopted,
        warnings,
        swept,
    })
}
