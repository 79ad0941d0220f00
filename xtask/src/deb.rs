//! The Debian package that `cargo xtask dist` builds: a tree staged here and packed by
//! `dpkg-deb`, so no cargo tool beyond the workspace is needed. `dpkg-dev` (dpkg-shlibdeps,
//! and binutils' strip through it) is among the packages setup installs.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _};

use crate::{root, run};

/// The Debian revision of the package: zdt is packaged by its own authors, once per version.
const REVISION: &str = "1";
/// Where the packaged systemd units call zdt-ctl, and where the examples call it: they are
/// written for a from-source install, in /usr/local.
const PACKAGED_CTL: &str = "/usr/sbin/zdt-ctl";
const EXAMPLES_CTL: &str = "/usr/local/bin/zdt-ctl";
/// Units of zdt itself, installed (not enabled) as system units.
const UNITS: [&str; 3] = [
    "zdt-attach.service",
    "zdt-hold.service",
    "zdt-watch@.service",
];
/// The app's side of the systemd example: a template for the user's own service, not a unit of
/// zdt's, so it goes with the documentation.
const DOC_EXAMPLES: [&str; 3] = ["app.service", "app@.service", "deploy.sh"];
const SUMMARY: &str = "zero-downtime deploys on one port, steered by a BPF program";
/// The control file's long description: one paragraph per entry.
const DESCRIPTION: [&str; 2] = [
    "zdt hands a listening port from one version of a service to the next without refusing \
     or resetting a connection, and without a proxy. A BPF sk_reuseport program picks the \
     listener of every new connection; zdt-ctl attaches it to the port's SO_REUSEPORT group \
     and, once the new process answers its readiness check, sends all new connections to it \
     in one map update. Connections queued on a listener that closes move to the new one.",
    "This package has zdt-ctl with its man page and shell completions, and systemd units \
     that attach port 80 at boot (zdt-attach.service), keep connections waiting across \
     restarts (zdt-hold.service) and promote what a restart starts (zdt-watch@PORT.service), \
     none enabled. zdt-ctl needs Linux 5.14 or later and root.",
];

/// Builds `dist/zdt_VERSION_ARCH.deb` from the release build and from what `dist` generated
/// beside it (completions, man page); returns its path.
pub fn build(dist: &Path) -> anyhow::Result<PathBuf> {
    let version = format!("{}-{REVISION}", env!("CARGO_PKG_VERSION"));
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"))?;
    let stage = dist.join("deb");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    // A package of an earlier version must not pass for this build's (tests/tests/package.rs
    // wants exactly one).
    for entry in fs::read_dir(dist)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with("zdt_") && name.ends_with(".deb") {
            fs::remove_file(&path)?;
        }
    }
    let ctl = stage.join(&PACKAGED_CTL[1..]);
    fs::create_dir_all(ctl.parent().unwrap())?;
    // What dh_strip removes: the symbol table and the compiler's notes (lintian flags an
    // unstripped binary).
    run({
        let mut c = Command::new("strip");
        c.args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
            "-o",
        ])
        .arg(&ctl)
        .arg(root().join("target/release/zdt-ctl"));
        c
    })?;
    fs::set_permissions(&ctl, fs::Permissions::from_mode(0o755))?;
    // The version line names the commit the binary was built from: the changelog says the same.
    let version_line = stdout(Command::new(&ctl).arg("--version"))?;
    let commit = version_line
        .split("(commit ")
        .nth(1)
        .and_then(|s| s.strip_suffix(')'))
        .with_context(|| format!("`zdt-ctl --version` printed {version_line:?}: no commit"))?;

    let man = gzip(&fs::read(dist.join("zdt-ctl.1"))?)?;
    put(&stage, "usr/share/man/man1/zdt-ctl.1.gz", &man)?;
    for (from, to) in [
        (
            "zdt-ctl.bash",
            "usr/share/bash-completion/completions/zdt-ctl",
        ),
        ("_zdt-ctl", "usr/share/zsh/vendor-completions/_zdt-ctl"),
        (
            "zdt-ctl.fish",
            "usr/share/fish/vendor_completions.d/zdt-ctl.fish",
        ),
    ] {
        put(&stage, to, &fs::read(dist.join("completions").join(from))?)?;
    }
    let doc = "usr/share/doc/zdt";
    let units = UNITS.map(|u| (u, "usr/lib/systemd/system"));
    let doc_examples = DOC_EXAMPLES.map(|f| (f, "usr/share/doc/zdt/examples"));
    for (file, dir) in units.into_iter().chain(doc_examples) {
        put(&stage, &format!("{dir}/{file}"), example(file)?.as_bytes())?;
    }
    // Compressed, as Debian policy (12.3) asks of documentation over 4 kB.
    for (from, to) in [
        ("README.md", "README.md.gz"),
        ("docs/ARCHITECTURE.md", "ARCHITECTURE.md.gz"),
        ("docs/BENCHMARK.md", "BENCHMARK.md.gz"),
        ("docs/FAULTS.md", "FAULTS.md.gz"),
        ("docs/OPERATING.md", "OPERATING.md.gz"),
        ("docs/PEERS.md", "PEERS.md.gz"),
        ("docs/TESTING.md", "TESTING.md.gz"),
    ] {
        put(
            &stage,
            &format!("{doc}/{to}"),
            &gzip(&fs::read(root().join(from))?)?,
        )?;
    }
    put(
        &stage,
        "usr/share/lintian/overrides/zdt",
        include_bytes!("../deb/lintian-overrides"),
    )?;
    put(
        &stage,
        &format!("{doc}/copyright"),
        include_bytes!("../deb/copyright"),
    )?;
    let (maintainer, date) = (maintainer()?, date()?);
    let changelog = format!(
        // spaces: Debian's changelog format (deb-changelog(5)).
        "zdt ({version}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from commit {commit}.\n\n -- {maintainer}  {date}\n"
    );
    put(
        &stage,
        &format!("{doc}/changelog.Debian.gz"),
        &gzip(changelog.as_bytes())?,
    )?;

    let files = files(&stage)?;
    let mut md5sums = Command::new("md5sum");
    md5sums.current_dir(&stage).args(&files);
    put(&stage, "DEBIAN/md5sums", stdout(&mut md5sums)?.as_bytes())?;
    // dpkg-gencontrol's measure: every file and directory rounded up to a KiB.
    let mut kib = 0u64;
    for f in &files {
        kib += fs::metadata(stage.join(f))?.len().div_ceil(1024);
    }
    let control = format!(
        "Package: zdt\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {maintainer}\n\
         Installed-Size: {kib}\nDepends: {}\nSection: admin\nPriority: optional\n\
         Description: {SUMMARY}\n{}\n",
        depends(&ctl, &dist.join("shlibdeps"))?,
        DESCRIPTION
            .iter()
            .map(|p| wrap(p, 78))
            .collect::<Vec<_>>()
            .join("\n .\n"),
    );
    put(&stage, "DEBIAN/control", control.as_bytes())?;

    let deb = dist.join(format!("zdt_{version}_{arch}.deb"));
    let mut pack = Command::new("dpkg-deb");
    // root:root whoever builds; SOURCE_DATE_EPOCH clamps the archive's timestamps so that one
    // commit gives one package.
    pack.arg("--root-owner-group")
        .arg("--build")
        .arg(&stage)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", source_date_epoch()?);
    run(pack)?;
    Ok(deb)
}

/// An example file, with the path of zdt-ctl that the package installs.
fn example(name: &str) -> anyhow::Result<String> {
    let path = root().join("examples").join(name);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let text = text.replace(EXAMPLES_CTL, PACKAGED_CTL);
    // A unit that calls zdt-ctl by another path would fail on every system with the package.
    if name.ends_with(".service") && text.contains("zdt-ctl") && !text.contains(PACKAGED_CTL) {
        bail!(
            "{} calls zdt-ctl, but not as {EXAMPLES_CTL}: update deb.rs",
            path.display()
        );
    }
    Ok(text)
}

/// Writes `bytes` to `rel` under `stage`, mode 0644 (0755 for its new directories, whatever
/// the umask).
fn put(stage: &Path, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = stage.join(rel);
    let parent = path.parent().unwrap();
    fs::create_dir_all(parent)?;
    for dir in parent.ancestors().take_while(|d| d.starts_with(stage)) {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(&path, bytes)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// The staged files outside DEBIAN/, relative to `stage`, sorted.
fn files(stage: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![stage.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                if path != stage.join("DEBIAN") {
                    dirs.push(path);
                }
            } else {
                out.push(path.strip_prefix(stage)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `gzip -9n` of `bytes`: best compression, no name or time stamp in the header (Debian's rule
/// for reproducible man pages and changelogs).
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .arg("-9n")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running gzip")?;
    // Written from a thread: gzip's output would fill the pipe while we still write its input.
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let o = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    ensure!(o.status.success(), "gzip failed: {}", o.status);
    Ok(o.stdout)
}

/// The shared libraries `binary` needs, as Debian packages with the versions its symbols
/// require (e.g. `libc6 (>= 2.34), libgcc-s1 (>= 4.2)`), from dpkg-shlibdeps.
fn depends(binary: &Path, work: &Path) -> anyhow::Result<String> {
    // dpkg-shlibdeps runs in a source tree: it wants a debian/control, of which it reads nothing
    // that matters here. `work` is a scratch directory for that tree.
    fs::create_dir_all(work.join("debian"))?;
    fs::write(
        work.join("debian/control"),
        "Source: zdt\n\nPackage: zdt\nArchitecture: any\n",
    )?;
    let mut c = Command::new("dpkg-shlibdeps");
    c.current_dir(work)
        .arg("-O")
        .arg(format!("-e{}", binary.display()));
    let out = stdout(&mut c)?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out:?}"))?;
    fs::remove_dir_all(work)?;
    Ok(deps.to_string())
}

/// `Name <email>`: $DEBFULLNAME and $DEBEMAIL as Debian's tools take them, else the author of
/// the checkout's last commit.
fn maintainer() -> anyhow::Result<String> {
    if let (Ok(name), Ok(email)) = (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        return Ok(format!("{name} <{email}>"));
    }
    git(&["log", "-1", "--format=%an <%ae>"])
        .context("no maintainer: set DEBFULLNAME and DEBEMAIL (outside a git checkout)")
}

/// The time of the checkout's last commit (seconds since the epoch), or now outside git.
fn source_date_epoch() -> anyhow::Result<String> {
    if let Ok(t) = std::env::var("SOURCE_DATE_EPOCH") {
        return Ok(t);
    }
    git(&["log", "-1", "--format=%ct"]).or_else(|_| stdout(Command::new("date").arg("+%s")))
}

/// [`source_date_epoch`] in the changelog's RFC 2822 form.
fn date() -> anyhow::Result<String> {
    stdout(
        Command::new("date")
            .arg("-R")
            .arg("-u")
            .arg(format!("-d@{}", source_date_epoch()?)),
    )
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    stdout(Command::new("git").current_dir(root()).args(args))
}

/// A command's trimmed stdout; its stderr in the error when it fails.
fn stdout(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8(o.stdout)?.trim().to_string())
}

/// `text` as control-file continuation lines (a leading space), each at most `width` long.
fn wrap(text: &str, width: usize) -> String {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().unwrap();
        if !line.is_empty() && line.len() + 1 + word.len() > width - 1 {
            lines.push(String::new());
        }
        let line = lines.last_mut().unwrap();
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines
        .iter()
        .map(|l| format!(" {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
