//! GeoDNS metrics (Prometheus): queries by response code and by client
//! country, answers by mirror, mirror health.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The counters the handler bumps.
#[derive(Debug, Clone)]
pub struct DnsMetrics {
    registry: Registry,
    rcodes: IntCounterVec,
    countries: IntCounterVec,
    answers: IntCounterVec,
    pub mirror_up: IntGaugeVec,
    pub mirror_in_service: IntGaugeVec,
}

impl DnsMetrics {
    pub fn new() -> Self {
        let m = DnsMetrics {
            rcodes: IntCounterVec::new(
                Opts::new(
                    "meridian_geodns_responses_total",
                    "Responses by response code",
                ),
                &["rcode"],
            )
            .expect("metric"),
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
            registry: Registry::new(),
        };
        for c in [&m.rcodes, &m.countries, &m.answers] {
            m.registry.register(Box::new(c.clone())).expect("register");
        }
        for g in [&m.mirror_up, &m.mirror_in_service] {
            m.registry.register(Box::new(g.clone())).expect("register");
        }
        m
    }
    pub fn rcode(&self, c: &str) {
        self.rcodes.with_label_values(&[c]).inc();
    }
    pub fn country(&self, c: &str) {
        self.countries.with_label_values(&[c]).inc();
    }
    pub fn answer(&self, id: &str) {
        self.answers.with_label_values(&[id]).inc();
    }
    pub fn render(&self) -> String {
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
