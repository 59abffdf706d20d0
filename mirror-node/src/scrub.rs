//! The scrubber: the periodic check that catches damage on this mirror's own
//! disk (bit rot, or someone editing a blob in place). Every blob and node of
//! the served generation is re-hashed; one that no longer matches is
//! quarantined (moved to `quarantine/`), which makes the download server
//! answer 503 for it at once, and the syncer is woken to fetch a good copy.
//!
//! In addition every download checks the blob's size against the manifest
//! before sending a byte, so truncation is caught on read.

use crate::state::MirrorState;
use meridian_core::Hash;
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Re-hashes every object of the served generation; returns the bad ones
/// (already quarantined).
pub fn scrub_once(state: &MirrorState) -> Vec<Hash> {
    let Some(g) = state.served.load_full() else {
        return Vec::new();
    };
    let mut objects: HashSet<Hash> = g.nodes.keys().copied().collect();
    objects.extend(g.blobs().map(|(h, _)| h));
    let mut bad = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for h in objects {
        let path = state.store.path(&h);
        // Missing (None): the repair pass fetches it.
        if object_matches(&path, &h, &mut buf) == Some(false) {
            tracing::error!(object = %h, "stored object is damaged; quarantined, will be fetched again");
            quarantine(state, &h);
            state.metrics.scrub_failures.inc();
            bad.push(h);
        }
    }
    if !bad.is_empty() {
        state.repair.notify_one();
    }
    bad
}

/// Whether the file at `path` hashes to `h` (one that fails to read does
/// not); `None` if it cannot be opened (missing).
pub fn object_matches(path: &Path, h: &Hash, buf: &mut [u8]) -> Option<bool> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut hasher = blake3::Hasher::new();
    loop {
        match f.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(_) => return Some(false),
        }
    }
    Some(Hash::from(hasher.finalize()) == *h)
}

/// Moves a damaged object out of the store (into `quarantine/`, for a
/// post-mortem); the download server answers 503 for it at once.
pub fn quarantine(state: &MirrorState, h: &Hash) {
    let qdir = state.cfg.state.join("quarantine");
    let path = state.store.path(h);
    let _ = std::fs::create_dir_all(&qdir);
    if std::fs::rename(&path, qdir.join(h.to_hex())).is_err() {
        let _ = std::fs::remove_file(&path);
    }
}

/// Runs the scrubber every `scrub_interval` until shutdown.
pub async fn run(state: Arc<MirrorState>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = state.cfg.scrub_interval;
    if every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || scrub_once(&s)).await;
    }
}
