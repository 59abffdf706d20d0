//! The admin HTTP endpoint (bearer token): `/metrics`, `/mirrors` (state of
//! every mirror and why it is or is not answered), and
//! `POST /mirrors/{id}/down|drain|clear`. `GET /health` alone needs no
//! token (a liveness probe; it says nothing but that the server runs).

use crate::answer::Runtime;
use crate::health::{Forced, Standing, Tracker};
use crate::metrics::DnsMetrics;
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
    pub runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    pub config: Arc<arc_swap::ArcSwap<crate::config::GeoDnsConfig>>,
}

#[derive(Serialize)]
struct MirrorReport<'a> {
    id: &'a str,
    region: &'a str,
    in_service: bool,
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
                let full_at = self.runtime.load().params.full_at;
                let reports: Vec<MirrorReport<'_>> = views
                    .iter()
                    .map(|v| {
                        let st = states.get(&v.id);
                        MirrorReport {
                            id: &v.id,
                            region: &v.region,
                            in_service: v.usable(full_at),
                            why: Standing::of(v, full_at).reason(),
                            up: v.health.up,
                            answering: v.health.answering,
                            current: v.health.current,
                            draining: v.health.draining,
                            load: v.health.load,
                            generation: st.map(|s| s.generation).unwrap_or(0),
                            newest_generation: newest,
                            forced: st.map(|s| s.forced).unwrap_or_default(),
                            last_error: st.and_then(|s| s.last_error.clone()),
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
                if !self.tracker.force(id, forced) {
                    return text(StatusCode::NOT_FOUND, format!("no mirror {id:?}\n"));
                }
                self.tracker.refresh_views(&self.config.load());
                tracing::info!(mirror = id, ?forced, "operator override");
                text(StatusCode::OK, format!("{id}: {action}\n"))
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "GET /metrics, GET /mirrors, POST /mirrors/{id}/down|drain|clear\n",
            ),
        }
    }
}
