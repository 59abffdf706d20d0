//! Answering GET/HEAD for one immutable file: conditional requests, ranges
//! (single, suffix, multi as `multipart/byteranges`), 416, `ETag` and
//! `Repr-Digest`. Shared by the mirror's download server and the read API.

use crate::body::{Body, Segment, StreamCheck, empty, full, segments, segments_checked};
use crate::range::{self, RangeResponse};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use meridian_core::Hash;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the response says about the file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub len: u64,
    pub hash: Hash,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    pub content_type: &'static str,
    /// `Cache-Control` value.
    pub cache_control: &'static str,
}

/// Whole files up to this size are read inline instead of streamed.
pub const INLINE_MAX: u64 = 64 * 1024;

fn http_date(secs: i64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

thread_local! {
    /// The last `Last-Modified` value built on this thread: downloads of the
    /// same files repeat it, and a `HeaderValue` clone is a reference count.
    static LAST_MODIFIED: std::cell::RefCell<Option<(i64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

fn last_modified(secs: i64) -> HeaderValue {
    LAST_MODIFIED.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((s, v)) = c.as_ref()
            && *s == secs
        {
            return v.clone();
        }
        let v = HeaderValue::from_maybe_shared(Bytes::from(http_date(secs)))
            .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
        *c = Some((secs, v.clone()));
        v
    })
}

/// `x-meridian-blake3`: the raw blake3 hash of the representation.
pub(crate) static BLAKE3_HEADER: header::HeaderName =
    header::HeaderName::from_static("x-meridian-blake3");

fn etag_matches(list: &str, tag: &str, weak_ok: bool) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == tag || (weak_ok && t.strip_prefix("W/") == Some(tag)))
}

/// Where a response's bytes come from.
enum Source<F> {
    /// A file, opened only when a body is actually sent.
    File(F),
    /// Bytes already in memory (and already verified).
    Memory(Bytes),
    /// A file not yet verified: its body is hashed as it streams (see
    /// [`StreamCheck`]), and never sent with sendfile.
    Checked(F, StreamCheck),
}

/// Builds the response for `method` with `headers` on a file. `open` is
/// called only when a body is actually sent.
pub fn respond(
    method: &Method,
    headers: &HeaderMap,
    meta: &FileMeta,
    open: impl FnOnce() -> std::io::Result<std::fs::File>,
    sent: Option<Arc<crate::egress::Egress>>,
) -> Response<Body> {
    respond_from(method, headers, meta, Source::File(open), sent)
}

/// [`respond`] for a file whose bytes are not yet known to match
/// `meta.hash`: a whole-file body is hashed as it streams and cut if it
/// does not match. The caller must have verified the file before asking
/// for a range of it: a response that would send part of an unchecked file
/// is refused (503) instead.
pub fn respond_checked(
    method: &Method,
    headers: &HeaderMap,
    meta: &FileMeta,
    file: std::fs::File,
    check: StreamCheck,
    sent: Option<Arc<crate::egress::Egress>>,
) -> Response<Body> {
    respond_from(
        method,
        headers,
        meta,
        Source::Checked(move || Ok(file), check),
        sent,
    )
}

/// [`respond`] for an object held in memory (`bytes.len() == meta.len`).
pub fn respond_bytes(
    method: &Method,
    headers: &HeaderMap,
    meta: &FileMeta,
    bytes: Bytes,
    sent: Option<Arc<crate::egress::Egress>>,
) -> Response<Body> {
    respond_from(
        method,
        headers,
        meta,
        Source::<fn() -> std::io::Result<std::fs::File>>::Memory(bytes),
        sent,
    )
}

fn respond_from(
    method: &Method,
    headers: &HeaderMap,
    meta: &FileMeta,
    source: Source<impl FnOnce() -> std::io::Result<std::fs::File>>,
    sent: Option<Arc<crate::egress::Egress>>,
) -> Response<Body> {
    // ETag: the blake3 hash in quotes, a strong validator. One buffer holds
    // it, and the x-meridian-blake3 value is a slice of the same bytes.
    let mut tag_bytes = Vec::with_capacity(66);
    tag_bytes.push(b'"');
    tag_bytes.extend_from_slice(&meta.hash.hex_bytes());
    tag_bytes.push(b'"');
    let tag_bytes = Bytes::from(tag_bytes);
    let tag = std::str::from_utf8(&tag_bytes).unwrap_or_default();
    let value =
        |b: Bytes| HeaderValue::from_maybe_shared(b).unwrap_or(HeaderValue::from_static(""));
    let mut b = Response::builder();
    if let Some(h) = b.headers_mut() {
        h.reserve(12);
        h.insert(header::ETAG, value(tag_bytes.clone()));
        h.insert(header::LAST_MODIFIED, last_modified(meta.mtime));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(meta.cache_control),
        );
        // blake3 is not in the IANA digest registry; the value is the raw
        // hash in hex, under its own name.
        h.insert(BLAKE3_HEADER.clone(), value(tag_bytes.slice(1..65)));
    }

    // Conditional requests (RFC 9110 §13.2.2 order). If-Match compares
    // strongly; it, or else If-Unmodified-Since, failing is 412.
    let precondition_failed = match headers.get(header::IF_MATCH).map(|v| v.to_str()) {
        Some(Ok(im)) => !etag_matches(im, tag, false),
        Some(Err(_)) => true,
        None => headers
            .get(header::IF_UNMODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .is_some_and(|ius| UNIX_EPOCH + Duration::from_secs(meta.mtime.max(0) as u64) > ius),
    };
    if precondition_failed {
        return b
            .status(StatusCode::PRECONDITION_FAILED)
            .header(header::CONTENT_LENGTH, 0)
            .body(empty())
            .unwrap_or_else(|_| internal_error());
    }
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if let Some(inm) = inm {
        if etag_matches(inm, tag, true) {
            return not_modified(b);
        }
    } else if let Some(ims) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        let mtime = UNIX_EPOCH + Duration::from_secs(meta.mtime.max(0) as u64);
        if mtime <= ims {
            return not_modified(b);
        }
    }

    let mut range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if let Some(ir) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let fresh = if ir.starts_with('"') {
            ir == tag
        } else {
            httpdate::parse_http_date(ir)
                .map(|d: SystemTime| {
                    d >= UNIX_EPOCH + Duration::from_secs(meta.mtime.max(0) as u64)
                })
                .unwrap_or(false)
        };
        if !fresh {
            range_header = None;
        }
    }
    let plan = match range_header {
        Some(h) if *method == Method::GET || *method == Method::HEAD => range::parse(h, meta.len),
        _ => RangeResponse::Full,
    };
    let head_only = *method == Method::HEAD;
    let body_of = |segs: Vec<Segment>| -> Result<(Body, Option<SendFile>), std::io::Error> {
        if head_only {
            return Ok((empty(), None));
        }
        let open = match source {
            Source::File(open) => open,
            Source::Checked(open, check) => {
                let whole = matches!(segs.as_slice(), [Segment::File { offset: 0, len }] if *len == meta.len);
                if !whole {
                    return Err(std::io::Error::other(
                        "part of an object not yet verified was asked for",
                    ));
                }
                return Ok((
                    segments_checked(open()?, segs, sent.clone(), Some(check)),
                    None,
                ));
            }
            Source::Memory(mem) => {
                let mut out = Vec::new();
                let mut parts = Vec::with_capacity(segs.len());
                for s in &segs {
                    parts.push(match s {
                        Segment::Bytes(b) => b.clone(),
                        Segment::File { offset, len } => {
                            let (a, z) = (*offset as usize, (*offset + *len) as usize);
                            mem.get(a..z).map(|_| mem.slice(a..z)).ok_or_else(|| {
                                std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "object shorter than its size",
                                )
                            })?
                        }
                    });
                }
                let body = match parts.len() {
                    1 => parts.pop().unwrap_or_default(),
                    _ => {
                        for p in &parts {
                            out.extend_from_slice(p);
                        }
                        Bytes::from(out)
                    }
                };
                if let Some(c) = &sent {
                    // Small bodies go at once; they count against the cap
                    // in all, which the next large send waits out.
                    c.count_unreserved(body.len() as u64);
                }
                return Ok((full(body), None));
            }
        };
        let f = open()?;
        // Small whole files are read right here, from the page cache: a
        // blocking-pool round trip would cost more than the read.
        if let [Segment::File { offset: 0, len }] = segs.as_slice()
            && *len <= INLINE_MAX
        {
            let mut buf = Vec::with_capacity(*len as usize);
            std::io::Read::read_to_end(&mut std::io::Read::take(&f, *len), &mut buf)?;
            if buf.len() as u64 != *len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shorter than its manifest size",
                ));
            }
            if let Some(c) = &sent {
                c.count_unreserved(*len);
            }
            return Ok((full(buf), None));
        }
        // Start reading every segment from disk now (asynchronously), so a
        // cold file does not wait for readahead window by window while the
        // sending thread blocks in sendfile.
        for seg in &segs {
            if let Segment::File { offset, len } = seg {
                let ahead = (*len).min(READ_AHEAD_MAX);
                let _ = rustix::fs::fadvise(
                    &f,
                    *offset,
                    std::num::NonZeroU64::new(ahead),
                    rustix::fs::Advice::WillNeed,
                );
            }
        }
        // The same segments from a second handle on the file, for a server
        // that can send them with sendfile(2) instead of polling the body.
        let zero_copy = f.try_clone().ok().map(|file| SendFile {
            file,
            segs: segs.clone(),
            sent: sent.clone(),
            held: None,
        });
        Ok((segments(f, segs, sent.clone()), zero_copy))
    };
    let with_body = |b: http::response::Builder, (body, zc): (Body, Option<SendFile>)| match zc {
        Some(zc) => b.extension(Arc::new(zc)).body(body),
        None => b.body(body),
    };
    let resp = match plan {
        RangeResponse::Full => {
            b = b
                .status(StatusCode::OK)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(meta.content_type),
                )
                .header(header::CONTENT_LENGTH, meta.len);
            body_of(vec![Segment::File {
                offset: 0,
                len: meta.len,
            }])
            .map(|body| with_body(b, body))
        }
        RangeResponse::Unsatisfiable => {
            return b
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{}", meta.len))
                .header(header::CONTENT_LENGTH, 0)
                .body(empty())
                .unwrap_or_else(|_| internal_error());
        }
        RangeResponse::Partial(ranges) if ranges.len() == 1 => {
            let (a, z) = ranges[0];
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_TYPE, meta.content_type)
                .header(header::CONTENT_RANGE, format!("bytes {a}-{z}/{}", meta.len))
                .header(header::CONTENT_LENGTH, z - a + 1);
            body_of(vec![Segment::File {
                offset: a,
                len: z - a + 1,
            }])
            .map(|body| with_body(b, body))
        }
        RangeResponse::Partial(ranges) => {
            let boundary = format!("meridian-{}", &meta.hash.to_hex()[..24]);
            let mut segs = Vec::with_capacity(ranges.len() * 2 + 1);
            let mut total = 0u64;
            for (i, (a, z)) in ranges.iter().enumerate() {
                let head = format!(
                    "{}--{boundary}\r\nContent-Type: {}\r\nContent-Range: bytes {a}-{z}/{}\r\n\r\n",
                    if i == 0 { "" } else { "\r\n" },
                    meta.content_type,
                    meta.len
                );
                total += head.len() as u64 + (z - a + 1);
                segs.push(Segment::Bytes(Bytes::from(head)));
                segs.push(Segment::File {
                    offset: *a,
                    len: z - a + 1,
                });
            }
            let tail = format!("\r\n--{boundary}--\r\n");
            total += tail.len() as u64;
            segs.push(Segment::Bytes(Bytes::from(tail)));
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/byteranges; boundary={boundary}"),
                )
                .header(header::CONTENT_LENGTH, total);
            body_of(segs).map(|body| with_body(b, body))
        }
    };
    match resp {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => internal_error(),
        Err(e) => {
            tracing::error!(hash = %meta.hash, error = %e, "cannot open object for serving");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "object temporarily unavailable; try again or another mirror\n",
            )
        }
    }
}

/// Most of a file body asked of the kernel ahead of sending it.
const READ_AHEAD_MAX: u64 = 8 << 20;

/// A response body that is a file's segments, attached to the response as
/// an extension next to the equivalent streaming body: the plain-HTTP
/// server sends it with sendfile(2) (no copy through user space); any other
/// connection polls the body as usual. `sent` counts bytes sent (egress).
#[derive(Debug)]
pub(crate) struct SendFile {
    pub file: std::fs::File,
    pub segs: Vec<Segment>,
    pub sent: Option<Arc<crate::egress::Egress>>,
    /// A download in flight ([`crate::inflight`]), while this is sent.
    pub held: Option<Arc<crate::inflight::Held>>,
}

impl SendFile {
    /// The body's length: every segment's.
    pub(crate) fn len(&self) -> u64 {
        self.segs
            .iter()
            .map(|s| match s {
                Segment::Bytes(b) => b.len() as u64,
                Segment::File { len, .. } => *len,
            })
            .sum()
    }
}

fn not_modified(b: http::response::Builder) -> Response<Body> {
    b.status(StatusCode::NOT_MODIFIED)
        .body(empty())
        .unwrap_or_else(|_| internal_error())
}

fn internal_error() -> Response<Body> {
    let mut r = Response::new(full("internal error\n"));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// `s` with the five HTML-special characters escaped (text and attribute
/// values alike).
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A short plain-text response.
pub fn text(status: StatusCode, msg: impl Into<Bytes>) -> Response<Body> {
    let msg = msg.into();
    let mut r = Response::new(full(msg.clone()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(msg.len()));
    r
}
