//! Garbage collection of objects and roots the mirror no longer serves.

use crate::generation::Generation;
use crate::sync::Syncer;
use meridian_core::Hash;
use std::collections::HashSet;

impl Syncer {
    /// Removes objects neither the served generation nor the previous one
    /// references, once they are older than the grace period. Unlinking is
    /// safe under running downloads: an open file stays readable.
    pub(crate) fn gc(&self) {
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
            .and_then(|env| self.state.verifier().open(&env).ok())
            .and_then(|vr| Generation::assemble(&self.state.store, vr, Some(&g.nodes)).ok())
        {
            add(&prev);
        }
        let grace = self.state.cfg().gc_grace;
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
        // Partial downloads of blobs nothing served needs (a sync that
        // moved on, an upstream that withdrew a generation), idle for the
        // grace period.
        let partials = self
            .state
            .store
            .remove_stale_partials(|h| keep.contains(h), grace);
        if partials > 0 {
            tracing::info!(partials, "removed stale partial downloads");
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
