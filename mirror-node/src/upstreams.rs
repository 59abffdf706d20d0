//! The upstreams a mirror pulls from, in configured order: the HTTP clients
//! (a long-poll client without an overall timeout, a lean one for blob
//! bodies), the strike-and-bench rule (three bad answers bench an upstream
//! for a minute), the feed (long-poll) and retained-root requests, the one
//! timeout rule for moving bytes, and `Syncer::try_each`, the one way
//! upstreams are tried in turn.

use crate::sync::{SyncError, Syncer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub(crate) struct UpstreamHealth {
    strikes: u32,
    benched_until: Option<Instant>,
}

/// What a long-poll brought, and the key statement set the upstream named.
#[derive(Debug)]
pub(crate) struct Polled {
    pub(crate) waited: Waited,
    pub(crate) keys: Option<meridian_core::Hash>,
}

/// What a long-poll brought.
#[derive(Debug)]
pub(crate) enum Waited {
    /// A newer root's envelope (not yet verified).
    Root(Vec<u8>),
    /// Nothing newer before the timeout; the upstream's own newest
    /// generation, as its answer says.
    NoNews { upstream_generation: Option<u64> },
}

/// Talks to the upstreams.
#[derive(Debug)]
pub(crate) struct Upstreams {
    pub(crate) urls: Vec<String>,
    pub(crate) health: Mutex<Vec<UpstreamHealth>>,
    pub(crate) http: reqwest::Client,
    /// Client without an overall timeout, for long-polls.
    pub(crate) poll: reqwest::Client,
    /// Blob bodies from plain-HTTP upstreams (none with a proxy set).
    pub(crate) raw: Option<Arc<crate::rawget::Pool>>,
}

const USER_AGENT: &str = concat!("meridian-mirror/", env!("CARGO_PKG_VERSION"));

const STRIKES_TO_BENCH: u32 = 3;
const BENCH_FOR: Duration = Duration::from_secs(60);

impl Upstreams {
    /// Makes each upstream's `verify_failures_total` series exist at 0, so
    /// an alert on any increase sees the first failure.
    pub(crate) fn precreate_series(&self, m: &crate::metrics::MirrorMetrics) {
        for u in &self.urls {
            m.verify_failures.with_label_values(&[u.as_str()]);
        }
    }

    /// Upstream URLs as kept: without a trailing slash.
    pub(crate) fn normalise(urls: &[String]) -> Vec<String> {
        urls.iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect()
    }

    pub(crate) fn new(urls: Vec<String>) -> Self {
        let urls = Self::normalise(&urls);
        let build = |read: Duration| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(read)
                .pool_max_idle_per_host(16)
                .user_agent(USER_AGENT)
                .build()
                .unwrap_or_default()
        };
        Upstreams {
            health: Mutex::new(vec![UpstreamHealth::default(); urls.len()]),
            urls,
            http: build(Duration::from_secs(30)),
            poll: build(Duration::from_secs(90)),
            raw: (!crate::rawget::proxy_configured())
                .then(|| Arc::new(crate::rawget::Pool::new(USER_AGENT))),
        }
    }

    /// Upstream indexes in the order to try: healthy ones in configured
    /// order, then benched ones (better a benched upstream than none).
    pub(crate) fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let health = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        let benched = |i: usize| {
            health
                .get(i)
                .and_then(|h| h.benched_until)
                .is_some_and(|t| t > now)
        };
        let mut v: Vec<usize> = (0..self.urls.len()).filter(|&i| !benched(i)).collect();
        v.extend((0..self.urls.len()).filter(|&i| benched(i)));
        v
    }

    pub(crate) fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// Records bad data from an upstream.
    pub(crate) fn strike(&self, i: usize) {
        if let Ok(mut h) = self.health.lock()
            && let Some(u) = h.get_mut(i)
        {
            u.strikes += 1;
            if u.strikes >= STRIKES_TO_BENCH {
                u.strikes = 0;
                u.benched_until = Some(Instant::now() + BENCH_FOR);
                tracing::warn!(upstream = %self.urls[i], "upstream keeps sending bad data; benched for {BENCH_FOR:?}");
            }
        }
    }

    pub(crate) fn api(&self, i: usize, rest: &str) -> String {
        format!("{}{}{rest}", self.urls[i], meridian_serve::readapi::PREFIX)
    }

    /// Long-polls one upstream for a root newer than `after`.
    pub(crate) async fn wait(
        &self,
        i: usize,
        after: u64,
        timeout: Duration,
    ) -> Result<Polled, String> {
        let url = self.api(
            i,
            &format!("wait?after={after}&timeout={}", timeout.as_secs()),
        );
        let r = self
            .poll
            .get(&url)
            .timeout(timeout + Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| meridian_serve::describe(&e))?;
        let keys = r
            .headers()
            .get(meridian_serve::keys::KEYS_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let waited = match r.status().as_u16() {
            200 => Waited::Root(read_capped(r, meridian_core::MAX_ROOT_BYTES).await?),
            204 => Waited::NoNews {
                upstream_generation: r
                    .headers()
                    .get("x-meridian-generation")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            },
            s => return Err(format!("{url}: HTTP {s}")),
        };
        Ok(Polled { waited, keys })
    }

    /// GETs `url`; anything but a success status is a transport failure
    /// (the caller tries the next upstream or falls back).
    pub(crate) async fn get_ok(
        &self,
        url: &str,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, FetchFail> {
        let mut req = self.http.get(url);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let r = req
            .send()
            .await
            .map_err(|e| FetchFail::Transport(meridian_serve::describe(&e)))?;
        if !r.status().is_success() {
            return Err(FetchFail::Transport(format!("{url}: HTTP {}", r.status())));
        }
        Ok(r)
    }

    /// Fetches a retained generation's root; `Ok(None)` if not retained.
    pub(crate) async fn generation(&self, i: usize, n: u64) -> Result<Option<Vec<u8>>, String> {
        let url = self.api(i, &format!("generations/{n}"));
        let r = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| meridian_serve::describe(&e))?;
        match r.status().as_u16() {
            200 => Ok(Some(read_capped(r, meridian_core::MAX_ROOT_BYTES).await?)),
            404 => Ok(None),
            s => Err(format!("{url}: HTTP {s}")),
        }
    }
}

/// The one timeout rule for moving `size` bytes from an upstream: a minute,
/// plus a second per 256 KiB (an upstream trickling a byte at a time must
/// not pin a sync forever, and a large blob over a slow link still fits).
pub(crate) fn transfer_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (256 * 1024))
}

/// Reads a whole small body, refusing more than `cap` bytes.
pub(crate) async fn read_capped(mut r: reqwest::Response, cap: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| meridian_serve::describe(&e))? {
        if out.len() as u64 + chunk.len() as u64 > cap {
            return Err(format!("response larger than {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Why one object fetch from one upstream failed.
#[derive(Debug)]
pub(crate) enum FetchFail {
    /// Transport trouble; a partial prefix may be kept for resuming.
    Transport(String),
    /// The upstream sent bytes that do not verify; counts as a strike.
    Bad(String),
    /// Local disk trouble: stop the sync.
    Local(meridian_serve::StoreError),
}

/// What [`Syncer::try_each`] does when an upstream fails for want of the
/// thing (a transport error, a 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMissing {
    /// Ask the next upstream.
    Next,
    /// Stop asking (the thing is optional, e.g. a patch).
    Stop,
}

impl Syncer {
    /// The one way upstreams are tried in turn: `attempt(url)` for `path`
    /// on each upstream in order (benched ones last) until one succeeds.
    /// Bad data counts against that upstream (and strikes it) and the next
    /// is asked; a transport failure asks the next or stops, as `missing`
    /// says; a local failure (the store) ends the whole try. `Ok(Err(last))`:
    /// no upstream delivered, with the last failure.
    pub(crate) async fn try_each<T, F, Fut>(
        &self,
        path: &str,
        missing: OnMissing,
        mut attempt: F,
    ) -> Result<Result<T, String>, SyncError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchFail>>,
    {
        let mut last = String::from("no upstream");
        for i in self.upstreams().order() {
            let url = self.upstreams().api(i, path);
            match attempt(url.clone()).await {
                Ok(v) => return Ok(Ok(v)),
                Err(FetchFail::Transport(m)) if missing == OnMissing::Stop => {
                    tracing::debug!(%url, error = %m, "not there; not asking further");
                    return Ok(Err(format!("{url}: {m}")));
                }
                Err(e) => last = self.note_failure(i, &url, e)?,
            }
        }
        Ok(Err(last))
    }

    /// Counts a verification failure against upstream `i` and strikes it.
    /// (Each upstream's series exists at 0 from the start:
    /// [`Upstreams::precreate_series`].)
    pub(crate) fn penalise(&self, i: usize) {
        self.state
            .metrics
            .verify_failures
            .with_label_values(&[self.upstreams().url(i)])
            .inc();
        self.upstreams().strike(i);
    }

    pub(crate) fn note_failure(
        &self,
        i: usize,
        url: &str,
        e: FetchFail,
    ) -> Result<String, SyncError> {
        match e {
            FetchFail::Transport(m) => {
                tracing::debug!(%url, error = %m, "fetch failed; trying the next upstream");
                Ok(format!("{url}: {m}"))
            }
            FetchFail::Bad(m) => {
                tracing::warn!(%url, error = %m, "upstream sent bad data; discarded");
                self.penalise(i);
                Ok(format!("{url}: {m}"))
            }
            FetchFail::Local(e) => Err(SyncError::Store(e)),
        }
    }
}
