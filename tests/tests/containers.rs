//! Containers under zdt, with Debian's podman and an image imported from a Debian root: the app
//! in a container with host networking (the test's namespace is the host's network here), and
//! in a pod whose network namespace its containers share. A new container starts beside the old
//! one and is promoted, by `zdt-ctl promote` with the container's pid or by the watcher; the old
//! one is stopped with `podman stop`; under load, not one request fails, where the same steps
//! without zdt (the control of the host-network test) lose the requests the warming container
//! answers. A compose project (podman-compose, `network_mode: host`) is deployed the same way
//! with compose's own commands.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use zdt_tests::{
    harness::{
        active_pids, assert_invariants, print_tally, until_active, wait_for_200, zdt_command,
        zdt_ok, KillOnDrop,
    },
    load::{self, scaled, Background, LoadSpec},
    netns::Netns,
    podman::{self, Compose, Container, Network, Pod},
};

const PORT: u16 = 8080;
const RATE: f64 = 300.0;
/// The new version's warm-up: it must not be served before.
const WARMUP: Duration = Duration::from_secs(1);

/// The demo service's arguments for `version` with its admin port.
/// The demo service's arguments besides its ports: its version and warm-up.
fn version(version: &str, warmup: Duration) -> Vec<String> {
    let warmup = format!("{}ms", warmup.as_millis());
    ["--version", version, "--warmup", &warmup]
        .map(String::from)
        .to_vec()
}

fn app(v: &str, admin: u16, warmup: Duration) -> Vec<String> {
    let ports = [
        "--port",
        &PORT.to_string(),
        "--admin-port",
        &admin.to_string(),
    ];
    ports
        .map(String::from)
        .into_iter()
        .chain(version(v, warmup))
        .collect()
}

fn start(
    net: Network<'_>,
    version: &str,
    admin: u16,
    warmup: Duration,
) -> anyhow::Result<Container> {
    let args = app(version, admin, warmup);
    Container::run(net, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn admin(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// Waits until the service on `port` of `ns` answers 200 on /readyz.
fn ready(ns: &Netns, port: u16) -> anyhow::Result<()> {
    wait_for_200(
        ns,
        admin(port),
        "/readyz",
        scaled(Duration::from_secs(20)),
        || true,
    )
    .map_err(|last| anyhow::anyhow!("no 200 on {}: {last}", admin(port)))
}

fn active(ns: &Netns) -> anyhow::Result<Vec<i64>> {
    active_pids(ns, PORT)
}

/// `zdt-ctl watch :8080` in `ns`, each version's readiness on its own admin port (found per
/// container); stopped when dropped.
fn watcher(ns: &Netns) -> anyhow::Result<KillOnDrop> {
    let timeout = format!("{}ms", scaled(Duration::from_secs(20)).as_millis());
    let args = [
        "watch",
        ":8080",
        "--readyz-path",
        "/readyz",
        "--timeout",
        &timeout,
    ];
    Ok(KillOnDrop(zdt_command(ns, &args).spawn()?))
}

/// Waits until the watcher has made `pid` the one active member, and checks that this was not
/// before its warm-up (started at `started`) was over.
fn promoted_after_warmup(ns: &Netns, pid: i32, started: Instant) -> anyhow::Result<()> {
    until_active(ns, PORT, pid, scaled(Duration::from_secs(20)))?;
    anyhow::ensure!(
        started.elapsed() >= scaled(WARMUP),
        "promoted after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The host-network handover under load: v2 started beside v1 (warming up for [`WARMUP`]),
/// promoted by `zdt-ctl promote` with the container's pid, v1 stopped with `podman stop`. The
/// control (`with_zdt` false) does the same without zdt: v2 shares the port by plain
/// SO_REUSEPORT from its start, and v1 is stopped once v2 answers 200.
fn host_network(with_zdt: bool) -> anyhow::Result<load::Tally> {
    let ns = Netns::new()?;
    let v1 = start(Network::Host(&ns), "v1", 9001, Duration::ZERO)?;
    ready(&ns, 9001)?;
    if with_zdt {
        zdt_ok(&ns, &["attach", ":8080"])?;
    }
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    l.see(load::BEFORE_CHANGE);
    let v2 = start(Network::Host(&ns), "v2", 9002, scaled(WARMUP))?;
    if with_zdt {
        // The container's pid as the host sees it: the service itself (the container's pid 1).
        let pid = v2.pid.to_string();
        let timeout = format!("{}ms", scaled(Duration::from_secs(20)).as_millis());
        let url = "http://127.0.0.1:9002/readyz";
        zdt_ok(
            &ns,
            &["promote", &pid, "--readyz", url, "--timeout", &timeout],
        )?;
        assert_eq!(active(&ns)?, [i64::from(v2.pid)]);
    } else {
        ready(&ns, 9002)?;
    }
    v1.stop(Duration::from_secs(10))?;
    assert_eq!(v1.exit_code()?, 0);
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    if with_zdt {
        assert_invariants(&ns, PORT)?;
    }
    Ok(t)
}

/// The control first, then zdt: the same containers, the same load, the same `podman stop`.
#[test]
fn a_container_on_the_host_network_is_promoted_and_the_old_one_podman_stopped() -> anyhow::Result<()>
{
    podman::image()?;
    let plain = host_network(false)?;
    print_tally("== host network, no zdt (control), podman stop:", &plain);
    let t = host_network(true)?;
    print_tally("== host network, promote, podman stop:", &t);
    // Without zdt the warming v2 takes its share of new connections from its start.
    assert!(plain.failures() > 0, "the control lost nothing: {plain:?}");
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.versions.get("v1").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(t.versions.get("v2").copied().unwrap_or(0) > 0, "{t:?}");
    Ok(())
}

#[test]
fn containers_in_a_pod_are_promoted_by_the_watcher() -> anyhow::Result<()> {
    podman::image()?;
    let pod = Pod::create()?;
    let ns = &pod.ns;
    let v1 = start(Network::Pod(&pod), "v1", 9001, Duration::ZERO)?;
    ready(ns, 9001)?;
    zdt_ok(ns, &["attach", ":8080"])?;
    let _watcher = watcher(ns)?;
    let l = Background::start(
        ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    l.see(load::BEFORE_CHANGE);
    let started = Instant::now();
    let v2 = start(Network::Pod(&pod), "v2", 9002, scaled(WARMUP))?;
    promoted_after_warmup(ns, v2.pid, started)?;
    v1.stop(Duration::from_secs(10))?;
    assert_eq!(v1.exit_code()?, 0);
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    print_tally("== pod, watcher, podman stop:", &t);
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.versions.get("v2").copied().unwrap_or(0) > 0, "{t:?}");
    assert_invariants(ns, PORT)?;
    Ok(())
}

/// The compose project of examples/compose.yaml (podman-compose 1.3.0, Debian 13's, from
/// PyPI): two services on the host network, blue and green, deployed as compose users do: `up -d green` beside blue, then
/// `stop blue`. With zdt the watcher promotes green once its /readyz answers 200, never before
/// its warm-up ends, and blue is stopped after that; the control (`with_zdt` false) stops blue
/// once green answers 200, with plain SO_REUSEPORT meanwhile.
fn compose_deploy(with_zdt: bool) -> anyhow::Result<load::Tally> {
    let ns = Netns::new()?;
    // examples/compose.yaml gives the ports (8080, admin 9001 and 9002) and the host network.
    let compose = Compose::example(&[
        ("blue", version("blue", Duration::ZERO)),
        ("green", version("green", scaled(WARMUP))),
    ])?;
    compose.run(Some(&ns), &["up", "-d", "blue"])?;
    ready(&ns, 9001)?;
    let _watcher = if with_zdt {
        zdt_ok(&ns, &["attach", ":8080"])?;
        Some(watcher(&ns)?)
    } else {
        None
    };
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    l.see(load::BEFORE_CHANGE);
    let started = Instant::now();
    compose.run(Some(&ns), &["up", "-d", "green"])?;
    if with_zdt {
        promoted_after_warmup(&ns, compose.pid("green")?, started)?;
    } else {
        ready(&ns, 9002)?;
    }
    compose.run(Some(&ns), &["stop", "blue"])?;
    assert_eq!(compose.exit_code("blue")?, 0);
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    if with_zdt {
        assert_invariants(&ns, PORT)?;
    }
    Ok(t)
}

/// The control first, then zdt: the same compose project, the same load, the same commands.
#[test]
fn a_compose_projects_blue_green_deploy_is_promoted_by_the_watcher() -> anyhow::Result<()> {
    podman::image()?;
    let plain = compose_deploy(false)?;
    print_tally(
        "== compose, host network, no zdt (control), compose stop:",
        &plain,
    );
    let t = compose_deploy(true)?;
    print_tally("== compose, host network, watcher, compose stop:", &t);
    // Without zdt the warming green takes its share of new connections from its start.
    assert!(plain.failures() > 0, "the control lost nothing: {plain:?}");
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(t.versions.get("blue").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(t.versions.get("green").copied().unwrap_or(0) > 0, "{t:?}");
    Ok(())
}
