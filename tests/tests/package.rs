//! The Debian package that `cargo xtask dist` builds (`cargo xtask test` builds it before the
//! suite): lintian finds no error in it, and it installs with apt into a fresh Debian root, where
//! zdt-ctl runs and names the commit of this checkout.
use std::process::Command;

use anyhow::{ensure, Context as _};
use zdt_tests::{
    debian::{self, run, Root},
    harness::bin,
};

/// The checkout's commit as `zdt-ctl --version` names it (build.rs), "unknown" outside git.
fn head() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `zdt-ctl VERSION (commit HASH)`, with `-dirty` after HASH when the tree was dirty at build
/// time (not checked: the flag is as of build.rs's last run, which unstaged edits do not cause).
fn assert_names_this_commit(version: &str) {
    let prefix = format!("zdt-ctl {} (commit {}", env!("CARGO_PKG_VERSION"), head());
    assert!(
        version.trim() == format!("{prefix})") || version.trim() == format!("{prefix}-dirty)"),
        "expected `{prefix}[-dirty])`, got {version:?}: was it built from another commit? \
         (`cargo xtask dist` builds the package again)"
    );
}

#[test]
fn version_names_the_commit_of_the_checkout() -> anyhow::Result<()> {
    let out = run(Command::new(bin("zdt-ctl")).arg("--version"))?;
    assert_names_this_commit(&out);
    Ok(())
}

#[test]
fn the_package_passes_lintian_and_installs_into_a_fresh_debian_root() -> anyhow::Result<()> {
    let deb = debian::deb()?;

    // --fail-on error: exit 1 on an E: tag. Run as root, lintian says that it should not be; the
    // package is only read.
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .context("lintian (from `cargo xtask setup`)")?;
    let report = String::from_utf8_lossy(&lintian.stdout);
    assert!(
        lintian.status.success() && !report.lines().any(|l| l.starts_with("E:")),
        "lintian: {}\n{report}{}",
        lintian.status,
        String::from_utf8_lossy(&lintian.stderr)
    );

    let root = Root::unpack(&debian::root_tarball(&[])?, "deb-root")?;
    root.install_deb(&deb)?;

    assert_names_this_commit(&run(&mut root.chroot(&["zdt-ctl", "--version"]))?);
    let help = run(&mut root.chroot(&["zdt-ctl", "--help"]))?;
    for verb in [
        "attach", "promote", "drain", "rollback", "status", "metrics", "exec", "hold", "watch",
        "upgrade", "detach",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{verb} "))),
            "--help lists no {verb}:\n{help}"
        );
    }

    let files = run(&mut root.chroot(&["dpkg", "-L", "zdt"]))?;
    for path in [
        "/usr/sbin/zdt-ctl",
        "/usr/share/man/man1/zdt-ctl.1.gz",
        "/usr/share/bash-completion/completions/zdt-ctl",
        "/usr/share/zsh/vendor-completions/_zdt-ctl",
        "/usr/share/fish/vendor_completions.d/zdt-ctl.fish",
        "/usr/lib/systemd/system/zdt-attach.service",
        "/usr/lib/systemd/system/zdt-hold.service",
        "/usr/lib/systemd/system/zdt-watch@.service",
        "/usr/share/doc/zdt/copyright",
        "/usr/share/doc/zdt/changelog.Debian.gz",
    ] {
        assert!(files.lines().any(|l| l == path), "no {path} in:\n{files}");
    }
    // The units run the installed zdt-ctl, not the examples' /usr/local/bin one.
    for unit in [
        "zdt-attach.service",
        "zdt-hold.service",
        "zdt-watch@.service",
    ] {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit))?;
        let exec: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ExecStart"))
            .collect();
        assert!(
            !exec.is_empty() && exec.iter().all(|l| l.contains("=/usr/sbin/zdt-ctl ")),
            "{unit}: {exec:?}"
        );
    }
    // The test hooks are not in the packaged binary: its environment cannot stop it halfway
    // through a promote, nor lie about the kernel. The test build has them (the check sees
    // them when they are there).
    let has = |bytes: &[u8], word: &str| bytes.windows(word.len()).any(|w| w == word.as_bytes());
    let packaged = std::fs::read(root.join("usr/sbin/zdt-ctl"))?;
    let test_build = std::fs::read(bin("zdt-ctl"))?;
    for hook in ["ZDT_FAILPOINT", "ZDT_KERNEL_RELEASE"] {
        assert!(!has(&packaged, hook), "the packaged zdt-ctl reads {hook}");
        assert!(has(&test_build, hook), "the test build lacks {hook}");
    }
    // The package takes away what it brought.
    run(&mut root.chroot(&["dpkg", "--purge", "zdt"]))?;
    ensure!(
        !root.join("usr/sbin/zdt-ctl").exists(),
        "purge left /usr/sbin/zdt-ctl"
    );
    Ok(())
}
