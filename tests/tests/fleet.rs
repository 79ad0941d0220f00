//! A fleet rolled by Ansible: the collection in ansible/ (modules around zdt-ctl, the
//! `zdt_deploy` role, the deploy and rollback playbooks) against three hosts, each a Debian root
//! booted with systemd by systemd-nspawn in a network namespace of its own, with sshd, its own
//! zdt and its own service. Ansible (ansible-core from PyPI; Debian's 2.14 for a smoke play)
//! reaches them over ssh from the test's namespace, as a deploy host reaches its servers, while a
//! load client there sends requests to every host's port 80.
//!
//! What it holds: a `serial: 1` rollout loses no request on any host; a release that never gets
//! ready stops the rollout on its first host (`max_fail_percentage: 0`) and every host keeps
//! serving the release before, again with no failed request; the rollback playbook brings every
//! host back; deploying what already runs changes nothing; the collection is ansible-lint clean.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use zdt_tests::{
    debian,
    harness::{bin, print_tally},
    load::{self, Background, LoadSpec, Tally},
    netns::Netns,
    nspawn::{self, Host},
};

const HOSTS: u8 = 3;
const PORT: u16 = 80;
/// Requests per second to each host, new connection per request.
const RATE: f64 = 40.0;
/// Where each host serves zdt's counters for Prometheus (the role's zdt-metrics.service).
const METRICS: u16 = 9814;
/// The service's name on the hosts: units demo@8081 and demo@8082, releases in /opt/demo.
const APP: &str = "demo";

/// The collection's root for ANSIBLE_COLLECTIONS_PATH (ansible/ansible_collections/zdt/zdt).
fn collections() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible")
}

/// Where setup installed ansible-core and ansible-lint from PyPI (`cargo xtask test` says).
fn venv() -> PathBuf {
    std::env::var_os("ZDT_ANSIBLE_VENV")
        .map(PathBuf::from)
        .expect("ZDT_ANSIBLE_VENV is unset: run this suite with `cargo xtask test --suite fleet`")
}

struct Fleet {
    lab: Netns,
    hosts: Vec<Host>,
    dir: PathBuf,
}

impl Fleet {
    fn boot() -> anyhow::Result<Fleet> {
        let image = debian::root_tarball(&nspawn::IMAGE)?;
        let dir = std::env::temp_dir().join(format!("zdt-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("id_ed25519");
        debian::run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
        )?;
        let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;
        let lab = Netns::new()?;
        let mut hosts = Vec::new();
        for n in 1..=HOSTS {
            hosts.push(Host::boot(&image, n, &lab, &pubkey)?);
        }
        let mut inventory = String::from("[fleet]\n");
        for (n, h) in (1..).zip(&hosts) {
            inventory += &format!("h{n} ansible_host={}\n", h.addr);
        }
        inventory += &format!(
            "[fleet:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
             ansible_python_interpreter=/usr/bin/python3\n",
            key.display()
        );
        std::fs::write(dir.join("inventory"), inventory)?;
        // A release that never gets ready: the demo service whose /readyz never answers.
        std::fs::write(
            dir.join("never-ready"),
            format!("#!/bin/sh\nexec /opt/{APP}/releases/v1/{APP} \"$@\" --readyz-mode hang\n"),
        )?;
        debian::run(
            Command::new("chmod")
                .arg("755")
                .arg(dir.join("never-ready")),
        )?;
        Ok(Fleet { lab, hosts, dir })
    }

    /// The variables every deploy passes: the same service, unit and timing each time.
    fn vars(&self) -> serde_json::Value {
        serde_json::json!({
            "zdt_deploy_app": APP,
            "zdt_deploy_deb": debian::deb().expect("the package").display().to_string(),
            "zdt_deploy_app_args": "--port 80 --admin-port %i --version ${RELEASE} --warmup 1s",
            "zdt_deploy_probation": "2s",
            "zdt_deploy_metrics_listen": format!(":{METRICS}"),
            "zdt_deploy_timeout": format!("{}s", load::scaled(Duration::from_secs(10)).as_secs()),
        })
    }

    fn release(&self, release: &str, artifact: &Path) -> serde_json::Value {
        let mut v = self.vars();
        v["zdt_deploy_app_release"] = release.into();
        v["zdt_deploy_app_artifact"] = artifact.display().to_string().into();
        v
    }

    /// Runs `ansible-playbook PLAYBOOK` from `bin_dir` in the lab against the fleet with
    /// `vars`: whether it succeeded, and its output.
    fn play(&self, bin_dir: &Path, playbook: &str, vars: &serde_json::Value) -> (bool, String) {
        self.play_with(bin_dir, playbook, vars, &[])
    }

    fn play_with(
        &self,
        bin_dir: &Path,
        playbook: &str,
        vars: &serde_json::Value,
        flags: &[&str],
    ) -> (bool, String) {
        let mut c = Command::new(bin_dir.join("ansible-playbook"));
        c.args(flags)
            .arg("-i")
            .arg(self.dir.join("inventory"))
            .arg("-e")
            .arg(vars.to_string())
            .arg(playbook)
            .env("ANSIBLE_COLLECTIONS_PATH", collections())
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("tmp"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", self.dir.join("cp"))
            .env(
                "ANSIBLE_SSH_ARGS",
                "-o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null",
            )
            .stdin(Stdio::null());
        self.lab.command(&mut c);
        let out = c.output().expect("ansible-playbook");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Load on every host's port, from the lab.
    fn load(&self) -> Vec<Background> {
        self.hosts
            .iter()
            .map(|h| {
                let spec = LoadSpec::open((h.addr, PORT).into(), RATE, Duration::from_secs(600));
                Background::start(&self.lab, spec)
            })
            .collect()
    }

    /// Stops the loads; each host's tally, printed, with 0 failed requests asserted.
    fn finish(&self, loads: Vec<Background>, what: &str) -> Vec<Tally> {
        let tallies: Vec<Tally> = loads
            .into_iter()
            .map(|l| load::tally(&l.finish()))
            .collect();
        for (h, t) in self.hosts.iter().zip(&tallies) {
            print_tally(&format!("{what}: {}", h.name), t);
        }
        for (h, t) in self.hosts.iter().zip(&tallies) {
            assert_eq!(
                t.failures(),
                0,
                "{what}: {} failed requests on {}",
                t.failures(),
                h.name
            );
            assert!(t.requests > 0, "{what}: no request reached {}", h.name);
        }
        tallies
    }

    /// The releases that answer 20 new connections to each host's port.
    fn serving(&self) -> Vec<Vec<String>> {
        self.hosts
            .iter()
            .map(|h| {
                let spec = LoadSpec::burst((h.addr, PORT).into(), 20, Duration::from_secs(5));
                let samples = self
                    .lab
                    .run(move || {
                        let mut out = Vec::new();
                        load::run(&spec, &Default::default(), &mut |s| out.push(s));
                        out
                    })
                    .expect("load thread");
                let t = load::tally(&samples);
                assert_eq!(t.failures(), 0, "requests to {} failed", h.name);
                t.versions.keys().cloned().collect()
            })
            .collect()
    }

    fn assert_serving(&self, release: &str, when: &str) {
        for (h, versions) in self.hosts.iter().zip(self.serving()) {
            assert_eq!(
                versions,
                [release],
                "{when}: {} answers as {versions:?}",
                h.name
            );
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.hosts.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn must(ok_out: (bool, String), what: &str) -> String {
    let (ok, out) = ok_out;
    assert!(ok, "{what} failed:\n{out}");
    out
}

/// The PLAY RECAP's `changed=N` of `host`.
fn changed(out: &str, host: &str) -> Option<u32> {
    let line = out
        .lines()
        .skip_while(|l| !l.starts_with("PLAY RECAP"))
        .find(|l| l.split_whitespace().next() == Some(host))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("changed="))
        .and_then(|n| n.parse().ok())
}

#[test]
fn a_rolling_deploy_over_three_hosts_loses_nothing_and_stops_at_a_bad_release() {
    let fleet = Fleet::boot().expect("booting the fleet");
    let venv_bin = venv().join("bin");
    let app = bin("zdt-demo-app");

    // The first deploy: zdt installed from its package, :80 attached, v1 started and promoted.
    let out = must(
        fleet.play(&venv_bin, "zdt.zdt.deploy", &fleet.release("v1", &app)),
        "the first deploy",
    );
    println!("first deploy:\n{}", recap(&out));
    fleet.assert_serving("v1", "after the first deploy");

    // Every host serves its counters where a Prometheus server scrapes them.
    for h in &fleet.hosts {
        let body = scrape(&fleet.lab, (h.addr, METRICS).into());
        assert!(
            body.contains("zdt_attached{port=\"80\"} 1"),
            "{}'s metrics on :{METRICS}:\n{body}",
            h.name
        );
    }

    // Check mode says what a deploy would change, and changes nothing.
    let out = must(
        fleet.play_with(
            &venv_bin,
            "zdt.zdt.deploy",
            &fleet.release("v2", &app),
            &["--check"],
        ),
        "the deploy of v2 in check mode",
    );
    for (n, h) in (1..).zip(&fleet.hosts) {
        assert!(
            changed(&out, &format!("h{n}")).is_some_and(|c| c > 0),
            "check mode reported no change on h{n}:\n{out}"
        );
        assert!(
            !h.file("opt/demo/releases/v2").exists(),
            "check mode shipped v2"
        );
    }
    fleet.assert_serving("v1", "after the deploy in check mode");

    // Debian 12's own ansible-core (2.14) runs the modules too: status as facts, a promote of
    // the active process changes nothing, and zdt's refusal comes back with its exit code.
    let debian = Command::new("/usr/bin/ansible-playbook")
        .arg("--version")
        .output()
        .expect("Debian's ansible-playbook");
    let debian = String::from_utf8_lossy(&debian.stdout);
    assert!(debian.contains("[core 2.14."), "{debian}");
    let smoke = fleet.dir.join("smoke.yml");
    std::fs::write(&smoke, SMOKE).unwrap();
    let out = must(
        fleet.play(
            Path::new("/usr/bin"),
            &smoke.to_string_lossy(),
            &serde_json::json!({}),
        ),
        "the smoke play with Debian's ansible-core",
    );
    for h in 1..=HOSTS {
        assert_eq!(
            changed(&out, &format!("h{h}")),
            Some(0),
            "smoke play:\n{out}"
        );
    }

    // v2, host by host, under load on every host.
    let loads = fleet.load();
    let out = must(
        fleet.play(&venv_bin, "zdt.zdt.deploy", &fleet.release("v2", &app)),
        "the rollout of v2",
    );
    let tallies = fleet.finish(loads, "rollout of v2");
    println!("rollout of v2:\n{}", recap(&out));
    for (h, t) in fleet.hosts.iter().zip(&tallies) {
        assert!(
            t.versions.contains_key("v1") && t.versions.contains_key("v2"),
            "{} was not handed over under load: {:?}",
            h.name,
            t.versions
        );
    }
    fleet.assert_serving("v2", "after the rollout of v2");

    // v3 never gets ready: the rollout stops on its first host, which keeps v2, as do the others.
    let loads = fleet.load();
    let never = fleet.dir.join("never-ready");
    let mut bad = fleet.release("v3", &never);
    bad["zdt_deploy_timeout"] =
        format!("{}s", load::scaled(Duration::from_secs(3)).as_secs()).into();
    let (ok, out) = fleet.play(&venv_bin, "zdt.zdt.deploy", &bad);
    fleet.finish(loads, "rollout of a release never ready");
    println!("rollout of v3 (never ready):\n{}", recap(&out));
    assert!(
        !ok,
        "the rollout of a release never ready succeeded:\n{out}"
    );
    assert!(
        out.contains("v3 was not deployed on h1") && out.contains("readiness-timeout"),
        "the failure does not say what happened:\n{out}"
    );
    assert!(fleet.hosts[0].file("opt/demo/releases/v3").exists());
    for h in &fleet.hosts[1..] {
        assert!(
            !h.file("opt/demo/releases/v3").exists(),
            "the rollout went on to {} after h1 failed:\n{out}",
            h.name
        );
    }
    fleet.assert_serving("v2", "after the failed rollout");

    // The rollback playbook: every host back to the release before its last deploy, v1.
    let loads = fleet.load();
    let out = must(
        fleet.play(&venv_bin, "zdt.zdt.rollback", &fleet.vars()),
        "the rollback playbook",
    );
    fleet.finish(loads, "rollback");
    println!("rollback:\n{}", recap(&out));
    fleet.assert_serving("v1", "after the rollback");

    // Deploying what runs changes nothing on any host.
    let out = must(
        fleet.play(&venv_bin, "zdt.zdt.deploy", &fleet.release("v1", &app)),
        "deploying v1 again",
    );
    for h in 1..=HOSTS {
        assert_eq!(
            changed(&out, &format!("h{h}")),
            Some(0),
            "deploying the serving release changed something:\n{out}"
        );
    }
    fleet.assert_serving("v1", "after deploying v1 again");
}

/// GET /metrics on `addr`, from `lab`: the body.
fn scrape(lab: &Netns, addr: std::net::SocketAddr) -> String {
    lab.run(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    })
    .expect("scrape thread")
}

/// The PLAY RECAP and the lines of failed tasks of an ansible-playbook run.
fn recap(out: &str) -> String {
    out.lines()
        .filter(|l| l.starts_with("fatal:") || l.contains("FAILED"))
        .chain(out.lines().skip_while(|l| !l.starts_with("PLAY RECAP")))
        .collect::<Vec<_>>()
        .join("\n")
}

const SMOKE: &str = r#"---
- name: Smoke
  hosts: fleet
  gather_facts: false
  tasks:
    - name: Read zdt's state as facts
      zdt.zdt.status:
    - name: One process serves :80
      ansible.builtin.assert:
        that: zdt_ports['80'].members | selectattr('role', 'eq', 'active') | list | length == 1
    - name: Promote the active process again
      zdt.zdt.promote:
        pid: "{{ (zdt_ports['80'].members | selectattr('role', 'eq', 'active') | first).pid }}"
        no_readyz: true
      register: again
    - name: Nothing changed
      ansible.builtin.assert:
        that: not again.changed
    - name: Promote pid 1, which zdt refuses
      zdt.zdt.promote:
        pid: 1
        no_readyz: true
      register: refused
      failed_when: false
    - name: The refusal carries zdt-ctl's exit code
      ansible.builtin.assert:
        that:
          - refused.rc == 2
          - refused.zdt_error == 'bad-input'
          - "'pid 1' in refused.msg"
"#;

#[test]
fn the_collection_is_ansible_lint_clean_and_documented() {
    let dir = collections().join("ansible_collections/zdt/zdt");
    let venv_bin = venv().join("bin");
    let out = Command::new(venv_bin.join("ansible-lint"))
        .args(["--offline", "-f", "pep8"])
        .current_dir(&dir)
        .env("ANSIBLE_COLLECTIONS_PATH", collections())
        .env("NO_COLOR", "1")
        .output()
        .expect("ansible-lint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ansible-lint:\n{text}");
    // The collection builds into the tarball that `ansible-galaxy collection install` takes.
    let out_dir = std::env::temp_dir().join(format!("zdt-galaxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let built = Command::new(venv_bin.join("ansible-galaxy"))
        .args(["collection", "build", "--output-path"])
        .arg(&out_dir)
        .arg(&dir)
        .output()
        .expect("ansible-galaxy");
    assert!(
        built.status.success(),
        "ansible-galaxy collection build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let tarball = out_dir.join("zdt-zdt-0.1.0.tar.gz");
    let listed = debian::run(Command::new("tar").arg("-tzf").arg(&tarball)).expect("tar -t");
    std::fs::remove_dir_all(&out_dir).unwrap();
    for file in [
        "plugins/modules/promote.py",
        "plugins/module_utils/zdt.py",
        "roles/zdt_deploy/tasks/main.yml",
        "playbooks/deploy.yml",
        "playbooks/rollback.yml",
    ] {
        assert!(
            listed.contains(file),
            "{file} is not in {}:\n{listed}",
            tarball.display()
        );
    }
    for (kind, name) in [
        ("module", "zdt.zdt.attach"),
        ("module", "zdt.zdt.promote"),
        ("module", "zdt.zdt.rollback"),
        ("module", "zdt.zdt.status"),
        ("role", "zdt.zdt.zdt_deploy"),
    ] {
        let out = Command::new(venv_bin.join("ansible-doc"))
            .args(["-t", kind, name])
            .env("ANSIBLE_COLLECTIONS_PATH", collections())
            .output()
            .expect("ansible-doc");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(name.rsplit('.').next().unwrap()),
            "ansible-doc -t {kind} {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
