//! The file-alteration monitor half: inotify (via `notify`) on the content
//! directory, recursively. Events only *trigger* a scan; the scan itself
//! decides what changed, so a lost or coalesced event (inotify queue
//! overflow) costs latency, never correctness. A periodic rescan backs it up.

use notify::{RecursiveMode, Watcher};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// Counts change events and wakes the publish loop.
#[derive(Debug, Default)]
pub(crate) struct ChangeSignal {
    pub events: AtomicU64,
    pub wake: Notify,
}

impl ChangeSignal {
    pub(crate) fn poke(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }
    pub(crate) fn count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// Starts watching; the watcher stops when the returned value is dropped.
pub(crate) fn watch(
    dir: &Path,
    signal: Arc<ChangeSignal>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) if ev.kind.is_access() => {}
        Ok(_) => signal.poke(),
        Err(e) => {
            tracing::warn!(error = %e, "file watcher error; rescanning");
            signal.poke();
        }
    })?;
    w.watch(dir, RecursiveMode::Recursive)?;
    Ok(w)
}
