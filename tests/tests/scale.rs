//! Many sockets per port: nginx with `reuseport` gives each worker a socket of its own per
//! address, so a 512-worker box has 512 listeners per family, and a deploy has two versions of
//! them at once.
use std::{collections::BTreeMap, time::Duration};

use zdt_tests::harness::{report, Kind, Role, Status};
use zdt_tests::{
    harness::{promote_args, replace, strs, zdt_ok, App, AppOpts},
    load::{self, Background, LoadSpec},
    netns::Netns,
};

const PORT: u16 = 8080;
/// The load on each family during the handover, in requests/s.
const RATE: f64 = 200.0;

/// Members of the port by pid: (role, number of slots).
fn members(st: &Status) -> BTreeMap<i32, (Role, usize)> {
    st.members
        .iter()
        .map(|m| (m.pid, (m.role, m.slots.len())))
        .collect()
}

#[test]
fn two_versions_of_a_512_worker_app_hand_over_on_both_families() -> anyhow::Result<()> {
    const SOCKETS: &str = "512";
    let ns = Netns::new()?;
    let app = |v: &str| {
        AppOpts::new(PORT, v)
            .arg("--split")
            .arg("--sockets")
            .arg(SOCKETS)
    };
    let mut v1 = App::start(&ns, &app("v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let loads: Vec<Background> = [
        std::net::SocketAddr::from(([127, 0, 0, 1], PORT)),
        (std::net::Ipv6Addr::LOCALHOST, PORT).into(),
    ]
    .into_iter()
    .map(|a| Background::start(&ns, LoadSpec::open(a, RATE, Duration::from_secs(60))))
    .collect();
    let v2 = App::start(&ns, &app("v2").warmup(Duration::from_millis(300)))?;
    // Both versions at once in the active set: v1's 1024 sockets active, v2's 1024 as a canary.
    zdt_ok(&ns, &strs(&promote_args(&v2, &["--weight", "50"])))?;
    let st = report(&ns, PORT)?;
    let by_pid = members(&st);
    assert_eq!(
        by_pid.get(&v1.pid),
        Some(&(Role::Active, 1024)),
        "{by_pid:?}"
    );
    assert_eq!(
        by_pid.get(&v2.pid),
        Some(&(Role::Canary, 1024)),
        "{by_pid:?}"
    );
    // Both versions serve before the rollout completes.
    for l in &loads {
        l.see(load::BEFORE_CHANGE);
    }
    // The rollout completes; v1 is stopped and its queues move to v2.
    replace(&ns, &v2, &mut v1)?;
    let st = report(&ns, PORT)?;
    assert_eq!(
        members(&st),
        BTreeMap::from([(v2.pid, (Role::Active, 1024))]),
        "{st:?}"
    );
    for l in loads {
        let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
        assert!(
            t.requests > load::requests_at(RATE, Duration::from_secs(1)),
            "{t:?}"
        );
        assert_eq!(t.failures(), 0, "{t:?}");
        assert_eq!(t.versions.len(), 2, "{t:?}");
    }
    Ok(())
}

/// New connections steered to each slot of the port (the program's per-slot counters).
fn steered_per_slot(ns: &Netns) -> anyhow::Result<BTreeMap<u32, u64>> {
    ns.run(|| -> anyhow::Result<BTreeMap<u32, u64>> {
        let state = zdt_ctl::state::State::open_read(PORT.into())?.expect("attached");
        Ok(state
            .slots()?
            .iter()
            .map(|s| (s.index, s.steered))
            .collect())
    })?
}

#[test]
fn a_small_canary_share_reaches_every_canary_socket() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1").arg("--sockets").arg("4"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2").arg("--sockets").arg("4"))?;
    zdt_ok(&ns, &strs(&promote_args(&v2, &["--weight", "2"])))?;
    let t = load::requests(&ns, PORT, 3000, 2000.0);
    assert_eq!(t.failures(), 0, "{t:?}");
    let canary = t.versions.get("v2").copied().unwrap_or(0);
    // About 60 canary connections. With the share and the slot decided on the same bits of the
    // flow hash (hash % 100 < 2, then hash % 4, which is hash % 100 % 4), they all went to the
    // canary's first two sockets.
    assert!(canary > 20, "{t:?}");
    let st = report(&ns, PORT)?;
    let v2_slots = st
        .member(v2.pid)
        .map(|m| m.slots.clone())
        .unwrap_or_default();
    assert_eq!(v2_slots.len(), 4, "{st:?}");
    let per_slot = steered_per_slot(&ns)?;
    for slot in &v2_slots {
        // Each gets a quarter, about 15; none is left out (P(0 of 60) = 0.75^60, 3e-8).
        assert!(
            per_slot.get(slot).copied().unwrap_or(0) > 0,
            "canary slot {slot} got nothing: {per_slot:?}"
        );
    }
    Ok(())
}

/// An app with `n` split sockets per family.
fn split_app(v: &str, n: usize) -> AppOpts {
    AppOpts::new(PORT, v)
        .arg("--split")
        .arg("--sockets")
        .arg(&n.to_string())
}

#[test]
fn deploys_of_an_app_with_700_sockets_per_family_never_run_out_of_slots() -> anyhow::Result<()> {
    // 1400 slots per version: the live set and a rollback target whose sockets are gone
    // (--stop-old stopped them) must not keep 4096 slots from holding the next version. They
    // did: the third deploy failed, exit 1, "drain old members", which could not help.
    const N: usize = 700;
    let ns = Netns::new()?;
    let mut old = App::start(&ns, &split_app("v1", N))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    for v in ["v2", "v3", "v4"] {
        let new = App::start(&ns, &split_app(v, N))?;
        replace(&ns, &new, &mut old)?;
        let st = report(&ns, PORT)?;
        assert_eq!(
            members(&st),
            BTreeMap::from([(new.pid, (Role::Active, 2 * N))]),
            "{v}: {st:?}"
        );
        old = new;
    }
    let t = load::requests(&ns, PORT, 100, 1000.0);
    assert_eq!(t.versions.get("v4"), Some(&100), "{t:?}");
    Ok(())
}

#[test]
fn more_sockets_of_a_family_than_zdt_steers_are_refused_before_any_change() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &split_app("v1", 1))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &split_app("v2", 1025))?;
    let before = zdt_tests::harness::fingerprint(&ns, PORT)?;
    let r = zdt_tests::harness::zdt(&ns, &strs(&promote_args(&v2, &[])));
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("1025 IPv4 sockets"), "{r:?}");
    assert_eq!(
        zdt_tests::harness::fingerprint(&ns, PORT)?,
        before,
        "state changed"
    );
    Ok(())
}

/// attach of an app already serving with more sockets of a family than the active lists hold
/// is refused before any change: no state is left, and the app keeps serving as before.
#[test]
fn attach_of_an_app_with_more_sockets_than_zdt_steers_changes_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &split_app("v1", 1025))?;
    let r = zdt_tests::harness::zdt(&ns, &["attach", ":8080"]);
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("1025 IPv4 sockets"), "{r:?}");
    assert_eq!(
        zdt_tests::harness::fingerprint(&ns, PORT)?,
        None,
        "the refused attach left state"
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], PORT).into();
    let (code, body) =
        ns.run(move || zdt_tests::harness::http_get(addr, "/", Duration::from_secs(5)))??;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&v1.pid.to_string()), "{body}");
    Ok(())
}
