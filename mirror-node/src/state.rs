//! State shared by the syncer, the download server and the status endpoint.

use crate::config::MirrorConfig;
use crate::generation::Generation;
use crate::metrics::MirrorMetrics;
use arc_swap::{ArcSwap, ArcSwapOption};
use meridian_core::{TrustedKeys, Verifier};
use meridian_serve::ObjectStore;
pub(crate) use meridian_serve::status::SyncState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, watch};

/// What the syncer is doing, for the status endpoint.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncStatus {
    pub state: SyncState,
    /// The last sync error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Unix time of the last successful sync (or check that found nothing new).
    pub last_success: Option<i64>,
    /// Newest generation seen at any upstream.
    pub upstream_generation: u64,
    /// The root refused last, while that lasts (see [`crate::refusal`]).
    pub refused: Option<meridian_serve::status::RefusedRoot>,
    /// Since when the served generation is older than `upstream_generation`
    /// (kept by [`MirrorState::set_status`] and the switch).
    pub behind_since: Option<std::time::Instant>,
}

/// Everything the mirror's tasks share.
#[derive(Debug)]
pub(crate) struct MirrorState {
    /// The configuration in force (replaced whole by a reload).
    cfg: ArcSwap<MirrorConfig>,
    pub store: Arc<ObjectStore>,
    /// The trusted keys in force, as key statements changed them (replaced
    /// by a reload or a new statement, see [`crate::keys`]).
    verifier: ArcSwap<Verifier>,
    /// The key statements held, as served downstream.
    pub(crate) keys: ArcSwap<meridian_serve::keys::KeysDoc>,
    /// The statement set each upstream named when its list was last
    /// fetched (so a list that adds nothing is not fetched again).
    pub(crate) keys_seen: Mutex<std::collections::HashMap<String, meridian_core::Hash>>,
    /// One keyring update at a time (a reload, or statements learnt).
    pub(crate) keys_update: Mutex<()>,
    pub roots_dir: PathBuf,
    /// The generation being served; replaced in one atomic step.
    pub served: ArcSwapOption<Generation>,
    /// Announces the served generation number (read API long-poll).
    pub notify: watch::Sender<u64>,
    pub metrics: MirrorMetrics,
    pub status: Mutex<SyncStatus>,
    pub draining: AtomicBool,
    /// Body bytes sent, all time (egress rate is derived from it), held to
    /// the configured egress caps.
    pub egress: Arc<meridian_serve::egress::Egress>,
    /// Egress bytes per second, averaged over the last few seconds.
    pub egress_rate: AtomicU64,
    /// The open-connection counters of the listeners (set once they are
    /// bound); [`MirrorState::active_connections`] sums them when asked.
    pub listeners: std::sync::OnceLock<Vec<Arc<AtomicUsize>>>,
    /// File bodies being sent right now ([`meridian_serve::inflight`]):
    /// what a drain waits on.
    pub downloads: Arc<AtomicUsize>,
    /// Wakes the syncer to repair the served generation (scrubber).
    pub repair: Notify,
    /// An operator asked it to stop (`POST /.meridian/admin/stop`).
    pub stop_asked: Notify,
    /// Wakes the syncer after a reload (new upstreams take effect between
    /// steps).
    pub(crate) reload: Notify,
    /// Tree deltas this mirror synced by, served on to downstream mirrors.
    pub deltas: meridian_serve::readapi::DeltaCache,
    /// The generation `current` names: served and flushed to disk.
    pub durable: AtomicU64,
    /// Wakes the flusher (after a switch or a repair).
    pub flush: Notify,
    /// The lowest generation this mirror may still accept (see
    /// [`crate::floor`]).
    pub floor: Mutex<crate::floor::Floor>,
    /// Objects checked against their names since they last changed.
    pub verified: Arc<crate::verified::Verified>,
    /// How far the sync under way has got.
    pub progress: crate::progress::Progress,
    /// True once shutdown begins: long-polls of downstream mirrors are
    /// answered at once instead of holding the drain.
    pub stopping: meridian_serve::shutdown::Shutdown,
}

impl MirrorState {
    /// Opens the state directory (objects, roots, partial downloads).
    pub(crate) fn open(cfg: MirrorConfig) -> Result<Self, meridian_serve::StoreError> {
        let store = Arc::new(ObjectStore::open(cfg.state.clone())?);
        let roots_dir = cfg.state.join("roots");
        std::fs::create_dir_all(&roots_dir)
            .map_err(|e| meridian_serve::StoreError::io(&roots_dir, e))?;
        let (notify, _) = watch::channel(0);
        let ring = Self::load_keyring(&cfg.state, &TrustedKeys::new(cfg.trust.iter().copied()));
        let metrics = MirrorMetrics::new();
        metrics.describe(&cfg);
        let egress = Arc::new(meridian_serve::egress::Egress::default());
        egress.set_caps(
            cfg.egress_cap_bytes_per_sec,
            cfg.egress_cap_per_connection_bytes_per_sec,
        );
        Ok(MirrorState {
            keys: ArcSwap::new(meridian_serve::keys::KeysDoc::of(&ring)),
            keys_seen: Mutex::default(),
            keys_update: Mutex::default(),
            verifier: ArcSwap::from_pointee(Verifier::with_keyring(ring)),
            cfg: ArcSwap::from_pointee(cfg),
            reload: Notify::new(),
            store,
            roots_dir,
            served: ArcSwapOption::empty(),
            notify,
            metrics,
            status: Mutex::new(SyncStatus::default()),
            draining: AtomicBool::new(false),
            egress,
            egress_rate: AtomicU64::new(0),
            listeners: std::sync::OnceLock::new(),
            downloads: Arc::new(AtomicUsize::new(0)),
            repair: Notify::new(),
            stop_asked: Notify::new(),
            deltas: Default::default(),
            durable: AtomicU64::new(0),
            flush: Notify::new(),
            floor: Mutex::default(),
            verified: Arc::default(),
            progress: Default::default(),
            stopping: Default::default(),
        })
    }

    /// The configuration in force.
    pub(crate) fn cfg(&self) -> arc_swap::Guard<Arc<MirrorConfig>> {
        self.cfg.load()
    }

    /// The trusted keys in force.
    pub(crate) fn verifier(&self) -> arc_swap::Guard<Arc<Verifier>> {
        self.verifier.load()
    }

    /// Puts a reloaded configuration in force: trust at once, upstreams
    /// between sync steps, the rest as each part next reads it.
    pub(crate) fn reconfigure(&self, cfg: MirrorConfig) {
        self.egress.set_caps(
            cfg.egress_cap_bytes_per_sec,
            cfg.egress_cap_per_connection_bytes_per_sec,
        );
        {
            let _one_writer = self.keys_update.lock();
            // The statements are checked again against the new trust (those
            // stored and those held).
            let trust = TrustedKeys::new(cfg.trust.iter().copied());
            let mut ring = Self::load_keyring(&cfg.state, &trust);
            let held = self.verifier().keyring().encode();
            if let Ok((_, refused)) = ring.add_list(&held) {
                for e in refused {
                    tracing::warn!(error = %e, "key statement no longer authorised by the trusted keys; left out");
                }
            }
            self.set_keyring(ring);
            self.keys_seen.lock().map(|mut m| m.clear()).ok();
        }
        self.metrics.describe(&cfg);
        self.cfg.store(Arc::new(cfg));
        self.reload.notify_one();
    }

    pub(crate) fn set_verifier(&self, v: Verifier) {
        self.verifier.store(Arc::new(v));
    }

    pub(crate) fn root_path(&self, generation: u64) -> PathBuf {
        self.roots_dir.join(format!("{generation:020}.root"))
    }

    pub(crate) fn served_generation(&self) -> u64 {
        self.served.load().as_ref().map(|g| g.number()).unwrap_or(0)
    }

    /// Changes the sync status; also the one place that keeps
    /// `behind_since` (the switch calls it with a no-op).
    pub(crate) fn set_status(&self, f: impl FnOnce(&mut SyncStatus)) {
        let served = self.served_generation();
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
            if s.upstream_generation > served {
                s.behind_since.get_or_insert_with(std::time::Instant::now);
            } else {
                s.behind_since = None;
            }
        }
    }

    /// Whether this mirror should get clients from a load balancer
    /// (`GET /.meridian/ready`, a Kubernetes readiness probe): it serves a
    /// verified generation that it may serve, is not draining, and has not
    /// lagged behind its upstreams for longer than `ready_max_lag`. The
    /// error says why not.
    pub(crate) fn readiness(&self) -> Result<String, String> {
        let cfg = self.cfg();
        let served = self.served_generation();
        if served == 0 {
            return Err(match self.progress.get() {
                Some(p) => format!("no generation yet: first sync under way ({p})"),
                None => "no generation yet".to_owned(),
            });
        }
        if cfg.refuse_expired && self.is_stale() {
            return Err(format!(
                "generation {served} has expired and refuse_expired is set"
            ));
        }
        if self.is_draining() {
            return Err(format!("draining (serving generation {served})"));
        }
        let s = self.status();
        if let Some(since) = s.behind_since {
            let lag = since.elapsed();
            if lag > cfg.ready_max_lag {
                return Err(format!(
                    "generation {served} is behind the upstreams' {} for {}s, longer than ready_max_lag ({}s)",
                    s.upstream_generation,
                    lag.as_secs(),
                    cfg.ready_max_lag.as_secs()
                ));
            }
        }
        Ok(format!(
            "serving generation {served} (upstreams: {})",
            s.upstream_generation.max(served)
        ))
    }

    pub(crate) fn status(&self) -> SyncStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Connections open right now across the listeners, besides the one
    /// asking (a status probe or a scrape is not a client).
    pub(crate) fn active_connections(&self) -> usize {
        self.listeners
            .get()
            .map_or(0, |l| {
                l.iter().map(|a| a.load(Ordering::Relaxed)).sum::<usize>()
            })
            .saturating_sub(1)
    }

    /// File downloads being sent right now.
    pub(crate) fn downloads_in_flight(&self) -> usize {
        self.downloads.load(Ordering::Relaxed)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
        self.metrics.draining.set(i64::from(on));
    }

    /// A stored object found damaged (wrong size, wrong bytes): it is
    /// quarantined, forgotten as verified, counted, and the syncer is woken
    /// to fetch it again. A deleted object takes the same path on its
    /// first read.
    pub(crate) fn damaged(&self, h: &meridian_core::Hash, why: &str) {
        tracing::error!(object = %h, "stored object {why}; quarantined, will be fetched again");
        crate::scrub::quarantine(self, h);
        self.metrics.scrub_failures.inc();
        self.repair.notify_one();
    }

    /// Whether the served generation has expired.
    pub(crate) fn is_stale(&self) -> bool {
        match self.served.load().as_ref() {
            Some(g) => meridian_serve::unix_now() >= g.root.root.expires,
            None => true,
        }
    }
}
