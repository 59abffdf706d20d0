//! The scrubber: the continuous check that catches damage on this mirror's
//! own disk that no file-system change reveals (bit rot, a bad sector). It
//! starts at boot and re-hashes every blob and node of the served
//! generation, at most `scrub_bytes_per_sec`, then waits until
//! `scrub_interval` has passed since the pass began and starts again. An
//! object that matches is remembered as verified (its downloads are then
//! sent without another check, see [`crate::verified`]); one that does not
//! is quarantined (moved to `quarantine/`), which makes the download server
//! answer 503 for it at once, and the syncer is woken to fetch a good copy.

use crate::state::MirrorState;
use meridian_core::Hash;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one object's check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scrubbed {
    /// Matched; this many bytes were read.
    Good(u64),
    /// Did not match (quarantined); this many bytes were read.
    Bad(u64),
    /// Not in the store (the repair pass fetches it).
    Missing,
}

/// Re-hashes one stored object; quarantines it if it does not match.
pub(crate) fn scrub_object(state: &MirrorState, h: &Hash, buf: &mut [u8]) -> Scrubbed {
    let Ok(f) = std::fs::File::open(state.store.path(h)) else {
        return Scrubbed::Missing;
    };
    let Ok(md) = f.metadata() else {
        return Scrubbed::Missing;
    };
    let stamp = crate::verified::Stamp::of(&md);
    if crate::verified::hashes_to(&f, h, buf) {
        state.verified.remember(*h, stamp);
        Scrubbed::Good(md.len())
    } else {
        state.damaged(h, "does not match its hash (scrub)");
        Scrubbed::Bad(md.len())
    }
}

/// Every object of the served generation (nodes and blobs), once each.
fn served_objects(state: &MirrorState) -> Vec<Hash> {
    let Some(g) = state.served.load_full() else {
        return Vec::new();
    };
    let mut objects: HashSet<Hash> = g.nodes.keys().copied().collect();
    objects.extend(g.blobs().map(|(h, _)| h));
    objects.into_iter().collect()
}

/// Whether the file at `path` hashes to `h` (one that fails to read does
/// not); `None` if it cannot be opened (missing).
pub(crate) fn object_matches(path: &Path, h: &Hash, buf: &mut [u8]) -> Option<bool> {
    let f = std::fs::File::open(path).ok()?;
    Some(crate::verified::hashes_to(&f, h, buf))
}

/// Moves a damaged object out of the store (into `quarantine/`, for a
/// post-mortem); the download server answers 503 for it at once.
pub(crate) fn quarantine(state: &MirrorState, h: &Hash) {
    state.verified.forget(h);
    let qdir = state.cfg().state.join("quarantine");
    let path = state.store.path(h);
    let _ = std::fs::create_dir_all(&qdir);
    if std::fs::rename(&path, qdir.join(h.to_hex())).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Objects hashed per blocking task: small objects are batched so a pass
/// over a million of them is not a million task hand-offs.
const BATCH_BYTES: u64 = 8 << 20;

/// Scrubs continuously from boot until shutdown (`scrub_interval` 0: off).
pub(crate) async fn run(state: Arc<MirrorState>, mut shutdown: meridian_serve::shutdown::Stopping) {
    let every = state.cfg().scrub_interval;
    let rate = state.cfg().scrub_bytes_per_sec.max(1);
    if every.is_zero() {
        return;
    }
    loop {
        let began = Instant::now();
        let (mut checked, mut bytes, mut bad) = (0u64, 0u64, 0u64);
        let s = state.clone();
        let mut todo = tokio::task::spawn_blocking(move || served_objects(&s))
            .await
            .unwrap_or_default();
        while !todo.is_empty() {
            // One batch on the blocking pool, then a pause that keeps the
            // pass at the budgeted rate.
            let s = state.clone();
            let (rest, done) = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut done = (0u64, 0u64, 0u64);
                while let Some(h) = todo.pop() {
                    match scrub_object(&s, &h, &mut buf) {
                        Scrubbed::Good(n) => done = (done.0 + 1, done.1 + n, done.2),
                        Scrubbed::Bad(n) => done = (done.0 + 1, done.1 + n, done.2 + 1),
                        Scrubbed::Missing => s.repair.notify_one(),
                    }
                    if done.1 >= BATCH_BYTES {
                        break;
                    }
                }
                (todo, done)
            })
            .await
            .unwrap_or_default();
            todo = rest;
            checked += done.0;
            bytes += done.1;
            bad += done.2;
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            let wait = due.saturating_sub(began.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait() => return,
            }
        }
        tracing::info!(
            objects = checked,
            bytes,
            damaged = bad,
            seconds = began.elapsed().as_secs_f64(),
            "scrub pass complete"
        );
        tokio::select! {
            _ = tokio::time::sleep(every.saturating_sub(began.elapsed()).max(Duration::from_secs(1))) => {}
            _ = shutdown.wait() => return,
        }
    }
}
