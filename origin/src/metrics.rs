//! Origin metrics (Prometheus text format at `/.meridian/metrics`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the origin exports.
#[derive(Debug, Clone)]
pub struct OriginMetrics {
    registry: Registry,
    pub generations_published: IntCounter,
    pub latest_generation: IntGauge,
    pub latest_expiry: IntGauge,
    pub files_hashed: IntCounter,
    pub bytes_hashed: IntCounter,
    pub publish_seconds: Histogram,
    pub hash_seconds: prometheus::Counter,
    pub bytes_served: IntCounter,
    pub skipped_files: IntCounterVec,
    /// Scans by scope: `full` (the whole tree) or `changed` (the paths
    /// inotify reported).
    pub scans: IntCounterVec,
    pub watched_directories: IntGauge,
    pub waiters: IntGauge,
    pub gc_objects_removed: IntCounter,
    pub publish_errors: IntCounter,
}

impl OriginMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = OriginMetrics {
            generations_published: IntCounter::new(
                "meridian_origin_generations_published_total",
                "Generations signed and published",
            )
            .expect("metric"),
            latest_generation: IntGauge::new(
                "meridian_origin_latest_generation",
                "Newest published generation number",
            )
            .expect("metric"),
            latest_expiry: IntGauge::new(
                "meridian_origin_latest_expiry_timestamp_seconds",
                "When the newest generation's signature expires (Unix time; the origin re-signs resign_before ahead)",
            )
            .expect("metric"),
            files_hashed: IntCounter::new(
                "meridian_origin_files_hashed_total",
                "Files hashed (cache misses)",
            )
            .expect("metric"),
            bytes_hashed: IntCounter::new("meridian_origin_bytes_hashed_total", "Bytes hashed")
                .expect("metric"),
            publish_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "meridian_origin_publish_seconds",
                    "Wall time of a scan-and-publish",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )
            .expect("metric"),
            hash_seconds: prometheus::Counter::new(
                "meridian_origin_hash_seconds_total",
                "Thread-seconds spent hashing and snapshotting files",
            )
            .expect("metric"),
            bytes_served: IntCounter::new(
                "meridian_origin_bytes_served_total",
                "Object bytes served over the read API",
            )
            .expect("metric"),
            skipped_files: IntCounterVec::new(
                Opts::new(
                    "meridian_origin_skipped_files_total",
                    "Directory entries not published, by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            scans: IntCounterVec::new(
                Opts::new(
                    "meridian_origin_scans_total",
                    "Scans of the content directory, by scope: full (the whole tree) or changed (only the paths inotify reported)",
                ),
                &["scope"],
            )
            .expect("metric"),
            watched_directories: IntGauge::new(
                "meridian_origin_watched_directories",
                "Directories under inotify watch",
            )
            .expect("metric"),
            waiters: IntGauge::new(
                "meridian_origin_waiters",
                "Long-poll clients waiting for the next generation",
            )
            .expect("metric"),
            gc_objects_removed: IntCounter::new(
                "meridian_origin_gc_objects_removed_total",
                "Objects garbage-collected",
            )
            .expect("metric"),
            publish_errors: IntCounter::new(
                "meridian_origin_publish_errors_total",
                "Publish attempts that failed",
            )
            .expect("metric"),
            registry,
        };
        let r = &m.registry;
        for c in [
            &m.generations_published,
            &m.files_hashed,
            &m.bytes_hashed,
            &m.bytes_served,
            &m.gc_objects_removed,
            &m.publish_errors,
        ] {
            r.register(Box::new(c.clone())).expect("register");
        }
        for g in [
            &m.latest_generation,
            &m.latest_expiry,
            &m.watched_directories,
            &m.waiters,
        ] {
            r.register(Box::new(g.clone())).expect("register");
        }
        for reason in crate::scan::SkipReason::ALL {
            m.skipped_files.with_label_values(&[reason.label()]);
        }
        for scope in ["full", "changed"] {
            m.scans.with_label_values(&[scope]);
        }
        r.register(Box::new(m.scans.clone())).expect("register");
        meridian_serve::metrics::register_common(r, "origin");
        r.register(Box::new(m.publish_seconds.clone()))
            .expect("register");
        r.register(Box::new(m.hash_seconds.clone()))
            .expect("register");
        r.register(Box::new(m.skipped_files.clone()))
            .expect("register");
        m
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for OriginMetrics {
    fn default() -> Self {
        Self::new()
    }
}
