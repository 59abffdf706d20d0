//! The public, read-only status listener (`[public]`): a page with a world
//! map of the mirrors coloured by where they stand, and the last minute's
//! steering (client country → mirror), updated in place from
//! `GET /status.json`. It takes GET and HEAD only, needs no token and
//! shows nothing the admin listener guards: no token, no operator action,
//! no probe error text (that names internal URLs), nothing a client can
//! change.
//!
//! | Path | What |
//! |---|---|
//! | `/` | the page (HTML, map inline; no external fonts, scripts or tiles) |
//! | `/app.js`, `/app.css` | its script and style |
//! | `/places.json` | country → map point, for the steering arcs |
//! | `/status.json` | mirrors and steering, the page's data |
//! | `/health` | `ok` |

use crate::health::{Standing, Tracker};
use crate::metrics::DnsMetrics;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use meridian_serve::files::text;
use meridian_serve::{Body, Service, full};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The steering view's window.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// How often the steering counters are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);

const INDEX: &str = include_str!("../status/index.html");
const MAP: &str = include_str!("../status/world.svg");
const APP_JS: &str = include_str!("../status/app.js");
const APP_CSS: &str = include_str!("../status/app.css");
const PLACES: &str = include_str!("../status/places.json");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Answers by (country, mirror) as the counters stood at one moment.
type Counts = rustc_hash::FxHashMap<(String, String), u64>;

/// Samples of the steering counter, enough to cover [`WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct Steering {
    samples: Mutex<VecDeque<(Instant, Counts)>>,
}

/// Answers to clients in `country` that named `mirror`, in the window.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Flow {
    pub country: String,
    pub mirror: String,
    pub answers: u64,
}

impl Steering {
    /// Reads the counters now and drops samples older than the window
    /// needs.
    pub(crate) fn sample(&self, metrics: &DnsMetrics, now: Instant) {
        use prometheus::core::Collector;
        let mut counts = Counts::default();
        for fam in metrics.steering.collect() {
            for m in fam.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                        .unwrap_or_default()
                };
                let n = m.get_counter().get_value() as u64;
                counts.insert((label("country"), label("mirror")), n);
            }
        }
        let Ok(mut s) = self.samples.lock() else {
            return;
        };
        s.push_back((now, counts));
        // Keep the newest sample at least WINDOW old, and none older.
        while s.len() > 2 && now.saturating_duration_since(s[1].0) >= WINDOW {
            s.pop_front();
        }
    }

    /// The flows over the window (or as much of it as has been sampled),
    /// largest first, and the window's length.
    pub(crate) fn flows(&self) -> (Vec<Flow>, Duration) {
        let Ok(s) = self.samples.lock() else {
            return (Vec::new(), Duration::ZERO);
        };
        let (Some((t_new, new)), Some((t_old, old))) = (s.back(), s.front()) else {
            return (Vec::new(), Duration::ZERO);
        };
        let mut flows: Vec<Flow> = new
            .iter()
            .filter_map(|(k, &n)| {
                let before = if s.len() > 1 {
                    old.get(k).copied().unwrap_or(0)
                } else {
                    0
                };
                let answers = n.saturating_sub(before);
                (answers > 0).then(|| Flow {
                    country: k.0.clone(),
                    mirror: k.1.clone(),
                    answers,
                })
            })
            .collect();
        flows.sort_by(|a, b| {
            b.answers
                .cmp(&a.answers)
                .then_with(|| (&a.country, &a.mirror).cmp(&(&b.country, &b.mirror)))
        });
        (flows, t_new.saturating_duration_since(*t_old))
    }
}

#[derive(Serialize)]
struct MirrorRow<'a> {
    id: &'a str,
    region: &'a str,
    latitude: f64,
    longitude: f64,
    standing: Standing,
    reason: &'static str,
    generation: u64,
    generations_behind: u64,
    /// Egress against capacity (0 = idle, 1 = at capacity).
    load: f64,
    egress_bytes_per_sec: u64,
    capacity_bytes_per_sec: u64,
    /// Unix seconds.
    last_sync: Option<i64>,
    probe_ms: f64,
}

#[derive(Serialize)]
struct StatusDoc<'a> {
    /// Unix seconds.
    now: i64,
    newest_generation: u64,
    mirrors: Vec<MirrorRow<'a>>,
    window_seconds: u64,
    steering: Vec<Flow>,
}

/// The public service.
#[derive(Debug)]
pub(crate) struct PublicService {
    pub tracker: Arc<Tracker>,
    pub steering: Arc<Steering>,
    pub runtime: Arc<arc_swap::ArcSwap<crate::answer::Runtime>>,
    index: Bytes,
}

impl PublicService {
    pub(crate) fn new(
        tracker: Arc<Tracker>,
        steering: Arc<Steering>,
        runtime: Arc<arc_swap::ArcSwap<crate::answer::Runtime>>,
    ) -> Self {
        PublicService {
            tracker,
            steering,
            runtime,
            index: Bytes::from(INDEX.replace("<!--MAP-->", MAP)),
        }
    }

    fn status(&self) -> Vec<u8> {
        let crate::health::Snapshot {
            views,
            states,
            newest,
        } = self.tracker.snapshot();
        let full_at = self.runtime.load().params.full_at;
        let mirrors = views
            .iter()
            .map(|v| {
                let st = states.get(&v.id);
                let generation = st.map(|s| s.generation).unwrap_or(0);
                MirrorRow {
                    id: &v.id,
                    region: &v.region,
                    latitude: v.lat,
                    longitude: v.lon,
                    standing: Standing::of(v, full_at),
                    reason: Standing::of(v, full_at).reason(),
                    generation,
                    generations_behind: newest.saturating_sub(generation),
                    load: v.health.load,
                    egress_bytes_per_sec: st.map(|s| s.egress_bytes_per_sec).unwrap_or(0),
                    capacity_bytes_per_sec: st.map(|s| s.capacity_bytes_per_sec).unwrap_or(0),
                    last_sync: st.and_then(|s| s.last_sync),
                    probe_ms: st.map(|s| s.probe_seconds * 1000.0).unwrap_or(0.0),
                }
            })
            .collect();
        let (steering, window) = self.steering.flows();
        serde_json::to_vec(&StatusDoc {
            now: meridian_serve::unix_now(),
            newest_generation: newest,
            mirrors,
            window_seconds: window.as_secs(),
            steering,
        })
        .unwrap_or_default()
    }
}

fn page(content_type: &'static str, body: impl Into<Bytes>, cache: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

impl Service for PublicService {
    async fn call(&self, req: http::Request<()>, _peer: SocketAddr) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "this is a read-only status page: GET or HEAD only\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        const STATIC: &str = "public, max-age=300";
        match req.uri().path() {
            "/" | "/index.html" => page("text/html; charset=utf-8", self.index.clone(), "no-cache"),
            "/app.js" => page("text/javascript; charset=utf-8", APP_JS, STATIC),
            "/app.css" => page("text/css; charset=utf-8", APP_CSS, STATIC),
            "/places.json" => page("application/json", PLACES, STATIC),
            "/status.json" => page("application/json", self.status(), "no-store"),
            "/health" => text(StatusCode::OK, "ok\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: this listener serves the status page at / and its data at /status.json\n",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window is the newest sample less the oldest one kept, and it
    /// keeps no sample older than it needs.
    #[test]
    fn steering_counts_the_answers_of_the_last_window_only() {
        let m = DnsMetrics::new();
        let s = Steering::default();
        let t0 = Instant::now();
        m.steering_counter("GB", "eu-west").inc_by(5);
        s.sample(&m, t0);
        let (flows, _) = s.flows();
        assert_eq!(flows[0].answers, 5, "one sample: everything counted so far");
        m.steering_counter("GB", "eu-west").inc_by(3);
        m.steering_counter("US", "us-east").inc_by(7);
        s.sample(&m, t0 + Duration::from_secs(30));
        let (flows, window) = s.flows();
        assert_eq!(window, Duration::from_secs(30));
        assert_eq!(
            flows,
            vec![
                Flow {
                    country: "US".into(),
                    mirror: "us-east".into(),
                    answers: 7
                },
                Flow {
                    country: "GB".into(),
                    mirror: "eu-west".into(),
                    answers: 3
                },
            ]
        );
        // 61 s later nothing new: the 30 s sample is now the window's start.
        s.sample(&m, t0 + Duration::from_secs(91));
        s.sample(&m, t0 + Duration::from_secs(95));
        let (flows, window) = s.flows();
        assert!(flows.is_empty(), "{flows:?}");
        assert!(window <= Duration::from_secs(65), "{window:?}");
        assert!(s.samples.lock().expect("lock").len() <= 3);
    }

    /// Everything the page loads is on this listener, and it is small.
    #[test]
    fn the_page_is_whole_and_small() {
        let s = PublicService::new(
            Arc::new(Tracker::new()),
            Arc::new(Steering::default()),
            Arc::new(arc_swap::ArcSwap::from_pointee(
                crate::build_runtime(&crate::config::tests::minimal()).expect("runtime"),
            )),
        );
        let html = std::str::from_utf8(&s.index).expect("utf-8");
        assert!(html.contains(r#"id="c-GB""#), "the map is inline");
        assert!(!html.contains("<!--MAP-->"));
        for external in ["http://", "https://", "//fonts", "@import"] {
            for (name, body) in [("index", html), ("app.js", APP_JS), ("app.css", APP_CSS)] {
                let hits: Vec<&str> = body
                    .lines()
                    .filter(|l| l.contains(external) && !l.contains("www.w3.org"))
                    .collect();
                assert!(hits.is_empty(), "{name} loads {external}: {hits:?}");
            }
        }
        let total = s.index.len() + APP_JS.len() + APP_CSS.len() + PLACES.len();
        assert!(total < 200_000, "the page is {total} bytes");
    }
}
