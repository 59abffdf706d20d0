//! Active health checks: every `interval`, each mirror's status endpoint is
//! probed (with `timeout`). A mirror goes down after `down_after`
//! consecutive failures and comes back after `up_after` consecutive
//! successes, so one lost probe does not flap it. The newest generation is
//! the origin's (if `origin_health_url` is set) or the highest any mirror
//! reports. After each round a snapshot of every mirror's [`MirrorView`] is
//! published for the query path to read without locks.

use crate::config::{GeoDnsConfig, Mirror};
use crate::select::{Health, MirrorView};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What an operator forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Forced {
    #[default]
    None,
    Down,
    Drain,
}

/// Probe history and last status of one mirror.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeState {
    pub up: bool,
    pub answering: bool,
    pub ok_streak: u32,
    pub fail_streak: u32,
    pub generation: u64,
    pub upstream_generation: u64,
    pub draining: bool,
    pub stale: bool,
    pub egress_bytes_per_sec: u64,
    pub capacity_bytes_per_sec: u64,
    /// When the mirror last finished a sync (unix seconds), as it reports.
    pub last_sync: Option<i64>,
    /// How long the last probe took (seconds).
    pub probe_seconds: f64,
    pub last_error: Option<String>,
    /// Seconds since the last up/down/drain change.
    #[serde(skip)]
    pub changed_at: Option<Instant>,
    pub forced: Forced,
}

impl Default for ProbeState {
    fn default() -> Self {
        ProbeState {
            up: false,
            answering: false,
            ok_streak: 0,
            fail_streak: 0,
            generation: 0,
            upstream_generation: 0,
            draining: false,
            stale: false,
            egress_bytes_per_sec: 0,
            capacity_bytes_per_sec: 0,
            last_sync: None,
            probe_seconds: 0.0,
            last_error: None,
            changed_at: None,
            forced: Forced::None,
        }
    }
}

use meridian_serve::status::MirrorStatus as StatusDoc;

/// The shared health picture.
#[derive(Debug)]
pub struct Tracker {
    pub states: Mutex<HashMap<String, ProbeState>>,
    pub newest_generation: std::sync::atomic::AtomicU64,
    /// What the query path reads.
    pub views: ArcSwap<Views>,
    http: reqwest::Client,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker {
            states: Mutex::new(HashMap::new()),
            newest_generation: std::sync::atomic::AtomicU64::new(0),
            views: ArcSwap::from_pointee(Views::new(Vec::new())),
            http: reqwest::Client::builder()
                // A connection per probe, closed after it: an idle probe
                // connection would count as a client on the mirror.
                .pool_max_idle_per_host(0)
                .user_agent("meridian-geodns-probe")
                .build()
                .unwrap_or_default(),
        }
    }

    /// Operator override of mirror `id` (one the served config has: the
    /// caller checks; the next probe round drops an unknown one).
    pub fn force(&self, id: &str, f: Forced) {
        let Ok(mut s) = self.states.lock() else {
            return;
        };
        let p = s.entry(id.to_owned()).or_default();
        p.forced = f;
        p.changed_at = Some(Instant::now());
    }

    async fn probe(&self, url: &str, timeout: Duration) -> Result<StatusDoc, String> {
        let r = self
            .http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| meridian_serve::describe(&e))?;
        if !r.status().is_success() {
            return Err(format!("{url}: HTTP {}", r.status()));
        }
        let body = r.bytes().await.map_err(|e| meridian_serve::describe(&e))?;
        if body.len() > 64 * 1024 {
            return Err("status document too large".into());
        }
        serde_json::from_slice(&body).map_err(|e| format!("status is not the expected JSON: {e}"))
    }

    /// One round of probes against `cfg`. Returns each mirror's probe:
    /// (id, how long it took, whether it succeeded), for the metrics.
    pub async fn round(&self, cfg: &GeoDnsConfig) -> Vec<(String, Duration, bool)> {
        let timeout = cfg.health.timeout;
        let timed = futures_util::future::join_all(cfg.mirrors.iter().map(|m| async move {
            let t0 = Instant::now();
            let r = self.probe(&m.status_url, timeout).await;
            (m.id.clone(), t0.elapsed(), r)
        }))
        .await;
        let probes = timed
            .iter()
            .map(|(id, took, r)| (id.clone(), *took, r.is_ok()))
            .collect();
        let results: Vec<(String, Result<StatusDoc, String>)> =
            timed.into_iter().map(|(id, _, r)| (id, r)).collect();
        let origin_gen = match &cfg.origin_health_url {
            Some(u) => {
                #[derive(Deserialize)]
                struct OriginHealth {
                    generation: u64,
                }
                let r = async {
                    let r = self.http.get(u).timeout(timeout).send().await.ok()?;
                    serde_json::from_slice::<OriginHealth>(&r.bytes().await.ok()?).ok()
                }
                .await;
                r.map(|o| o.generation)
            }
            None => None,
        };
        let now = Instant::now();
        let Ok(mut states) = self.states.lock() else {
            return probes;
        };
        states.retain(|id, _| cfg.mirrors.iter().any(|m| &m.id == id));
        let mut newest = origin_gen.unwrap_or(0);
        for ((id, r), (_, took, _)) in results.into_iter().zip(&probes) {
            let st = states.entry(id.clone()).or_default();
            let was = (st.up, st.draining);
            st.probe_seconds = took.as_secs_f64();
            match r {
                Ok(doc) => {
                    st.answering = true;
                    st.ok_streak += 1;
                    st.fail_streak = 0;
                    st.generation = doc.generation;
                    st.upstream_generation = doc.upstream_generation;
                    st.draining = doc.draining;
                    st.stale = doc.stale;
                    st.egress_bytes_per_sec = doc.egress_bytes_per_sec;
                    st.capacity_bytes_per_sec = doc.capacity_bytes_per_sec;
                    st.last_sync = doc.last_sync;
                    st.last_error = None;
                    if !st.up && st.ok_streak >= cfg.health.up_after {
                        st.up = true;
                    }
                }
                Err(e) => {
                    st.answering = false;
                    st.fail_streak += 1;
                    st.ok_streak = 0;
                    st.last_error = Some(e);
                    if st.up && st.fail_streak >= cfg.health.down_after {
                        st.up = false;
                    }
                }
            }
            if origin_gen.is_none() && st.answering {
                newest = newest.max(st.generation).max(st.upstream_generation);
            }
            if (st.up, st.draining) != was {
                st.changed_at = Some(now);
                tracing::info!(mirror = %id, up = st.up, draining = st.draining, error = st.last_error.as_deref().unwrap_or(""), "mirror state changed");
            }
        }
        self.newest_generation
            .store(newest, std::sync::atomic::Ordering::Relaxed);
        let views: Vec<MirrorView> = cfg
            .mirrors
            .iter()
            .map(|m| view(m, states.get(&m.id), newest, cfg.health.max_generation_lag))
            .collect();
        drop(states);
        self.views.store(Arc::new(Views::new(views)));
        probes
    }

    /// One consistent look at every mirror for a report: the views the
    /// query path reads, a copy of the probe states, the newest generation.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            views: self.views.load_full(),
            states: self.states.lock().map(|s| s.clone()).unwrap_or_default(),
            newest: self
                .newest_generation
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Rebuilds the views without probing (after a config reload or an
    /// operator action).
    pub fn refresh_views(&self, cfg: &GeoDnsConfig) {
        let newest = self
            .newest_generation
            .load(std::sync::atomic::Ordering::Relaxed);
        let Ok(states) = self.states.lock() else {
            return;
        };
        let views = cfg
            .mirrors
            .iter()
            .map(|m| view(m, states.get(&m.id), newest, cfg.health.max_generation_lag))
            .collect();
        drop(states);
        self.views.store(Arc::new(Views::new(views)));
    }
}

/// What [`Tracker::snapshot`] returns.
pub(crate) struct Snapshot {
    pub views: Arc<Views>,
    pub states: HashMap<String, ProbeState>,
    pub newest: u64,
}

/// One snapshot of every mirror as the query path sees it, with a
/// fingerprint of the mirrors' coordinates: per-location caches of
/// distances stay valid exactly as long as the fingerprint is unchanged
/// (health changes every probe round; coordinates only on a reload).
#[derive(Debug)]
pub struct Views {
    pub mirrors: Vec<MirrorView>,
    pub coords: u64,
}

impl Views {
    pub fn new(mirrors: Vec<MirrorView>) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        for m in &mirrors {
            m.lat.to_bits().hash(&mut h);
            m.lon.to_bits().hash(&mut h);
        }
        mirrors.len().hash(&mut h);
        Views {
            coords: h.finish(),
            mirrors,
        }
    }
}

impl std::ops::Deref for Views {
    type Target = [MirrorView];
    fn deref(&self) -> &[MirrorView] {
        &self.mirrors
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a mirror stands, from the query path's view of it: the one
/// place the admin report, the status page and its colours take it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Standing {
    /// Up, current, not draining, below capacity: given to new clients.
    InService,
    /// Up and current but at capacity: held back until load falls.
    Full,
    /// Up but behind the newest generation (or stale).
    Lagging,
    /// Draining (it said so, or an operator drained it).
    Draining,
    /// Failing health probes.
    Down,
    /// Taken out by an operator.
    ForcedDown,
}

impl Standing {
    pub(crate) fn of(v: &MirrorView, full_at: f64) -> Standing {
        let h = &v.health;
        if h.forced_down {
            Standing::ForcedDown
        } else if !h.up {
            Standing::Down
        } else if h.draining {
            Standing::Draining
        } else if !h.current {
            Standing::Lagging
        } else if h.load >= full_at {
            Standing::Full
        } else {
            Standing::InService
        }
    }
    /// Why a mirror is or is not answered, in words.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Standing::ForcedDown => "forced down by an operator",
            Standing::Down => "down (failed health probes)",
            Standing::Draining => "draining",
            Standing::Lagging => "behind the newest generation (or stale)",
            Standing::Full => "at capacity",
            Standing::InService => "in service",
        }
    }
}

fn view(m: &Mirror, st: Option<&ProbeState>, newest: u64, lag: u64) -> MirrorView {
    let d = ProbeState::default();
    let st = st.unwrap_or(&d);
    let capacity = m
        .capacity_bytes_per_sec
        .unwrap_or(st.capacity_bytes_per_sec);
    let load = if capacity > 0 {
        st.egress_bytes_per_sec as f64 / capacity as f64
    } else {
        0.0
    };
    MirrorView {
        id: m.id.clone(),
        region: m.region.clone(),
        lat: m.latitude,
        lon: m.longitude,
        v4: m.ipv4.clone(),
        v6: m.ipv6.clone(),
        weight: m.weight,
        countries: m.countries.clone(),
        continents: m.continents.clone(),
        health: Health {
            up: st.up,
            answering: st.answering,
            current: st.generation > 0 && st.generation + lag >= newest && !st.stale,
            draining: st.draining || st.forced == Forced::Drain,
            forced_down: st.forced == Forced::Down,
            load,
            changed_at: st.changed_at,
        },
        generation: st.generation,
    }
}
