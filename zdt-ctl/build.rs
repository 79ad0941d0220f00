//! Builds the BPF program (zdt-ebpf) for bpfel-unknown-none with the Debian toolchain that
//! `cargo xtask setup` installs, and embeds it in zdt-ctl; records the git commit that
//! `zdt-ctl --version` names.
use std::{path::Path, process::Command};

const TOOLCHAIN: &str = "debian-web";

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=ZDT_COMMIT={}", commit());
    let linker_ok = Command::new("bpf-linker").arg("--version").output().is_ok();
    let toolchain_ok = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !linker_ok || !toolchain_ok {
        // A plain message (no error chain or backtrace): cargo prints a failed build script's
        // stderr as it is.
        eprintln!(
            "error: the BPF toolchain is missing ({}). Run `cargo xtask setup` once, then build again.",
            [
                (!linker_ok).then_some("bpf-linker not on PATH"),
                (!toolchain_ok).then_some("rustup toolchain `debian-web` not linked"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        );
        std::process::exit(1);
    }
    // aya-build prints every line of the nested cargo's stderr as a cargo warning, so its
    // progress ("Compiling ...", "Finished ...") would show as some 30 warnings on every
    // build. Quiet mode keeps only what matters there: the compiler's own diagnostics come
    // through its JSON stream, and a failed build still prints cargo's error. The build script
    // is single-threaded here, before aya-build spawns anything.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    let package = aya_build::Package {
        name: "zdt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zdt-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
}

/// The checkout's commit (12 hex digits, `-dirty` when tracked files differ from it), or
/// "unknown" outside a git checkout (a source tarball) or without git.
fn commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    // git obeys these; outside a checkout (or with git missing) no path below is watched, so
    // only a change of them, of zdt-ebpf or of this file runs this again.
    for var in ["GIT_DIR", "GIT_WORK_TREE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let git = |args: &[&str]| -> Option<String> {
        // --no-optional-locks: `status` must not rewrite the index under a git command the
        // developer runs meanwhile.
        let o = Command::new("git")
            .arg("--no-optional-locks")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(hash) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    // Build again when HEAD moves (checkout, commit: HEAD or the branch's ref changes) or the
    // index does (`git add`, `git commit -a`). A branch whose loose ref was packed has none:
    // packed-refs changes then. Paths come from git because in a worktree HEAD and the index
    // are in .git/worktrees/NAME, the refs in the main .git. Only existing files are named: cargo
    // reruns a build script every time when one of its paths is missing.
    let mut watch = vec!["HEAD".to_string(), "index".into(), "packed-refs".into()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    // Edits not yet staged leave the index as it is: the flag is as of the build script's last
    // run (which the checks above and any change to zdt-ebpf trigger).
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if s.is_empty() => hash,
        Some(_) => format!("{hash}-dirty"),
        None => "unknown".into(),
    }
}
