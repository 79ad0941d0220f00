//! UDP request/response load for the UDP suite: flows (client sockets) that each send a request,
//! wait for its answer and send the next, as a QUIC client's connection keeps its 4-tuple. Each
//! answer says which process sent it (`PID STATE PAYLOAD`, see zdt-udp-echo), so the load can
//! tell a flow that stayed with its process from one the group moved, and a process that was not
//! ready from one that was.
use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{harness::Proc, load::scaled, netns::Netns};

/// What the flows saw, all of them together.
#[derive(Debug, Default, Clone)]
pub struct UdpTally {
    /// Requests sent, and answered.
    pub sent: u64,
    pub answered: u64,
    /// Requests with no answer within the timeout (the datagram or its answer was lost).
    pub lost: u64,
    /// Answers from another process than the one that answered the flow before: the group sent
    /// the flow's datagram elsewhere.
    pub moved: u64,
    /// Answers from a process still warming up: a datagram reached a process before it was ready.
    pub warming: u64,
    /// Answers that told the flow to move on (the process is stopping): the flow ends and a new
    /// one starts, as a QUIC client does on GOAWAY.
    pub byes: u64,
    /// Flows started (each a new client socket: a new 4-tuple).
    pub flows: u64,
    /// The longest a flow waited for an answer that came.
    pub slowest: Duration,
    /// Processes that answered.
    pub pids: std::collections::BTreeSet<u32>,
    /// Datagrams the namespace's UDP sockets dropped over the run because their receive buffer
    /// was full (the kernel's RcvbufErrors): the app did not read fast enough, which happens
    /// under emulation and is no handover's doing. Filled in by the test that counts them.
    pub buffer_drops: u64,
}

impl UdpTally {
    /// Requests that failed: lost, moved, or answered by a process that was not ready.
    pub fn failed(&self) -> u64 {
        self.lost + self.moved + self.warming
    }

    /// [`UdpTally::failed`], less the losses a full receive buffer accounts for
    /// ([`UdpTally::buffer_drops`]): what the handovers cost.
    pub fn failed_by_handover(&self) -> u64 {
        self.lost.saturating_sub(self.buffer_drops) + self.moved + self.warming
    }
}

/// A running UDP load.
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<UdpTally>>,
    answered: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// `flows` flows at once against `target`, each sending a request every `interval` and starting
/// over as a new flow after `renew` requests (new flows keep arriving) or when told to move on.
/// Flows alternate between IPv4 and IPv6 clients when `target` is a dual-stack port on loopback
/// (`127.0.0.1` / `::1`).
pub fn start(ns: &Netns, port: u16, flows: usize, interval: Duration, renew: u64) -> UdpLoad {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(UdpTally::default()));
    let answered = Arc::new(AtomicU64::new(0));
    let threads = (0..flows)
        .map(|i| {
            let target: SocketAddr = if i % 2 == 0 {
                ([127, 0, 0, 1], port).into()
            } else {
                (std::net::Ipv6Addr::LOCALHOST, port).into()
            };
            let (stop, tally, answered) = (stop.clone(), tally.clone(), answered.clone());
            ns.spawn_thread(move || flow_loop(i, target, interval, renew, &stop, &tally, &answered))
        })
        .collect();
    UdpLoad {
        stop,
        tally,
        answered,
        threads,
    }
}

fn flow_loop(
    i: usize,
    target: SocketAddr,
    interval: Duration,
    renew: u64,
    stop: &AtomicBool,
    tally: &Mutex<UdpTally>,
    answered: &AtomicU64,
) {
    let timeout = scaled(Duration::from_secs(1));
    let mut local = UdpTally::default();
    let mut seq: u64 = 0;
    'flows: while !stop.load(Ordering::Relaxed) {
        let any: SocketAddr = if target.is_ipv4() {
            ([127, 0, 0, 1], 0).into()
        } else {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        };
        let Ok(s) = UdpSocket::bind(any) else {
            std::thread::sleep(interval);
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        local.flows += 1;
        let mut owner: Option<u32> = None;
        for _ in 0..renew {
            if stop.load(Ordering::Relaxed) {
                break 'flows;
            }
            seq += 1;
            let request = format!("flow-{i} {seq}");
            let sent_at = Instant::now();
            if s.send_to(request.as_bytes(), target).is_err() {
                local.sent += 1;
                local.lost += 1;
                std::thread::sleep(interval);
                continue;
            }
            local.sent += 1;
            let mut buf = [0u8; 2048];
            let answer = loop {
                if sent_at.elapsed() > timeout {
                    break None;
                }
                let Ok((n, _)) = s.recv_from(&mut buf) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                // A late answer to an earlier request of this flow is not this one's.
                if text.ends_with(&request) {
                    break Some(text);
                }
            };
            let Some(answer) = answer else {
                local.lost += 1;
                continue;
            };
            local.answered += 1;
            answered.fetch_add(1, Ordering::Relaxed);
            local.slowest = local.slowest.max(sent_at.elapsed());
            let mut words = answer.split(' ');
            let pid: u32 = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let state = words.next().unwrap_or("");
            local.pids.insert(pid);
            if owner.is_some_and(|o| o != pid) {
                local.moved += 1;
            }
            owner = Some(pid);
            match state {
                "warming" => local.warming += 1,
                "bye" => {
                    local.byes += 1;
                    continue 'flows;
                }
                _ => {}
            }
            std::thread::sleep(interval.saturating_sub(sent_at.elapsed()));
        }
    }
    let mut t = tally.lock().expect("tally");
    t.sent += local.sent;
    t.answered += local.answered;
    t.lost += local.lost;
    t.moved += local.moved;
    t.warming += local.warming;
    t.byes += local.byes;
    t.flows += local.flows;
    t.slowest = t.slowest.max(local.slowest);
    t.pids.extend(local.pids);
}

impl UdpLoad {
    /// Answers so far, all flows together.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests were answered (bounded by a scaled 10 s): the load has
    /// seen the state that is there now.
    pub fn see(&self, n: u64) {
        let start = self.answered();
        let deadline = Instant::now() + scaled(Duration::from_secs(10));
        while self.answered() < start + n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(self) -> UdpTally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let t = self.tally.lock().expect("tally").clone();
        t
    }
}

/// A zdt-udp-echo process.
pub struct Echo {
    pub process: Proc,
    /// Its admin port (/readyz), on loopback.
    pub admin: SocketAddr,
}

impl Echo {
    /// Starts one on `port` (or on the socket `zdt-ctl exec` passes, when `exec` names the
    /// `--listen` spec) that warms up for `warmup`, and waits until it is bound.
    pub fn start(
        ns: &Netns,
        port: u16,
        warmup: Duration,
        exec: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Echo> {
        use anyhow::Context as _;
        use std::io::BufRead as _;
        let echo = crate::harness::bin("zdt-udp-echo");
        let mut cmd = match exec {
            Some(spec) => {
                let mut c = std::process::Command::new(crate::harness::bin("zdt-ctl"));
                c.args(["exec", "--listen", spec, "--"]).arg(&echo);
                c
            }
            None => std::process::Command::new(&echo),
        };
        cmd.args(["--port", &port.to_string()])
            .args(["--warmup", &format!("{}ms", warmup.as_millis())])
            .args(extra)
            .stdout(std::process::Stdio::piped());
        ns.command(&mut cmd);
        let mut child = cmd.spawn().context("starting zdt-udp-echo")?;
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut admin = None;
        for line in lines.by_ref() {
            let line = line?;
            if let Some(a) = line.strip_prefix("admin=") {
                admin = Some(a.parse()?);
            }
            if line.starts_with("bound=") {
                break;
            }
        }
        // The rest of its output (its exit line) is not needed; keep the pipe drained.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Echo {
            process: Proc::new(child),
            admin: admin.context("zdt-udp-echo printed no admin address")?,
        })
    }

    /// Its readiness URL.
    pub fn readyz(&self) -> String {
        format!("http://{}/readyz", self.admin)
    }
}

impl std::ops::Deref for Echo {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.process
    }
}

impl std::ops::DerefMut for Echo {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.process
    }
}
