//! Starting again on what is on disk: the rollback floor from `highest`
//! and the retained roots, then the generation `current` names, or else the
//! newest retained root whose tree loads.

use crate::generation::Generation;
use crate::sync::{SyncError, Syncer};
use meridian_core::VerifiedRoot;

impl Syncer {
    /// Loads the generation served before a restart, if any, and
    /// establishes the rollback floor. `current` (the last durable
    /// generation) is preferred; if it is damaged or its tree cannot be
    /// loaded, the newest retained root whose tree loads is served instead.
    pub(crate) fn restore(&self) -> Result<Option<u64>, SyncError> {
        let retained = self.retained_roots();
        crate::floor::establish(&self.state, &retained);
        let cur_path = self.state.cfg().state.join("current");
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
    pub(crate) fn retained_roots(&self) -> Vec<VerifiedRoot> {
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
            match std::fs::read(e.path()).map(|env| self.state.verifier().open(&env)) {
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
}
