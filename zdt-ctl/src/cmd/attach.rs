//! `zdt-ctl attach [ADDR]:PORT`: load and pin the program; take over listeners already there.
use crate::{
    addr::{PortSpec, Proto},
    error::{bad_input, require_root},
    sockets::{self, Listener},
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
    /// none is a member yet: the others' are left alone, with a warning.
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

/// Existing listeners of `spec` owned by the app's user, validated, each with the process that
/// serves it (None: only systemd or zdt-ctl hold it), and the other users' listeners, described.
/// Validation runs before anything is created, so a listener without SO_REUSEPORT fails the
/// attach cleanly; another user's listener is not validated, only left out.
type Existing = (Vec<(Option<i32>, Listener)>, Vec<String>, Option<u32>);

fn existing_listeners(spec: &PortSpec, user: Option<&str>) -> anyhow::Result<Existing> {
    let found = sockets::matching_listeners(spec)?;
    let members = match State::open_read(spec.key())? {
        Some(s) => s.member_uids()?,
        None => Vec::new(),
    };
    let uids: Vec<u32> = found.iter().map(|f| f.entry.uid).collect();
    let owner = match user {
        Some(u) => Some(crate::cmd::hold::uid_of(u)?),
        None => crate::plan::owner(&members, &uids).map_err(|many| {
            bad_input(format!(
                "{spec} has listeners of several users (uids {many:?}) and no member yet says \
                 which is the app's: pass --user with the app's user; nothing was changed"
            ))
        })?,
    };
    let (mine, foreign) = sockets::by_owner(found, owner);
    let mine = mine
        .into_iter()
        .map(|f| {
            let pid = f.member.unwrap_or(0);
            Ok((f.member, sockets::listener_from(pid, f.fd, &f.entry)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((mine, foreign, owner))
}

/// The port's listeners that `spec` does not name (bound to a specific address while `spec` is
/// the wildcard, or the other way round), as "ADDR (pid N)".
fn others_on_port(spec: &PortSpec) -> anyhow::Result<Vec<String>> {
    let table = sockets::listen_entries(spec.proto)?;
    let others: std::collections::BTreeSet<u64> = table
        .values()
        .filter(|e| e.local.port() == spec.port && !spec.matches(&e.local))
        .map(|e| e.inode)
        .collect();
    let h = sockets::holders(&others);
    Ok(others
        .iter()
        .filter_map(|i| table.get(i))
        .map(|e| {
            let pids = h.pids(e.inode);
            match crate::plan::member(&pids, &h.procs).or(pids.first().copied()) {
                Some(p) => format!("{} (pid {p})", e.local),
                None => e.local.to_string(),
            }
        })
        .collect())
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
    if let Some(attached) = State::open_read(spec.key())?.map(|s| s.spec) {
        if attached != spec {
            return Err(crate::state::attached_as(spec, attached));
        }
    }
    let (listeners, foreign, owner) = existing_listeners(&spec, user)?;
    let others = others_on_port(&spec)?;
    // Kernel contract: a listener bound to a specific address wins its address's connections
    // over a wildcard one, and is in a group of its own. Attaching a spec that names none of the
    // port's listeners would steer nothing at all.
    if listeners.is_empty() && !others.is_empty() {
        let first = others[0].split(" (").next().unwrap_or_default();
        return Err(bad_input(format!(
            "no listener on {spec}: port {} is served by {} only, which {spec} does not name. \
             Attach what the service listens on: `zdt-ctl attach {first}` (or make the service \
             listen on {spec}); nothing was changed",
            spec.port,
            others.join(", "),
        )));
    }
    let mut warnings = Vec::new();
    if let (false, Some(owner)) = (foreign.is_empty(), owner) {
        warnings.push(sockets::foreign_warning(&foreign, owner));
    }
    if !others.is_empty() {
        warnings.push(format!(
            "{} also listen(s) on port {}, outside {spec}: connections to that address go there \
             without zdt's steering",
            others.join(", "),
            spec.port
        ));
    }
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
    // (Re)attach to every group present: harmless if already attached, and it repairs a group
    // that was re-created without the program.
    for (_, l) in &listeners {
        state.attach_to_group(&l.fd)?;
    }
    let mut adopted = Vec::new();
    if state.active_set()?.is_none() && listeners.iter().any(|(m, _)| m.is_some()) {
        // The listeners already serving keep serving: they become the active set, so from now
        // on the program steers exactly where kernel hashing did before. Sockets that no process
        // serves (systemd's before the service started, a placeholder) are not members.
        let mut slots = Vec::new();
        for (pid, l) in &listeners {
            let Some(pid) = *pid else { continue };
            let start = sockets::start_time(pid).unwrap_or(0);
            slots.extend(state.insert(
                pid,
                start,
                std::slice::from_ref(l),
                crate::plan::sets::Role::Candidate,
            )?);
            if !adopted.contains(&pid) {
                adopted.push(pid);
            }
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
