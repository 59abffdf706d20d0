//! Pulling generations: feed, verification, plan, fetch, atomic switch.
//!
//! 1. **Feed.** Long-poll `wait?after=N` on the upstreams in order (the push
//!    half: a new generation starts syncing within a second of its publish);
//!    if every upstream fails, retry after a short backoff, and at most every
//!    `poll_interval` regardless.
//! 2. **Verify** the offered root: signature by a trusted key, expiry,
//!    rollback/replay (generation must exceed the served one) and the hash
//!    chain (walked through intermediate generations the upstream retains).
//! 3. **Plan.** Walk the new tree from the top, descending only into nodes
//!    the served generation does not have (unchanged subtrees are skipped by
//!    hash), and list the blobs the store lacks: O(changed).
//! 4. **Fetch** nodes and blobs with bounded parallelism, streaming each blob
//!    to `partial/<hash>` while hashing it; a blob is committed to the store
//!    only once its size and blake3 hash match. A short transfer keeps its
//!    prefix and resumes with a Range request; a bad one is discarded,
//!    counted, and fetched from the next upstream. An upstream that fails
//!    verification three times is benched for a minute.
//! 5. **Switch.** Write the root, then swap the served generation in one
//!    atomic pointer store. In-flight downloads hold open file handles and
//!    finish on the old bytes. The flusher ([`crate::durable`]) then makes
//!    the generation durable and only then names it in `current`.

use crate::generation::{Generation, read_node};
use crate::state::MirrorState;
use futures_util::StreamExt;
use meridian_core::{DirNode, EntryKind, Hash, VerifiedRoot, VerifyError, hash_bytes};
use meridian_serve::store::write_atomic;
use meridian_serve::unix_now;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a sync did not complete. The served generation is unaffected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error("no upstream answered: {0}")]
    Unreachable(String),
    #[error("root from {upstream} refused: {source}")]
    Verify {
        upstream: String,
        source: VerifyError,
    },
    #[error("root from {upstream} refused: {source}")]
    BelowFloor {
        upstream: String,
        source: crate::floor::BelowFloor,
    },
    #[error("object {hash} could not be fetched from any upstream: {last}")]
    Object { hash: Hash, last: String },
    #[error(
        "not enough disk: the sync needs {needed} bytes plus {reserve} reserved, {free} are free"
    )]
    NoSpace {
        needed: u64,
        reserve: u64,
        free: u64,
    },
    #[error("store: {0}")]
    Store(#[from] meridian_serve::StoreError),
    #[error("loading the new generation: {0}")]
    Load(#[from] crate::generation::LoadError),
}

impl SyncError {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SyncError::Unreachable(_) => "unreachable",
            SyncError::Verify { .. } | SyncError::BelowFloor { .. } => "verify",
            SyncError::Object { .. } => "object",
            SyncError::NoSpace { .. } => "no_space",
            SyncError::Store(e) if e.is_disk_full() => "no_space",
            SyncError::Store(_) => "io",
            SyncError::Load(_) => "load",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct UpstreamHealth {
    strikes: u32,
    benched_until: Option<Instant>,
}

/// Talks to the upstreams.
#[derive(Debug)]
pub struct Upstreams {
    urls: Vec<String>,
    health: Mutex<Vec<UpstreamHealth>>,
    http: reqwest::Client,
    /// Client without an overall timeout, for long-polls.
    poll: reqwest::Client,
    /// Blob bodies from plain-HTTP upstreams (none with a proxy set).
    raw: Option<Arc<crate::rawget::Pool>>,
}

const USER_AGENT: &str = concat!("meridian-mirror/", env!("CARGO_PKG_VERSION"));

const STRIKES_TO_BENCH: u32 = 3;
const BENCH_FOR: Duration = Duration::from_secs(60);

impl Upstreams {
    pub fn new(urls: Vec<String>) -> Self {
        let urls = urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect::<Vec<_>>();
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
    pub fn order(&self) -> Vec<usize> {
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

    pub fn url(&self, i: usize) -> &str {
        &self.urls[i]
    }

    /// Records bad data from an upstream.
    pub fn strike(&self, i: usize) {
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

    fn api(&self, i: usize, rest: &str) -> String {
        format!("{}{}{rest}", self.urls[i], meridian_serve::readapi::PREFIX)
    }

    /// Long-polls one upstream for a root newer than `after`.
    async fn wait(
        &self,
        i: usize,
        after: u64,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
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
        match r.status().as_u16() {
            200 => Ok(Some(read_capped(r, meridian_core::MAX_ROOT_BYTES).await?)),
            204 => Ok(None),
            s => Err(format!("{url}: HTTP {s}")),
        }
    }

    /// GETs `url`; anything but a success status is a transport failure
    /// (the caller tries the next upstream or falls back).
    async fn get_ok(
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
    async fn generation(&self, i: usize, n: u64) -> Result<Option<Vec<u8>>, String> {
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
fn transfer_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (256 * 1024))
}

/// What [`Syncer::try_each`] does when an upstream fails for want of the
/// thing (a transport error, a 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnMissing {
    /// Ask the next upstream.
    Next,
    /// Stop asking (the thing is optional, e.g. a patch).
    Stop,
}

/// Reads a whole small body, refusing more than `cap` bytes.
async fn read_capped(mut r: reqwest::Response, cap: u64) -> Result<Vec<u8>, String> {
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
enum FetchFail {
    /// Transport trouble; a partial prefix may be kept for resuming.
    Transport(String),
    /// The upstream sent bytes that do not verify; counts as a strike.
    Bad(String),
    /// Local disk trouble: stop the sync.
    Local(meridian_serve::StoreError),
}

/// Smallest blob worth a patch: below this a whole fetch costs about the same.
const PATCH_MIN: u64 = 4096;

/// One blob the plan needs.
#[derive(Debug, Clone, Copy)]
struct Want {
    hash: Hash,
    size: u64,
    /// The blob at the same path in the served generation, held locally: a
    /// patch against it is tried first.
    base: Option<Hash>,
}

/// The sync engine for one mirror.
#[derive(Debug)]
pub struct Syncer {
    pub state: Arc<MirrorState>,
    pub upstreams: Upstreams,
    /// A repair was asked for (`state.repair`): done between steps, never
    /// by dropping a step whose writers are still running.
    repair_due: std::sync::atomic::AtomicBool,
}

impl Syncer {
    pub fn new(state: Arc<MirrorState>) -> Self {
        let upstreams = Upstreams::new(state.cfg.upstreams.clone());
        Syncer {
            state,
            upstreams,
            repair_due: Default::default(),
        }
    }

    /// Loads the generation served before a restart, if any, and
    /// establishes the rollback floor. `current` (the last durable
    /// generation) is preferred; if it is damaged or its tree cannot be
    /// loaded, the newest retained root whose tree loads is served instead.
    pub fn restore(&self) -> Result<Option<u64>, SyncError> {
        let retained = self.retained_roots();
        crate::floor::establish(&self.state, &retained);
        let cur_path = self.state.cfg.state.join("current");
        let current = match std::fs::read(&cur_path) {
            Ok(b) => {
                let n = std::str::from_utf8(&b)
                    .ok()
                    .and_then(|t| t.trim().parse::<u64>().ok());
                if n.is_none_or(|n| !retained.iter().any(|v| v.root.generation == n)) {
                    tracing::warn!(path = %cur_path.display(), "`current` is damaged or names no retained root; trying the newest retained root");
                }
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %cur_path.display(), error = %e, "cannot read `current`; trying the newest retained root");
                None
            }
        };
        let mut order: Vec<&VerifiedRoot> = retained.iter().collect();
        // `current` first, then the rest newest first.
        order.sort_by_key(|v| {
            (
                Some(v.root.generation) != current,
                std::cmp::Reverse(v.root.generation),
            )
        });
        for vr in order {
            let n = vr.root.generation;
            match Generation::assemble(&self.state.store, vr.clone(), None) {
                Ok(g) => {
                    if Some(n) == current {
                        // `current` is only ever written after a flush.
                        self.state
                            .durable
                            .store(n, std::sync::atomic::Ordering::Release);
                        self.state.metrics.durable_generation.set(n as i64);
                    } else {
                        // Not known durable: the flusher makes it so and
                        // names it in `current`.
                        self.state.flush.notify_one();
                    }
                    self.install(g);
                    self.refresh_store_bytes();
                    return Ok(Some(n));
                }
                Err(e) => {
                    tracing::warn!(generation = n, error = %e, "cannot load retained generation {n}")
                }
            }
        }
        Ok(None)
    }

    /// Every retained root that still verifies with the trusted keys
    /// (expired ones included: they still count for the floor).
    fn retained_roots(&self) -> Vec<VerifiedRoot> {
        let Ok(rd) = std::fs::read_dir(&self.state.roots_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".root"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            match std::fs::read(e.path()).map(|env| self.state.verifier.open(&env)) {
                Ok(Ok(vr)) if vr.root.generation == n => out.push(vr),
                Ok(Ok(_)) => {
                    tracing::warn!(path = %e.path().display(), "retained root is named for another generation; ignored")
                }
                Ok(Err(err)) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "retained root does not verify (trust changed?); ignored")
                }
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot read retained root; ignored")
                }
            }
        }
        out
    }

    /// Switches to `g`: one atomic pointer store; every request after it
    /// sees the new generation.
    fn install(&self, g: Generation) {
        let n = g.number();
        self.state.served.store(Some(Arc::new(g)));
        self.state.notify.send_replace(n);
        let m = &self.state.metrics;
        m.served_generation.set(n as i64);
        let up = self.state.status().upstream_generation.max(n);
        m.generation_lag.set(up.saturating_sub(n) as i64);
    }

    /// Recomputes the bytes-served gauge (O(tree); after the switch, not
    /// before it).
    fn refresh_store_bytes(&self) {
        let Some(g) = self.state.served.load_full() else {
            return;
        };
        let mut seen = HashSet::new();
        let bytes: u64 = g
            .blobs()
            .filter(|(h, _)| seen.insert(*h))
            .map(|(_, s)| s)
            .sum();
        self.state.metrics.store_bytes.set(bytes as i64);
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(250);
        let mut gc_due = Instant::now() + self.state.cfg.gc_grace;
        loop {
            // A repair asked for while waiting for a root ends the wait; one
            // asked for during a sync waits for the sync to finish (its
            // fetches own their partial files until they end).
            let step = if self
                .repair_due
                .swap(false, std::sync::atomic::Ordering::AcqRel)
            {
                self.repair().await
            } else {
                tokio::select! {
                    r = self.step() => r,
                    _ = shutdown.changed() => return,
                }
            };
            match step {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    let error = meridian_serve::describe(&e);
                    match self.state.served_generation() {
                        0 => {
                            tracing::warn!(%error, "sync failed; nothing is served yet (this mirror has never synced a generation)")
                        }
                        n => tracing::warn!(%error, "sync failed; still serving generation {n}"),
                    }
                    self.state
                        .metrics
                        .syncs
                        .with_label_values(&[e.label()])
                        .inc();
                    self.state.set_status(|s| {
                        s.state = crate::state::SyncState::Error;
                        s.last_error = Some(error);
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff =
                        (backoff * 2).min(self.state.cfg.poll_interval.max(Duration::from_secs(1)));
                }
            }
            if Instant::now() >= gc_due {
                gc_due = Instant::now() + self.state.cfg.gc_grace.max(Duration::from_secs(1)) / 2;
                let s = self.clone();
                let _ = tokio::task::spawn_blocking(move || s.gc()).await;
            }
        }
    }

    /// One round: wait for a newer root, verify, sync to it.
    pub async fn step(&self) -> Result<(), SyncError> {
        let after = self.state.served_generation();
        let mut errors = Vec::new();
        for i in self.upstreams.order() {
            let timeout = self
                .state
                .cfg
                .poll_interval
                .clamp(Duration::from_secs(1), Duration::from_secs(55));
            let waited = tokio::select! {
                r = self.upstreams.wait(i, after, timeout) => r,
                _ = self.state.repair.notified() => {
                    self.repair_due.store(true, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
            };
            match waited {
                Ok(None) => {
                    // Up to date with this upstream.
                    self.state.set_status(|s| {
                        s.state = crate::state::SyncState::Idle;
                        s.last_error = None;
                        s.last_success = Some(unix_now());
                        s.upstream_generation = s.upstream_generation.max(after);
                    });
                    return Ok(());
                }
                Ok(Some(env)) => {
                    self.state
                        .metrics
                        .manifest_bytes_fetched
                        .inc_by(env.len() as u64);
                    match self.accept_root(i, &env).await {
                        Ok(vr) => return self.sync_to(vr, i).await,
                        Err(e) => {
                            tracing::warn!(upstream = %self.upstreams.url(i), error = %e, "refusing root");
                            self.penalise(i);
                            errors.push(e.to_string());
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        Err(SyncError::Unreachable(errors.join("; ")))
    }

    /// Verifies an offered root against what is served, walking the chain.
    async fn accept_root(&self, i: usize, env: &[u8]) -> Result<VerifiedRoot, SyncError> {
        let upstream = self.upstreams.url(i).to_owned();
        let verr = |source| SyncError::Verify {
            upstream: upstream.clone(),
            source,
        };
        let served = self.state.served.load_full();
        let held = served.as_ref().map(|g| &g.root);
        let vr = self
            .state
            .verifier
            .verify_latest(env, unix_now(), held)
            .map_err(verr)?;
        crate::floor::check(&self.state, &vr).map_err(|source| SyncError::BelowFloor {
            upstream: upstream.clone(),
            source,
        })?;
        // Recorded before anything is fetched for it: from here on, no
        // older root is accepted, across restarts and damage to `current`.
        let (s, v) = (self.state.clone(), vr.clone());
        tokio::task::spawn_blocking(move || crate::floor::raise(&s, &v))
            .await
            .map_err(|e| {
                meridian_serve::StoreError::io(&self.state.cfg.state, std::io::Error::other(e))
            })??;
        self.state
            .set_status(|s| s.upstream_generation = s.upstream_generation.max(vr.root.generation));
        self.state
            .metrics
            .upstream_generation
            .set(vr.root.generation as i64);
        if let Some(held) = held
            && vr.root.generation > held.root.generation + 1
        {
            // Walk the chain through the generations in between, as far as
            // the upstream retains them.
            let mut prev = held.clone();
            for n in held.root.generation + 1..vr.root.generation {
                let Ok(Some(bytes)) = self.upstreams.generation(i, n).await else {
                    tracing::info!(
                        generation = n,
                        "intermediate generation not retained upstream; chain checked up to {}",
                        prev.root.generation
                    );
                    return Ok(vr);
                };
                let mid = self.state.verifier.open(&bytes).map_err(verr)?;
                meridian_core::check_link(&prev, &mid).map_err(verr)?;
                prev = mid;
            }
            meridian_core::check_link(&prev, &vr).map_err(verr)?;
        }
        Ok(vr)
    }

    /// Re-checks the served generation: fetches anything missing from the
    /// store (a quarantined blob, say).
    async fn repair(&self) -> Result<(), SyncError> {
        let Some(g) = self.state.served.load_full() else {
            return Ok(());
        };
        let missing: Vec<Want> = {
            let mut seen = HashSet::new();
            g.blobs()
                .filter(|(h, _)| seen.insert(*h) && !self.state.store.contains(h))
                .map(|(hash, size)| Want {
                    hash,
                    size,
                    base: None,
                })
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(blobs = missing.len(), "repairing the served generation");
        self.fetch_blobs(missing).await?;
        self.state.flush.notify_one();
        Ok(())
    }

    /// Fetches everything `vr` needs and switches to it.
    pub async fn sync_to(&self, vr: VerifiedRoot, preferred: usize) -> Result<(), SyncError> {
        let t0 = Instant::now();
        let generation = vr.root.generation;
        self.state
            .set_status(|s| s.state = crate::state::SyncState::Syncing);
        tracing::info!(generation, upstream = %self.upstreams.url(preferred), "syncing");
        let served = self.state.served.load_full();
        let known = served.as_ref().map(|g| &g.nodes);

        // The new tree's nodes as edits of the served tree's (one small
        // request instead of every changed directory whole). Anything wrong
        // with it only costs the fallback: fetching the nodes by hash.
        let mut delta_nodes: HashMap<Hash, Arc<DirNode>> = HashMap::new();
        if let Some(g) = served.as_ref()
            && g.root.root.tree != vr.root.tree
        {
            delta_nodes = self.fetch_delta(g.clone(), vr.root.tree).await?;
        }
        let delta_done = t0.elapsed();

        // Plan: nodes first (breadth-first, skipping known subtrees). Each
        // new node is paired with the node at the same path in the served
        // tree, so a changed file can be patched from its old version.
        let mut new_nodes: HashMap<Hash, Arc<DirNode>> = HashMap::new();
        let mut blobs: Vec<Want> = Vec::new();
        let mut seen_blobs: HashSet<Hash> = HashSet::new();
        let mut frontier: Vec<(Hash, u64, Option<Hash>)> = vec![(
            vr.root.tree,
            vr.root.tree_size,
            served.as_ref().map(|g| g.root.root.tree),
        )];
        while !frontier.is_empty() {
            let mut next = Vec::new();
            let delta_nodes = &delta_nodes;
            let fetched =
                futures_util::stream::iter(frontier.into_iter().map(|(h, size, old)| async move {
                    if known.is_some_and(|k| k.contains_key(&h)) {
                        return Ok(None);
                    }
                    if let Some(n) = delta_nodes.get(&h) {
                        return Ok(Some((h, n.clone(), old)));
                    }
                    if self.state.store.contains(&h)
                        && let Ok(n) = read_node(&self.state.store, &h)
                    {
                        return Ok(Some((h, Arc::new(n), old)));
                    }
                    let bytes = self.fetch_small(h, size).await?;
                    let n = DirNode::decode(&bytes).map_err(|e| SyncError::Object {
                        hash: h,
                        last: e.to_string(),
                    })?;
                    self.state.store.put_bytes(&h, &bytes)?;
                    Ok::<_, SyncError>(Some((h, Arc::new(n), old)))
                }))
                .buffer_unordered(self.state.cfg.parallel_fetches.max(1))
                .collect::<Vec<_>>()
                .await;
            for r in fetched {
                let Some((h, node, old)) = r? else { continue };
                let old_node = old.and_then(|o| known.and_then(|k| k.get(&o)));
                for (e, was) in paired(&node, old_node.map(|o| o.as_ref())) {
                    if was.is_some_and(|w| w.kind == e.kind && w.hash == e.hash) {
                        // Unchanged since the served generation, which is
                        // complete: nothing to fetch, nothing to look up.
                        continue;
                    }
                    match e.kind {
                        EntryKind::Dir if !new_nodes.contains_key(&e.hash) => next.push((
                            e.hash,
                            e.size,
                            was.filter(|w| w.kind == EntryKind::Dir).map(|w| w.hash),
                        )),
                        EntryKind::File
                            if seen_blobs.insert(e.hash) && !self.state.store.contains(&e.hash) =>
                        {
                            let base = was
                                .filter(|w| {
                                    w.kind == EntryKind::File
                                        && (PATCH_MIN..=meridian_serve::readapi::PATCH_MAX_BYTES)
                                            .contains(&e.size)
                                        && w.size <= meridian_serve::readapi::PATCH_MAX_BYTES
                                        && self.state.store.contains(&w.hash)
                                })
                                .map(|w| w.hash);
                            blobs.push(Want {
                                hash: e.hash,
                                size: e.size,
                                base,
                            });
                        }
                        _ => {}
                    }
                }
                new_nodes.insert(h, node);
            }
            frontier = next;
        }

        let planned = t0.elapsed();
        // Space check before fetching a byte of blob data.
        let partial: u64 = blobs
            .iter()
            .filter_map(|w| std::fs::metadata(self.state.partial_dir.join(w.hash.to_hex())).ok())
            .map(|m| m.len())
            .sum();
        let needed: u64 = blobs
            .iter()
            .map(|w| w.size)
            .sum::<u64>()
            .saturating_sub(partial);
        let free = self.state.store.free_bytes()?;
        self.state.metrics.disk_free_bytes.set(free as i64);
        let reserve = self.state.cfg.reserve_free_bytes;
        if needed.saturating_add(reserve) > free {
            return Err(SyncError::NoSpace {
                needed,
                reserve,
                free,
            });
        }

        let total_blobs = blobs.len();
        let total_bytes: u64 = blobs.iter().map(|w| w.size).sum();
        let progress = &self.state.progress;
        progress.start(generation, total_blobs as u64, total_bytes, partial);
        struct Finish<'a>(&'a crate::progress::Progress);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.finish();
            }
        }
        let _finish = Finish(progress);
        {
            // A long sync says how far it has got, at a steady interval.
            let fetch = self.fetch_blobs(blobs);
            tokio::pin!(fetch);
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + crate::progress::LOG_EVERY,
                crate::progress::LOG_EVERY,
            );
            loop {
                tokio::select! {
                    r = &mut fetch => break r?,
                    _ = tick.tick() => progress.log(),
                }
            }
        }
        let fetched = t0.elapsed();

        // Switch: every object is in the store, verified. The flusher makes
        // the generation durable afterwards (see `crate::durable`); until
        // then `current` names the previous one.
        write_atomic(&self.state.root_path(generation), &vr.envelope)?;
        let mut all_nodes: HashMap<Hash, Arc<DirNode>> = known.cloned().unwrap_or_default();
        all_nodes.extend(new_nodes);
        let g = Generation::assemble(&self.state.store, vr, Some(&all_nodes))?;
        self.install(g);
        self.state.flush.notify_one();
        let dt = t0.elapsed();
        self.refresh_store_bytes();
        self.state.metrics.sync_seconds.observe(dt.as_secs_f64());
        self.state.metrics.syncs.with_label_values(&["ok"]).inc();
        self.state.set_status(|s| {
            s.state = crate::state::SyncState::Idle;
            s.last_error = None;
            s.last_success = Some(unix_now());
        });
        tracing::debug!(
            delta = delta_done.as_secs_f64(),
            plan = (planned - delta_done).as_secs_f64(),
            fetch = (fetched - planned).as_secs_f64(),
            switch = (dt - fetched).as_secs_f64(),
            "sync phases (seconds)"
        );
        tracing::info!(
            generation,
            blobs = total_blobs,
            seconds = dt.as_secs_f64(),
            "now serving generation {generation}"
        );
        Ok(())
    }

    async fn fetch_blobs(&self, blobs: Vec<Want>) -> Result<(), SyncError> {
        let results = futures_util::stream::iter(blobs.into_iter().map(|w| async move {
            let size = w.size;
            let r = self.fetch_blob(w).await;
            if r.is_ok() {
                self.state.progress.blob_done(size);
            }
            r
        }))
        .buffer_unordered(self.state.cfg.parallel_fetches.max(1))
        .collect::<Vec<_>>()
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Fetches a small object (a directory node) into memory, verified.
    async fn fetch_small(&self, h: Hash, size: u64) -> Result<Vec<u8>, SyncError> {
        if size > meridian_core::MAX_NODE_BYTES {
            return Err(SyncError::Object {
                hash: h,
                last: format!("declared node size {size} over the limit"),
            });
        }
        let got = self
            .try_each(&format!("objects/{h}"), OnMissing::Next, |url| async move {
                let r = self.upstreams.get_ok(&url, None).await?;
                let b = read_capped(r, size).await.map_err(FetchFail::Bad)?;
                if b.len() as u64 != size || hash_bytes(&b) != h {
                    return Err(FetchFail::Bad(format!(
                        "node {h} does not match its hash or size"
                    )));
                }
                Ok(b)
            })
            .await?;
        let b = got.map_err(|last| SyncError::Object { hash: h, last })?;
        let m = &self.state.metrics;
        m.bytes_fetched.inc_by(b.len() as u64);
        m.manifest_bytes_fetched.inc_by(b.len() as u64);
        m.objects_fetched.inc();
        Ok(b)
    }

    /// Fetches the delta from the served tree to `to` and rebuilds every
    /// node it describes, each checked against its hash and stored. An
    /// upstream without the delta, or with a bad one, leaves an empty map:
    /// the plan then fetches nodes by hash.
    async fn fetch_delta(
        &self,
        served: Arc<Generation>,
        to: Hash,
    ) -> Result<HashMap<Hash, Arc<DirNode>>, SyncError> {
        let from = served.root.root.tree;
        let got = self
            .try_each(&format!("delta/{from}/{to}"), OnMissing::Next, |url| {
                let served = served.clone();
                async move {
                    let r = self.upstreams.get_ok(&url, None).await?;
                    let bytes = read_capped(r, meridian_core::delta::MAX_DELTA_BYTES)
                        .await
                        .map_err(FetchFail::Transport)?;
                    self.state.metrics.bytes_fetched.inc_by(bytes.len() as u64);
                    self.state
                        .metrics
                        .manifest_bytes_fetched
                        .inc_by(bytes.len() as u64);
                    let state = self.state.clone();
                    let t0 = Instant::now();
                    let bytes = bytes::Bytes::from(bytes);
                    let b2 = bytes.clone();
                    let nodes =
                        tokio::task::spawn_blocking(move || apply_delta(&state, &served, to, &b2))
                            .await
                            .map_err(|e| FetchFail::Transport(e.to_string()))??;
                    tracing::debug!(
                        seconds = t0.elapsed().as_secs_f64(),
                        nodes = nodes.len(),
                        %url,
                        "tree delta applied"
                    );
                    // Verified (every node it rebuilds matched its hash): pass it on.
                    self.state.deltas.insert(from, to, bytes);
                    Ok(nodes)
                }
            })
            .await?;
        Ok(got.unwrap_or_else(|last| {
            tracing::debug!(error = %last, "no tree delta; fetching nodes by hash");
            HashMap::new()
        }))
    }

    /// Rebuilds blob `h` from a patch against the local blob `base`, into a
    /// staging file, hashing as it writes; commits only on a hash match.
    async fn fetch_patch_from(
        &self,
        url: &str,
        h: Hash,
        size: u64,
        base: Hash,
    ) -> Result<(), FetchFail> {
        let timeout = transfer_timeout(size);
        let r = self.upstreams.get_ok(url, Some(timeout)).await?;
        // A patch is never longer than its literal bytes plus op headers.
        let cap = size + size / 16 + 4096;
        let patch = read_capped(r, cap).await.map_err(FetchFail::Bad)?;
        self.state.metrics.bytes_fetched.inc_by(patch.len() as u64);
        let store = self.state.clone();
        tokio::task::spawn_blocking(move || rebuild_from_patch(&store, &patch, base, h, size))
            .await
            .map_err(|e| FetchFail::Transport(e.to_string()))?
    }

    /// The one way upstreams are tried in turn: `attempt(url)` for `path`
    /// on each upstream in order (benched ones last) until one succeeds.
    /// Bad data counts against that upstream (and strikes it) and the next
    /// is asked; a transport failure asks the next or stops, as `missing`
    /// says; a local failure (the store) ends the whole try. `Ok(Err(last))`:
    /// no upstream delivered, with the last failure.
    async fn try_each<T, F, Fut>(
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
        for i in self.upstreams.order() {
            let url = self.upstreams.api(i, path);
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
    fn penalise(&self, i: usize) {
        self.state
            .metrics
            .verify_failures
            .with_label_values(&[self.upstreams.url(i)])
            .inc();
        self.upstreams.strike(i);
    }

    fn note_failure(&self, i: usize, url: &str, e: FetchFail) -> Result<String, SyncError> {
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

    /// Fetches one blob into the store, verified: as a patch against the
    /// old version when there is one, else whole, resuming a partial.
    async fn fetch_blob(&self, want: Want) -> Result<(), SyncError> {
        let Want {
            hash: h,
            size,
            base,
        } = want;
        if self.state.store.contains(&h) {
            return Ok(());
        }
        if let Some(base) = base {
            let patched = self
                .try_each(&format!("patch/{base}/{h}"), OnMissing::Stop, |url| async move {
                    self.fetch_patch_from(&url, h, size, base).await
                })
                .await?;
            if patched.is_ok() {
                self.state.metrics.objects_fetched.inc();
                self.state.metrics.blobs_patched.inc();
                return Ok(());
            }
            // No patch there (too large, base gone): fetch the blob whole.
        }
        self.try_each(&format!("objects/{h}"), OnMissing::Next, |url| async move {
            self.fetch_blob_from(&url, h, size).await
        })
        .await?
        .map_err(|last| SyncError::Object { hash: h, last })?;
        self.state.metrics.objects_fetched.inc();
        Ok(())
    }

    /// Fetches one blob whole (resuming a partial) from a plain-HTTP
    /// upstream on one blocking thread (see [`crate::rawget`]); `None` if
    /// that client does not take the URL or the answer.
    async fn fetch_blob_raw(&self, url: &str, h: Hash, size: u64) -> Option<Result<(), FetchFail>> {
        let pool = self.upstreams.raw.clone()?;
        let target = crate::rawget::Target::parse(url)?;
        let state = self.state.clone();
        let job = tokio::task::spawn_blocking(move || {
            use crate::rawget::Raw;
            let partial = state.partial_dir.join(h.to_hex());
            let local = |e: std::io::Error| {
                Some(FetchFail::Local(meridian_serve::StoreError::io(
                    &partial, e,
                )))
            };
            let (mut file, mut hasher, have) = open_partial(&partial, size).map_err(local)?;
            if have < size {
                let deadline = Instant::now() + transfer_timeout(size);
                let mut sink = |piece: Option<&[u8]>| -> std::io::Result<()> {
                    match piece {
                        Some(b) => {
                            hasher.update(b);
                            file.write_all(b)
                        }
                        None => {
                            file.set_len(0)?;
                            file.seek(std::io::SeekFrom::Start(0))?;
                            hasher = blake3::Hasher::new();
                            Ok(())
                        }
                    }
                };
                let counted = |n: u64| state.metrics.bytes_fetched.inc_by(n);
                let got = pool.get(&target, have, size, deadline, &mut sink, &counted);
                match got {
                    Ok(()) => {}
                    Err(Raw::Unsupported(why)) => {
                        tracing::debug!(%why, "blob answer left to the async client");
                        return Err(None);
                    }
                    Err(Raw::Transport(m)) => return Err(Some(FetchFail::Transport(m))),
                    Err(Raw::Bad(m)) => {
                        drop(file);
                        let _ = std::fs::remove_file(&partial);
                        return Err(Some(FetchFail::Bad(m)));
                    }
                    Err(Raw::Local(e)) => return Err(local(e)),
                }
            }
            finish_blob(&state, &partial, file, hasher, h).map_err(Some)
        });
        match job.await {
            Ok(Ok(())) => Some(Ok(())),
            Ok(Err(Some(e))) => Some(Err(e)),
            Ok(Err(None)) => None,
            Err(e) => Some(Err(FetchFail::Local(meridian_serve::StoreError::io(
                &self.state.partial_dir,
                std::io::Error::other(e),
            )))),
        }
    }

    async fn fetch_blob_from(&self, url: &str, h: Hash, size: u64) -> Result<(), FetchFail> {
        if let Some(r) = self.fetch_blob_raw(url, h, size).await {
            return r;
        }
        let partial = self.state.partial_dir.join(h.to_hex());
        let local =
            |e: std::io::Error| FetchFail::Local(meridian_serve::StoreError::io(&partial, e));
        let (mut file, mut hasher, mut have) = {
            let p = partial.clone();
            tokio::task::spawn_blocking(move || open_partial(&p, size))
                .await
                .map_err(|e| local(std::io::Error::other(e)))?
                .map_err(local)?
        };
        if have < size {
            let mut req = self.upstreams.http.get(url);
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            // Bound the whole transfer too: an upstream trickling a byte at a
            // time must not pin the sync forever.
            let deadline = transfer_timeout(size);
            let resp = req
                .timeout(deadline)
                .send()
                .await
                .map_err(|e| FetchFail::Transport(e.to_string()))?;
            match resp.status().as_u16() {
                206 if have > 0 => {
                    let ok = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
                    if !ok {
                        return Err(FetchFail::Bad(
                            "Content-Range does not match the requested resume point".into(),
                        ));
                    }
                }
                200 => {
                    if have > 0 {
                        file.set_len(0).map_err(local)?;
                        file.seek(std::io::SeekFrom::Start(0)).map_err(local)?;
                        hasher = blake3::Hasher::new();
                        have = 0;
                    }
                }
                s => return Err(FetchFail::Transport(format!("HTTP {s}"))),
            }
            let mut stream = resp.bytes_stream();
            // Bytes are gathered into blocks and each block is hashed and
            // written on the blocking pool, off the runtime threads. The
            // prefix written so far always matches `have`, so a transfer cut
            // anywhere can resume.
            const BLOCK: usize = 1 << 20;
            let block_cap = ((size - have) as usize).min(BLOCK);
            let mut block: Vec<u8> = Vec::with_capacity(block_cap);
            let mut io = Some((file, hasher));
            let flush = |io: &mut Option<(std::fs::File, blake3::Hasher)>, block: Vec<u8>| {
                let (mut f, mut h) = io
                    .take()
                    .ok_or_else(|| local(std::io::Error::other("writer lost")))?;
                Ok::<_, FetchFail>(tokio::task::spawn_blocking(move || {
                    h.update(&block);
                    let r = f.write_all(&block);
                    (f, h, r)
                }))
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    FetchFail::Transport(format!("after {have} of {size} bytes: {e}"))
                });
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // Keep the verified-length prefix: write what arrived.
                        if !block.is_empty() {
                            let (f, h, r) = flush(&mut io, std::mem::take(&mut block))?
                                .await
                                .map_err(|e| local(std::io::Error::other(e)))?;
                            r.map_err(local)?;
                            drop((f, h));
                        }
                        return Err(e);
                    }
                };
                if have + block.len() as u64 + chunk.len() as u64 > size {
                    drop(io);
                    let _ = std::fs::remove_file(&partial);
                    return Err(FetchFail::Bad(format!(
                        "upstream sent more than the declared {size} bytes"
                    )));
                }
                block.extend_from_slice(&chunk);
                self.state.metrics.bytes_fetched.inc_by(chunk.len() as u64);
                if block.len() >= BLOCK {
                    let n = block.len() as u64;
                    let (f, h, r) = flush(
                        &mut io,
                        std::mem::replace(&mut block, Vec::with_capacity(block_cap)),
                    )?
                    .await
                    .map_err(|e| local(std::io::Error::other(e)))?;
                    r.map_err(local)?;
                    io = Some((f, h));
                    have += n;
                }
            }
            if !block.is_empty() {
                let n = block.len() as u64;
                let (f, h, r) = flush(&mut io, block)?
                    .await
                    .map_err(|e| local(std::io::Error::other(e)))?;
                r.map_err(local)?;
                io = Some((f, h));
                have += n;
            }
            let Some((f, h)) = io else {
                return Err(local(std::io::Error::other("writer lost")));
            };
            file = f;
            hasher = h;
            if have < size {
                return Err(FetchFail::Transport(format!(
                    "truncated: {have} of {size} bytes; will resume"
                )));
            }
        }
        finish_blob(&self.state, &partial, file, hasher, h)
    }

    /// Removes objects neither the served generation nor the previous one
    /// references, once they are older than the grace period. Unlinking is
    /// safe under running downloads: an open file stays readable.
    pub fn gc(&self) {
        let Some(g) = self.state.served.load_full() else {
            return;
        };
        if self
            .state
            .durable
            .load(std::sync::atomic::Ordering::Acquire)
            < g.number()
        {
            // `current` still names an older generation, whose objects a
            // restart after a power loss would need: wait for the flusher.
            return;
        }
        let mut keep: HashSet<Hash> = HashSet::new();
        let mut add = |g: &Generation| {
            keep.extend(g.nodes.keys().copied());
            keep.extend(g.blobs().map(|(h, _)| h));
        };
        add(&g);
        if let Some(prev) = std::fs::read(self.state.root_path(g.number().saturating_sub(1)))
            .ok()
            .and_then(|env| self.state.verifier.open(&env).ok())
            .and_then(|vr| Generation::assemble(&self.state.store, vr, Some(&g.nodes)).ok())
        {
            add(&prev);
        }
        let grace = self.state.cfg.gc_grace;
        let Ok(all) = self.state.store.list() else {
            return;
        };
        let mut removed = 0;
        for h in all {
            if keep.contains(&h) {
                continue;
            }
            let old = std::fs::metadata(self.state.store.path(&h))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace);
            if old && self.state.store.remove(&h).is_ok() {
                removed += 1;
            }
        }
        // Old roots: keep the served one and its predecessor.
        if let Ok(rd) = std::fs::read_dir(&self.state.roots_dir) {
            for e in rd.flatten() {
                let n = e
                    .file_name()
                    .to_str()
                    .and_then(|s| s.strip_suffix(".root"))
                    .and_then(|s| s.parse::<u64>().ok());
                if n.is_some_and(|n| n + 1 < g.number()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "garbage-collected objects no longer served");
        }
    }
}

/// Decodes a tree delta and rebuilds its nodes (blocking: hashing).
/// Opens (or creates) the partial download of a blob of `size` bytes and
/// re-hashes the prefix already there (a prefix is only trusted once the
/// whole blob hashes right; a bad prefix is discarded with the rest).
/// Returns the file positioned at the end of the prefix, the hasher over
/// it, and its length.
fn open_partial(
    p: &std::path::Path,
    size: u64,
) -> std::io::Result<(std::fs::File, blake3::Hasher, u64)> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)?;
    // One writer per partial download, in this process or another: the
    // lock is held until the writer commits or gives up (drops the file).
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("{} is being written by another download ({e})", p.display()),
        )
    })?;
    let len = f.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    if len > size {
        f.set_len(0)?;
        return Ok((f, hasher, 0));
    }
    let mut buf = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    f.seek(std::io::SeekFrom::Start(done))?;
    Ok((f, hasher, done))
}

/// Checks a complete partial download against its hash and commits it to
/// the store; a mismatch discards it.
fn finish_blob(
    state: &MirrorState,
    partial: &std::path::Path,
    file: std::fs::File,
    hasher: blake3::Hasher,
    h: Hash,
) -> Result<(), FetchFail> {
    let got: Hash = hasher.finalize().into();
    if got != h {
        let _ = std::fs::remove_file(partial);
        return Err(FetchFail::Bad(format!("blob {h} hashed to {got}")));
    }
    // Renamed while this writer still holds the partial's lock, so no
    // other writer can open it between the check and the rename.
    let r = state.store.commit(partial, &h).map_err(FetchFail::Local);
    drop(file);
    r
}

fn apply_delta(
    state: &MirrorState,
    served: &Generation,
    to: Hash,
    bytes: &[u8],
) -> Result<HashMap<Hash, Arc<DirNode>>, FetchFail> {
    let bad = |m: String| FetchFail::Bad(format!("tree delta: {m}"));
    let d = meridian_core::TreeDelta::decode(bytes).map_err(|e| bad(e.to_string()))?;
    if d.from != served.root.root.tree || d.to != to {
        return Err(bad("it connects other trees than asked".into()));
    }
    let mut out: HashMap<Hash, Arc<DirNode>> = HashMap::with_capacity(d.nodes.len());
    // Edits of nodes the mirror holds are independent: rebuilt (merge,
    // encode, hash, store) on a few threads at once. An edit whose base is
    // another rebuilt node (rare) waits for the sequential pass below.
    let apply_one = |edit: &meridian_core::delta::NodeEdit, base: Option<&DirNode>| {
        let (node, enc) = edit.apply(base).map_err(|e| bad(e.to_string()))?;
        state
            .store
            .put_bytes(&edit.hash, &enc)
            .map_err(FetchFail::Local)?;
        Ok::<_, FetchFail>((edit.hash, Arc::new(node)))
    };
    let (independent, dependent): (Vec<_>, Vec<_>) = d
        .nodes
        .iter()
        .partition(|e| e.base.as_ref().is_none_or(|b| served.nodes.contains_key(b)));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(independent.len().div_ceil(16).max(1));
    let chunk = independent.len().div_ceil(threads).max(1);
    type Rebuilt = Result<Vec<(Hash, Arc<DirNode>)>, FetchFail>;
    let results: Vec<Rebuilt> = std::thread::scope(|s| {
        let workers: Vec<_> = independent
            .chunks(chunk)
            .map(|edits| {
                s.spawn(move || {
                    edits
                        .iter()
                        .map(|e| {
                            let base = e.base.as_ref().and_then(|b| served.nodes.get(b));
                            apply_one(e, base.map(|b| &**b))
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for r in results {
        out.extend(r?);
    }
    for edit in dependent {
        let base = match &edit.base {
            Some(b) => Some(
                out.get(b)
                    .or_else(|| served.nodes.get(b))
                    .cloned()
                    .ok_or_else(|| bad(format!("base node {b} is not held here")))?,
            ),
            None => None,
        };
        let (h, node) = apply_one(edit, base.as_deref())?;
        out.insert(h, node);
    }
    if !out.contains_key(&to) {
        return Err(bad("it does not rebuild the top node".into()));
    }
    Ok(out)
}

/// Applies a blob patch against a local base into a staging file (blocking).
fn rebuild_from_patch(
    state: &MirrorState,
    patch: &[u8],
    base: Hash,
    h: Hash,
    size: u64,
) -> Result<(), FetchFail> {
    use meridian_core::patch::{PatchOp, PatchReader};
    use std::os::unix::fs::FileExt;
    let bad = |m: String| FetchFail::Bad(format!("patch for {h}: {m}"));
    let base_file = state.store.open_object(&base).map_err(FetchFail::Local)?;
    let base_len = base_file
        .metadata()
        .map_err(|e| FetchFail::Local(meridian_serve::StoreError::io(state.store.path(&base), e)))?
        .len();
    let mut r = PatchReader::new(patch, base_len).map_err(|e| bad(e.to_string()))?;
    let hdr = r.header();
    if hdr.base != base || hdr.target != h || hdr.target_size != size {
        return Err(bad("its header names other blobs or another size".into()));
    }
    let (tmp, f) = state.store.create_tmp("patch").map_err(FetchFail::Local)?;
    let local = |e: std::io::Error| FetchFail::Local(meridian_serve::StoreError::io(&tmp, e));
    let result = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, f);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Some(op) = r.next_op().map_err(|e| bad(e.to_string()))? {
            match op {
                PatchOp::Data(d) => {
                    hasher.update(d);
                    out.write_all(d).map_err(local)?;
                }
                PatchOp::Copy { mut offset, len } => {
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(buf.len());
                        base_file
                            .read_exact_at(&mut buf[..n], offset)
                            .map_err(local)?;
                        hasher.update(&buf[..n]);
                        out.write_all(&buf[..n]).map_err(local)?;
                        offset += n as u64;
                        left -= n;
                    }
                }
            }
        }
        out.flush().map_err(local)?;
        let got: Hash = hasher.finalize().into();
        if got != h {
            return Err(bad(format!("rebuilt bytes hash to {got}")));
        }
        Ok(())
    })();
    match result {
        Ok(()) => state.store.commit(&tmp, &h).map_err(FetchFail::Local),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Each entry of `new` with the entry of the same name in `old`, by one
/// merge of the two sorted lists (no search per entry).
fn paired<'a>(
    new: &'a DirNode,
    old: Option<&'a DirNode>,
) -> impl Iterator<Item = (&'a meridian_core::Entry, Option<&'a meridian_core::Entry>)> + 'a {
    let old: &[meridian_core::Entry] = old.map_or(&[], |o| &o.entries);
    let mut i = 0;
    new.entries.iter().map(move |e| {
        while i < old.len() && old[i].name.as_bytes() < e.name.as_bytes() {
            i += 1;
        }
        let was = old.get(i).filter(|o| o.name == e.name);
        (e, was)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_writers_can_never_share_a_partial_download() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("partial");
        let (mut first, _, _) = open_partial(&p, 10).expect("first writer");
        first.write_all(b"abc").expect("write");
        let second = open_partial(&p, 10);
        assert!(
            matches!(&second, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a second writer opened a partial that is being written"
        );
        // Once the first writer is done, the download resumes from its
        // prefix.
        drop(first);
        let (_, _, have) = open_partial(&p, 10).expect("resumed");
        assert_eq!(have, 3);
    }
}
