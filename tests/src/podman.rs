//! Containers for tests/tests/containers.rs: Debian's podman, with an image imported from a
//! Debian root (no registry is reachable), running the demo service mounted from the build.
//!
//! Every podman command names runc and cgroupfs: podman's default runtime (crun) fails on these
//! machines ("cgroups in hybrid mode not supported"); and sets the containers' open-files limit
//! below the machine's hard limit (20000), which podman's default would exceed.
use std::{
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{ensure, Context as _};

use crate::{debian, harness::bin, netns::Netns};

/// The image every container runs: a Debian root of the host's release (its libc is the one
/// the demo service was linked against), imported once.
const IMAGE: &str = "localhost/zdt-test-debian:latest";
const GLOBAL: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

/// podman's configuration for these tests: the containers' (and pods' infra containers')
/// resource limits, within the machine's hard limits (podman's defaults exceed them, and its
/// pods take no `--ulimit`).
const CONTAINERS_CONF: &str = "[containers]
default_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]
";

/// `podman GLOBAL ARGS`, inside `ns` when given (`--network host` is then that namespace).
pub fn podman(ns: Option<&Netns>, args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(GLOBAL).args(args);
    configured(cmd, ns)
}

/// `cmd` (podman, or a tool that runs it) with this module's podman configuration, stdin
/// closed, inside `ns` when given.
fn configured(mut cmd: Command, ns: Option<&Netns>) -> Command {
    static CONF: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("zdt-containers-{}.conf", std::process::id()));
        std::fs::write(&path, CONTAINERS_CONF).expect("writing podman's configuration");
        path
    });
    cmd.stdin(Stdio::null()).env("CONTAINERS_CONF", conf);
    if let Some(ns) = ns {
        ns.command(&mut cmd);
    }
    cmd
}

/// A compose project run by podman-compose (from the venv `cargo xtask test` names in
/// ZDT_COMPOSE_VENV): `compose.yaml` in a directory of its own,
/// whose services run the demo service (`/app`, mounted read-only) from [`IMAGE`]. Its
/// containers and pod are removed when dropped.
pub struct Compose {
    dir: std::path::PathBuf,
    pub project: String,
}

impl Compose {
    /// The project of `examples/compose.yaml`, as it is but for what only the example can
    /// leave open: each service's image is [`IMAGE`] with the demo service mounted at `/app`,
    /// its command runs `/app` in place of `app`, and `extra` (service, arguments) adds the
    /// demo service's arguments (its version, a warm-up). Everything else (the services,
    /// `network_mode`, ports, the stop grace) is the example's, so that the suite deploys what
    /// the docs show.
    pub fn example(extra: &[(&str, Vec<String>)]) -> anyhow::Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/compose.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let yaml = Self::localized(&text, extra)
            .with_context(|| format!("adapting {}", path.display()))?;
        let project = unique("compose").replace('-', "_");
        let dir = std::env::temp_dir().join(&project);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("compose.yaml"), yaml)?;
        Ok(Compose { dir, project })
    }

    fn localized(text: &str, extra: &[(&str, Vec<String>)]) -> anyhow::Result<String> {
        let app = bin("zdt-demo-app");
        let mut service = None;
        let mut out = String::new();
        for line in text.lines() {
            let indent = line.len() - line.trim_start().len();
            let body = line.trim_start();
            if indent == 2 && body.ends_with(':') {
                service = Some(body.trim_end_matches(':').to_string());
            }
            if indent == 4 && body.starts_with("image:") {
                out += &format!(
                    "    image: {IMAGE}\n    volumes:\n      - {}:/app:ro\n",
                    app.display()
                );
                continue;
            }
            if let Some(list) = body.strip_prefix("command:").filter(|_| indent == 4) {
                // A flow sequence of quoted strings: the same text as a JSON array.
                let mut argv: Vec<String> = serde_json::from_str(list.trim())
                    .with_context(|| format!("the command {list:?}"))?;
                anyhow::ensure!(argv.first().is_some_and(|a| a == "app"), "{line:?}");
                argv[0] = "/app".into();
                let name = service.as_deref().unwrap_or_default();
                if let Some((_, args)) = extra.iter().find(|(s, _)| *s == name) {
                    argv.extend(args.iter().cloned());
                }
                out += &format!("    command: {}\n", serde_json::to_string(&argv)?);
                continue;
            }
            out += line;
            out.push('\n');
        }
        Ok(out)
    }

    /// `podman-compose ARGS` in the project (podman's global flags passed through), inside
    /// `ns` when given (`network_mode: host` is then that namespace).
    pub fn run(&self, ns: Option<&Netns>, args: &[&str]) -> anyhow::Result<String> {
        let venv = std::env::var_os("ZDT_COMPOSE_VENV").context(
            "ZDT_COMPOSE_VENV is unset: run this suite with `cargo xtask test --suite containers`",
        )?;
        let mut cmd = Command::new(std::path::Path::new(&venv).join("bin/podman-compose"));
        cmd.current_dir(&self.dir)
            .args(["-p", &self.project, "-f", "compose.yaml"])
            .args(["--podman-args", &GLOBAL.join(" ")])
            .args(args);
        output(configured(cmd, ns))
    }

    /// The container podman-compose made for `service`.
    pub fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    /// The service's pid as the host sees it (the container's pid 1).
    pub fn pid(&self, service: &str) -> anyhow::Result<i32> {
        inspect(&self.container(service), "{{.State.Pid}}")
    }

    /// The exit code of `service`'s container, once it has stopped.
    pub fn exit_code(&self, service: &str) -> anyhow::Result<i32> {
        inspect(&self.container(service), "{{.State.ExitCode}}")
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(None, &["down", "-t", "0"]);
        drop(PodGuard(format!("pod_{}", self.project)));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs podman and returns its stdout, trimmed; Err with its stderr when it fails.
fn output(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .context("running podman (from `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "{cmd:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The image, imported from the cached Debian root when podman does not have it yet.
pub fn image() -> anyhow::Result<&'static str> {
    let exists = podman(None, &["image", "exists", IMAGE]).status()?;
    if !exists.success() {
        let tar = debian::root_tarball(&[])?;
        output(podman(None, &["import", &tar.to_string_lossy(), IMAGE]))?;
    }
    Ok(IMAGE)
}

/// A number field of `container` (`podman inspect --format FORMAT`): its pid, its exit code.
fn inspect(container: &str, format: &str) -> anyhow::Result<i32> {
    output(podman(None, &["inspect", "--format", format, container]))?
        .parse()
        .with_context(|| format!("{format} of container {container}"))
}

/// A name no other test's container or pod has.
fn unique(what: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!(
        "zdt-{what}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pod whose network namespace its containers share: `--network none` gives it one of its own
/// with only loopback. Removed, with its containers, when dropped.
pub struct Pod {
    pub name: String,
    /// The pod's network namespace (its infra container's), where zdt-ctl and the load run.
    pub ns: Netns,
}

impl Pod {
    pub fn create() -> anyhow::Result<Pod> {
        let name = unique("pod");
        output(podman(
            None,
            &["pod", "create", "--name", &name, "--network", "none"],
        ))?;
        let pod = PodGuard(name.clone());
        // The infra container holds the namespace; it runs from the pod's start.
        output(podman(None, &["pod", "start", &name]))?;
        let infra = output(podman(
            None,
            &["pod", "inspect", "--format", "{{.InfraContainerID}}", &name],
        ))?;
        let pid = inspect(&infra, "{{.State.Pid}}")?;
        let ns = Netns::of_process(pid)?;
        std::mem::forget(pod);
        Ok(Pod { name, ns })
    }
}

struct PodGuard(String);

impl Drop for PodGuard {
    fn drop(&mut self) {
        let _ = podman(None, &["pod", "rm", "--force", "--time", "0", &self.0]).output();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        drop(PodGuard(self.name.clone()));
    }
}

/// Where a container's network namespace comes from.
pub enum Network<'a> {
    /// `--network host` in the test's namespace: the container uses it as its own.
    Host(&'a Netns),
    /// `--pod NAME`: the pod's namespace.
    Pod(&'a Pod),
}

/// A container running the demo service (`zdt-demo-app APP_ARGS`, mounted read-only at /app).
/// Removed (killed if still running) when dropped.
pub struct Container {
    pub name: String,
    /// The service's pid as the host sees it (the container's pid 1): what `promote` takes.
    pub pid: i32,
}

impl Container {
    pub fn run(net: Network<'_>, app_args: &[&str]) -> anyhow::Result<Container> {
        let name = unique("app");
        let app = format!("{}:/app:ro", bin("zdt-demo-app").display());
        let mut args = vec!["run", "--detach", "--name", &name];
        let ns = match &net {
            Network::Host(ns) => {
                args.extend(["--network", "host"]);
                Some(*ns)
            }
            Network::Pod(pod) => {
                args.extend(["--pod", &pod.name]);
                None
            }
        };
        args.extend(["--volume", &app, IMAGE, "/app"]);
        args.extend(app_args);
        output(podman(ns, &args))?;
        // Removed on drop from here on, also when the pid cannot be read.
        let mut c = Container { name, pid: 0 };
        c.pid = inspect(&c.name, "{{.State.Pid}}")?;
        Ok(c)
    }

    /// `podman stop --time SECS`: SIGTERM, then SIGKILL after SECS; Ok once it has stopped.
    pub fn stop(&self, time: Duration) -> anyhow::Result<()> {
        let secs = time.as_secs().max(1).to_string();
        output(podman(None, &["stop", "--time", &secs, &self.name]))?;
        Ok(())
    }

    /// The container's exit code, once it has stopped.
    pub fn exit_code(&self) -> anyhow::Result<i32> {
        inspect(&self.name, "{{.State.ExitCode}}")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(None, &["rm", "--force", "--time", "0", &self.name]).output();
    }
}
