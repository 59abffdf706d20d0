//! The HTTP redirector (`[redirector]`): `GET /path` answers `302` to the
//! nearest usable mirror that serves the file's exact bytes, with the next
//! ones in `Link: …; rel=duplicate` (RFC 6249).
//!
//! It shares GeoDNS's mirror views (health, load), its client placement
//! ([`crate::answer::locate`]) and its band rule
//! ([`crate::select::select_for_file`]). What it adds is per file: a
//! mirror qualifies when the tree of the generation it reports serving
//! ([`trees`]) holds the path with the same blake3 hash as the newest
//! generation, so a mirror a generation behind still gets every file that
//! did not change and never one that did.
//!
//! A target is always a configured mirror base URL plus the normalised
//! published path, percent-encoded ([`meridian_serve::urlpath`]): nothing
//! of the request but a path that resolves in the signed tree reaches a
//! `Location`, so no path or header makes it an open redirect.

pub(crate) mod digest;
mod list;
mod metalink;
pub(crate) mod trees;

use crate::answer::{Runtime, locate};
use crate::geoip::GeoSet;
use crate::health::Tracker;
use crate::select::{self, Ranked};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, header};
use meridian_core::{Hash, Resolved};
use meridian_serve::files::text;
use meridian_serve::urlpath::{encoded, normalise};
use meridian_serve::{Body, Service, empty};
use prometheus::{IntCounterVec, Opts, Registry};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use trees::{Known, Tree, Trees};

/// Mirrors named in `Link: rel=duplicate` besides the target.
const DUPLICATES: usize = 4;
/// `Retry-After` when no usable mirror has a file.
const RETRY_AFTER: &str = "30";

/// The redirector's counters.
#[derive(Debug, Clone)]
pub(crate) struct RedirectMetrics {
    id: u64,
    redirects: IntCounterVec,
    responses: IntCounterVec,
}

impl RedirectMetrics {
    /// The counters, with every response code's series and each of
    /// `mirrors`' redirect series at 0 from the start.
    pub(crate) fn new<'a>(registry: &Registry, mirrors: impl Iterator<Item = &'a str>) -> Self {
        let m = RedirectMetrics {
            id: crate::metrics::next_id(),
            redirects: IntCounterVec::new(
                Opts::new(
                    "meridian_redirector_redirects_total",
                    "Downloads redirected (GET without Range, or from byte 0), by target mirror",
                ),
                &["mirror"],
            )
            .expect("metric"),
            responses: IntCounterVec::new(
                Opts::new(
                    "meridian_redirector_responses_total",
                    "Redirector responses by status code",
                ),
                &["code"],
            )
            .expect("metric"),
        };
        for c in [&m.redirects, &m.responses] {
            let _ = registry.register(Box::new(c.clone()));
        }
        for code in ["302", "400", "404", "405", "503"] {
            m.responses.with_label_values(&[code]);
        }
        for id in mirrors {
            m.redirects.with_label_values(&[id]);
        }
        m
    }
    fn response(&self, code: StatusCode) {
        crate::metrics::inc_cached((self.id, 0), &self.responses, code.as_str(), 1);
    }
    fn redirect(&self, mirror: &str) {
        crate::metrics::inc_cached((self.id, 1), &self.redirects, mirror, 1);
    }
}

/// The redirector service.
#[derive(Debug)]
pub(crate) struct Redirector {
    pub trees: Arc<Trees>,
    pub digests: Arc<digest::Digests>,
    pub tracker: Arc<Tracker>,
    pub runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    pub geo: Arc<GeoSet>,
    pub proxies: Vec<(IpAddr, u8)>,
    pub metrics: RedirectMetrics,
    random: AtomicU64,
    counts: list::Counts,
    started: i64,
}

/// What the request names in the newest tree.
enum Target {
    File(Hash),
    Dir,
}

impl Redirector {
    pub(crate) fn new(
        trees: Arc<Trees>,
        digests: Arc<digest::Digests>,
        tracker: Arc<Tracker>,
        runtime: Arc<arc_swap::ArcSwap<Runtime>>,
        geo: Arc<GeoSet>,
        proxies: &[String],
        metrics: RedirectMetrics,
    ) -> Self {
        Redirector {
            trees,
            digests,
            tracker,
            runtime,
            geo,
            proxies: proxies
                .iter()
                .filter_map(|p| select::parse_cidr(p))
                .collect(),
            metrics,
            counts: list::Counts::default(),
            started: meridian_serve::unix_now(),
            random: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
            ),
        }
    }

    /// The client: the peer, or, from a trusted proxy, the right-most
    /// address in `X-Forwarded-For` that is not itself a trusted proxy.
    fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let trusted = |ip: IpAddr| {
            self.proxies
                .iter()
                .any(|&(n, l)| select::cidr_contains(n, l, ip))
        };
        if !trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for v in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(v) = v.to_str() else { return client };
            for part in v.rsplit(',') {
                let Ok(ip) = part.trim().parse::<IpAddr>() else {
                    return client;
                };
                client = ip;
                if !trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }

    fn next_random(&self) -> u64 {
        crate::answer::splitmix(
            self.random
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
        )
    }
}

/// Whether `tree` serves what `target` names at `path` in the newest tree.
fn serves(tree: &Tree, path: &str, target: &Target) -> bool {
    match (tree.resolve(path), target) {
        (Some(Resolved::File(e)), Target::File(h)) => e.hash == *h,
        (Some(Resolved::Dir(..)), Target::Dir) => true,
        _ => false,
    }
}

fn tree_of(known: &Known, generation: u64) -> Option<&Tree> {
    match &known.newest {
        Some(t) if t.generation() == generation => Some(t),
        _ => known.by_generation.get(&generation).map(|t| t.as_ref()),
    }
}

fn reply(code: StatusCode, msg: &str) -> Response<Body> {
    let mut r = text(code, msg.to_owned());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl Service for Redirector {
    async fn call(&self, req: http::Request<()>, peer: SocketAddr) -> Response<Body> {
        let r = self.redirect(&req, peer).await;
        self.metrics.response(r.status());
        r
    }
}

impl Redirector {
    async fn redirect(&self, req: &http::Request<()>, peer: SocketAddr) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        if req.uri().path() == "/.meridian/stats" {
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store")
                .body(meridian_serve::full(self.counts.summary(self.started)))
                .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, ""));
        }
        let Some((path, wants_dir)) = normalise(req.uri().path()) else {
            return reply(StatusCode::BAD_REQUEST, "invalid path\n");
        };
        // `?mirrorlist` (HTML; `?mirrorlist=json` or Accept: application/json
        // for JSON).
        let list = req.uri().query().and_then(|q| {
            q.split('&').find_map(|kv| match kv.split_once('=') {
                Some(("mirrorlist", v)) => Some(v == "json"),
                None if kv == "mirrorlist" => Some(false),
                _ => None,
            })
        });
        let list_json = list.map(|j| {
            j || req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/json") && !v.contains("text/html"))
        });
        let known = self.trees.known.load();
        let Some(newest) = known.newest.as_ref() else {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the redirector has not loaded a generation yet; try again soon\n",
            );
        };
        // A Metalink: `PATH.meta4` (unless that is a published file
        // itself), or any file asked for with the Metalink media type.
        let accepts_metalink = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(metalink::MEDIA_TYPE)));
        let mut want_metalink = false;
        let mut found = newest.resolve(&path);
        let mut path = path;
        if found.is_none()
            && let Some(file) = path.strip_suffix(".meta4")
            && let Some(f @ Resolved::File(_)) = newest.resolve(file)
        {
            found = Some(f);
            path = file.to_owned().into();
            want_metalink = true;
        }
        let (target, canonical) = match found {
            None => return reply(StatusCode::NOT_FOUND, "not found\n"),
            Some(Resolved::File(_)) if wants_dir => {
                return reply(StatusCode::NOT_FOUND, "not found\n");
            }
            Some(Resolved::File(e)) => {
                want_metalink |= accepts_metalink;
                (Target::File(e.hash), path)
            }
            Some(Resolved::Dir(c, _)) => (Target::Dir, std::borrow::Cow::Owned(c)),
        };
        let rt = self.runtime.load();
        let views = self.tracker.views.load();
        let client = locate(&rt, &self.geo, self.client_ip(peer.ip(), req.headers()));
        let loc = client.location.as_deref();
        let ctx = Ctx {
            req,
            known: &known,
            newest,
            rt: &rt,
            views: &views,
            loc,
            canonical: &canonical,
            target: &target,
            want_metalink,
            list_json,
        };
        // Distances from the client: cached per location (as for DNS).
        let step = match loc {
            Some(l) => crate::answer::with_ranked(&views, l, |ranked| self.decide(&ctx, ranked)),
            None => self.decide(&ctx, &Ranked::unplaced(&views)),
        };
        let (hash, size, urls) = match step {
            Step::Done(r) => return r,
            Step::Metalink { hash, size, urls } => (hash, size, urls),
        };
        let digest = match self.digests.get(hash, size).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(path = %canonical, error = %e, "redirector: no SHA-256 for a Metalink");
                let mut r = reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the file's SHA-256 cannot be computed from verified bytes now; try again later\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
                return r;
            }
        };
        let name = canonical.rsplit('/').next().unwrap_or(&canonical);
        let urls: Vec<(String, Option<&str>)> = urls
            .iter()
            .map(|(u, c)| (u.clone(), c.as_deref()))
            .collect();
        let body = metalink::render(name, hash, &digest, &urls, newest.generation());
        if req.method() == Method::GET {
            self.counts.count(&canonical, "(metalink)");
        }
        Response::builder()
            .header(header::CONTENT_TYPE, metalink::MEDIA_TYPE)
            .header(header::CACHE_CONTROL, "no-store")
            .header(
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"{}.meta4\"",
                    name.replace(['"', '\\'], "_")
                ),
            )
            .body(meridian_serve::full(body))
            .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, "bad metalink\n"))
    }

    /// Everything but the Metalink's digest, which may need I/O: the mirror
    /// list, the 503, the 302, or what a Metalink lists.
    fn decide(&self, c: &Ctx<'_>, ranked: &Ranked) -> Step {
        let (views, rt, canonical, target) = (c.views, c.rt, c.canonical, c.target);
        // Whether each mirror serves the path: one lookup per distinct
        // generation among the mirrors (they mostly share one). The newest
        // tree is where `target` was found: no second lookup. On the stack
        // for up to 64 mirrors and 8 generations.
        let mut memo = [(0u64, false); 8];
        memo[0] = (c.newest.generation(), true);
        let mut memo_len = 1;
        let mut on_stack = [false; 64];
        let mut on_heap = Vec::new();
        let has_vec: &mut [bool] = if views.len() <= on_stack.len() {
            &mut on_stack[..views.len()]
        } else {
            on_heap.resize(views.len(), false);
            &mut on_heap
        };
        for (slot, v) in has_vec.iter_mut().zip(views.iter()) {
            let g = v.generation;
            *slot = match memo[..memo_len].iter().find(|(mg, _)| *mg == g) {
                Some(&(_, ok)) => ok,
                None => {
                    let ok = tree_of(c.known, g).is_some_and(|t| serves(t, canonical, target));
                    if memo_len < memo.len() {
                        memo[memo_len] = (g, ok);
                        memo_len += 1;
                    }
                    ok
                }
            };
        }
        let has_vec = &*has_vec;
        let has = |i: usize| has_vec.get(i).copied().unwrap_or(false);
        let slash = if matches!(target, Target::Dir) && !canonical.is_empty() {
            "/"
        } else {
            ""
        };
        // The path percent-encoded once; every URL is a base plus it.
        let mut path_enc = String::with_capacity(canonical.len() + 8);
        let _ = write!(path_enc, "{}", encoded(canonical));
        path_enc.push_str(slash);
        let write_url = |out: &mut String, i: usize| {
            out.push_str(rt.bases.get(&views[i].id).map_or("", |b| b.as_ref()));
            out.push('/');
            out.push_str(&path_enc);
        };
        let url = |i: usize| {
            let mut u = String::new();
            write_url(&mut u, i);
            u
        };
        if let Some(json) = c.list_json {
            let rows = list::rows(
                views,
                c.loc.map(|_| ranked.dists.as_slice()),
                rt.params.full_at,
                &rt.countries,
                has,
                url,
            );
            let (ct, body) = if json {
                #[derive(serde::Serialize)]
                struct Doc<'a> {
                    path: &'a str,
                    generation: u64,
                    mirrors: &'a [list::Row<'a>],
                }
                let doc = Doc {
                    path: canonical,
                    generation: c.newest.generation(),
                    mirrors: &rows,
                };
                (
                    "application/json",
                    serde_json::to_vec_pretty(&doc).unwrap_or_default(),
                )
            } else {
                (
                    "text/html; charset=utf-8",
                    list::html(canonical, c.newest.generation(), &rows).into_bytes(),
                )
            };
            return Step::Done(
                Response::builder()
                    .header(header::CONTENT_TYPE, ct)
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(meridian_serve::full(body))
                    .unwrap_or_else(|_| reply(StatusCode::INTERNAL_SERVER_ERROR, "")),
            );
        }
        let mut picks = Vec::with_capacity(1 + DUPLICATES);
        let n = if c.want_metalink {
            views.len()
        } else {
            1 + DUPLICATES
        };
        if !select::select_for_file(
            c.loc,
            ranked,
            views,
            &rt.params,
            self.next_random(),
            has,
            n,
            &mut picks,
        ) {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no mirror that serves this file is usable now; try again later\n",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
            return Step::Done(r);
        }
        if c.want_metalink
            && let (Target::File(h), Some(Resolved::File(e))) =
                (target, c.newest.resolve(canonical))
        {
            return Step::Metalink {
                hash: *h,
                size: e.size,
                urls: picks
                    .iter()
                    .map(|&i| (url(i), rt.countries.get(&views[i].id).cloned()))
                    .collect(),
            };
        }
        // Every header value of the 302 is written into one buffer and
        // handed out as slices of it: one allocation for all of them.
        let mut buf = String::with_capacity(320 + 160 * picks.len());
        let mut cuts = [(Slot::Location, 0usize); 5 + DUPLICATES];
        let mut n_cuts = 0;
        let mut cut = |buf: &String, slot: Slot| {
            if n_cuts < cuts.len() {
                cuts[n_cuts] = (slot, buf.len());
                n_cuts += 1;
            }
        };
        write_url(&mut buf, picks[0]);
        cut(&buf, Slot::Location);
        push_decimal(&mut buf, c.newest.generation());
        cut(&buf, Slot::Generation);
        if let Target::File(h) = target {
            buf.push_str(std::str::from_utf8(&h.hex_bytes()).unwrap_or_default());
            cut(&buf, Slot::Blake3);
            buf.push_str("</");
            buf.push_str(&path_enc);
            buf.push_str(".meta4>; rel=describedby; type=\"");
            buf.push_str(metalink::MEDIA_TYPE);
            buf.push('"');
            cut(&buf, Slot::Link);
            if let Some(d) = self.digests.known(h) {
                use base64::Engine;
                buf.push_str("sha-256=:");
                base64::engine::general_purpose::STANDARD.encode_string(d.sha256, &mut buf);
                buf.push(':');
                cut(&buf, Slot::Digest);
            }
        }
        for (k, &i) in picks.iter().enumerate().skip(1).take(DUPLICATES) {
            buf.push('<');
            write_url(&mut buf, i);
            buf.push_str(">; rel=duplicate; pri=");
            push_decimal(&mut buf, k as u64 + 1);
            if let Some(cc) = rt.countries.get(&views[i].id) {
                buf.push_str("; geo=");
                buf.push_str(cc);
            }
            cut(&buf, Slot::Link);
        }
        let values = bytes::Bytes::from(buf.into_bytes());
        let mut headers = http::HeaderMap::with_capacity(8 + DUPLICATES);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let mut start = 0;
        for &(slot, end) in &cuts[..n_cuts] {
            let Ok(v) = HeaderValue::from_maybe_shared(values.slice(start..end)) else {
                return Step::Done(reply(StatusCode::INTERNAL_SERVER_ERROR, "bad target\n"));
            };
            headers.append(slot.name(), v);
            start = end;
        }
        if c.req.method() == Method::GET && list::starts_download(c.req.headers()) {
            let id = &views[picks[0]].id;
            self.metrics.redirect(id);
            self.counts.count(canonical, id);
        }
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::FOUND;
        *r.headers_mut() = headers;
        Step::Done(r)
    }
}

/// Appends `n` in decimal (no formatting machinery on the hot path).
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).unwrap_or_default());
}

/// The 302's headers, in [`Redirector::decide`]'s one buffer.
#[derive(Clone, Copy)]
enum Slot {
    Location,
    Generation,
    Blake3,
    Link,
    Digest,
}

impl Slot {
    fn name(self) -> HeaderName {
        const GENERATION: HeaderName = HeaderName::from_static("x-meridian-generation");
        const BLAKE3: HeaderName = HeaderName::from_static("x-meridian-blake3");
        const DIGEST: HeaderName = HeaderName::from_static("repr-digest");
        match self {
            Slot::Location => header::LOCATION,
            Slot::Generation => GENERATION,
            Slot::Blake3 => BLAKE3,
            Slot::Link => header::LINK,
            Slot::Digest => DIGEST,
        }
    }
}

/// What one request needs to be decided.
struct Ctx<'a> {
    req: &'a http::Request<()>,
    known: &'a Known,
    newest: &'a Tree,
    rt: &'a Runtime,
    views: &'a crate::health::Views,
    loc: Option<&'a crate::geoip::Location>,
    canonical: &'a str,
    target: &'a Target,
    want_metalink: bool,
    list_json: Option<bool>,
}

/// [`Redirector::decide`]'s outcome.
enum Step {
    Done(Response<Body>),
    /// A Metalink for the file with this blake3 and size, listing these
    /// URLs (with each mirror's country), best first.
    Metalink {
        hash: Hash,
        size: u64,
        urls: Vec<(String, Option<Box<str>>)>,
    },
}

#[cfg(test)]
mod tests {
    use super::push_decimal;

    #[test]
    fn decimals_are_written_as_format_writes_them() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX] {
            let mut s = String::from("x=");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x={n}"));
        }
    }
}
