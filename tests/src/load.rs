//! A load client that classifies every request: ok, http-5xx, other HTTP status, refused, reset,
//! eof, timeout, slow. Raw TCP (not an HTTP library) so that a reset is told from an EOF exactly
//! as the kernel reported it.
use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A request that took at least this long (times [`time_scale`]) counts as slow: a SYN
/// retransmit costs 1 s. A retransmitted SYN is also counted as slow directly (TCP_INFO), so
/// that a slower machine, which needs a larger scale, does not hide one.
pub const SLOW: Duration = Duration::from_secs(1);

/// How much slower than the development machine this one runs the tests: `ZDT_TEST_TIME_SCALE`
/// (a number, default 1). `cargo xtask test --kernel` sets it for a VM under software
/// emulation; the tests stretch their time limits (not their assertions on counts) by it.
pub fn time_scale() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("ZDT_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v >= 1.0)
            .unwrap_or(1.0)
    })
}

/// Whether the tests run under software emulation ([`time_scale`] above 1): the few checks
/// that hold only at the host's pace say so with this.
pub fn emulated() -> bool {
    time_scale() > 1.0
}

/// `d` stretched by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// The rate an open-loop load asked for `rate` req/s really runs at: divided by the square root
/// of [`time_scale`], a compromise: a machine that runs the tests 10 times slower (a VM under
/// emulation) still carries a real load (a third of `rate`), without drowning in requests it
/// cannot serve (SYN drops and timeouts that say nothing about zdt).
pub fn open_rate(rate: f64) -> f64 {
    rate / time_scale().sqrt()
}

/// How many requests an open-loop load asked for `rate` req/s starts in `d`: the unit in which
/// a test states the least load it must have seen, so that the same statement holds on a slower
/// machine, where the rate is lower ([`open_rate`]).
pub fn requests_at(rate: f64, d: Duration) -> u64 {
    (open_rate(rate) * d.as_secs_f64()).round() as u64
}

/// Segments the connection retransmitted so far (tcpi_total_retrans): right after connect(),
/// the SYN's retransmissions. On loopback only a dropped segment makes one.
fn retransmits(s: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: getsockopt fills at most `len` bytes of the tcp_info we pass.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        info.tcpi_total_retrans
    } else {
        0
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    Http5xx,
    HttpOther,
    Refused,
    Reset,
    Eof,
    Timeout,
    /// 200, but after [`SLOW`] (times [`time_scale`]) or more, or after a retransmitted SYN.
    Slow,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Http5xx,
        Outcome::HttpOther,
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Eof,
        Outcome::Timeout,
        Outcome::Slow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Http5xx => "http-5xx",
            Outcome::HttpOther => "http-other",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Eof => "eof",
            Outcome::Timeout => "timeout",
            Outcome::Slow => "slow",
        }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Sample {
    pub outcome: Outcome,
    /// The `x-zdt-version` header of the answer, if any.
    pub version: Option<String>,
    pub latency: Duration,
    /// When the request started.
    pub at: Instant,
    /// With keep-alive: how the request failed on a reused connection before any answer, after
    /// which it was sent again on a new connection (as HTTP clients do for idempotent requests).
    pub retried_from: Option<Outcome>,
}

/// Counts per outcome and per answering version.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub requests: u64,
    pub outcomes: BTreeMap<Outcome, u64>,
    pub versions: BTreeMap<String, u64>,
    /// Keep-alive requests sent a second time after their reused connection closed (not failures).
    pub retried: u64,
    /// Of those, the ones whose first attempt was reset (the kernel sent a RST for them).
    pub retried_after_reset: u64,
}

impl Tally {
    /// Whether this tally's failures stay within `a`.
    pub fn within(&self, a: Allowance) -> bool {
        let slow = self.count(Outcome::Slow);
        self.failures() - slow <= a.failed && slow <= a.slow
    }

    pub fn add(&mut self, s: &Sample) {
        self.requests += 1;
        *self.outcomes.entry(s.outcome).or_default() += 1;
        if let Some(v) = &s.version {
            *self.versions.entry(v.clone()).or_default() += 1;
        }
        self.retried += u64::from(s.retried_from.is_some());
        self.retried_after_reset += u64::from(s.retried_from == Some(Outcome::Reset));
    }

    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }

    /// Everything that is not a timely 200.
    pub fn failures(&self) -> u64 {
        self.requests - self.count(Outcome::Ok)
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    /// Requests per second (open loop), or None for closed loop with `workers` workers.
    pub rate: Option<f64>,
    pub workers: usize,
    /// Reuse connections (HTTP/1.1 keep-alive) instead of one connection per request.
    pub keepalive: bool,
    /// Upper bounds: the run stops at whichever comes first (or when `Progress::stop` is set).
    pub duration: Duration,
    pub max_requests: u64,
    pub request_timeout: Duration,
}

impl LoadSpec {
    /// `n` requests started within a moment (2000/s), each allowed `timeout`: connections that
    /// are meant to wait in a listener's accept queue.
    pub fn burst(addr: SocketAddr, n: u64, timeout: Duration) -> Self {
        let mut s = Self::open(addr, 2000.0, Duration::from_secs(30));
        s.max_requests = n;
        s.request_timeout = timeout;
        s
    }

    /// Open loop at `rate` req/s ([`open_rate`] on a slower machine), new connection per
    /// request, for at most `duration` (stretched by [`time_scale`]: it is an upper bound, and
    /// what a test does under the load takes that much longer).
    pub fn open(addr: SocketAddr, rate: f64, duration: Duration) -> Self {
        let (rate, duration) = (open_rate(rate), scaled(duration));
        LoadSpec {
            addr,
            rate: Some(rate),
            workers: 1,
            keepalive: false,
            duration,
            max_requests: (rate * duration.as_secs_f64() * 2.0) as u64 + 10,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What a running load shares with whoever started it: a flag that ends it early, and how many
/// requests it has completed so far (each counted as it completes).
#[derive(Debug, Default)]
pub struct Progress {
    pub stop: AtomicBool,
    pub done: AtomicU64,
}

impl Progress {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Records one completed request: for the sink at the end of the run, and in the count that
/// [`Background::see`] waits on now.
fn record(samples: &Mutex<Vec<Sample>>, progress: &Progress, s: Sample) {
    samples.lock().unwrap().push(s);
    progress.done.fetch_add(1, Ordering::Relaxed);
}

/// Runs the load on a current-thread runtime in the calling thread (call it from a thread inside
/// the target's network namespace). `progress.stop` ends the run early; every sample goes to
/// `sink` once the run has ended.
pub fn run(spec: &LoadSpec, progress: &Arc<Progress>, sink: &mut dyn FnMut(Sample)) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let deadline = start + spec.duration;
        let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let more = |issued: &std::sync::atomic::AtomicU64| {
            !progress.stopped()
                && Instant::now() < deadline
                && issued.fetch_add(1, Ordering::Relaxed) < spec.max_requests
        };
        match spec.rate {
            Some(rate) if spec.keepalive => {
                // `workers` connections, each sending requests in sequence at its share of the
                // rate (a request that is late is sent at once, then the schedule resumes).
                for _ in 0..spec.workers.max(1) {
                    let (spec, samples, issued, progress) = (
                        spec.clone(),
                        samples.clone(),
                        issued.clone(),
                        progress.clone(),
                    );
                    tasks.spawn(async move {
                        let period = Duration::from_secs_f64(spec.workers.max(1) as f64 / rate);
                        let mut tick = tokio::time::interval(period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        let mut conn = None;
                        while !progress.stopped()
                            && Instant::now() < deadline
                            && issued.fetch_add(1, Ordering::Relaxed) < spec.max_requests
                        {
                            tick.tick().await;
                            let s = one(&spec, &mut conn).await;
                            record(&samples, &progress, s);
                        }
                    });
                }
            }
            Some(rate) => {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while more(&issued) {
                    tick.tick().await;
                    let (spec, samples, progress) =
                        (spec.clone(), samples.clone(), progress.clone());
                    tasks.spawn(async move {
                        let s = one(&spec, &mut None).await;
                        record(&samples, &progress, s);
                    });
                    // Keep the set from growing without bound: reap finished tasks.
                    while tasks.try_join_next().is_some() {}
                }
            }
            None => {
                for _ in 0..spec.workers {
                    let (spec, samples, issued, progress) = (
                        spec.clone(),
                        samples.clone(),
                        issued.clone(),
                        progress.clone(),
                    );
                    tasks.spawn(async move {
                        let mut conn = None;
                        while !progress.stopped()
                            && Instant::now() < deadline
                            && issued.fetch_add(1, Ordering::Relaxed) < spec.max_requests
                        {
                            let s = one(&spec, &mut conn).await;
                            record(&samples, &progress, s);
                        }
                    });
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    });
    for s in samples.lock().unwrap().drain(..) {
        sink(s);
    }
}

/// One request; with keep-alive, reuses `conn` and replaces it after any failure.
async fn one(spec: &LoadSpec, conn: &mut Option<TcpStream>) -> Sample {
    let t = Instant::now();
    let reused = conn.is_some();
    let result = tokio::time::timeout(scaled(spec.request_timeout), exchange(spec, conn)).await;
    let latency = t.elapsed();
    let (outcome, version) = match result {
        Err(_) => (Outcome::Timeout, None),
        Ok(Ok((status, version, syn_retransmitted))) => {
            let o = match status {
                200 if syn_retransmitted || latency >= scaled(SLOW) => Outcome::Slow,
                200 => Outcome::Ok,
                500..=599 => Outcome::Http5xx,
                _ => Outcome::HttpOther,
            };
            (o, version)
        }
        Ok(Err(e)) => (classify(&e), None),
    };
    if outcome != Outcome::Ok && outcome != Outcome::Http5xx {
        *conn = None;
    }
    // A keep-alive connection that the server closed while idle is the normal end of keep-alive:
    // the request was never taken by anyone, so it is retried once on a new connection.
    if reused && matches!(outcome, Outcome::Eof | Outcome::Reset) {
        let mut s = Box::pin(one(spec, conn)).await;
        s.retried_from = Some(outcome);
        s.at = t;
        s.latency = t.elapsed();
        return s;
    }
    Sample {
        outcome,
        version,
        latency,
        at: t,
        retried_from: None,
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Outcome::Reset,
        io::ErrorKind::TimedOut => Outcome::Timeout,
        _ => Outcome::Eof,
    }
}

/// Sends `GET /` and reads one response: (status, x-zdt-version, whether a new connection's
/// SYN had to be retransmitted).
async fn exchange(
    spec: &LoadSpec,
    conn: &mut Option<TcpStream>,
) -> io::Result<(u16, Option<String>, bool)> {
    let mut syn_retransmitted = false;
    if conn.is_none() {
        let s = TcpStream::connect(spec.addr).await?;
        syn_retransmitted = retransmits(&s) > 0;
        s.set_nodelay(true)?;
        *conn = Some(s);
    }
    let stream = conn.as_mut().expect("connected above");
    let req: &[u8] = if spec.keepalive {
        b"GET / HTTP/1.1\r\nHost: zdt\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: zdt\r\nConnection: close\r\n\r\n"
    };
    stream.write_all(req).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a full reply");
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(eof());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(eof)?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(eof());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if !spec.keepalive || header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        *conn = None;
    }
    Ok((status, header("x-zdt-version"), syn_retransmitted))
}

/// How many requests a load must complete after a test's last change before it is stopped: the
/// state the test left behind, seen serving by that many requests ([`Background::finish_after`]).
/// 60: about the 300 ms the tests paused for at 200 req/s, and as many requests, not as long a
/// time, where the load runs slower (under emulation).
pub const AFTER_LAST_CHANGE: u64 = 60;

/// How many requests a load must complete in a state before the test changes it
/// ([`Background::see`]): the state before a deploy (or a kill) seen serving, so that the
/// change happens under load and not as the load starts. 60, as [`AFTER_LAST_CHANGE`].
pub const BEFORE_CHANGE: u64 = 60;

/// The failures a test allows, named at the call site: `failed` requests beyond the slow ones,
/// and `slow` answers (a SYN sent again after 1 s, say). [`Tally::within`] checks them.
#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    pub failed: u64,
    pub slow: u64,
}

/// A load running on its own thread inside a namespace, stopped on demand.
pub struct Background {
    progress: Arc<Progress>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Background {
    pub fn start(ns: &crate::netns::Netns, spec: LoadSpec) -> Self {
        let progress = Arc::new(Progress::default());
        let shared = progress.clone();
        let handle = ns.spawn_thread(move || {
            let mut out = Vec::new();
            run(&spec, &shared, &mut |s| out.push(s));
            out
        });
        Background { progress, handle }
    }

    pub fn finish(self) -> Vec<Sample> {
        self.progress.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }

    /// Stops the load once it has completed `n` more requests than when called: a wait for
    /// the event (the current state seen by `n` requests), not for a time. Within 10 s,
    /// stretched by the time scale; a load that gets there slower is stopped then, and the
    /// test's own counts say so.
    pub fn finish_after(self, n: u64) -> Vec<Sample> {
        self.see(n);
        self.finish()
    }

    /// The requests this load has completed so far.
    pub fn completed(&self) -> u64 {
        self.progress.done.load(Ordering::Relaxed)
    }

    /// Returns once the load has completed `n` more requests than when called, leaving it
    /// running: the current state seen by `n` requests before the test's next step (within
    /// 10 s, stretched by the time scale, as [`Background::finish_after`]).
    pub fn see(&self, n: u64) {
        let target = self.completed() + n;
        let deadline = std::time::Instant::now() + scaled(Duration::from_secs(10));
        while self.completed() < target
            && std::time::Instant::now() < deadline
            && !self.handle.is_finished()
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `n` requests to `port` on 127.0.0.1, one new connection each, at `rate` per second, from a
/// thread inside `ns`; waits for all of them.
pub fn requests(ns: &crate::netns::Netns, port: u16, n: u64, rate: f64) -> Tally {
    let mut spec = LoadSpec::open(([127, 0, 0, 1], port).into(), rate, Duration::from_secs(60));
    spec.max_requests = n;
    let samples = ns
        .run(move || {
            let mut out = Vec::new();
            run(&spec, &Arc::default(), &mut |s| out.push(s));
            out
        })
        .expect("load thread");
    tally(&samples)
}

pub fn tally(samples: &[Sample]) -> Tally {
    let mut t = Tally::default();
    for s in samples {
        t.add(s);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        harness::{App, AppOpts},
        netns::Netns,
    };

    /// A running load counts each request as it completes: `see` and `finish_after` wait on
    /// that count. Counted only when the run ended, it stays 0 while the load runs, and every
    /// such wait lasts its whole deadline instead of ending at the event.
    #[test]
    fn a_running_load_counts_its_requests_as_they_complete() -> anyhow::Result<()> {
        let ns = Netns::new()?;
        let _app = App::start(&ns, &AppOpts::new(8080, "v1"))?;
        let spec = LoadSpec::open(
            ([127, 0, 0, 1], 8080).into(),
            200.0,
            Duration::from_secs(30),
        );
        let l = Background::start(&ns, spec);
        l.see(BEFORE_CHANGE);
        let seen = l.completed();
        let t = tally(&l.finish_after(AFTER_LAST_CHANGE));
        assert!(
            seen >= BEFORE_CHANGE,
            "{seen} completed while running; {t:?}"
        );
        assert!(t.requests >= seen + AFTER_LAST_CHANGE, "{seen} then {t:?}");
        assert_eq!(t.failures(), 0, "{t:?}");
        Ok(())
    }
}
