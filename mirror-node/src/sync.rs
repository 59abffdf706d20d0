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
//!
//! This module holds the loop (run, step, accept, repair, plan and switch).
//! The upstreams and their rules are in `upstreams`, fetching in `fetch`,
//! the start from disk in `restore`, and garbage collection in `gc`.

use crate::fetch::Want;
use crate::generation::{Generation, read_node};
use crate::plan::Plan;
use crate::state::MirrorState;
use crate::upstreams::Upstreams;
use crate::upstreams::Waited;
use futures_util::StreamExt;
use meridian_core::{DirNode, Hash, VerifiedRoot, VerifyError};
use meridian_serve::store::write_atomic;
use meridian_serve::unix_now;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a sync did not complete. The served generation is unaffected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error("no upstream answered: {0}")]
    Unreachable(String),
    /// Every upstream that answered offered a root this mirror refuses
    /// (already logged and shown; see [`crate::refusal`]).
    #[error("every root offered was refused: {0}")]
    Refused(String),
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

/// Every `result` label of `meridian_mirror_syncs_total`: `ok` and each
/// [`SyncError::label`]. The series exist at 0 from the start.
pub(crate) const SYNC_RESULTS: [&str; 8] = [
    "ok",
    "unreachable",
    "refused",
    "verify",
    "object",
    "no_space",
    "io",
    "load",
];

impl SyncError {
    /// Short label for metrics (one of [`SYNC_RESULTS`]).
    pub fn label(&self) -> &'static str {
        match self {
            SyncError::Unreachable(_) => "unreachable",
            SyncError::Refused(_) => "refused",
            SyncError::Verify { .. } | SyncError::BelowFloor { .. } => "verify",
            SyncError::Object { .. } => "object",
            SyncError::NoSpace { .. } => "no_space",
            SyncError::Store(e) if e.is_disk_full() => "no_space",
            SyncError::Store(_) => "io",
            SyncError::Load(_) => "load",
        }
    }
}

/// Runs blocking work (file-system calls, O(tree) walks) on the blocking
/// pool, never on a runtime thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        SyncError::Store(meridian_serve::StoreError::io(
            "blocking task",
            std::io::Error::other(e),
        ))
    })
}

/// The sync engine for one mirror.
#[derive(Debug)]
pub(crate) struct Syncer {
    pub state: Arc<MirrorState>,
    /// The upstreams in force; a reload replaces them between steps, so
    /// the indexes a step uses always name the same upstreams.
    upstreams_now: arc_swap::ArcSwap<Upstreams>,
    /// A repair was asked for (`state.repair`): done between steps, never
    /// by dropping a step whose writers are still running.
    repair_due: std::sync::atomic::AtomicBool,
}
impl Syncer {
    pub(crate) fn new(state: Arc<MirrorState>) -> Self {
        let upstreams = Upstreams::new(state.cfg().upstreams.clone());
        upstreams.precreate_series(&state.metrics);
        Syncer {
            state,
            upstreams_now: arc_swap::ArcSwap::from_pointee(upstreams),
            repair_due: Default::default(),
        }
    }

    /// The upstreams in force.
    pub(crate) fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams_now.load_full()
    }

    /// Between steps: takes up upstreams a reload changed.
    fn take_reloaded_upstreams(&self) {
        let want = self.state.cfg().upstreams.clone();
        if Upstreams::normalise(&want) != self.upstreams().urls {
            tracing::info!(upstreams = ?want, "upstreams reloaded");
            let u = Upstreams::new(want);
            u.precreate_series(&self.state.metrics);
            self.upstreams_now.store(Arc::new(u));
        }
    }

    /// Switches to `g`: one atomic pointer store; every request after it
    /// sees the new generation.
    pub(crate) fn install(&self, g: Generation) {
        let n = g.number();
        let (expires, bytes) = (g.root.root.expires, g.root.root.bytes);
        self.state.served.store(Some(Arc::new(g)));
        self.state.set_status(|_| {});
        self.state.notify.send_replace(n);
        let m = &self.state.metrics;
        m.served_generation.set(n as i64);
        m.served_expiry.set(expires);
        // From the signed root: O(1), however big the tree.
        m.store_bytes.set(bytes as i64);
        let up = self.state.status().upstream_generation.max(n);
        m.generation_lag.set(up.saturating_sub(n) as i64);
    }
}

impl Syncer {
    /// Runs until `shutdown` fires.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: meridian_serve::shutdown::Stopping) {
        let mut backoff = Duration::from_millis(250);
        let mut gc_due = Instant::now() + self.state.cfg().gc_grace;
        loop {
            self.take_reloaded_upstreams();
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
                    _ = shutdown.wait() => return,
                }
            };
            match step {
                Ok(()) => {
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    let error = meridian_serve::describe(&e);
                    match self.state.served_generation() {
                        // Logged once when first seen (`note_refusal`).
                        _ if matches!(e, SyncError::Refused(_)) => {
                            tracing::debug!(%error, "sync refused")
                        }
                        0 => {
                            tracing::warn!(%error, "sync failed; nothing is served yet (this mirror has never synced a generation)")
                        }
                        n => tracing::warn!(%error, "sync failed; still serving generation {n}"),
                    }
                    debug_assert!(SYNC_RESULTS.contains(&e.label()), "{}", e.label());
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
                        _ = shutdown.wait() => return,
                    }
                    backoff = (backoff * 2)
                        .min(self.state.cfg().poll_interval.max(Duration::from_secs(1)));
                }
            }
            if Instant::now() >= gc_due {
                gc_due = Instant::now() + self.state.cfg().gc_grace.max(Duration::from_secs(1)) / 2;
                let s = self.clone();
                let _ = tokio::task::spawn_blocking(move || s.gc()).await;
            }
        }
    }

    /// One round: wait for a newer root, verify, sync to it.
    pub(crate) async fn step(&self) -> Result<(), SyncError> {
        let after = self.state.served_generation();
        let mut errors = Vec::new();
        let mut only_refusals = true;
        // The first round after a start asks without waiting: the status
        // says at once whether the generation served is the upstream's
        // (not `starting` for a whole poll interval).
        let first = self.state.status().state == crate::state::SyncState::Starting;
        for i in self.upstreams().order() {
            let timeout = if first {
                Duration::ZERO
            } else {
                self.state
                    .cfg()
                    .poll_interval
                    .clamp(Duration::from_secs(1), Duration::from_secs(55))
            };
            let ups = self.upstreams();
            let waited = tokio::select! {
                r = ups.wait(i, after, timeout) => r,
                _ = self.state.repair.notified() => {
                    self.repair_due.store(true, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
                // A reload ends the wait: new upstreams are taken up
                // before the next.
                _ = self.state.reload.notified() => return Ok(()),
            };
            // Statements first: a root signed by a rotated-to key verifies
            // only once its rotation is taken up.
            let waited = match waited {
                Ok(p) => {
                    self.learn_keys(i, p.keys).await;
                    Ok(p.waited)
                }
                Err(e) => Err(e),
            };
            match waited {
                Ok(Waited::NoNews {
                    upstream_generation,
                }) => {
                    match upstream_generation {
                        Some(g) if g < after => self.note_refusal(
                            i,
                            g,
                            "upstream_behind",
                            format!(
                                "{} serves generation {g}, older than the generation {after} this mirror serves: it is behind, or it lost its state (an origin restarted with an empty state directory starts over and can never be followed; restore its state and content from a mirror instead); nothing older than {after} is accepted",
                                self.upstreams().url(i)
                            ),
                        ),
                        _ => self.clear_refusal(Some(i)),
                    }
                    // Up to date with this upstream.
                    self.state.set_status(|s| {
                        s.state = crate::state::SyncState::Idle;
                        s.last_error = None;
                        s.last_success = Some(unix_now());
                        s.upstream_generation = s.upstream_generation.max(after);
                    });
                    return Ok(());
                }
                Ok(Waited::Root(env)) => {
                    self.state
                        .metrics
                        .manifest_bytes_fetched
                        .inc_by(env.len() as u64);
                    match self.accept_root(i, &env).await {
                        Ok(vr) => {
                            self.sync_to(vr, i).await?;
                            self.clear_refusal(None);
                            return Ok(());
                        }
                        Err(e) => {
                            let reason = match &e {
                                SyncError::Verify { source, .. } => source.reason(),
                                SyncError::BelowFloor { .. } => "below_floor",
                                _ => "malformed",
                            };
                            self.note_refusal(
                                i,
                                crate::refusal::claimed_generation(&env),
                                reason,
                                e.to_string(),
                            );
                            self.penalise(i);
                            errors.push(e.to_string());
                        }
                    }
                }
                Err(e) => {
                    only_refusals = false;
                    errors.push(e);
                }
            }
        }
        if only_refusals && !errors.is_empty() {
            return Err(SyncError::Refused(errors.join("; ")));
        }
        Err(SyncError::Unreachable(errors.join("; ")))
    }

    /// Verifies an offered root against what is served, walking the chain.
    pub(crate) async fn accept_root(
        &self,
        i: usize,
        env: &[u8],
    ) -> Result<VerifiedRoot, SyncError> {
        let upstream = self.upstreams().url(i).to_owned();
        let verr = |source| SyncError::Verify {
            upstream: upstream.clone(),
            source,
        };
        let served = self.state.served.load_full();
        let held = served.as_ref().map(|g| &g.root);
        let vr = self
            .state
            .verifier()
            .verify_latest(env, unix_now(), held)
            .map_err(verr)?;
        crate::floor::check(&self.state, &vr).map_err(|source| SyncError::BelowFloor {
            upstream: upstream.clone(),
            source,
        })?;
        // Recorded while the sync fetches (two fsyncs are not on its
        // critical path): from here on, no older root is accepted, across
        // restarts and damage to `current`. Should the machine stop before
        // the record is on disk, the retained roots still give the floor.
        let (s, v) = (self.state.clone(), vr.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::floor::raise(&s, &v) {
                tracing::error!(error = %e, "cannot record the rollback floor in `highest`; the retained roots still hold it");
            }
        });
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
                let Ok(Some(bytes)) = self.upstreams().generation(i, n).await else {
                    tracing::info!(
                        generation = n,
                        "intermediate generation not retained upstream; chain checked up to {}",
                        prev.root.generation
                    );
                    return Ok(vr);
                };
                let mid = self.state.verifier().open(&bytes).map_err(verr)?;
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
        let state = self.state.clone();
        let missing: Vec<Want> = blocking(move || {
            let mut seen = HashSet::new();
            g.blobs()
                .filter(|(h, _)| seen.insert(*h) && !state.store.contains(h))
                .map(|(hash, size)| Want {
                    hash,
                    size,
                    base: None,
                })
                .collect()
        })
        .await?;
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(blobs = missing.len(), "repairing the served generation");
        self.fetch_blobs(missing).await?;
        self.state.flush.notify_one();
        Ok(())
    }

    /// Fetches everything `vr` needs and switches to it.
    pub(crate) async fn sync_to(
        &self,
        vr: VerifiedRoot,
        preferred: usize,
    ) -> Result<(), SyncError> {
        let t0 = Instant::now();
        let generation = vr.root.generation;
        self.state
            .set_status(|s| s.state = crate::state::SyncState::Syncing);
        tracing::info!(generation, upstream = %self.upstreams().url(preferred), "syncing");
        let served = self.state.served.load_full();

        // The new tree's nodes as edits of the served tree's (one small
        // request instead of every changed directory whole). Anything wrong
        // with it only costs the fallback: fetching the nodes by hash.
        let mut delta_nodes = meridian_core::NodeMap::default();
        if let Some(g) = served.as_ref()
            && g.root.root.tree != vr.root.tree
        {
            delta_nodes = self.fetch_delta(g.clone(), vr.root.tree).await?;
        }
        let delta_nodes = Arc::new(delta_nodes);
        let delta_done = t0.elapsed();

        // Plan (see `crate::plan`), one depth of the tree at a time. Nodes
        // come from the delta or the store (read and checked on the blocking
        // pool), else from an upstream; each depth is then added to the plan
        // on the blocking pool too, where its blob lookups are.
        let mut plan = Plan::new(served.clone(), vr.root.tree, vr.root.tree_size);
        loop {
            let frontier = plan.frontier();
            if frontier.is_empty() {
                break;
            }
            let (state, delta) = (self.state.clone(), delta_nodes.clone());
            let (mut found, missing) = blocking(move || {
                let (mut found, mut missing) = (Vec::new(), Vec::new());
                for p in frontier {
                    match delta.get(&p.hash) {
                        Some(n) => found.push((p, n.clone())),
                        None => match read_node(&state.store, &p.hash) {
                            Ok(n) => found.push((p, Arc::new(n))),
                            Err(_) => missing.push(p),
                        },
                    }
                }
                (found, missing)
            })
            .await?;
            let fetched = futures_util::stream::iter(missing.into_iter().map(|p| async move {
                let bytes = self.fetch_small(p.hash, p.size).await?;
                let n = DirNode::decode(&bytes).map_err(|e| SyncError::Object {
                    hash: p.hash,
                    last: e.to_string(),
                })?;
                Ok::<_, SyncError>((p, n, bytes))
            }))
            .buffer_unordered(self.state.cfg().parallel_fetches.max(1))
            .collect::<Vec<_>>()
            .await;
            let state = self.state.clone();
            plan = blocking(move || {
                for r in fetched {
                    let (p, n, bytes) = r?;
                    state.store.put_bytes(&p.hash, &bytes)?;
                    found.push((p, Arc::new(n)));
                }
                for (p, n) in found {
                    plan.add(p, n, &|h| state.store.contains(h));
                }
                Ok::<_, SyncError>(plan)
            })
            .await??;
        }
        let (new_nodes, blobs) = plan.finish();

        let planned = t0.elapsed();
        // Space check before fetching a byte of blob data (one stat per
        // blob, on the blocking pool).
        let (partial, free, blobs) = {
            let state = self.state.clone();
            blocking(move || {
                let partial: u64 = blobs
                    .iter()
                    .filter_map(|w| state.store.partial_len(&w.hash))
                    .sum();
                state.store.free_bytes().map(|free| (partial, free, blobs))
            })
            .await??
        };
        let needed: u64 = blobs
            .iter()
            .map(|w| w.size)
            .sum::<u64>()
            .saturating_sub(partial);
        self.state.metrics.disk_free_bytes.set(free as i64);
        let reserve = self.state.cfg().reserve_free_bytes;
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
            let fetch = self.fetch_packed_and_blobs(&new_nodes, blobs);
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
        // The root file (fsynced) and the new tree, O(tree), on the blocking
        // pool; then the one pointer store.
        let state = self.state.clone();
        let g = blocking(move || -> Result<Generation, SyncError> {
            write_atomic(&state.root_path(generation), &vr.envelope)?;
            Ok(match served {
                Some(old) => old.next(&state.store, vr, &new_nodes)?,
                None => Generation::assemble(&state.store, vr, Some(&new_nodes))?,
            })
        })
        .await??;
        // Nothing is left to fetch: the progress ends as the new generation
        // is served, not after.
        drop(_finish);
        self.install(g);
        self.state.flush.notify_one();
        let dt = t0.elapsed();
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
}
