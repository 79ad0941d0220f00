//! examples/deploy.sh, the deploy script of the systemd example, run for real under load.
//! systemd itself is played by tests/fixtures/systemctl (no systemd runs here); the script,
//! zdt-ctl, the demo service and the kernel are real.
use std::{path::PathBuf, process::Command, time::Duration};

use zdt_tests::{
    harness::{bin, wait_for_200, zdt_ok},
    load::{self, scaled, Background, LoadSpec},
    netns::Netns,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy(
    ns: &Netns,
    shim: &std::path::Path,
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String)> {
    let bins = bin("zdt-ctl").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        repo().join("tests/fixtures").display(),
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(repo().join("examples/deploy.sh"));
    cmd.env("PATH", path)
        .env("SHIM_DIR", shim)
        .env("ZDT_BIN_DIR", &bins)
        .envs(env.iter().copied());
    ns.command(&mut cmd);
    let out = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn the_deploy_script_deploys_and_rolls_back() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let shim = tempdir()?;
    // The first instance, started by hand as an operator would (systemctl start app@8081).
    let mut first = Command::new(repo().join("tests/fixtures/systemctl"));
    first
        .args(["start", "app@8081"])
        .env("SHIM_DIR", &shim)
        .env("ZDT_BIN_DIR", bin("zdt-ctl").parent().unwrap());
    ns.command(&mut first);
    assert!(first.status()?.success());
    // Attached (and loaded) once it is ready: attach makes it the active member as it is, and a
    // warming instance answers 503.
    wait_for_200(
        &ns,
        ([127, 0, 0, 1], 8081).into(),
        "/readyz",
        scaled(Duration::from_secs(10)),
        || true,
    )
    .map_err(|last| anyhow::anyhow!("app@8081 never got ready (last: {last})"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let l = Background::start(
        &ns,
        LoadSpec::open(
            ([127, 0, 0, 1], 8080).into(),
            300.0,
            Duration::from_secs(60),
        ),
    );

    // The last of them binds its port 3 s after it starts: the script, unchanged, still works
    // (promote waits for it to listen).
    for (i, (new, bind_delay)) in [("app@8082", "0s"), ("app@8081", "0s"), ("app@8082", "3s")]
        .iter()
        .enumerate()
    {
        let (code, out) = deploy(
            &ns,
            &shim,
            &[("PROBATION", "500ms"), ("APP_BIND_DELAY", bind_delay)],
        )?;
        assert_eq!(code, 0, "deploy {i}: {out}");
        assert!(
            out.contains(&format!("deployed {new}")),
            "deploy {i}: {out}"
        );
    }
    // A version that never gets ready: the script exits with zdt-ctl's code 4 and stops it;
    // app@8082 keeps serving.
    let (code, out) = deploy(&ns, &shim, &[("APP_WARMUP", "1h"), ("TIMEOUT", "1s")])?;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("app@8082 keeps the port"), "{out}");
    let t = load::tally(&l.finish_after(load::AFTER_LAST_CHANGE));
    assert_eq!(t.failures(), 0, "{t:?}");
    let versions: Vec<&String> = t.versions.keys().collect();
    assert_eq!(versions, ["app@8081", "app@8082"], "{t:?}");
    // Clean up the instance that is still running.
    let mut stop = Command::new(repo().join("tests/fixtures/systemctl"));
    stop.args(["stop", "app@8082"]).env("SHIM_DIR", &shim);
    stop.status()?;
    let _ = std::fs::remove_dir_all(&shim);
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("zdt-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
