//! The admin HTTP endpoint (bearer token): `/metrics`, `/mirrors` (state of
//! every mirror and why it is or is not answered),
//! `POST /mirrors/{id}/down|drain|clear` (operator overrides, kept in the
//! state file), `PUT /mirrors/{id}?field=value&…` (register a mirror, or
//! update its registration) and `DELETE /mirrors/{id}` (remove it): see
//! [`crate::registry`]. `GET /health` alone needs no token (a liveness
//! probe; it says nothing but that the server runs).

use crate::config::Mirror;
use crate::health::{Forced, Standing, Tracker};
use crate::metrics::DnsMetrics;
use crate::registry::{Refused, Registered, Registry};
use http::{Method, Response, StatusCode};
use meridian_serve::files::text;
use meridian_serve::{Body, Service, full};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;

/// The admin service.
#[derive(Debug, Clone)]
pub(crate) struct AdminService {
    pub token: String,
    pub tracker: Arc<Tracker>,
    pub metrics: DnsMetrics,
    pub served: crate::Served,
    pub registry: Arc<Registry>,
}

#[derive(Serialize)]
struct MirrorReport<'a> {
    id: &'a str,
    region: &'a str,
    /// `config` (the config file) or `registered` (the admin API).
    source: &'static str,
    status_url: &'a str,
    /// Seconds a client may keep an answer naming this mirror (the
    /// longest TTL GeoDNS gives): how long after a drain new downloads
    /// can still arrive.
    answer_ttl: u64,
    in_service: bool,
    /// Where it stands, as one word (`in_service`, `full`, `lagging`,
    /// `draining`, `down`, `forced_down`).
    standing: Standing,
    why: &'static str,
    up: bool,
    answering: bool,
    current: bool,
    draining: bool,
    load: f64,
    generation: u64,
    newest_generation: u64,
    forced: Forced,
    last_error: Option<String>,
    /// The fields it is served with (its `[[mirrors]]` block or its
    /// registration).
    fields: Option<&'a Mirror>,
}

impl Service for AdminService {
    async fn call(&self, req: http::Request<()>, _peer: SocketAddr) -> Response<Body> {
        if req.method() == Method::GET && req.uri().path() == "/health" {
            return text(StatusCode::OK, "ok\n");
        }
        let authed = meridian_serve::auth::bearer_matches(req.headers(), &self.token);
        if !authed {
            return text(StatusCode::UNAUTHORIZED, "bearer token required\n");
        }
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::GET, "/metrics") => Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(self.metrics.render()))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "")),
            (&Method::GET, "/mirrors") => {
                let crate::health::Snapshot {
                    views,
                    states,
                    newest,
                } = self.tracker.snapshot();
                let full_at = self.served.runtime.load().params.full_at;
                let cfg = self.served.config.load();
                let answer_ttl = cfg.selection.ttl.max(cfg.selection.ttl_changing).as_secs();
                let reports: Vec<MirrorReport<'_>> = views
                    .iter()
                    .map(|v| {
                        let st = states.get(&v.id);
                        let fields = cfg.mirrors.iter().find(|m| m.id == v.id);
                        let standing = Standing::of(v, full_at);
                        MirrorReport {
                            id: &v.id,
                            region: &v.region,
                            source: if self.registry.is_registered(&v.id) {
                                "registered"
                            } else {
                                "config"
                            },
                            status_url: fields.map_or("", |m| m.status_url.as_str()),
                            answer_ttl,
                            in_service: v.usable(full_at),
                            standing,
                            why: standing.reason(),
                            up: v.health.up,
                            answering: v.health.answering,
                            current: v.health.current,
                            draining: v.health.draining,
                            load: v.health.load,
                            generation: st.map(|s| s.generation).unwrap_or(0),
                            newest_generation: newest,
                            forced: st.map(|s| s.forced).unwrap_or_default(),
                            last_error: st.and_then(|s| s.last_error.clone()),
                            fields,
                        }
                    })
                    .collect();
                let body = serde_json::to_vec_pretty(&reports).unwrap_or_default();
                Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(full(body))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
            }
            (&Method::POST, p) if p.starts_with("/mirrors/") => {
                let rest = &p["/mirrors/".len()..];
                let Some((id, action)) = rest.rsplit_once('/') else {
                    return text(
                        StatusCode::NOT_FOUND,
                        "use /mirrors/{id}/down|drain|clear\n",
                    );
                };
                let forced = match action {
                    "down" => Forced::Down,
                    "drain" => Forced::Drain,
                    "clear" => Forced::None,
                    _ => return text(StatusCode::NOT_FOUND, "action is down, drain or clear\n"),
                };
                if !self.served.config.load().mirrors.iter().any(|m| m.id == id) {
                    return text(StatusCode::NOT_FOUND, format!("no mirror {id:?}\n"));
                }
                // Stored first: what a restart reads is what was answered.
                if let Err(Refused(code, msg)) = self.registry.set_forced(id, forced) {
                    return text(code, msg);
                }
                self.tracker.force(id, forced);
                self.tracker.refresh_views(&self.served.config.load());
                tracing::info!(mirror = id, ?forced, "operator override");
                text(StatusCode::OK, format!("{id}: {action}\n"))
            }
            (&Method::PUT, p) if p.starts_with("/mirrors/") => {
                let id = &p["/mirrors/".len()..];
                let (m, forced) = match registration(id, req.uri().query().unwrap_or("")) {
                    Ok(m) => m,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("mirror {id}: {e}\n")),
                };
                let (what, cfg) = match self.registry.register(m, forced) {
                    Ok(x) => x,
                    Err(Refused(code, msg)) => return text(code, msg),
                };
                // Forced before it is served: a standby is never answered.
                if let Some(f) = forced {
                    self.tracker.force(id, f);
                }
                if let Err(e) = self.served.apply(cfg) {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
                }
                let (code, word) = match what {
                    Registered::Added => (StatusCode::CREATED, "registered"),
                    Registered::Updated => (StatusCode::OK, "registration updated"),
                    Registered::Unchanged => (StatusCode::OK, "already registered, unchanged"),
                };
                tracing::info!(mirror = id, "{word}");
                text(code, format!("{id}: {word}\n"))
            }
            (&Method::DELETE, p) if p.starts_with("/mirrors/") => {
                let id = &p["/mirrors/".len()..];
                match self.registry.remove(id) {
                    Ok(Some(cfg)) => {
                        if let Err(e) = self.served.apply(cfg) {
                            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
                        }
                        tracing::info!(mirror = id, "registration removed");
                        text(StatusCode::OK, format!("{id}: removed\n"))
                    }
                    Ok(None) => text(StatusCode::NOT_FOUND, format!("{id}: not registered\n")),
                    Err(Refused(code, msg)) => text(code, msg),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "GET /metrics, GET /mirrors, POST /mirrors/{id}/down|drain|clear, PUT /mirrors/{id}?…, DELETE /mirrors/{id}\n",
            ),
        }
    }
}

/// The fields a registration may set, as `PUT /mirrors/{id}?field=value`
/// (repeat a list field for more than one value).
pub(crate) const FIELDS: &[&str] = &[
    "region",
    "latitude",
    "longitude",
    "ipv4",
    "ipv6",
    "status_url",
    "weight",
    "capacity_bytes_per_sec",
    "countries",
    "continents",
    "url",
    "country",
];

/// A registration from its query string: every error names its field.
/// Besides the [`FIELDS`], `forced=down|drain|none` sets the operator
/// override in the same stored change (`down`: a standby, probed but
/// never answered).
pub(crate) fn registration(id: &str, query: &str) -> Result<(Mirror, Option<Forced>), String> {
    fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, String> {
        v.parse().map_err(|_| format!("{k} {v:?}: not a number"))
    }
    let mut m = Mirror {
        id: id.to_owned(),
        region: String::new(),
        latitude: f64::NAN,
        longitude: f64::NAN,
        ipv4: Vec::new(),
        ipv6: Vec::new(),
        status_url: String::new(),
        weight: 1.0,
        capacity_bytes_per_sec: None,
        countries: Vec::new(),
        continents: Vec::new(),
        url: None,
        country: None,
    };
    let mut seen = std::collections::HashSet::new();
    let mut forced = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let (k, v) = (k.as_ref(), v.as_ref());
        let list = matches!(k, "ipv4" | "ipv6" | "countries" | "continents");
        if !list && !seen.insert(k.to_owned()) {
            return Err(format!("{k}: given twice"));
        }
        match k {
            "region" => m.region = v.to_owned(),
            "latitude" => m.latitude = num(k, v)?,
            "longitude" => m.longitude = num(k, v)?,
            "ipv4" => m.ipv4.push(
                v.parse()
                    .map_err(|_| format!("ipv4 {v:?}: not an IPv4 address"))?,
            ),
            "ipv6" => m.ipv6.push(
                v.parse()
                    .map_err(|_| format!("ipv6 {v:?}: not an IPv6 address"))?,
            ),
            "status_url" => m.status_url = v.to_owned(),
            "weight" => m.weight = num(k, v)?,
            "capacity_bytes_per_sec" => m.capacity_bytes_per_sec = Some(num(k, v)?),
            "countries" => m.countries.push(v.to_owned()),
            "continents" => m.continents.push(v.to_owned()),
            "url" => m.url = Some(v.to_owned()),
            "country" => m.country = Some(v.to_owned()),
            "forced" => {
                forced = Some(match v {
                    "down" => Forced::Down,
                    "drain" => Forced::Drain,
                    "none" => Forced::None,
                    _ => return Err(format!("forced {v:?}: not down, drain or none")),
                })
            }
            other => {
                return Err(format!(
                    "{other:?}: unknown field (known: {})",
                    FIELDS.join(", ")
                ));
            }
        }
    }
    for (k, missing) in [
        ("latitude", m.latitude.is_nan()),
        ("longitude", m.longitude.is_nan()),
        ("status_url", m.status_url.is_empty()),
    ] {
        if missing {
            return Err(format!("{k}: required"));
        }
    }
    m.check()?;
    Ok((m, forced))
}

#[cfg(test)]
mod tests {
    use super::registration;

    #[test]
    fn a_registration_names_the_field_it_refuses() {
        let ok = "region=eu&latitude=51.5&longitude=-0.1&ipv4=127.0.0.5&ipv4=127.0.0.6&status_url=http%3A%2F%2F127.0.0.5%3A80%2F.meridian%2Fstatus";
        let (m, forced) = registration("m5", ok).expect("test step");
        assert_eq!(forced, None);
        assert_eq!(m.ipv4.len(), 2);
        assert_eq!(m.status_url, "http://127.0.0.5:80/.meridian/status");
        for (q, field) in [
            (format!("{ok}&colour=red"), "\"colour\": unknown field"),
            (format!("{ok}&latitude=1"), "latitude: given twice"),
            (
                ok.replace("latitude=51.5", "latitude=95"),
                "latitude 95: out of range",
            ),
            (
                ok.replace("longitude=-0.1", "longitude=west"),
                "longitude \"west\": not a number",
            ),
            (
                ok.replace("ipv4=127.0.0.5", "ipv4=300.1.1.1"),
                "ipv4 \"300.1.1.1\": not an IPv4",
            ),
            (
                ok.replace("&status_url=", "&x_status_url="),
                "unknown field",
            ),
            (
                ok.replace("region=eu&latitude=51.5&", "region=eu&"),
                "latitude: required",
            ),
            (format!("{ok}&weight=0"), "weight 0: must be positive"),
            (format!("{ok}&country=GBR"), "country \"GBR\""),
            (format!("{ok}&url=ftp://x/"), "url \"ftp://x\""),
        ] {
            let e = registration("m5", &q).expect_err("refused");
            assert!(e.contains(field), "{q}: {e}");
        }
        let (_, forced) = registration("m5", &format!("{ok}&forced=down")).expect("test step");
        assert_eq!(forced, Some(crate::health::Forced::Down));
        let e = registration("m5", &format!("{ok}&forced=later")).expect_err("refused");
        assert!(
            e.contains("forced \"later\": not down, drain or none"),
            "{e}"
        );
        let e = registration("bad id", ok).expect_err("refused");
        assert!(e.starts_with("id \"bad id\""), "{e}");
    }
}
