//! The read API every node (origin or mirror) exposes under `/.meridian/v1/`.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /.meridian/v1/root` | the newest signed root envelope (`application/x-meridian-root`), 503 before the first |
//! | `GET /.meridian/v1/generations/{n}` | the signed root of generation `n`, 404 once garbage-collected |
//! | `GET /.meridian/v1/objects/{blake3}` | a blob or directory node by hash, with Range support; immutable |
//! | `GET /.meridian/v1/wait?after=N[&timeout=S]` | long-poll: the newest root as soon as its generation is > N; 204 after S seconds (default 30, max 60) |
//!
//! Every answer carries `X-Meridian-Generation` with the newest generation.
//! The prefix starts with a dot so that it cannot collide with published
//! content: the origin refuses to publish a top-level `.meridian`.

use crate::body::{Body, full};
use crate::files::{self, FileMeta, text};
use crate::store::ObjectStore;
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};
use meridian_core::{Hash, VerifiedRoot};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The path prefix of the read API.
pub const PREFIX: &str = "/.meridian/v1/";
/// Media type of a signed root envelope.
pub const ROOT_CONTENT_TYPE: &str = "application/x-meridian-root";
/// Longest long-poll a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// What a node publishes.
pub trait Published: Send + Sync + 'static {
    /// The newest generation this node serves.
    fn latest(&self) -> Option<Arc<VerifiedRoot>>;
    /// The envelope of an older (still retained) generation.
    fn root_envelope(&self, generation: u64) -> Option<Vec<u8>>;
    /// The object store holding blobs and nodes.
    fn store(&self) -> &ObjectStore;
    /// Changes whenever a newer generation is published.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Counts bytes sent for objects (metrics).
    fn count_object_bytes(&self, _bytes: u64) {}
}

/// Handles a request whose path starts with [`PREFIX`]; `rest` is the path
/// after it.
pub async fn handle<P: Published>(
    node: &P,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    if *method != Method::GET && *method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read API is GET/HEAD only\n",
        );
    }
    let latest_gen = node.latest().map(|r| r.root.generation).unwrap_or(0);
    let mut resp = route(node, method, rest, query, headers).await;
    resp.headers_mut()
        .insert("x-meridian-generation", latest_gen.into());
    resp
}

async fn route<P: Published>(
    node: &P,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response<Body> {
    if rest == "root" {
        return match node.latest() {
            Some(r) => envelope_response(r.envelope.clone(), method),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no generation published yet\n",
            ),
        };
    }
    if let Some(n) = rest.strip_prefix("generations/") {
        let Ok(n) = n.parse::<u64>() else {
            return text(StatusCode::BAD_REQUEST, "generation must be a number\n");
        };
        return match node.root_envelope(n) {
            Some(env) => envelope_response(env, method),
            None => text(
                StatusCode::NOT_FOUND,
                format!("generation {n} is not retained here\n"),
            ),
        };
    }
    if let Some(h) = rest.strip_prefix("objects/") {
        let Ok(hash) = h.parse::<Hash>() else {
            return text(
                StatusCode::BAD_REQUEST,
                "object name must be a blake3 hash (64 hex digits)\n",
            );
        };
        let store = node.store();
        let path = store.path(&hash);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) => m,
            Err(_) => return text(StatusCode::NOT_FOUND, format!("object {hash} not found\n")),
        };
        let fm = FileMeta {
            len: meta.len(),
            hash,
            mtime: 0,
            content_type: "application/octet-stream",
            cache_control: "public, max-age=31536000, immutable",
        };
        let resp = files::respond(method, headers, &fm, || std::fs::File::open(&path), None);
        if resp.status().is_success() && *method == Method::GET {
            let n = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            node.count_object_bytes(n);
        }
        return resp;
    }
    if rest == "wait" {
        let mut after = 0u64;
        let mut timeout = Duration::from_secs(30);
        for kv in query.unwrap_or("").split('&') {
            match kv.split_once('=') {
                Some(("after", v)) => match v.parse() {
                    Ok(n) => after = n,
                    Err(_) => return text(StatusCode::BAD_REQUEST, "after must be a number\n"),
                },
                Some(("timeout", v)) => match v.parse::<u64>() {
                    Ok(s) => timeout = Duration::from_secs(s).min(MAX_WAIT),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "timeout must be seconds\n"),
                },
                _ => {}
            }
        }
        let mut rx = node.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(r) = node.latest().filter(|r| r.root.generation > after) {
                return envelope_response(r.envelope.clone(), method);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    return Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(crate::body::empty())
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""));
                }
            }
        }
    }
    text(StatusCode::NOT_FOUND, "unknown read API path\n")
}

fn envelope_response(env: Vec<u8>, method: &Method) -> Response<Body> {
    let len = env.len();
    let body = if *method == Method::HEAD {
        crate::body::empty()
    } else {
        full(env)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, ROOT_CONTENT_TYPE)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
}
