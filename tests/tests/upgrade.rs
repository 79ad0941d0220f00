//! The program's identity and `zdt-ctl upgrade`: the tag zdt-ctl computes without loading its
//! program is the one the kernel gives it, and a state made by another build of the program is
//! refused by every command but `upgrade`, which replaces the program without losing a
//! connection, a role or a counter.

/// The tag zdt-ctl computes from its object (no verifier) equals the tag the kernel computes
/// when the program is really loaded. If aya's relocation or the kernel's hashing rule changed,
/// every command would refuse every state: this is the test that says so first.
#[test]
fn tag_is_the_kernels() -> anyhow::Result<()> {
    for proto in [zdt_ctl::addr::Proto::Tcp, zdt_ctl::addr::Proto::Udp] {
        let mut ebpf = zdt_ctl::program::load_fresh(1)?;
        let program = zdt_ctl::program::load_program(&mut ebpf, proto)?;
        let kernel = program.info()?.tag();
        let ours = zdt_ctl::program::expected_tags(proto)?;
        eprintln!(
            "{proto:?}: kernel {kernel:016x} sha1 {:016x} sha256 {:016x}",
            ours[0], ours[1]
        );
        assert!(
            ours.contains(&kernel),
            "{proto:?}: kernel tag {kernel:016x}, computed {:016x} (SHA-1) / {:016x} (SHA-256)",
            ours[0],
            ours[1]
        );
    }
    Ok(())
}

use std::time::Duration;
use zdt_ctl::Step;

use zdt_tests::harness::{report, Kind, Role};
use zdt_tests::{
    harness::{at_failpoint, promote_args, strs, zdt, zdt_ok, App, AppOpts},
    load::{self, Background, LoadSpec},
    netns::Netns,
    programs,
};

const PORT: u16 = 8080;

/// (role, steered) of `pid` in the port's status.
fn role_and_steered(ns: &Netns, pid: i32) -> anyhow::Result<(Role, u64)> {
    let st = report(ns, PORT)?;
    let m = st
        .member(pid)
        .ok_or_else(|| anyhow::anyhow!("pid {pid} is not a member: {st:?}"))?;
    Ok((m.role, m.steered))
}

/// The program pinned for the port.
fn pinned(ns: &Netns) -> anyhow::Result<aya::programs::ProgramInfo> {
    ns.run(|| -> anyhow::Result<_> {
        let path = zdt_ctl::state::port_dir(PORT.into())?.join(zdt_common::names::PROGRAM);
        Ok(aya::programs::ProgramInfo::from_pin(path)?)
    })?
}

/// The kernel's run count of program `id` (BPF run-time stats must be on).
fn runs(id: u32) -> anyhow::Result<u64> {
    for p in aya::programs::loaded_programs() {
        let p = p?;
        if p.id() == id {
            return Ok(p.run_count());
        }
    }
    anyhow::bail!("no program {id}")
}

/// A state whose program another zdt build loaded is refused by every command but `upgrade`;
/// `upgrade`, killed once after attaching and run again, swaps this build's program in under
/// load: the kernel runs the new program from then on, the members keep their roles and
/// counters, and not one request fails, before, during or after (a deploy follows).
#[test]
fn upgrade_swaps_the_program_under_load_keeping_roles_and_counters() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    const RATE: f64 = 300.0;
    let l = Background::start(
        &ns,
        LoadSpec::open(([127, 0, 0, 1], PORT).into(), RATE, Duration::from_secs(60)),
    );
    std::thread::sleep(load::scaled(Duration::from_millis(800)));
    let (role, steered_before) = role_and_steered(&ns, v1.pid)?;
    assert_eq!(role, Role::Active);
    assert!(steered_before > 100, "{steered_before}");

    // "Another zdt build" upgraded the port: its program steers with the same maps, and it is
    // a build from before ZDT_PROBES (its state has no such map).
    let variant = ns.run(|| programs::install_variant(PORT))??;
    let variant_id = pinned(&ns)?.id();
    let probes = || -> anyhow::Result<std::path::PathBuf> {
        ns.run(|| Ok(zdt_ctl::state::port_dir(PORT.into())?.join(zdt_common::names::PROBES)))?
    };
    std::fs::remove_file(probes()?)?;
    let r = zdt(&ns, &["status", "8080"]);
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("zdt-ctl upgrade"), "{r:?}");
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    let r = zdt(&ns, &strs(&promote_args(&v2, &[])));
    assert_eq!(
        r.kind(),
        Some(Kind::Refused),
        "a promote under another build's program: {r:?}"
    );
    let variant_runs = runs(variant_id)?;
    std::thread::sleep(load::scaled(Duration::from_millis(500)));
    assert!(
        runs(variant_id)? > variant_runs,
        "the variant steers the port"
    );

    // Killed after attaching the new program, before its pin replaced the old one: the next
    // command still refuses (the pin says another build), and upgrade finishes the job.
    let mut killed = at_failpoint(
        &ns,
        &["upgrade".into(), "8080".into()],
        Step::UpgradeAttached.name(),
    );
    killed.child.kill()?;
    killed.child.wait()?;
    assert_eq!(zdt(&ns, &["status", "8080"]).kind(), Some(Kind::Refused));

    let r = zdt_ok(&ns, &["upgrade", "8080"])?;
    assert!(r.stdout.contains("program upgraded"), "{r:?}");
    // The map the earlier build lacked is made, root's alone like the others.
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(probes()?)?.permissions().mode() & 0o7777,
        0o600
    );
    // From here on the kernel runs the pinned (new) program, never the variant.
    let (variant_after, ours_after) = (runs(variant_id)?, runs(pinned(&ns)?.id())?);
    std::thread::sleep(load::scaled(Duration::from_millis(500)));
    assert_eq!(runs(variant_id)?, variant_after);
    assert!(runs(pinned(&ns)?.id())? > ours_after);
    let (role, steered_after) = role_and_steered(&ns, v1.pid)?;
    assert_eq!(role, Role::Active, "the role survived the upgrade");
    assert!(
        steered_after > steered_before,
        "the counters survived: {steered_before} then {steered_after}"
    );
    // Running it again changes nothing.
    let r = zdt_ok(&ns, &["upgrade"])?;
    assert!(r.stdout.contains("already runs"), "{r:?}");

    // And deploys go on.
    zdt_ok(&ns, &strs(&promote_args(&v2, &["--stop-old"])))?;
    l.see(load::requests_at(RATE, Duration::from_millis(400)));
    drop(stats);
    let t = load::tally(&l.finish());
    assert_eq!(t.failures(), 0, "{t:?}");
    // v2 served for 0.4 s at least after its promote.
    assert!(
        t.versions["v1"] > load::requests_at(RATE, Duration::from_secs(1) / 3)
            && t.versions["v2"] > load::requests_at(RATE, Duration::from_secs(1) / 6),
        "{t:?}"
    );
    drop((v1, variant));
    Ok(())
}

/// A state whose maps have another layout than this build's cannot be kept: upgrade refuses it
/// (exit 7, saying what to do) and changes nothing.
#[test]
fn upgrade_refuses_maps_of_another_layout() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let set_layout = |delta: i32| {
        edit_control(&ns, move |c| {
            c.layout_version = c.layout_version.wrapping_add_signed(delta)
        })
    };
    let _variant = ns.run(|| programs::install_variant(PORT))??;
    let tag = || pinned(&ns).map(|p| p.tag());
    let before = tag()?;
    set_layout(1)?;
    let r = zdt(&ns, &["upgrade", "8080"]);
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("layout"), "{r:?}");
    assert_eq!(tag()?, before, "the pinned program was not replaced");
    // With the layout back, the same command succeeds: the refusal was the layout's.
    set_layout(-1)?;
    zdt_ok(&ns, &["upgrade", "8080"])?;
    assert_ne!(tag()?, before);
    zdt_ok(&ns, &["status", "8080"])?;
    Ok(())
}

/// Changes the port's control word in place; returns it as it was.
fn edit_control(
    ns: &Netns,
    edit: impl FnOnce(&mut zdt_common::Control) + Send + 'static,
) -> anyhow::Result<zdt_common::Control> {
    use aya::maps::{Array, Map, MapData};
    ns.run(move || -> anyhow::Result<zdt_common::Control> {
        let path = zdt_ctl::state::port_dir(PORT.into())?.join(zdt_common::names::CONTROL);
        let mut control: Array<MapData, zdt_common::Control> =
            Map::Array(MapData::from_pin(path)?).try_into()?;
        let was = control.get(&0, 0)?;
        let mut c = was;
        edit(&mut c);
        control.set(0, c, 0)?;
        Ok(was)
    })?
}

/// A state of the layout before this one (the rollback target always in entry 2, no
/// rollback_buf) is refused by every command but `upgrade`, which converts it in place: the
/// rollback target is kept.
#[test]
fn upgrade_converts_the_layout_before_in_place() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    zdt_ok(&ns, &strs(&promote_args(&v2, &[])))?;
    // As layout 2 kept it: the target (v1) in entry 2, live in entry 0 or 1.
    ns.run(|| -> anyhow::Result<()> {
        use aya::maps::{Array, Map, MapData};
        let dir = zdt_ctl::state::port_dir(PORT.into())?;
        let control: Array<MapData, zdt_common::Control> =
            Map::Array(MapData::from_pin(dir.join(zdt_common::names::CONTROL))?).try_into()?;
        let c = control.get(&0, 0)?;
        anyhow::ensure!(c.active_buf < 3 && c.rollback_buf > 0, "{c:?}");
        let mut active: Array<MapData, zdt_common::ActiveSet> =
            Map::Array(MapData::from_pin(dir.join(zdt_common::names::ACTIVE))?).try_into()?;
        let target = active.get(&(u32::from(c.rollback_buf) - 1), 0)?;
        active.set(2, target, 0)?;
        Ok(())
    })??;
    edit_control(&ns, |c| {
        c.layout_version = zdt_common::UPGRADABLE_LAYOUT;
        c.rollback_buf = 0;
    })?;
    let r = zdt(&ns, &["rollback"]);
    assert_eq!(r.kind(), Some(Kind::Refused), "{r:?}");
    assert!(r.stderr.contains("zdt-ctl upgrade"), "{r:?}");
    zdt_ok(&ns, &["upgrade", "8080"])?;
    let r = zdt_ok(&ns, &["rollback"])?;
    assert!(
        r.stdout.contains(&format!("pid {} active again", v1.pid)),
        "{r:?}"
    );
    let t = load::requests(&ns, PORT, 50, 1000.0);
    assert_eq!(t.versions.get("v1"), Some(&50), "{t:?}");
    Ok(())
}
