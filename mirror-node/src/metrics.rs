//! Mirror metrics (Prometheus text format at `/.meridian/metrics`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric a mirror exports.
#[derive(Debug, Clone)]
pub(crate) struct MirrorMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub sync_seconds: Histogram,
    pub syncs: IntCounterVec,
    pub bytes_fetched: IntCounter,
    pub manifest_bytes_fetched: IntCounter,
    pub blobs_patched: IntCounter,
    pub objects_fetched: IntCounter,
    pub packs_fetched: IntCounter,
    pub verify_failures: IntCounterVec,
    pub served_generation: IntGauge,
    pub served_expiry: IntGauge,
    pub first_byte_seconds: Histogram,
    pub durable_generation: IntGauge,
    pub flush_failures: IntCounter,
    pub upstream_generation: IntGauge,
    pub generation_lag: IntGauge,
    pub disk_free_bytes: IntGauge,
    pub store_bytes: IntGauge,
    pub active_connections: IntGauge,
    pub downloads_in_flight: IntGauge,
    pub scrub_failures: IntCounter,
    pub draining: IntGauge,
    pub refused_roots: IntCounterVec,
    pub refused_generation: IntGauge,
    capacity: IntGauge,
    info: prometheus::IntGaugeVec,
}

impl MirrorMetrics {
    pub(crate) fn new() -> Self {
        let m = MirrorMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "meridian_mirror_requests_total",
                    "Download requests by status class",
                ),
                &["class"],
            )
            .expect("metric"),
            response_bytes: IntCounterVec::new(
                Opts::new(
                    "meridian_mirror_response_bytes_total",
                    "Body bytes sent by status class",
                ),
                &["class"],
            )
            .expect("metric"),
            sync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "meridian_mirror_sync_seconds",
                    "Duration of a sync to a new generation",
                )
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                ]),
            )
            .expect("metric"),
            syncs: IntCounterVec::new(
                Opts::new("meridian_mirror_syncs_total", "Sync attempts by result"),
                &["result"],
            )
            .expect("metric"),
            bytes_fetched: IntCounter::new(
                "meridian_mirror_bytes_fetched_total",
                "Bytes downloaded from upstreams",
            )
            .expect("metric"),
            manifest_bytes_fetched: IntCounter::new(
                "meridian_mirror_manifest_bytes_fetched_total",
                "Bytes of signed roots and directory nodes downloaded",
            )
            .expect("metric"),
            blobs_patched: IntCounter::new(
                "meridian_mirror_blobs_patched_total",
                "Changed blobs rebuilt from a patch against their old version",
            )
            .expect("metric"),
            objects_fetched: IntCounter::new(
                "meridian_mirror_objects_fetched_total",
                "Blobs and nodes downloaded and verified",
            )
            .expect("metric"),
            packs_fetched: IntCounter::new(
                "meridian_mirror_packs_fetched_total",
                "Packs (the small blobs of one directory node in one request) fetched whole",
            )
            .expect("metric"),
            verify_failures: IntCounterVec::new(
                Opts::new(
                    "meridian_mirror_verify_failures_total",
                    "Objects or roots from an upstream that failed verification",
                ),
                &["upstream"],
            )
            .expect("metric"),
            served_generation: IntGauge::new(
                "meridian_mirror_served_generation",
                "Generation being served",
            )
            .expect("metric"),
            served_expiry: IntGauge::new(
                "meridian_mirror_served_expiry_timestamp_seconds",
                "When the served generation's signature expires (Unix time; 0: none served)",
            )
            .expect("metric"),
            first_byte_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "meridian_mirror_first_byte_seconds",
                    "Time from a request's head to its response's head (time to first byte at the server)",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ]),
            )
            .expect("metric"),
            durable_generation: IntGauge::new(
                "meridian_mirror_durable_generation",
                "Newest served generation flushed to disk (what a restart after a power loss serves)",
            )
            .expect("metric"),
            flush_failures: IntCounter::new(
                "meridian_mirror_flush_failures_total",
                "Failed attempts to flush the store to disk",
            )
            .expect("metric"),
            upstream_generation: IntGauge::new(
                "meridian_mirror_upstream_generation",
                "Newest generation seen upstream",
            )
            .expect("metric"),
            generation_lag: IntGauge::new(
                "meridian_mirror_generation_lag",
                "Upstream generation minus served generation",
            )
            .expect("metric"),
            disk_free_bytes: IntGauge::new(
                "meridian_mirror_disk_free_bytes",
                "Free bytes on the store's file system",
            )
            .expect("metric"),
            store_bytes: IntGauge::new(
                "meridian_mirror_store_bytes",
                "Bytes of the files the served generation names (the total in its signed root; a file at two paths counts twice)",
            )
            .expect("metric"),
            active_connections: IntGauge::new(
                "meridian_mirror_active_connections",
                "Open client connections (not counting the scrape's own)",
            )
            .expect("metric"),
            downloads_in_flight: IntGauge::new(
                "meridian_mirror_downloads_in_flight",
                "File downloads being sent (what a drain waits on; probes and idle connections are not downloads)",
            )
            .expect("metric"),
            scrub_failures: IntCounter::new(
                "meridian_mirror_scrub_failures_total",
                "Stored objects found damaged (by the scrubber, or by a download's check) and quarantined",
            )
            .expect("metric"),
            draining: IntGauge::new("meridian_mirror_draining", "1 while draining")
                .expect("metric"),
            refused_roots: IntCounterVec::new(
                Opts::new(
                    "meridian_mirror_refused_roots_total",
                    "Roots refused (or upstreams found behind this mirror), by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            refused_generation: IntGauge::new(
                "meridian_mirror_refused_generation",
                "Generation of the root refused last, while the refusal lasts (0: none)",
            )
            .expect("metric"),
            capacity: IntGauge::new(
                "meridian_mirror_capacity_bytes_per_second",
                "Egress capacity reported to GeoDNS: the configured one, or the enforced egress cap if lower (compare with rate(meridian_mirror_response_bytes_total))",
            )
            .expect("metric"),
            info: prometheus::IntGaugeVec::new(
                Opts::new(
                    "meridian_mirror_info",
                    "Always 1; the labels give this mirror's id and region (for dashboards to group by)",
                ),
                &["id", "region"],
            )
            .expect("metric"),
            registry: Registry::new(),
        };
        // Every reason exists from the start, so an alert on any increase
        // sees the first one.
        for r in crate::refusal::REASONS {
            m.refused_roots.with_label_values(&[r]);
        }
        for r in crate::sync::SYNC_RESULTS {
            m.syncs.with_label_values(&[r]);
        }
        let r = &m.registry;
        for c in [
            &m.requests,
            &m.response_bytes,
            &m.syncs,
            &m.verify_failures,
            &m.refused_roots,
        ] {
            r.register(Box::new(c.clone())).expect("register");
        }
        for c in [
            &m.bytes_fetched,
            &m.manifest_bytes_fetched,
            &m.blobs_patched,
            &m.objects_fetched,
            &m.packs_fetched,
            &m.scrub_failures,
            &m.flush_failures,
        ] {
            r.register(Box::new(c.clone())).expect("register");
        }
        for g in [
            &m.served_generation,
            &m.served_expiry,
            &m.durable_generation,
            &m.upstream_generation,
            &m.generation_lag,
            &m.disk_free_bytes,
            &m.store_bytes,
            &m.active_connections,
            &m.downloads_in_flight,
            &m.draining,
            &m.refused_generation,
            &m.capacity,
        ] {
            r.register(Box::new(g.clone())).expect("register");
        }
        for h in [&m.sync_seconds, &m.first_byte_seconds] {
            r.register(Box::new(h.clone())).expect("register");
        }
        r.register(Box::new(m.info.clone())).expect("register");
        meridian_serve::metrics::register_common(r, "mirror");
        m
    }

    /// The series that describe the configuration: capacity, id and region
    /// (set at start and on every reload).
    pub(crate) fn describe(&self, cfg: &crate::config::MirrorConfig) {
        self.capacity
            .set(cfg.reported_capacity().min(i64::MAX as u64) as i64);
        self.info.reset();
        self.info.with_label_values(&[&cfg.id, &cfg.region]).set(1);
    }

    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for MirrorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
