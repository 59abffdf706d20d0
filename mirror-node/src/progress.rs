//! How far the running sync has got: files and bytes of the blobs it has
//! to fetch, done and in all. Read by the status document, the 503 a
//! mirror answers before its first generation, and the progress log line a
//! long sync writes every [`LOG_EVERY`].

pub(crate) use meridian_serve::status::SyncProgress;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A long sync logs its progress this often.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(5);

/// The progress of the sync under way, if any.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    now: Mutex<Option<(SyncProgress, Instant, u64)>>,
}

impl Progress {
    /// A sync of `files` blobs, `bytes` in all, of which `have` bytes are
    /// already here (resumed partial downloads).
    pub(crate) fn start(&self, generation: u64, files: u64, bytes: u64, have: u64) {
        if let Ok(mut p) = self.now.lock() {
            *p = Some((
                SyncProgress {
                    generation,
                    files_done: 0,
                    files_total: files,
                    bytes_done: have.min(bytes),
                    bytes_total: bytes,
                },
                Instant::now(),
                have.min(bytes),
            ));
        }
    }

    /// One blob of `size` bytes is in the store.
    pub(crate) fn blob_done(&self, size: u64) {
        if let Ok(mut p) = self.now.lock()
            && let Some((s, _, _)) = p.as_mut()
        {
            s.files_done += 1;
            s.bytes_done = (s.bytes_done + size).min(s.bytes_total);
        }
    }

    /// The sync ended (switched, or failed).
    pub(crate) fn finish(&self) {
        if let Ok(mut p) = self.now.lock() {
            *p = None;
        }
    }

    pub(crate) fn get(&self) -> Option<SyncProgress> {
        self.now.lock().ok()?.map(|(s, _, _)| s)
    }

    /// The progress with its rate since the start (bytes per second) and
    /// the time left at that rate.
    pub(crate) fn rate(&self) -> Option<(SyncProgress, f64, Option<Duration>)> {
        let (s, started, have) = (*self.now.lock().ok()?)?;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = (s.bytes_done - have) as f64 / secs;
        let left = s.bytes_total - s.bytes_done;
        let eta = (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate));
        Some((s, rate, eta))
    }

    /// Logs the progress (the sync's periodic line).
    pub(crate) fn log(&self) {
        if let Some((s, rate, eta)) = self.rate() {
            tracing::info!(
                generation = s.generation,
                files_done = s.files_done,
                files_total = s.files_total,
                bytes_done = s.bytes_done,
                bytes_total = s.bytes_total,
                rate_bytes_per_sec = rate as u64,
                eta_seconds = eta.map(|d| d.as_secs()),
                "syncing {s}, {:.1} MB/s, {} left",
                rate / 1e6,
                eta.map(
                    |d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
                )
                .unwrap_or_else(|| "unknown time".into())
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_and_bytes_and_ends() {
        let p = Progress::default();
        assert_eq!(p.get(), None);
        p.start(7, 4, 1000, 100);
        p.blob_done(300);
        let s = p.get().expect("running");
        assert_eq!((s.files_done, s.bytes_done, s.percent()), (1, 400, 40));
        assert!(
            s.to_string()
                .contains("1 of 4 files, 400 of 1000 bytes (40%)")
        );
        p.finish();
        assert_eq!(p.get(), None);
    }
}
