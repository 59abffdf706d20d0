//! GeoDNS metrics (Prometheus): queries by response code and by client
//! country, answers by mirror and by client country → mirror, answer
//! latency, mirror health and probes.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Counters of one family by label value.
type ByLabel = FxHashMap<String, IntCounter>;

thread_local! {
    /// Per-thread cache of resolved label counters: (metrics id, family, label) -> counter.
    /// Resolving a label (`with_label_values`) hashes and locks; the query
    /// path only does a local map lookup and an atomic add.
    static COUNTERS: RefCell<FxHashMap<(u64, u8), FxHashMap<String, IntCounter>>> = RefCell::new(FxHashMap::default());
    /// The same for the two-label steering counter: metrics id -> country -> mirror -> counter.
    static PAIRS: RefCell<FxHashMap<u64, FxHashMap<String, ByLabel>>> = RefCell::new(FxHashMap::default());
}

/// A fresh key for [`inc_cached`] (one per metrics instance).
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Adds `n` to `vec{label}` through this thread's cache of resolved
/// counters (`key`: the owner's id from [`next_id`] and a family number):
/// a local map lookup and an atomic add, no hashing of the vec's lock.
pub(crate) fn inc_cached(key: (u64, u8), vec: &IntCounterVec, label: &str, n: u64) {
    COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        let inner = c.entry(key).or_default();
        // Lookup by &str without allocating; allocate only on a miss.
        if let Some(counter) = inner.get(label) {
            counter.inc_by(n);
            return;
        }
        let counter = vec.with_label_values(&[label]);
        counter.inc_by(n);
        inner.insert(label.to_owned(), counter);
    });
}

/// Buckets of the answer latency histogram: the fast path answers in
/// microseconds, a query through the general path on a busy runtime in
/// milliseconds.
const ANSWER_BUCKETS: [f64; 14] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25,
];

/// The counters the handler bumps.
#[derive(Debug, Clone)]
pub(crate) struct DnsMetrics {
    id: u64,
    noerror: IntCounter,
    registry: Registry,
    rcodes: IntCounterVec,
    countries: IntCounterVec,
    answers: IntCounterVec,
    /// Answered mirror-name queries by client country and the mirror named
    /// first (what the status page's steering view reads).
    pub(crate) steering: IntCounterVec,
    answer_seconds: HistogramVec,
    mirror_up: IntGaugeVec,
    mirror_in_service: IntGaugeVec,
    probe_seconds: HistogramVec,
    probe_failures: IntCounterVec,
    /// The mirrors whose health gauges are exported.
    gauged: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// TCP connections closed at once because a connection cap was reached.
    pub tcp_refused: IntCounter,
}

impl DnsMetrics {
    pub(crate) fn new() -> Self {
        let rcodes = IntCounterVec::new(
            Opts::new(
                "meridian_geodns_responses_total",
                "Responses by response code",
            ),
            &["rcode"],
        )
        .expect("metric");
        let m = DnsMetrics {
            id: next_id(),
            noerror: rcodes.with_label_values(&["NOERROR"]),
            rcodes,
            countries: IntCounterVec::new(
                Opts::new(
                    "meridian_geodns_queries_by_country_total",
                    "Mirror-name queries by client country",
                ),
                &["country"],
            )
            .expect("metric"),
            answers: IntCounterVec::new(
                Opts::new(
                    "meridian_geodns_answers_total",
                    "Addresses handed out, by mirror",
                ),
                &["mirror"],
            )
            .expect("metric"),
            steering: IntCounterVec::new(
                Opts::new(
                    "meridian_geodns_steered_total",
                    "Mirror-name queries answered, by client country (ISO 3166 code, or unknown / override) and the mirror named first (or fallback)",
                ),
                &["country", "mirror"],
            )
            .expect("metric"),
            answer_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "meridian_geodns_answer_seconds",
                    "Time in the server from a query being read to its answer being sent (UDP: from the batch's receive to its send)",
                )
                .buckets(ANSWER_BUCKETS.to_vec()),
                &["transport"],
            )
            .expect("metric"),
            mirror_up: IntGaugeVec::new(
                Opts::new(
                    "meridian_geodns_mirror_up",
                    "1 if the mirror passes health probes",
                ),
                &["mirror"],
            )
            .expect("metric"),
            mirror_in_service: IntGaugeVec::new(
                Opts::new(
                    "meridian_geodns_mirror_in_service",
                    "1 if the mirror is given to new clients",
                ),
                &["mirror"],
            )
            .expect("metric"),
            probe_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "meridian_geodns_probe_seconds",
                    "Duration of a health probe of a mirror's status URL (failed ones included)",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["mirror"],
            )
            .expect("metric"),
            probe_failures: IntCounterVec::new(
                Opts::new(
                    "meridian_geodns_probe_failures_total",
                    "Health probes of a mirror that failed (unreachable, an HTTP error, a bad document, too slow)",
                ),
                &["mirror"],
            )
            .expect("metric"),
            tcp_refused: IntCounter::new(
                "meridian_geodns_tcp_refused_total",
                "DNS-over-TCP connections closed at once: a cap in all or per client was reached",
            )
            .expect("metric"),
            registry: Registry::new(),
            gauged: Default::default(),
        };
        m.registry
            .register(Box::new(m.tcp_refused.clone()))
            .expect("register");
        for h in [&m.probe_seconds, &m.answer_seconds] {
            m.registry.register(Box::new(h.clone())).expect("register");
        }
        for c in [
            &m.rcodes,
            &m.countries,
            &m.answers,
            &m.steering,
            &m.probe_failures,
        ] {
            m.registry.register(Box::new(c.clone())).expect("register");
        }
        for g in [&m.mirror_up, &m.mirror_in_service] {
            m.registry.register(Box::new(g.clone())).expect("register");
        }
        // Error series exist at 0 from the start, so an alert on any
        // increase sees the first one.
        for rcode in [
            "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "FORMERR", "NOTIMP",
        ] {
            m.rcodes.with_label_values(&[rcode]);
        }
        for t in ["udp", "tcp"] {
            m.answer_seconds.with_label_values(&[t]);
        }
        meridian_serve::metrics::register_common(&m.registry, "geodns");
        m
    }

    /// Sets every mirror's health gauges from `views`, and drops the gauges
    /// of mirrors no longer configured (a removed mirror is not "down").
    pub(crate) fn mirror_states(&self, views: &crate::health::Views, full_at: f64) {
        for v in views.iter() {
            self.mirror_state(&v.id, v.health.up, v.usable(full_at));
        }
        let Ok(mut known) = self.gauged.lock() else {
            return;
        };
        known.retain(|id| {
            let keep = views.iter().any(|v| &v.id == id);
            if !keep {
                let _ = self.mirror_up.remove_label_values(&[id]);
                let _ = self.mirror_in_service.remove_label_values(&[id]);
            }
            keep
        });
        for v in views.iter() {
            if !known.contains(&v.id) {
                known.push(v.id.clone());
            }
        }
    }

    /// Sets a mirror's health gauges, and makes its answers series exist
    /// (at 0 until it is first handed out).
    fn mirror_state(&self, id: &str, up: bool, in_service: bool) {
        self.mirror_up.with_label_values(&[id]).set(i64::from(up));
        self.mirror_in_service
            .with_label_values(&[id])
            .set(i64::from(in_service));
        self.answers.with_label_values(&[id]);
        self.probe_failures.with_label_values(&[id]);
    }

    /// One health probe of mirror `id`.
    pub(crate) fn probe(&self, id: &str, took: std::time::Duration, ok: bool) {
        self.probe_seconds
            .with_label_values(&[id])
            .observe(took.as_secs_f64());
        if !ok {
            self.probe_failures.with_label_values(&[id]).inc();
        }
    }
    fn cached(&self, family: u8, vec: &IntCounterVec, label: &str, n: u64) {
        inc_cached((self.id, family), vec, label, n);
    }
    /// `n` NOERROR responses at once (the UDP fast path tallies a batch).
    pub(crate) fn noerror_by(&self, n: u64) {
        if n > 0 {
            self.noerror.inc_by(n);
        }
    }
    /// `n` addresses of mirror `id` handed out.
    pub(crate) fn answer_by(&self, id: &str, n: u64) {
        self.cached(2, &self.answers, id, n);
    }
    /// The counter for queries from country `c`, for a caller that keeps
    /// its own tally and adds it in batches.
    pub(crate) fn country_counter(&self, c: &str) -> IntCounter {
        self.countries.with_label_values(&[c])
    }
    pub(crate) fn rcode(&self, c: &str) {
        self.cached(0, &self.rcodes, c, 1);
    }
    pub(crate) fn country(&self, c: &str) {
        self.cached(1, &self.countries, c, 1);
    }
    /// An address of mirror `id` (or "fallback") handed out (the general
    /// path; the fast path tallies its own).
    pub(crate) fn answer(&self, id: &str) {
        self.cached(2, &self.answers, id, 1);
    }
    /// A client in `country` sent to mirror `id` (named first) or to the
    /// fallback addresses.
    pub(crate) fn steered(&self, country: &str, id: &str) {
        PAIRS.with(|p| {
            let mut p = p.borrow_mut();
            let by_country = p.entry(self.id).or_default();
            // Lookups by &str without allocating; allocate only on a miss.
            if !by_country.contains_key(country) {
                by_country.insert(country.to_owned(), FxHashMap::default());
            }
            let Some(inner) = by_country.get_mut(country) else {
                return;
            };
            match inner.get(id) {
                Some(c) => c.inc(),
                None => {
                    let c = self.steering.with_label_values(&[country, id]);
                    c.inc();
                    inner.insert(id.to_owned(), c);
                }
            }
        });
    }
    /// The steering counter for (country, mirror), for a caller that keeps
    /// its own tally.
    pub(crate) fn steering_counter(&self, country: &str, id: &str) -> IntCounter {
        self.steering.with_label_values(&[country, id])
    }
    /// One answer's time in the server, by transport (`udp` or `tcp`).
    pub(crate) fn answered(&self, transport: &str, took: std::time::Duration) {
        self.answer_seconds
            .with_label_values(&[transport])
            .observe(took.as_secs_f64());
    }
    /// A per-thread histogram of UDP answer times, flushed with the tally.
    pub(crate) fn local_udp_latency(&self) -> prometheus::local::LocalHistogram {
        self.answer_seconds.with_label_values(&["udp"]).local()
    }
    /// The registry `/metrics` renders, for other parts of GeoDNS (the
    /// redirector) to register in.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirror taken out of the config loses its health gauges (it is not
    /// "down"); the others keep theirs.
    #[test]
    fn a_removed_mirror_leaves_the_health_gauges() {
        let m = DnsMetrics::new();
        let (mut cfg, tracker) = crate::config::tests::two_mirrors();
        m.mirror_states(&tracker.views.load(), 0.9);
        let text = m.render();
        for id in ["eu-west", "us-east"] {
            assert!(
                text.contains(&format!("meridian_geodns_mirror_up{{mirror=\"{id}\"}} 0")),
                "{text}"
            );
        }
        cfg.mirrors.retain(|x| x.id == "us-east");
        tracker.refresh_views(&cfg);
        m.mirror_states(&tracker.views.load(), 0.9);
        let text = m.render();
        assert!(
            !text.contains("meridian_geodns_mirror_up{mirror=\"eu-west\"}")
                && !text.contains("meridian_geodns_mirror_in_service{mirror=\"eu-west\"}"),
            "{text}"
        );
        assert!(text.contains("meridian_geodns_mirror_in_service{mirror=\"us-east\"} 0"));
    }
}
