//! The read API every node (origin or mirror) exposes under `/.meridian/v1/`.
//!
//! | path | answer |
//! | --- | --- |
//! | `GET /.meridian/v1/root` | the newest signed root envelope (`application/x-meridian-root`), 503 before the first |
//! | `GET /.meridian/v1/generations/{n}` | the signed root of generation `n`, 404 once garbage-collected |
//! | `GET /.meridian/v1/objects/{blake3}` | a blob or directory node by hash, with Range support; immutable |
//! | `GET /.meridian/v1/wait?after=N[&timeout=S]` | long-poll: the newest root as soon as its generation is > N; 204 after S seconds (default 30, max 60) |
//! | `GET /.meridian/v1/delta/{from}/{to}` | the directory nodes of tree `to` as edits of tree `from` ([`meridian_core::TreeDelta`]); 404 when either tree is not held |
//! | `GET /.meridian/v1/patch/{base}/{target}` | blob `target` as copies from blob `base` plus new bytes ([`meridian_core::patch`]); 404 when either is not held or too large |
//! | `GET /.meridian/v1/outboard/{blake3}` | the blob's block chaining values ([`meridian_core::outboard`]: 32 bytes per 256 KiB), computed from the held bytes on demand (one at a time, queued like deltas) and kept for the next client; 404 for a blob of one block or one not held, 503 if the held bytes do not hash to the name |
//! | `GET /.meridian/v1/pack/{node}` | the small blobs of directory node `node` ([`pack_entries`]), concatenated in entry order, each made ready as `objects/` does it; 404 when the node or one of them is not held; the body is cut short if one turns out missing midway |
//! | `GET /.meridian/v1/keys` | the key statements this node holds ([`meridian_core::Keyring::encode`], `application/x-meridian-keys`) |
//!
//! Every answer carries `X-Meridian-Generation` with the newest generation,
//! and `X-Meridian-Keys` with the id of the key statements held
//! ([`crate::keys`]).
//! The prefix starts with a dot so that it cannot collide with published
//! content: the origin refuses to publish a top-level `.meridian`.

use crate::body::{Body, full};
use crate::files::{self, FileMeta, text};
use crate::store::ObjectStore;
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};
use meridian_core::{Hash, VerifiedRoot, hash_bytes};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The path prefix of the read API.
pub const PREFIX: &str = "/.meridian/v1/";
/// Media type of a signed root envelope.
pub(crate) const ROOT_CONTENT_TYPE: &str = "application/x-meridian-root";
/// Media type of an outboard ([`meridian_core::outboard`]).
pub(crate) const OUTBOARD_CONTENT_TYPE: &str = "application/x-meridian-outboard";
/// Longest long-poll a client may ask for.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(60);

/// What a node publishes.
pub trait Published: Send + Sync + 'static {
    /// The newest generation this node serves.
    fn latest(&self) -> Option<Arc<VerifiedRoot>>;
    /// The envelope of an older (still retained) generation.
    fn root_envelope(&self, generation: u64) -> Option<Vec<u8>>;
    /// How this node's stored objects are read.
    type Objects: Objects;
    /// The object store holding blobs and nodes.
    fn objects(&self) -> &Arc<Self::Objects>;
    /// Changes whenever a newer generation is published.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The key statements this node holds and passes on.
    fn keys(&self) -> Arc<crate::keys::KeysDoc>;
    /// Counts bytes sent for objects (metrics).
    fn count_object_bytes(&self, _bytes: u64) {}
    /// Tree deltas already computed or received, served without
    /// recomputing (`None`: compute every request).
    fn deltas(&self) -> Option<&DeltaCache> {
        None
    }
    /// Turns true when the node starts shutting down: every long-poll is
    /// answered at once (the newest root, or 204), so the drain does not
    /// wait out their timeouts.
    fn stopping(&self) -> Option<crate::shutdown::Stopping> {
        None
    }
}

/// What the read API needs of a node's object store. A mirror's store holds
/// only objects its verified writer committed, and answers as it is
/// ([`ObjectStore`]'s implementation); the origin's also holds files hashed
/// in place, which it checks, or copies through the verified writer, before
/// a byte of them is served. Every method may block on the disk: the read
/// API calls them on the blocking pool.
pub trait Objects: Send + Sync + 'static {
    /// Makes object `h` ready to be served, and says from where.
    fn ready(&self, h: &Hash) -> Ready;
    /// The whole of object `h`, checked against its name; `None` when it
    /// is not held or its bytes do not match.
    fn read_checked(&self, h: &Hash) -> Option<Vec<u8>>;
    /// The length of object `h`, if held.
    fn held_len(&self, h: &Hash) -> Option<u64>;
}

/// How an object is served ([`Objects::ready`]).
#[derive(Debug)]
pub enum Ready {
    /// From this file, of this length.
    File { path: std::path::PathBuf, len: u64 },
    /// From these bytes, checked against the object's name.
    Bytes(Vec<u8>),
    /// Not held here.
    Missing,
    /// Held, but its source changed before a verified copy was made:
    /// withdrawn.
    Withdrawn,
    /// The store failed.
    Failed,
}

impl Objects for ObjectStore {
    fn ready(&self, h: &Hash) -> Ready {
        let path = self.path(h);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ready::File { path, len: m.len() },
            _ => Ready::Missing,
        }
    }

    fn read_checked(&self, h: &Hash) -> Option<Vec<u8>> {
        self.read(h).ok().filter(|b| hash_bytes(b) == *h)
    }

    fn held_len(&self, h: &Hash) -> Option<u64> {
        ObjectStore::held_len(self, h)
    }
}

/// Runs blocking store work on the blocking pool.
async fn blocking<O: Objects, T: Send + 'static>(
    objects: &Arc<O>,
    f: impl FnOnce(&O) -> T + Send + 'static,
) -> Option<T> {
    let o = objects.clone();
    tokio::task::spawn_blocking(move || f(&o)).await.ok()
}

/// The most recent tree deltas, by the trees they connect. A delta is
/// immutable (named by both tree hashes), so it is computed once and served
/// to every mirror that asks: an origin fills it when it publishes (it has
/// the new nodes in memory), a mirror with the delta it synced by, so
/// mirrors downstream of it get the same bytes without any work.
#[derive(Debug, Default)]
pub struct DeltaCache {
    entries: std::sync::Mutex<std::collections::VecDeque<(Hash, Hash, bytes::Bytes)>>,
}

impl DeltaCache {
    /// Deltas kept, newest first.
    const ENTRIES: usize = 8;
    /// Total bytes kept.
    const BYTES: usize = 64 << 20;

    pub fn get(&self, from: &Hash, to: &Hash) -> Option<bytes::Bytes> {
        let e = self.entries.lock().ok()?;
        e.iter()
            .find(|(f, t, _)| f == from && t == to)
            .map(|(_, _, b)| b.clone())
    }

    pub fn insert(&self, from: Hash, to: Hash, delta: bytes::Bytes) {
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        if delta.len() > Self::BYTES || e.iter().any(|(f, t, _)| *f == from && *t == to) {
            return;
        }
        e.push_front((from, to, delta));
        while e.len() > Self::ENTRIES
            || e.iter().map(|(_, _, b)| b.len()).sum::<usize>() > Self::BYTES
        {
            e.pop_back();
        }
    }
}

/// Largest blob (base or target) a patch is computed for.
pub const PATCH_MAX_BYTES: u64 = 64 << 20;
/// Deltas and patches are CPU work: at most [`DIFF_WORKERS`] run at once.
/// A request waits for its turn only if it finds a place in the queue
/// ([`DIFF_QUEUE`] in all, [`DIFF_QUEUE_PER_CLIENT`] per client: a mirror
/// syncing many changed files keeps its parallel patches), and for at most
/// [`DIFF_WAIT`]; otherwise it is answered 503 at once (the mirror then
/// fetches the object whole). So a crowd asking for distinct pairs costs
/// one core and one patch's memory, and cannot queue without bound.
const DIFF_WORKERS: usize = 1;
const DIFF_QUEUE: usize = 64;
const DIFF_QUEUE_PER_CLIENT: usize = 16;
const DIFF_WAIT: Duration = Duration::from_secs(10);

/// A queue for CPU work requests (one kind): a few workers, bounded
/// places in all and per client, a bounded wait.
struct CpuQueue {
    permits: tokio::sync::Semaphore,
    places: std::sync::Arc<crate::limits::Admission>,
}

impl CpuQueue {
    fn new(workers: usize) -> Self {
        CpuQueue {
            permits: tokio::sync::Semaphore::new(workers),
            places: crate::limits::Admission::new(crate::limits::ConnLimits {
                total: DIFF_QUEUE,
                per_client: DIFF_QUEUE_PER_CLIENT,
            }),
        }
    }

    /// A turn for `peer`, or the 503 to send.
    async fn turn(
        &'static self,
        peer: std::net::IpAddr,
        what: &str,
    ) -> Result<(crate::limits::Permit, tokio::sync::SemaphorePermit<'static>), Response<Body>>
    {
        let place = self.places.try_admit(peer).map_err(|_| busy(what))?;
        match tokio::time::timeout(DIFF_WAIT, self.permits.acquire()).await {
            Ok(Ok(turn)) => Ok((place, turn)),
            _ => Err(busy(what)),
        }
    }
}

/// A turn to compute a delta or patch for `peer`, or the 503 to send.
async fn diff_turn(
    peer: std::net::IpAddr,
    what: &str,
) -> Result<(crate::limits::Permit, tokio::sync::SemaphorePermit<'static>), Response<Body>> {
    static Q: std::sync::OnceLock<CpuQueue> = std::sync::OnceLock::new();
    Q.get_or_init(|| CpuQueue::new(DIFF_WORKERS))
        .turn(peer, what)
        .await
}

/// Outboards are hashing (a core per GB/s): [`OUTBOARD_WORKERS`] at once,
/// queued as deltas are but apart from them, so a client asking for a big
/// file's outboard never holds up a mirror's sync.
const OUTBOARD_WORKERS: usize = 1;

async fn outboard_turn(
    peer: std::net::IpAddr,
) -> Result<(crate::limits::Permit, tokio::sync::SemaphorePermit<'static>), Response<Body>> {
    static Q: std::sync::OnceLock<CpuQueue> = std::sync::OnceLock::new();
    Q.get_or_init(|| CpuQueue::new(OUTBOARD_WORKERS))
        .turn(peer, "outboard")
        .await
}

/// Outboards computed lately ([`meridian_core::outboard`]), by blob:
/// immutable, so computed once per blob while they stay here.
fn outboards() -> &'static std::sync::Mutex<std::collections::VecDeque<(Hash, bytes::Bytes)>> {
    static S: std::sync::OnceLock<
        std::sync::Mutex<std::collections::VecDeque<(Hash, bytes::Bytes)>>,
    > = std::sync::OnceLock::new();
    S.get_or_init(Default::default)
}
/// Outboards kept, and their bytes in all (a 1 GiB blob's is 128 KiB).
const OUTBOARDS: usize = 64;
const OUTBOARD_BYTES: usize = 16 << 20;

fn outboard_cached(h: &Hash) -> Option<bytes::Bytes> {
    let c = outboards().lock().ok()?;
    c.iter().find(|(k, _)| k == h).map(|(_, b)| b.clone())
}

fn outboard_keep(h: Hash, b: bytes::Bytes) {
    let Ok(mut c) = outboards().lock() else {
        return;
    };
    if c.iter().any(|(k, _)| *k == h) {
        return;
    }
    c.push_front((h, b));
    while c.len() > OUTBOARDS || c.iter().map(|(_, b)| b.len()).sum::<usize>() > OUTBOARD_BYTES {
        c.pop_back();
    }
}

/// Computes blob `h`'s outboard from the store's bytes, which must hash to
/// `h` (else `None`: the object is damaged or changed at its source).
fn compute_outboard<O: Objects>(o: &O, h: &Hash) -> Option<Option<Vec<u8>>> {
    use std::io::Read;
    let len = o.held_len(h)?;
    let mut b = meridian_core::outboard::OutboardBuilder::new(len);
    match o.ready(h) {
        Ready::File { path, .. } => {
            let mut f = std::fs::File::open(path).ok()?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => b.update(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return None,
                }
            }
        }
        Ready::Bytes(bytes) => b.update(&bytes),
        _ => return None,
    }
    Some(b.finish(h).map(|o| o.encode()))
}

/// Largest blob sent in a pack.
pub const PACK_BLOB_MAX: u64 = 64 << 10;
/// Largest pack body: a node whose small blobs add up to more is not
/// packed (its blobs are fetched one by one).
pub const PACK_MAX_BYTES: u64 = 256 << 20;

/// The entries of `node` whose blobs a pack carries, in order: the regular
/// files of at most [`PACK_BLOB_MAX`] bytes. `None` when they add up to
/// more than [`PACK_MAX_BYTES`]. The one rule both ends apply.
pub fn pack_entries(node: &meridian_core::DirNode) -> Option<Vec<(Hash, u64)>> {
    let mut total = 0u64;
    let mut out = Vec::new();
    for e in &node.entries {
        if e.kind == meridian_core::EntryKind::File && e.size <= PACK_BLOB_MAX {
            total += e.size;
            out.push((e.hash, e.size));
        }
    }
    (total <= PACK_MAX_BYTES).then_some(out)
}

/// A pack of `node`'s small blobs, streamed: each blob is made ready and
/// read on the blocking pool as the `objects/` route would serve it, a few
/// blobs ahead of the socket (memory bounded to the channel); the reader
/// checks each against its name, and a blob that turns out missing ends the
/// body short.
async fn pack_response<O: Objects>(
    objects: &Arc<O>,
    node: Hash,
    method: &Method,
) -> Response<Body> {
    let o = objects.clone();
    let entries = tokio::task::spawn_blocking(move || {
        let bytes = o.read_checked(&node)?;
        let n = meridian_core::DirNode::decode(&bytes).ok()?;
        let entries = pack_entries(&n)?;
        // Every blob held, before a byte is promised.
        entries
            .iter()
            .all(|(h, size)| o.held_len(h) == Some(*size))
            .then_some(entries)
    })
    .await
    .ok()
    .flatten();
    let Some(entries) = entries else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no pack of node {node} here\n"),
        );
    };
    let len: u64 = entries.iter().map(|e| e.1).sum();
    let body = if *method == Method::HEAD {
        crate::body::empty()
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(8);
        let o = objects.clone();
        tokio::task::spawn_blocking(move || {
            for (h, size) in entries {
                // As the objects route serves it: `ready` (which, on an
                // origin, makes and checks the private copy of a file
                // hashed in place), then its bytes.
                let item = match o.ready(&h) {
                    Ready::File { path, len } if len == size => {
                        std::fs::read(&path).map(bytes::Bytes::from)
                    }
                    Ready::Bytes(b) if b.len() as u64 == size => Ok(bytes::Bytes::from(b)),
                    _ => Err(std::io::Error::other(format!(
                        "object {h} missing or withdrawn"
                    ))),
                };
                let end = item.is_err();
                if tx.blocking_send(item).is_err() || end {
                    return;
                }
            }
        });
        use http_body_util::BodyExt;
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let next = rx.recv().await?;
            Some((next.map(hyper::body::Frame::data), rx))
        });
        http_body_util::StreamBody::new(frames).boxed()
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-meridian-pack")
        .header(header::CONTENT_LENGTH, len)
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

/// Long-polls held at once in all, and per client: they hold a connection
/// each for up to [`MAX_WAIT`], so they get a bounded share and the rest
/// of the connections stay for downloads.
pub(crate) const MAX_LONG_POLLS: usize = 1024;
pub(crate) const MAX_LONG_POLLS_PER_CLIENT: usize = 8;

fn long_poll_places() -> &'static std::sync::Arc<crate::limits::Admission> {
    static S: std::sync::OnceLock<std::sync::Arc<crate::limits::Admission>> =
        std::sync::OnceLock::new();
    S.get_or_init(|| {
        crate::limits::Admission::new(crate::limits::ConnLimits {
            total: MAX_LONG_POLLS,
            per_client: MAX_LONG_POLLS_PER_CLIENT,
        })
    })
}

fn busy(what: &str) -> Response<Body> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what}: this node is busy with others; retry later, or fetch the object whole\n"),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
    r
}

/// Counts an object response's body bytes (a successful GET).
fn count_sent<P: Published>(node: &P, method: &Method, resp: &Response<Body>) {
    if resp.status().is_success() && *method == Method::GET {
        let n = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        node.count_object_bytes(n);
    }
}

fn two_hashes(rest: &str) -> Option<(Hash, Hash)> {
    let (a, b) = rest.split_once('/')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Handles `req` if its path is under [`PREFIX`] (else `None`).
pub async fn handle<P: Published>(
    node: &P,
    req: &http::Request<()>,
    peer: std::net::IpAddr,
) -> Option<Response<Body>> {
    let rest = req.uri().path().strip_prefix(PREFIX)?;
    Some(
        answer(
            node,
            req.method(),
            rest,
            req.uri().query(),
            req.headers(),
            peer,
        )
        .await,
    )
}

async fn answer<P: Published>(
    node: &P,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    peer: std::net::IpAddr,
) -> Response<Body> {
    if *method != Method::GET && *method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read API is GET/HEAD only\n",
        );
    }
    let latest_gen = node.latest().map(|r| r.root.generation).unwrap_or(0);
    let keys = node.keys();
    let mut resp = if rest == "keys" {
        let mut r = binary_response(keys.bytes.clone(), crate::keys::KEYS_CONTENT_TYPE, method);
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        r
    } else {
        route(node, method, rest, query, headers, peer).await
    };
    let h = resp.headers_mut();
    h.insert("x-meridian-generation", latest_gen.into());
    h.insert(crate::keys::KEYS_HEADER, keys.header.clone());
    resp
}

async fn route<P: Published>(
    node: &P,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    peer: std::net::IpAddr,
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
        let ready = blocking(node.objects(), move |o| o.ready(&hash))
            .await
            .unwrap_or(Ready::Failed);
        let fm = |len| FileMeta {
            len,
            hash,
            mtime: 0,
            content_type: "application/octet-stream",
            cache_control: "public, max-age=31536000, immutable",
        };
        let resp = match ready {
            Ready::File { path, len } => files::respond(
                method,
                headers,
                &fm(len),
                || std::fs::File::open(&path),
                None,
            ),
            Ready::Bytes(bytes) => {
                files::respond_bytes(method, headers, &fm(bytes.len() as u64), bytes.into(), None)
            }
            Ready::Missing => text(StatusCode::NOT_FOUND, format!("object {hash} not found\n")),
            Ready::Withdrawn => text(
                StatusCode::NOT_FOUND,
                format!("object {hash} changed at its source and was withdrawn\n"),
            ),
            Ready::Failed => text(StatusCode::SERVICE_UNAVAILABLE, "object store error\n"),
        };
        count_sent(node, method, &resp);
        return resp;
    }
    if let Some(h) = rest.strip_prefix("outboard/") {
        let Ok(hash) = h.parse::<Hash>() else {
            return text(
                StatusCode::BAD_REQUEST,
                "outboard/{blake3}: a blob hash (64 hex digits)\n",
            );
        };
        let len = blocking(node.objects(), move |o| o.held_len(&hash))
            .await
            .flatten();
        match len {
            None => return text(StatusCode::NOT_FOUND, format!("object {hash} not found\n")),
            Some(l) if l <= meridian_core::outboard::BLOCK_LEN => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!("object {hash} is one block ({l} bytes): its hash checks it whole\n"),
                );
            }
            Some(_) => {}
        }
        if let Some(b) = outboard_cached(&hash) {
            return binary_response(b, OUTBOARD_CONTENT_TYPE, method);
        }
        let _turn = match outboard_turn(peer).await {
            Ok(t) => t,
            Err(r) => return r,
        };
        // Another request may have computed it while this one waited.
        if let Some(b) = outboard_cached(&hash) {
            return binary_response(b, OUTBOARD_CONTENT_TYPE, method);
        }
        let t0 = std::time::Instant::now();
        let out = blocking(node.objects(), move |o| compute_outboard(o, &hash))
            .await
            .flatten();
        return match out {
            Some(Some(b)) => {
                tracing::debug!(seconds = t0.elapsed().as_secs_f64(), %hash, "computed outboard");
                let b = bytes::Bytes::from(b);
                outboard_keep(hash, b.clone());
                binary_response(b, OUTBOARD_CONTENT_TYPE, method)
            }
            Some(None) => {
                tracing::warn!(%hash, "an object's bytes do not match its name: no outboard served");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("object {hash} does not match its hash here\n"),
                )
            }
            None => text(StatusCode::NOT_FOUND, format!("object {hash} not found\n")),
        };
    }
    if let Some(h) = rest.strip_prefix("pack/") {
        let Ok(node_hash) = h.parse::<Hash>() else {
            return text(StatusCode::BAD_REQUEST, "pack/{node}: a node hash\n");
        };
        let resp = pack_response(node.objects(), node_hash, method).await;
        count_sent(node, method, &resp);
        return resp;
    }
    if let Some(pair) = rest.strip_prefix("delta/") {
        let Some((from, to)) = two_hashes(pair) else {
            return text(
                StatusCode::BAD_REQUEST,
                "delta/{from}/{to}: two tree hashes\n",
            );
        };
        if let Some(b) = node.deltas().and_then(|c| c.get(&from, &to)) {
            node.count_object_bytes(b.len() as u64);
            return binary_response(b, "application/x-meridian-delta", method);
        }
        let _turn = match diff_turn(peer, "delta").await {
            Ok(t) => t,
            Err(r) => return r,
        };
        let t0 = std::time::Instant::now();
        let delta = blocking(node.objects(), move |o| {
            meridian_core::delta::encode_between(from, to, |h| o.read_checked(h))
        })
        .await;
        tracing::debug!(seconds = t0.elapsed().as_secs_f64(), %from, %to, "computed tree delta");
        return match delta {
            Some(Ok(b)) if b.len() as u64 <= meridian_core::delta::MAX_DELTA_BYTES => {
                node.count_object_bytes(b.len() as u64);
                let b = bytes::Bytes::from(b);
                if let Some(c) = node.deltas() {
                    c.insert(from, to, b.clone());
                }
                binary_response(b, "application/x-meridian-delta", method)
            }
            Some(Ok(_)) => text(StatusCode::NOT_FOUND, "delta too large; fetch the nodes\n"),
            Some(Err(e)) => text(StatusCode::NOT_FOUND, format!("no delta: {e}\n")),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "delta computation failed\n",
            ),
        };
    }
    if let Some(pair) = rest.strip_prefix("patch/") {
        let Some((base, target)) = two_hashes(pair) else {
            return text(
                StatusCode::BAD_REQUEST,
                "patch/{base}/{target}: two blob hashes\n",
            );
        };
        let objects = node.objects();
        let small = |h: &Hash| {
            objects
                .held_len(h)
                .is_some_and(|len| len <= PATCH_MAX_BYTES)
        };
        if !small(&base) || !small(&target) {
            return text(
                StatusCode::NOT_FOUND,
                "no patch: an object is not held here or is too large\n",
            );
        }
        let _turn = match diff_turn(peer, "patch").await {
            Ok(t) => t,
            Err(r) => return r,
        };
        // Both versions are read whole and checked against their names.
        let patch = blocking(objects, move |o| {
            let b = o.read_checked(&base)?;
            let t = o.read_checked(&target)?;
            Some(meridian_core::patch::make_patch(&b, base, &t, target))
        })
        .await
        .flatten();
        return match patch {
            Some(p) => {
                node.count_object_bytes(p.len() as u64);
                binary_response(p, "application/x-meridian-patch", method)
            }
            None => text(StatusCode::NOT_FOUND, "no patch: an object vanished\n"),
        };
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
        let no_news = || {
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(crate::body::empty())
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
        };
        if let Some(r) = node.latest().filter(|r| r.root.generation > after) {
            return envelope_response(r.envelope.clone(), method);
        }
        let Ok(_place) = long_poll_places().try_admit(peer) else {
            return busy("wait");
        };
        let mut rx = node.subscribe();
        let mut stopping = node.stopping();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(r) = node.latest().filter(|r| r.root.generation > after) {
                return envelope_response(r.envelope.clone(), method);
            }
            if stopping.as_ref().is_some_and(|s| s.is_set()) {
                return no_news();
            }
            let stop = async {
                match stopping.as_mut() {
                    Some(s) => s.wait().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.changed()) => match r {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => return no_news(),
                },
                _ = stop => continue,
            }
        }
    }
    text(StatusCode::NOT_FOUND, "unknown read API path\n")
}

fn envelope_response(env: Vec<u8>, method: &Method) -> Response<Body> {
    let mut r = binary_response(env, ROOT_CONTENT_TYPE, method);
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

/// An immutable computed answer (a delta or a patch: both are named by the
/// hashes they connect, so they never change).
fn binary_response(
    env: impl Into<bytes::Bytes>,
    content_type: &'static str,
    method: &Method,
) -> Response<Body> {
    let env: bytes::Bytes = env.into();
    let len = env.len();
    let body = if *method == Method::HEAD {
        crate::body::empty()
    } else {
        full(env)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        meridian_core::hash_bytes(&[i])
    }

    #[test]
    fn the_delta_cache_keeps_the_newest_within_its_bounds() {
        let c = DeltaCache::default();
        assert!(c.get(&h(0), &h(1)).is_none());
        for i in 0..20u8 {
            c.insert(h(i), h(i + 1), bytes::Bytes::from(vec![i; 10]));
        }
        // The newest ENTRIES are kept, the oldest dropped.
        assert_eq!(c.get(&h(19), &h(20)).expect("newest kept")[0], 19);
        assert_eq!(c.get(&h(12), &h(13)).expect("eighth newest kept")[0], 12);
        assert!(c.get(&h(11), &h(12)).is_none());
        // Direction matters.
        assert!(c.get(&h(20), &h(19)).is_none());
        // Bytes are bounded too: one big delta pushes the others out.
        c.insert(
            h(100),
            h(101),
            bytes::Bytes::from(vec![0u8; DeltaCache::BYTES - 5]),
        );
        assert!(c.get(&h(100), &h(101)).is_some());
        assert!(c.get(&h(19), &h(20)).is_none());
        // One larger than the whole budget is not kept at all.
        c.insert(
            h(102),
            h(103),
            bytes::Bytes::from(vec![0u8; DeltaCache::BYTES + 1]),
        );
        assert!(c.get(&h(102), &h(103)).is_none());
        assert!(c.get(&h(100), &h(101)).is_some());
    }
}
