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
use std::sync::Arc;

/// Re-hashes every object of the served generation; returns the bad ones
/// (already quarantined).
pub fn scrub_once(state: &MirrorState) -> Vec<Hash> {
    let Some(g) = state.served.load_full() else {
        return Vec::new();
    };
    let mut objects: HashSet<Hash> = g.nodes.keys().copied().collect();
    objects.extend(g.blobs().map(|(h, _)| h));
    let qdir = state.cfg.state.join("quarantine");
    let mut bad = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for h in objects {
        let path = state.store.path(&h);
        let Ok(mut f) = std::fs::File::open(&path) else {
            continue; // missing: the repair pass fetches it
        };
        let mut hasher = blake3::Hasher::new();
        let ok = loop {
            match f.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                }
                Err(_) => break false,
            }
        };
        let got: Hash = hasher.finalize().into();
        if !ok || got != h {
            tracing::error!(object = %h, "stored object is damaged; quarantined, will be fetched again");
            let _ = std::fs::create_dir_all(&qdir);
            if std::fs::rename(&path, qdir.join(h.to_hex())).is_err() {
                let _ = std::fs::remove_file(&path);
            }
            state.metrics.scrub_failures.inc();
            bad.push(h);
        }
    }
    if !bad.is_empty() {
        state.repair.notify_one();
    }
    bad
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
