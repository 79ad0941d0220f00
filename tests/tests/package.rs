//! The Debian package that `cargo xtask dist` builds (`cargo xtask test` builds it before the
//! suite): lintian finds no error in it, and it installs with apt into a fresh Debian root, where
//! zdt-ctl runs and names the commit of this checkout.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _};
use zdt_tests::harness::bin;

/// The Debian root the package goes into: mmdebstrap's `apt` variant (the essential packages
/// and apt) of the host's own release, whose libc the binary was linked against. Building it
/// takes half a minute and the Debian mirror, so it is made once and kept as a tarball, shared
/// by every clone like setup's virtme-ng venv; each run unpacks a fresh copy.
const ROOT_CACHE: &str = "/var/cache/zdt";

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

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(o.status.success(), "{cmd:?}: {}\n{text}", o.status);
    Ok(text)
}

#[test]
fn version_names_the_commit_of_the_checkout() -> anyhow::Result<()> {
    let out = run(Command::new(bin("zdt-ctl")).arg("--version"))?;
    assert_names_this_commit(&out);
    Ok(())
}

/// target/dist/zdt_VERSION-REVISION_ARCH.deb, next to the binaries' target/release.
fn deb() -> anyhow::Result<PathBuf> {
    let dist = bin("zdt-ctl").parent().unwrap().join("../dist");
    let prefix = format!("zdt_{}-", env!("CARGO_PKG_VERSION"));
    let found: Vec<PathBuf> = std::fs::read_dir(&dist)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .collect();
    match &found[..] {
        [one] => Ok(one.clone()),
        _ => anyhow::bail!(
            "want one {prefix}*.deb in {}, found {found:?}: run `cargo xtask dist`",
            dist.display()
        ),
    }
}

/// The cached root tarball of the host's release, made with mmdebstrap when missing.
fn root_tarball() -> anyhow::Result<PathBuf> {
    let release =
        run(Command::new("sh").args(["-c", ". /etc/os-release; echo $VERSION_CODENAME"]))?;
    let release = release.trim();
    ensure!(
        !release.is_empty(),
        "/etc/os-release names no VERSION_CODENAME"
    );
    let tar = Path::new(ROOT_CACHE).join(format!("debian-{release}-apt.tar"));
    if !tar.exists() {
        std::fs::create_dir_all(ROOT_CACHE)?;
        // Built beside and renamed: an interrupted build must not leave a tarball that passes
        // for a root.
        let part = tar.with_extension("tar.part");
        let _ = std::fs::remove_file(&part);
        run(Command::new("mmdebstrap")
            .args(["--variant=apt", "--format=tar", "--quiet", release])
            .arg(&part))
        .context(
            "mmdebstrap (from `cargo xtask setup`) builds the test root from the Debian mirror",
        )?;
        std::fs::rename(&part, &tar)?;
    }
    Ok(tar)
}

/// A directory removed with everything under it when dropped.
struct TempRoot(PathBuf);

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_package_passes_lintian_and_installs_into_a_fresh_debian_root() -> anyhow::Result<()> {
    let deb = deb()?;

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

    let root = TempRoot(std::env::temp_dir().join(format!("zdt-deb-root-{}", std::process::id())));
    std::fs::create_dir_all(&root.0)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(root_tarball()?)
        .arg("-C")
        .arg(&root.0))?;
    let inside = Path::new("/tmp").join(deb.file_name().unwrap());
    std::fs::copy(&deb, root.0.join(inside.strip_prefix("/")?))?;
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(&root.0)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    };
    // The README's `apt install ./zdt_VERSION_ARCH.deb`: apt takes the Depends from the root's
    // own packages, and downloads nothing (a missing one would fail the install: the root has
    // no package lists). No pty: the chroot has no /dev/pts.
    run(
        chroot(&["apt-get", "install", "-y", "-q", "-o", "Dpkg::Use-Pty=0"])
            .arg(&inside)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;

    assert_names_this_commit(&run(&mut chroot(&["zdt-ctl", "--version"]))?);
    let help = run(&mut chroot(&["zdt-ctl", "--help"]))?;
    for verb in [
        "attach", "promote", "drain", "rollback", "status", "metrics", "exec", "hold", "detach",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{verb} "))),
            "--help lists no {verb}:\n{help}"
        );
    }

    let files = run(&mut chroot(&["dpkg", "-L", "zdt"]))?;
    for path in [
        "/usr/sbin/zdt-ctl",
        "/usr/share/man/man1/zdt-ctl.1.gz",
        "/usr/share/bash-completion/completions/zdt-ctl",
        "/usr/share/zsh/vendor-completions/_zdt-ctl",
        "/usr/share/fish/vendor_completions.d/zdt-ctl.fish",
        "/usr/lib/systemd/system/zdt-attach.service",
        "/usr/lib/systemd/system/zdt-hold.service",
        "/usr/share/doc/zdt/copyright",
        "/usr/share/doc/zdt/changelog.Debian.gz",
    ] {
        assert!(files.lines().any(|l| l == path), "no {path} in:\n{files}");
    }
    // The units run the installed zdt-ctl, not the examples' /usr/local/bin one.
    for unit in ["zdt-attach.service", "zdt-hold.service"] {
        let text = std::fs::read_to_string(root.0.join("usr/lib/systemd/system").join(unit))?;
        let exec: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ExecStart"))
            .collect();
        assert!(
            !exec.is_empty() && exec.iter().all(|l| l.contains("=/usr/sbin/zdt-ctl ")),
            "{unit}: {exec:?}"
        );
    }
    // The package takes away what it brought.
    run(&mut chroot(&["dpkg", "--purge", "zdt"]))?;
    ensure!(
        !root.0.join("usr/sbin/zdt-ctl").exists(),
        "purge left /usr/sbin/zdt-ctl"
    );
    Ok(())
}
