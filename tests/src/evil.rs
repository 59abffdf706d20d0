//! An upstream that lies: it forwards the read API of a real node but
//! corrupts what it forwards, in one of several ways.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Frame;
use meridian_serve::{Body, ServerHandle, ServerOptions, Service, full, serve};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the proxy lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Honest = 0,
    /// Flips one byte in the middle of every blob.
    FlipByte = 1,
    /// Sends half of every blob, then drops the connection.
    Truncate = 2,
    /// Sends every blob followed by extra bytes.
    Extra = 3,
    /// Answers root requests with `fake_root`.
    FakeRoot = 4,
    /// Sends blobs slowly (64 KiB every 50 ms).
    Slow = 5,
    /// Passes blobs and nodes, but flips a byte in the middle of every tree
    /// delta and blob patch.
    CorruptDiffs = 6,
    /// A lying download mirror: passes the read API and `/.meridian/*`
    /// untouched, flips one byte in the middle of every download (a whole
    /// file or a range).
    FlipDownloads = 7,
    /// A slow download mirror: passes the read API and `/.meridian/*`
    /// untouched, sends every download 64 KiB every 50 ms.
    SlowDownloads = 8,
}

/// The lying upstream.
pub struct Evil {
    pub upstream: String,
    pub mode: AtomicU8,
    pub fake_root: Mutex<Vec<u8>>,
    pub objects_served: AtomicU64,
    /// Deltas and patches forwarded (damaged or not).
    pub diffs_served: AtomicU64,
    /// Packs asked for.
    pub packs_served: AtomicU64,
    http: reqwest::Client,
}

impl Evil {
    pub async fn start(upstream: SocketAddr, mode: Mode) -> (Arc<Evil>, ServerHandle) {
        Self::start_on("127.0.0.1:0", upstream, mode).await
    }

    /// [`Evil::start`] listening on `listen` (another loopback address, so
    /// a client sees another host).
    pub async fn start_on(
        listen: &str,
        upstream: SocketAddr,
        mode: Mode,
    ) -> (Arc<Evil>, ServerHandle) {
        let evil = Arc::new(Evil {
            upstream: format!("http://{upstream}"),
            mode: AtomicU8::new(mode as u8),
            fake_root: Mutex::new(Vec::new()),
            objects_served: AtomicU64::new(0),
            diffs_served: AtomicU64::new(0),
            packs_served: AtomicU64::new(0),
            http: reqwest::Client::new(),
        });
        let l = tokio::net::TcpListener::bind(listen).await.unwrap();
        let h = serve(l, ServerOptions::default(), evil.clone());
        (evil, h)
    }

    pub fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }

    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }
}

fn stream(chunks: Vec<Result<Bytes, std::io::Error>>, delay: Option<Duration>) -> Body {
    let s = futures_util::stream::unfold(chunks.into_iter(), move |mut it| async move {
        let next = it.next()?;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        Some((next.map(Frame::data), it))
    });
    http_body_util::StreamBody::new(s).boxed()
}

impl Service for Evil {
    async fn call(&self, req: http::Request<()>, _peer: SocketAddr) -> Response<Body> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let is_root = path.contains("/v1/root") || path.contains("/v1/wait");
        let is_object = path.contains("/v1/objects/");
        let is_pack = path.contains("/v1/pack/");
        if is_pack {
            self.packs_served.fetch_add(1, Ordering::Relaxed);
        }
        let mode = self.mode();
        if mode == Mode::FlipDownloads as u8 && !path.starts_with("/.meridian/") {
            // Counted when asked (a client may give up before the answer).
            self.objects_served.fetch_add(1, Ordering::Relaxed);
        }
        if is_root && mode == Mode::FakeRoot as u8 {
            let fake = self.fake_root.lock().unwrap().clone();
            return Response::new(full(fake));
        }
        let mut fwd = self.http.get(format!("{}{path}", self.upstream));
        if let Some(r) = req.headers().get("range") {
            fwd = fwd.header("range", r.clone());
        }
        let Ok(resp) = fwd.send().await else {
            let mut r = Response::new(full("upstream down"));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return r;
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        // A long-poll forwarded before the switch to FakeRoot answers with
        // the fake too: from the switch on, no real root gets through.
        if is_root && self.mode() == Mode::FakeRoot as u8 {
            let fake = self.fake_root.lock().unwrap().clone();
            return Response::new(full(fake));
        }
        let mut out = Response::builder().status(status.as_u16());
        for k in [
            "accept-ranges",
            "content-range",
            "content-type",
            "x-meridian-generation",
            "x-meridian-keys",
        ] {
            if let Some(v) = headers.get(k) {
                out = out.header(k, v.as_bytes());
            }
        }
        let is_diff = path.contains("/v1/delta/") || path.contains("/v1/patch/");
        if is_diff && status.is_success() {
            self.diffs_served.fetch_add(1, Ordering::Relaxed);
            if mode == Mode::CorruptDiffs as u8 {
                let mut b = body.to_vec();
                let mid = b.len() / 2;
                b[mid] ^= 0x40;
                return out.body(full(b)).unwrap();
            }
        }
        if mode == Mode::CorruptDiffs as u8 {
            return out.body(full(body)).unwrap();
        }
        if mode == Mode::SlowDownloads as u8 {
            if path.starts_with("/.meridian/") || !status.is_success() {
                return out.body(full(body)).unwrap();
            }
            self.objects_served.fetch_add(1, Ordering::Relaxed);
            let chunks: Vec<_> = body
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            return out
                .header("content-length", body.len())
                .body(stream(chunks, Some(Duration::from_millis(50))))
                .unwrap();
        }
        if mode == Mode::FlipDownloads as u8 {
            let download = !path.starts_with("/.meridian/") && status.is_success();
            if download && !body.is_empty() {
                let mut b = body.to_vec();
                let mid = b.len() / 2;
                b[mid] ^= 0x40;
                return out.body(full(b)).unwrap();
            }
            return out.body(full(body)).unwrap();
        }
        // Directory nodes pass untouched: only blobs (which do not decode
        // as nodes) are damaged, so each test exercises blob verification.
        // A pack is blob data too.
        let is_blob = (is_object && meridian_core::DirNode::decode(&body).is_err()) || is_pack;
        if !is_blob || !status.is_success() || mode == Mode::Honest as u8 {
            return out.body(full(body)).unwrap();
        }
        self.objects_served.fetch_add(1, Ordering::Relaxed);
        match mode {
            m if m == Mode::FlipByte as u8 => {
                let mut b = body.to_vec();
                if !b.is_empty() {
                    let mid = b.len() / 2;
                    b[mid] ^= 0x40;
                }
                out.body(full(b)).unwrap()
            }
            m if m == Mode::Truncate as u8 => {
                let half = body.slice(..body.len() / 2);
                out.header("content-length", body.len())
                    .body(stream(
                        vec![Ok(half), Err(std::io::Error::other("cut"))],
                        None,
                    ))
                    .unwrap()
            }
            m if m == Mode::Extra as u8 => {
                let mut b = body.to_vec();
                b.extend_from_slice(&[0xAB; 4096]);
                out.body(full(b)).unwrap()
            }
            m if m == Mode::Slow as u8 => {
                let chunks: Vec<_> = body
                    .chunks(64 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                out.header("content-length", body.len())
                    .body(stream(chunks, Some(Duration::from_millis(50))))
                    .unwrap()
            }
            _ => out.body(full(body)).unwrap(),
        }
    }
}
