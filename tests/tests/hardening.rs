//! Bad input gets a clear error and changes nothing; a pinned state zdt did not create as it is
//! gets refused. (The argument-level cases are in core.rs.)
use std::{os::unix::fs::PermissionsExt, time::Duration};

use anyhow::Context as _;

use zdt_tests::{
    harness::{fingerprint, zdt, zdt_ok, App, AppOpts},
    netns::Netns,
};

const PORT: u16 = 8080;

/// A process of this machine with the kernel-thread flag (PF_KTHREAD), e.g. kthreadd.
fn kernel_thread() -> Option<i32> {
    procfs::process::all_processes()
        .ok()?
        .flatten()
        .find(|p| p.stat().is_ok_and(|s| s.flags & 0x0020_0000 != 0))
        .map(|p| p.pid)
}

#[test]
fn bad_pids_and_sockets_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let other_addr = App::start(
        &ns,
        &AppOpts::new(PORT, "lo").arg("--addr").arg("127.0.0.2"),
    )?;
    let udp = App::start(
        &ns,
        &AppOpts::new(PORT + 1, "udp").arg("--udp-port").arg("8080"),
    )?;
    let elsewhere = Netns::new()?;
    let foreign = App::start(&elsewhere, &AppOpts::new(PORT, "foreign"))?;
    // A zombie: a child that exited and was never waited for.
    let mut zombie = std::process::Command::new("true").spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let kthread = kernel_thread().expect("a kernel thread to point at");

    let before = fingerprint(&ns, PORT)?;
    let ready = v1.readyz();
    let cases: Vec<(String, i32, String)> = vec![
        (kthread.to_string(), 2, "is a kernel thread".into()),
        (zombie.id().to_string(), 2, "is a zombie".into()),
        (
            foreign.pid.to_string(),
            2,
            "another network namespace".into(),
        ),
        (
            other_addr.pid.to_string(),
            2,
            "listens on 127.0.0.2:8080, not on :8080".into(),
        ),
        // A UDP socket only: the process may still bind its TCP listener, so promote waits for
        // it, up to --timeout (exit 4), and then says what it saw.
        (udp.pid.to_string(), 4, "UDP socket on 0.0.0.0:8080".into()),
    ];
    for (pid, code, text) in &cases {
        let r = zdt(
            &ns,
            &["promote", pid, "--readyz", &ready, "--timeout", "1s"],
        );
        assert_eq!(r.code, *code, "pid {pid}: {r:?}");
        assert!(
            r.stderr.contains(text.as_str()),
            "pid {pid}: {:?} lacks {text:?}",
            r.stderr
        );
        assert!(
            r.stderr.contains(&format!("pid {pid}")),
            "message names the pid: {r:?}"
        );
    }
    // The readiness URL of another process: zdt would switch to PID on someone else's word
    // (a pid that was reused by another process is caught the same way).
    let v2 = App::start(&ns, &AppOpts::new(PORT, "v2"))?;
    let r = zdt(&ns, &["promote", &v2.pid.to_string(), "--readyz", &ready]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "is served by pid {}, not by pid {}",
            v1.pid, v2.pid
        )),
        "{r:?}"
    );
    assert_eq!(fingerprint(&ns, PORT)?, before, "state changed");
    let _ = zombie.wait();
    Ok(())
}

#[test]
fn readiness_urls_that_never_say_200_change_nothing() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let _v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let before = fingerprint(&ns, PORT)?;
    // (readyz behaviour of the new process, text the message must hold)
    let cases = [
        ("redirect", "last answer: 302"),
        ("hang", "last answer: no answer within 1s"),
        ("slow", "last answer: no answer within 1s"),
        ("garbage", "last answer: error"),
    ];
    for (mode, text) in cases {
        let app = App::start(
            &ns,
            &AppOpts::new(PORT, mode).arg("--readyz-mode").arg(mode),
        )?;
        let url = app.readyz();
        let r = zdt(
            &ns,
            &[
                "promote",
                &app.pid.to_string(),
                "--readyz",
                &url,
                "--timeout",
                "2500ms",
            ],
        );
        assert_eq!(r.code, 4, "{mode}: {r:?}");
        assert!(
            r.stderr.contains(&url),
            "{mode}: message names the URL: {r:?}"
        );
        assert!(
            r.stderr.contains(text),
            "{mode}: {:?} lacks {text:?}",
            r.stderr
        );
        assert_eq!(fingerprint(&ns, PORT)?, before, "{mode}: state changed");
    }
    // Nothing listens on the URL at all.
    let app = App::start(&ns, &AppOpts::new(PORT, "x"))?;
    let r = zdt(
        &ns,
        &[
            "promote",
            &app.pid.to_string(),
            "--readyz",
            "http://127.0.0.1:1/readyz",
            "--timeout",
            "1s",
        ],
    );
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("last answer: connection refused"),
        "{r:?}"
    );
    assert_eq!(fingerprint(&ns, PORT)?, before);
    Ok(())
}

#[test]
fn a_pinned_state_zdt_did_not_create_is_refused() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    zdt_ok(&ns, &["attach", ":8080"])?;
    let dir = ns.run(|| zdt_ctl::state::port_dir(PORT))??;
    let promote = ["promote", &v1.pid.to_string(), "--no-readyz"].map(String::from);
    let promote: Vec<&str> = promote.iter().map(String::as_str).collect();

    // Root-only, as created.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for e in std::fs::read_dir(&dir)? {
        assert_eq!(mode(&e?.path()), 0o600);
    }

    // Opened up to other users: every command refuses it and says why.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    for args in [&promote[..], &["status", "8080"]] {
        let r = zdt(&ns, args);
        assert_eq!(r.code, 7, "{args:?}: {r:?}");
        assert!(r.stderr.contains("mode 755, not root and 700"), "{r:?}");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    zdt_ok(&ns, &promote)?;

    // The directories above it: one that others can write, one replaced by a symlink.
    let netns_dir = dir
        .parent()
        .expect("the namespace's directory")
        .to_path_buf();
    std::fs::set_permissions(&netns_dir, std::fs::Permissions::from_mode(0o777))
        .context("chmod 777")?;
    let r = zdt(&ns, &promote);
    assert_eq!(r.code, 7, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "{} is owned by uid 0 with mode 777",
            netns_dir.display()
        )),
        "{r:?}"
    );
    std::fs::set_permissions(&netns_dir, std::fs::Permissions::from_mode(0o700))
        .context("chmod 700")?;
    // (bpffs refuses names with a dot.)
    let real = netns_dir.with_file_name(format!(
        "{}real",
        netns_dir.file_name().expect("a name").to_string_lossy()
    ));
    std::fs::rename(&netns_dir, &real).context("rename")?;
    std::os::unix::fs::symlink(&real, &netns_dir).context("symlink")?;
    let r = zdt(&ns, &promote);
    assert_eq!(r.code, 7, "{r:?}");
    assert!(r.stderr.contains("is a symlink"), "{r:?}");
    std::fs::remove_file(&netns_dir).context("unlink")?;
    std::fs::rename(&real, &netns_dir).context("rename back")?;
    zdt_ok(&ns, &promote)?;

    // A map of another shape under one of zdt's names.
    let (a, b) = (
        dir.join(zdt_common::names::CONTROL),
        dir.join(zdt_common::names::ACTIVE),
    );
    let tmp = dir.join("swap");
    std::fs::rename(&a, &tmp)?;
    std::fs::rename(&b, &a)?;
    std::fs::rename(&tmp, &b)?;
    let r = zdt(&ns, &promote);
    assert_eq!(r.code, 7, "{r:?}");
    assert!(r.stderr.contains("map ZDT_CONTROL is"), "{r:?}");
    std::fs::rename(&a, &tmp)?;
    std::fs::rename(&b, &a)?;
    std::fs::rename(&tmp, &b)?;
    zdt_ok(&ns, &promote)?;

    // Another program pinned under zdt's program name: refused by its tag.
    let prog = dir.join(zdt_common::names::PROGRAM);
    let saved = dir.join("saved");
    std::fs::rename(&prog, &saved)?;
    zdt_tests::programs::pin_pass_program(&prog)?;
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o600))?;
    let r = zdt(&ns, &promote);
    assert_eq!(r.code, 7, "{r:?}");
    assert!(r.stderr.contains("is not this zdt-ctl's"), "{r:?}");
    std::fs::remove_file(&prog)?;
    std::fs::rename(&saved, &prog)?;
    zdt_ok(&ns, &promote)?;
    Ok(())
}

#[test]
fn a_kernel_older_than_5_14_is_refused_before_anything_changes() -> anyhow::Result<()> {
    let ns = Netns::new()?;
    let v1 = App::start(&ns, &AppOpts::new(PORT, "v1"))?;
    // The running kernel's release, as an older kernel would report it (the variable is the
    // test hook that stands in for uname).
    for (args, attached) in [
        (vec!["attach", ":8080"], false),
        (vec!["status"], false),
        (vec!["attach", ":8080"], true),
    ] {
        if attached {
            zdt_ok(&ns, &["attach", ":8080"])?;
        }
        let before = fingerprint(&ns, PORT)?;
        let out: zdt_tests::harness::Ctl = zdt_tests::harness::zdt_command(&ns, &args)
            .env("ZDT_KERNEL_RELEASE", "5.10.0-28-amd64")
            .output()?
            .into();
        assert_eq!(out.code, 7, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("5.10.0-28-amd64") && out.stderr.contains(">= 5.14"),
            "{args:?}: {out:?}"
        );
        assert_eq!(
            fingerprint(&ns, PORT)?,
            before,
            "{args:?} changed the state"
        );
    }
    // The promote that would follow changes nothing either.
    let out: zdt_tests::harness::Ctl =
        zdt_tests::harness::zdt_command(&ns, &["promote", &v1.pid.to_string(), "--no-readyz"])
            .env("ZDT_KERNEL_RELEASE", "5.13.19")
            .output()?
            .into();
    assert_eq!(out.code, 7, "{out:?}");
    Ok(())
}
