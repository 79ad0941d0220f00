//! Waiting for a process's readiness endpoint (`/readyz`) to answer 200.
use std::time::{Duration, Instant};

use crate::error::{bad_input, err, Kind};

/// How often the URL is asked, and how long one answer may take.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
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

/// Polls `url` until it answers 200, for at most `timeout`. The status code alone decides:
/// redirects are not followed, bodies are not read. `alive` is asked between polls, so a process
/// that dies while warming fails the wait at once. `progress` sees every answer (or error).
pub fn wait_ready(
    url: &reqwest::Url,
    timeout: Duration,
    alive: impl Fn() -> bool,
    mut progress: impl FnMut(Duration, &str),
) -> anyhow::Result<Duration> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let start = Instant::now();
    loop {
        if !alive() {
            return Err(err(
                Kind::ProcessDied,
                "the process exited while zdt was waiting for it to become ready; nothing was changed",
            ));
        }
        let remaining = timeout.saturating_sub(start.elapsed());
        let answer = rt.block_on(async {
            tokio::time::timeout(
                remaining.min(REQUEST_TIMEOUT),
                client.get(url.clone()).send(),
            )
            .await
        });
        let last = match answer {
            Ok(Ok(resp)) if resp.status() == reqwest::StatusCode::OK => {
                progress(start.elapsed(), "200");
                return Ok(start.elapsed());
            }
            Ok(Ok(resp)) => resp.status().as_u16().to_string(),
            Ok(Err(e)) if e.is_connect() => "connection refused".into(),
            Ok(Err(e)) if e.is_timeout() => "no answer within 1s".into(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "no answer within 1s".into(),
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
