//! Membership follows the kernel: a member that re-creates its listener in process, and a
//! process that inherits a member's socket, are what they serve as, not what the slots recorded
//! when the sockets were put in.
use std::{collections::BTreeSet, os::fd::AsRawFd, time::Duration};

use nix::sys::signal::Signal;
use zdt_ctl::cmd::status::Drift;
use zdt_tests::{
    harness::{
        promote_args, relistening_member_beside_a_warming_version, replace, report, roles, strs,
        zdt_ok, App, AppOpts, Role,
    },
    load::{self, scaled},
    netns::Netns,
};

const PORT: u16 = 8080;

/// (pid, role) of every member in `status --json`.
fn members(ns: &Netns) -> anyhow::Result<BTreeSet<(i32, Role)>> {
    roles(ns, PORT)
}

/// `attach` again (a command that takes the port's lock) puts right what `status` reported in
/// the drift list that `list` reads, saying `says`; `app` (`version`) is then the one active
/// member, and takes every request.
fn put_right(
    ns: &Netns,
    says: &str,
    list: fn(&Drift) -> usize,
    app: &App,
    version: &str,
) -> anyhow::Result<()> {
    let r = zdt_ok(ns, &["attach", ":8080"])?;
    assert!(r.stderr.contains(says), "{r:?}");
    assert_eq!(members(ns)?, BTreeSet::from([(app.pid, Role::Active)]));
    assert_eq!(list(&report(ns, PORT)?.drift), 0);
    let t = load::requests(ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get(version), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn a_member_that_recreates_its_listener_is_adopted_and_keeps_its_role() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // v2 warms up beside v1: it must take nothing before it is promoted.
    let (mut v1, _v2) = relistening_member_beside_a_warming_version(&ns, PORT)?;
    assert_eq!(members(&ns)?, BTreeSet::from([(v1.pid, Role::Active)]));

    // v1 opens a new listener and closes the one zdt steers to (a Go server restarted in
    // process, nginx reloading changed `listen` lines).
    v1.relisten()?;
    // status sees it at once.
    let unadopted = report(&ns, PORT)?.drift.unadopted;
    assert_eq!(unadopted.len(), 1, "{unadopted:?}");
    assert_eq!(unadopted[0].pid, v1.pid, "{unadopted:?}");
    assert_eq!(unadopted[0].role, Role::Active, "{unadopted:?}");

    // The next command that takes the port's lock adopts it, in v1's role.
    put_right(
        &ns,
        "re-created its listener",
        |d| d.unadopted.len(),
        &v1,
        "v1",
    )?;

    // And a deploy's --stop-old stops it.
    let v3 = App::start(&ns, &AppOpts::new(PORT, "v3"))?;
    replace(&ns, &v3, &mut v1)?;
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v3"), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn a_process_that_inherits_a_members_socket_becomes_the_member() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    // The socket a supervisor (this test, as systemd's socket unit would) hands to v1 and
    // later to v1b, which takes over from v1 as nginx's new master does after USR2.
    let socket = ns.run(|| -> std::io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_port(true)?;
        s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], PORT)).into())?;
        s.listen(4096)?;
        Ok(s.into())
    })??;
    let mut v1 = App::start(&ns, &AppOpts::new(PORT, "v1").inherit(socket.as_raw_fd()))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    assert_eq!(members(&ns)?, BTreeSet::from([(v1.pid, Role::Active)]));
    let mut v1b = App::start(&ns, &AppOpts::new(PORT, "v1b").inherit(socket.as_raw_fd()))?;
    v1b.wait_ready()?;
    drop(socket);
    v1.signal(Signal::SIGKILL);
    assert!(v1.wait_exit(scaled(Duration::from_secs(10))));

    // status names the heir at once.
    let inherited = report(&ns, PORT)?.drift.inherited;
    assert_eq!(inherited.len(), 1, "{inherited:?}");
    assert_eq!(inherited[0].recorded_pid, v1.pid, "{inherited:?}");
    assert_eq!(inherited[0].pid, v1b.pid, "{inherited:?}");

    // The next command that takes the lock records it; a deploy then stops it.
    put_right(&ns, "inherited", |d| d.inherited.len(), &v1b, "v1b")?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    replace(&ns, &v2, &mut v1b)?;
    Ok(())
}

/// While nothing of the live set listens (the active member re-created its listener and no
/// command has adopted it yet; then it crashed), new connections go to the version before it,
/// which still runs, and never to a version still warming up beside them.
#[test]
fn with_the_live_set_gone_the_previous_version_serves_not_a_warming_one() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let mut v2 = App::start(&ns, &AppOpts::new(PORT, "v2").arg("--relisten-on-hup"))?;
    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    let _v3 = App::start(
        &ns,
        &AppOpts::new(PORT, "v3").warmup(Duration::from_secs(3600)),
    )?;
    let t = load::requests(&ns, PORT, 60, 1000.0);
    assert_eq!(t.versions.get("v2"), Some(&60), "{t:?}");

    // v2's listener in the live set closes; its new one is in no slot yet.
    v2.relisten()?;
    let t = load::requests(&ns, PORT, 60, 1000.0);
    assert_eq!(
        t.versions.get("v1"),
        Some(&60),
        "after v2 re-listened: {t:?}"
    );

    // v2 dies: v1 (the rollback target) still takes every new connection.
    v2.signal(Signal::SIGKILL);
    assert!(v2.wait_exit(scaled(Duration::from_secs(10))));
    let t = load::requests(&ns, PORT, 60, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&60), "after v2 died: {t:?}");
    // status says so, and where new connections go.
    let st = zdt_ok(&ns, &["status", ":8080"])?;
    assert!(
        st.stdout.contains("no active or canary member listens"),
        "{}",
        st.stdout
    );
    assert!(zdt_tests::harness::running(v1.pid));
    Ok(())
}
