//! Asking a process's readiness endpoint (`/readyz`): waiting for 200 before a switch, and
//! watching it during probation after one.
use std::time::{Duration, Instant};

use crate::error::{bad_input, err, Kind};

/// How often the URL is asked, and how long one answer may take.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks a readiness URL before anything is waited for, so a typo fails at once.
pub fn check_url(url: &str) -> anyhow::Result<reqwest::Url> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        bad_input(format!(
            "invalid readiness URL {url:?}: {e}; write it like http://127.0.0.1:8081/readyz"
        ))
    })?;
    if parsed.scheme() != "http" {
        return Err(bad_input(format!(
            "invalid readiness URL {url:?}: only http:// is supported (the readiness endpoint is \
             an internal per-instance port)"
        )));
    }
    Ok(parsed)
}

/// Asks a readiness URL, one request at a time. The status code alone decides: redirects are
/// not followed, bodies are not read, anything but 200 (or no answer) is "not ready".
pub struct Prober {
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Prober {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Prober {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(REQUEST_TIMEOUT)
                .no_proxy()
                .build()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// Ok(()) for 200; otherwise what was seen, for messages.
    pub fn probe(&self, url: &reqwest::Url, limit: Duration) -> Result<(), String> {
        // send() registers its timeout with the runtime's timer: call it inside the runtime.
        let answer = self.rt.block_on(async {
            tokio::time::timeout(
                limit.min(REQUEST_TIMEOUT),
                self.client.get(url.clone()).send(),
            )
            .await
        });
        match answer {
            Ok(Ok(resp)) if resp.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(Ok(resp)) => Err(resp.status().as_u16().to_string()),
            Ok(Err(e)) if e.is_connect() => Err("connection refused".into()),
            Ok(Err(e)) if e.is_timeout() => Err("no answer within 1s".into()),
            Ok(Err(e)) => Err(format!("error: {e}")),
            Err(_) => Err("no answer within 1s".into()),
        }
    }
}

/// Polls `url` until it answers 200, for at most `timeout`. `alive` is asked between polls, so
/// a process that dies while warming fails the wait at once. `progress` sees every answer.
pub fn wait_ready(
    url: &reqwest::Url,
    timeout: Duration,
    alive: impl Fn() -> bool,
    mut progress: impl FnMut(Duration, &str),
) -> anyhow::Result<Duration> {
    let prober = Prober::new()?;
    let start = Instant::now();
    loop {
        if !alive() {
            return Err(err(
                Kind::ProcessDied,
                "the process exited while zdt was waiting for it to become ready; nothing was changed",
            ));
        }
        let remaining = timeout.saturating_sub(start.elapsed());
        let last = match prober.probe(url, remaining) {
            Ok(()) => {
                progress(start.elapsed(), "200");
                return Ok(start.elapsed());
            }
            Err(last) => last,
        };
        progress(start.elapsed(), &last);
        if start.elapsed() + POLL_INTERVAL >= timeout {
            return Err(err(
                Kind::ReadinessTimeout,
                format!(
                    "{url} did not answer 200 within {} (last answer: {last}); nothing was changed. \
                     Raise --timeout if the service warms up slower.",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
