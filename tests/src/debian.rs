//! Fresh Debian roots with the package that `cargo xtask dist` builds installed as an operator
//! installs it (`apt install ./zdt_VERSION_ARCH.deb`): tests/tests/package.rs checks the install,
//! tests/tests/systemd_vm.rs boots such a root with systemd.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _};

/// Where the roots' tarballs are kept. Building one takes a minute or two and the Debian mirror,
/// so each is made once and kept, shared by every clone like setup's virtme-ng venv; each test
/// unpacks a fresh copy.
const ROOT_CACHE: &str = "/var/cache/zdt";

/// Runs `cmd`; its stdout and stderr, or an error with both when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(o.status.success(), "{cmd:?}: {}\n{text}", o.status);
    Ok(text)
}

/// target/dist/zdt_VERSION-REVISION_ARCH.deb ($ZDT_DIST_DIR when set).
pub fn deb() -> anyhow::Result<PathBuf> {
    // `cargo xtask dist` writes the package of the release build (target/release, without the
    // test hooks) to target/dist; the tests' own binaries are another build (target/test).
    let dist = std::env::var_os("ZDT_DIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist"));
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

/// The tarball of a root of the host's release, whose libc the binaries were linked against:
/// mmdebstrap's `apt` variant (the essential packages and apt) and the packages `include` names.
/// Made with mmdebstrap when missing; its name lists `include`, so that another list makes
/// another tarball.
pub fn root_tarball(include: &[&str]) -> anyhow::Result<PathBuf> {
    let release =
        run(Command::new("sh").args(["-c", ". /etc/os-release; echo $VERSION_CODENAME"]))?;
    let release = release.trim();
    ensure!(
        !release.is_empty(),
        "/etc/os-release names no VERSION_CODENAME"
    );
    let name = std::iter::once("apt")
        .chain(include.iter().copied())
        .collect::<Vec<_>>()
        .join("+");
    let tar = Path::new(ROOT_CACHE).join(format!("debian-{release}-{name}.tar"));
    if !tar.exists() {
        std::fs::create_dir_all(ROOT_CACHE)?;
        // Built beside and renamed: an interrupted build must not leave a tarball that passes
        // for a root.
        let part = tar.with_extension("tar.part");
        let _ = std::fs::remove_file(&part);
        let mut mm = Command::new("mmdebstrap");
        mm.args(["--variant=apt", "--format=tar", "--quiet"]);
        if !include.is_empty() {
            mm.arg(format!("--include={}", include.join(",")));
        }
        run(mm.arg(release).arg(&part)).context(
            "mmdebstrap (from `cargo xtask setup`) builds the test root from the Debian mirror",
        )?;
        std::fs::rename(&part, &tar)?;
    }
    Ok(tar)
}

/// A root unpacked from a tarball into a directory of its own, removed with everything under it
/// when dropped.
pub struct Root(PathBuf);

impl Root {
    /// `tarball` unpacked in a new directory of the temporary directory, named after `what`.
    pub fn unpack(tarball: &Path, what: &str) -> anyhow::Result<Root> {
        let dir = std::env::temp_dir().join(format!("zdt-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let root = Root(dir);
        run(Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&root.0))?;
        Ok(root)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `path` inside the root (absolute or not), as a path on the host.
    pub fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        self.0.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// `args` run in the root (chroot), with the environment cleared but for a plain PATH.
    pub fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.0)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }

    /// The README's `apt install ./zdt_VERSION_ARCH.deb`: apt takes the Depends from the root's
    /// own packages, and downloads nothing (a missing one would fail the install: the root has
    /// no package lists). No pty: the chroot has no /dev/pts.
    pub fn install_deb(&self, deb: &Path) -> anyhow::Result<()> {
        let inside = Path::new("/tmp").join(deb.file_name().context("a .deb file")?);
        std::fs::copy(deb, self.join(&inside))?;
        run(self
            .chroot(&["apt-get", "install", "-y", "-q", "-o", "Dpkg::Use-Pty=0"])
            .arg(&inside)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        std::fs::remove_file(self.join(&inside))?;
        Ok(())
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
