//! The mirror's HTTP face: downloads, listings, read API, status, admin.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET/HEAD /<path>` | a published file (Range, conditional, ETag = blake3) or, with a trailing `/`, a directory listing (HTML, or JSON with `Accept: application/json`) |
//! | `/.meridian/v1/...` | the read API (see `meridian_serve::readapi`), so mirrors feed mirrors |
//! | `GET /.meridian/status` | JSON status for GeoDNS and operators |
//! | `GET /.meridian/metrics` | Prometheus text |
//! | `GET /.meridian/health` | 200 while a generation is served |
//! | `POST /.meridian/admin/drain`, `/undrain` | needs `Authorization: Bearer <admin_token>` |

use crate::generation::Resolved;
use crate::state::MirrorState;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use meridian_core::{DirNode, EntryKind, VerifiedRoot};
use meridian_serve::files::{self, FileMeta, text};
use meridian_serve::readapi::{self, Published};
use meridian_serve::urlpath::{encode_path, normalise};
use meridian_serve::{Body, ObjectStore, Service, full};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Whole objects at least this large are checked as they stream instead
/// of before the first byte (hashing 64 MiB takes about 50 ms here).
const STREAM_CHECK_MIN: u64 = 64 << 20;

/// The mirror's request handler.
#[derive(Debug, Clone)]
pub(crate) struct MirrorService {
    pub state: Arc<MirrorState>,
    /// (requests, bytes) counters per status class, resolved once rather
    /// than looked up by label on every request.
    by_class: Arc<[(prometheus::IntCounter, prometheus::IntCounter); 5]>,
}

impl MirrorService {
    pub(crate) fn new(state: Arc<MirrorState>) -> Self {
        let m = &state.metrics;
        let by_class = Arc::new(CLASSES.map(|c| {
            (
                m.requests.with_label_values(&[c]),
                m.response_bytes.with_label_values(&[c]),
            )
        }));
        MirrorService { state, by_class }
    }
}

impl Published for MirrorService {
    fn keys(&self) -> Arc<meridian_serve::keys::KeysDoc> {
        self.state.keys.load_full()
    }
    fn stopping(&self) -> Option<meridian_serve::shutdown::Stopping> {
        Some(self.state.stopping.subscribe())
    }
    fn latest(&self) -> Option<Arc<VerifiedRoot>> {
        self.state
            .served
            .load_full()
            .map(|g| Arc::new(g.root.clone()))
    }
    fn root_envelope(&self, generation: u64) -> Option<Vec<u8>> {
        std::fs::read(self.state.root_path(generation)).ok()
    }
    type Objects = ObjectStore;
    fn objects(&self) -> &Arc<ObjectStore> {
        &self.state.store
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.notify.subscribe()
    }
    fn deltas(&self) -> Option<&meridian_serve::readapi::DeltaCache> {
        Some(&self.state.deltas)
    }
}

/// Content-Type by file extension.
pub(crate) fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map_or("", |(_, e)| e);
    // Lower-cased into a small stack buffer: no allocation per download.
    let mut buf = [0u8; 8];
    if ext.len() > buf.len() {
        return "application/octet-stream";
    }
    buf[..ext.len()].copy_from_slice(ext.as_bytes());
    buf[..ext.len()].make_ascii_lowercase();
    match std::str::from_utf8(&buf[..ext.len()]).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" | "md" | "asc" | "sha256" | "sha512" | "sum" => "text/plain; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "xml" => "application/xml",
        "gz" | "tgz" => "application/gzip",
        "xz" => "application/x-xz",
        "bz2" => "application/x-bzip2",
        "zst" => "application/zstd",
        "tar" => "application/x-tar",
        "zip" => "application/zip",
        "iso" => "application/x-iso9660-image",
        "deb" | "udeb" => "application/vnd.debian.binary-package",
        "rpm" => "application/x-rpm",
        "sig" | "gpg" => "application/pgp-signature",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

thread_local! {
    /// The `x-meridian-generation` value last sent on this thread (it only
    /// changes with a switch; a `HeaderValue` clone is a reference count).
    static GENERATION_HEADER: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((0, HeaderValue::from_static("0"))) };
}

fn generation_header(n: u64) -> HeaderValue {
    GENERATION_HEADER.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != n {
            *c = (n, n.into());
        }
        c.1.clone()
    })
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

impl Service for MirrorService {
    async fn call(&self, req: Request<()>, peer: SocketAddr) -> Response<Body> {
        let t0 = std::time::Instant::now();
        let resp = self.route(&req, peer).await;
        self.state
            .metrics
            .first_byte_seconds
            .observe(t0.elapsed().as_secs_f64());
        let (requests, bytes) = &self.by_class[class_index(resp.status())];
        requests.inc();
        if req.method() != Method::HEAD
            && let Some(n) = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        {
            bytes.inc_by(n);
        }
        resp
    }
}

impl MirrorService {
    async fn route(&self, req: &Request<()>, peer: SocketAddr) -> Response<Body> {
        if let Some(resp) = readapi::handle(self, req, peer.ip()).await {
            return resp;
        }
        let path = req.uri().path();
        if let Some(rest) = path.strip_prefix("/.meridian/") {
            return self.control(req, rest);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        if self.state.cfg().refuse_expired && self.state.is_stale() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this mirror's content has expired and it is configured not to serve it\n",
            );
        }
        let Some(g) = self.state.served.load_full() else {
            let msg = match self.state.progress.get() {
                Some(p) => format!(
                    "this mirror has not synced a generation yet; its first sync is under way ({p}); try again soon or another mirror\n"
                ),
                None => "this mirror has not synced a generation yet; try again soon or another mirror\n".to_owned(),
            };
            return text(StatusCode::SERVICE_UNAVAILABLE, msg);
        };
        let Some((norm, wants_dir)) = normalise(path) else {
            return text(StatusCode::BAD_REQUEST, "invalid path\n");
        };
        match g.resolve(&norm) {
            None => not_found(),
            Some(Resolved::File(_)) if wants_dir => not_found(),
            Some(Resolved::File(e)) => {
                let name = norm.rsplit('/').next().unwrap_or(&norm);
                let meta = FileMeta {
                    len: e.size,
                    hash: e.hash,
                    mtime: e.mtime,
                    content_type: content_type(name),
                    cache_control: "public, max-age=60",
                };
                let mut r = self.send_object(req, &meta).await;
                r.headers_mut()
                    .insert("x-meridian-generation", generation_header(g.number()));
                if req.method() == Method::GET && r.status().is_success() {
                    r = meridian_serve::inflight::track(r, &self.state.downloads);
                }
                r
            }
            Some(Resolved::Dir(canonical, node)) => {
                if !wants_dir || canonical != norm {
                    let loc = if canonical.is_empty() {
                        "/".to_owned()
                    } else {
                        format!("/{}/", encode_path(&canonical))
                    };
                    return Response::builder()
                        .status(StatusCode::MOVED_PERMANENTLY)
                        .header(header::LOCATION, loc)
                        .header(header::CONTENT_LENGTH, 0)
                        .body(meridian_serve::empty())
                        .unwrap_or_else(|_| not_found());
                }
                listing(req, &canonical, node, g.number())
            }
        }
    }

    /// Answers for a stored object, sending only bytes checked against
    /// `meta.hash` since the file last changed (see [`crate::verified`]).
    /// An object missing, of the wrong size or found damaged is treated
    /// alike: quarantined, the syncer woken to fetch it again, 503 now.
    async fn send_object(&self, req: &Request<()>, meta: &FileMeta) -> Response<Body> {
        let st = &self.state;
        let h = meta.hash;
        let unavailable = || {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "file temporarily unavailable on this mirror; try another\n",
            )
        };
        // The file opened here is the one the body is read from.
        let opened =
            std::fs::File::open(st.store.path(&h)).and_then(|f| f.metadata().map(|md| (f, md)));
        let (file, md) = match opened {
            Ok((f, md)) if md.len() == meta.len => (f, md),
            Ok(_) => {
                st.damaged(&h, "has the wrong size");
                return unavailable();
            }
            Err(_) => {
                st.repair.notify_one();
                return unavailable();
            }
        };
        let stamp = crate::verified::Stamp::of(&md);
        let sent = Some(st.egress.clone());
        let (method, headers) = (req.method(), req.headers());
        if *method == Method::HEAD || st.verified.is_verified(&h, stamp) {
            return files::respond(method, headers, meta, move || Ok(file), sent);
        }
        if meta.len <= files::INLINE_MAX {
            // Small: read and hash in memory, then send those very bytes.
            let mut buf = Vec::with_capacity(meta.len as usize);
            let read =
                std::io::Read::read_to_end(&mut std::io::Read::take(&file, meta.len + 1), &mut buf);
            if read.is_err() || meridian_core::hash_bytes(&buf) != h {
                st.damaged(&h, "does not match its hash");
                return unavailable();
            }
            st.verified.remember(h, stamp);
            return files::respond_bytes(method, headers, meta, bytes::Bytes::from(buf), sent);
        }
        if headers.contains_key(header::RANGE) || meta.len < STREAM_CHECK_MIN {
            // Part of a large object, or a whole one that hashes in a few
            // milliseconds: one whole check first, shared by every request
            // for it meanwhile, then `sendfile` as usual.
            if !st.verified.check_whole(h, &file, stamp).await {
                st.damaged(&h, "does not match its hash");
                return unavailable();
            }
            return files::respond(method, headers, meta, move || Ok(file), sent);
        }
        // A whole very large object: hashed as it streams (no wait before
        // the first byte), cut if bad.
        let state = self.state.clone();
        let check = meridian_serve::body::StreamCheck {
            expected: h,
            verdict: Box::new(move |ok| {
                if ok {
                    state.verified.remember(h, stamp);
                } else {
                    state.damaged(&h, "does not match its hash (download cut)");
                }
            }),
        };
        files::respond_checked(method, headers, meta, file, check, sent)
    }

    fn control(&self, req: &Request<()>, rest: &str) -> Response<Body> {
        let st = &self.state;
        match (req.method(), rest) {
            (&Method::GET, "status") => {
                let s = st.status();
                let g = st.served.load_full();
                let status = meridian_serve::status::MirrorStatus {
                    id: st.cfg().id.clone(),
                    region: st.cfg().region.clone(),
                    generation: g.as_ref().map(|g| g.number()).unwrap_or(0),
                    durable_generation: st.durable.load(Ordering::Acquire),
                    root_hash: g.as_ref().map(|g| g.root.hash.to_hex()),
                    expires: g.as_ref().map(|g| g.root.root.expires),
                    stale: st.is_stale(),
                    upstream_generation: s.upstream_generation,
                    last_sync: s.last_success,
                    sync_state: s.state,
                    last_error: s.last_error,
                    active_connections: st.active_connections() as u64,
                    downloads_in_flight: st.downloads_in_flight() as u64,
                    egress_bytes_per_sec: st.egress_rate.load(Ordering::Relaxed),
                    capacity_bytes_per_sec: st.cfg().reported_capacity(),
                    draining: st.is_draining(),
                    sync_progress: st.progress.get(),
                    trusted_keys: st
                        .verifier()
                        .keyring()
                        .keys()
                        .iter()
                        .map(|k| k.to_string())
                        .collect(),
                    store_bytes: st.metrics.store_bytes.get().max(0) as u64,
                    disk_free_bytes: st.store.free_bytes().ok(),
                    refused: s.refused,
                };
                if wants_html(req.headers()) {
                    let page = status.to_html(meridian_serve::unix_now());
                    return Response::builder()
                        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                        .header(header::CONTENT_LENGTH, page.len())
                        .header(header::CACHE_CONTROL, "no-store")
                        .header(header::VARY, "accept")
                        .body(full(page))
                        .unwrap_or_else(|_| not_found());
                }
                json(StatusCode::OK, &status)
            }
            (&Method::GET, "metrics") => {
                st.metrics
                    .active_connections
                    .set(st.active_connections() as i64);
                st.metrics
                    .downloads_in_flight
                    .set(st.downloads_in_flight() as i64);
                if let Ok(free) = st.store.free_bytes() {
                    st.metrics.disk_free_bytes.set(free as i64);
                }
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(full(st.metrics.render()))
                    .unwrap_or_else(|_| not_found())
            }
            (&Method::GET, "health") => {
                if st.served.load().is_some() {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "no generation yet\n")
                }
            }
            (&Method::GET, "ready") => match st.readiness() {
                Ok(why) => text(StatusCode::OK, format!("ready: {why}\n")),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            (&Method::POST, "admin/drain" | "admin/undrain" | "admin/stop") => {
                let cfg = st.cfg();
                let Some(token) = cfg.admin_token.as_deref() else {
                    return text(
                        StatusCode::NOT_FOUND,
                        "admin API disabled (no admin_token configured)\n",
                    );
                };
                if !meridian_serve::auth::bearer_matches(req.headers(), token) {
                    return text(StatusCode::UNAUTHORIZED, "bad or missing bearer token\n");
                }
                if rest == "admin/stop" {
                    tracing::info!("admin request: stop (drain, then exit)");
                    st.stop_asked.notify_one();
                    return text(StatusCode::OK, "stopping\n");
                }
                let on = rest == "admin/drain";
                st.set_draining(on);
                tracing::info!(draining = on, "admin request");
                text(StatusCode::OK, if on { "draining\n" } else { "serving\n" })
            }
            _ => not_found(),
        }
    }
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "404 not found\n")
}

/// A browser asking: `text/html` among the accepted types (curl, GeoDNS
/// and other machines ask for `*/*` or JSON, and get JSON).
fn wants_html(h: &http::HeaderMap) -> bool {
    h.get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/html"))
        })
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::VARY, "accept")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .unwrap_or_else(|_| not_found())
}

#[derive(Serialize)]
struct JsonEntry<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    blake3: String,
    mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a str>,
}

fn listing(req: &Request<()>, path: &str, node: &DirNode, generation: u64) -> Response<Body> {
    let etag = format!("\"dir-{}\"", meridian_core::hash_bytes(&node.encode()));
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, etag)
            .body(meridian_serve::empty())
            .unwrap_or_else(|_| not_found());
    }
    let wants_json = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    let kind = |k: EntryKind| match k {
        EntryKind::File => "file",
        EntryKind::Dir => "directory",
        EntryKind::Symlink => "symlink",
    };
    let (body, ctype) = if wants_json {
        let entries: Vec<JsonEntry<'_>> = node
            .entries
            .iter()
            .map(|e| JsonEntry {
                name: &e.name,
                kind: kind(e.kind),
                size: if e.kind == EntryKind::File { e.size } else { 0 },
                blake3: e.hash.to_hex(),
                mtime: e.mtime,
                target: e.target.as_deref(),
            })
            .collect();
        let doc = serde_json::json!({ "path": format!("/{path}"), "generation": generation, "entries": entries });
        (
            serde_json::to_vec_pretty(&doc).unwrap_or_default(),
            "application/json",
        )
    } else {
        let title = meridian_serve::files::html_escape(&format!("/{path}"));
        let mut h = String::with_capacity(256 + node.entries.len() * 200);
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title>\
            <style>body{{font-family:sans-serif}}td{{padding:0 1em}}td.n{{text-align:right}}code{{font-size:85%}}</style></head>\
            <body><h1>Index of {title}</h1><p>generation {generation}</p><table><tr><th>name</th><th>size</th><th>modified</th><th>blake3</th></tr>\n"
        );
        if !path.is_empty() {
            h.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td><td></td></tr>\n");
        }
        for e in &node.entries {
            let slash = if e.kind == EntryKind::Dir { "/" } else { "" };
            let href = format!("{}{slash}", encode_path(&e.name));
            let size = if e.kind == EntryKind::File {
                e.size.to_string()
            } else {
                "-".into()
            };
            let when = if e.mtime > 0 {
                httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.mtime as u64),
                )
            } else {
                String::new()
            };
            let hash = if e.kind == EntryKind::File {
                e.hash.to_hex()
            } else {
                String::new()
            };
            let _ = writeln!(
                h,
                "<tr><td><a href=\"{}\">{}{slash}</a></td><td class=\"n\">{size}</td><td>{when}</td><td><code>{hash}</code></td></tr>",
                meridian_serve::files::html_escape(&href),
                meridian_serve::files::html_escape(&e.name)
            );
        }
        h.push_str("</table></body></html>\n");
        (h.into_bytes(), "text/html; charset=utf-8")
    };
    let len = body.len();
    let b = if req.method() == Method::HEAD {
        meridian_serve::empty()
    } else {
        full(body)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ETAG, etag)
        .header(header::VARY, "Accept")
        .header(header::CACHE_CONTROL, "public, max-age=10")
        .body(b)
        .unwrap_or_else(|_| not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_by_extension() {
        assert_eq!(content_type("x.ISO"), "application/x-iso9660-image");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }
}
