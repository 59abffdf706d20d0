//! The plain-HTTP/1.1 connection loop: a lean path for what a download
//! mirror mostly sees (GET and HEAD without a request body, on keep-alive
//! connections), measured against nginx. Per request it parses the head in
//! place (`httparse`; header values are slices of the read buffer, not
//! copies), calls the [`Service`], writes the response head and a small
//! body in one system call, and sends file bodies with sendfile(2): the
//! bytes go from the page cache to the socket without passing through user
//! space.
//!
//! Anything else (a request with a body, `Expect`, `Upgrade`, a version
//! other than 1.0/1.1) hands the connection, with the bytes already read,
//! to hyper for the rest of its life, so the full protocol is always there.
//!
//! Guards, as on every listener: the head must arrive within the header
//! timeout (slowloris), be at most `max_head_bytes` (431 otherwise), a
//! client that stops reading is dropped after the send timeout, and an idle
//! connection holds no buffer.

use crate::body::Segment;
use crate::files::SendFile;
use crate::service::{ServerOptions, Service};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most header lines a request may have.
const MAX_HEADERS: usize = 100;
/// Read buffer: allocated when a request starts arriving, released while
/// the connection is idle.
const READ_CHUNK: usize = 4096;
/// Response bodies up to this size are copied next to the head and sent
/// with it in one write.
const COALESCE: usize = 16 * 1024;
/// A zero-copy body this long lets the connection's head buffer go while
/// it is sent (a slow client may take minutes); shorter ones keep it for
/// the next request on the connection.
const LONG_SEND: u64 = 256 * 1024;

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
}

/// Serves one plain-TCP connection until it closes, the peer misbehaves,
/// or `shutdown` is set (between requests). `hyper_conn` is called with the
/// stream and the unread bytes when a request needs the full protocol.
pub(crate) async fn serve_conn<S, H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<S>,
    opts: ServerOptions,
    mut shutdown: crate::shutdown::Stopping,
    hyper_conn: H,
) where
    S: Service,
    H: FnOnce(TcpStream, Bytes) -> F,
    F: std::future::Future<Output = ()>,
{
    let mut buf = BytesMut::new();
    let mut out: Vec<u8> = Vec::new();
    let header_timeout = opts.header_timeout;
    let sleep = tokio::time::sleep(header_timeout);
    tokio::pin!(sleep);
    loop {
        // Read until a whole head is buffered, within the header timeout.
        let started = tokio::time::Instant::now();
        let deadline = started + header_timeout;
        // Re-arm the timer only when it moved by more than a second (a
        // timer-wheel update per request costs more than the precision).
        if deadline > sleep.deadline() + Duration::from_secs(1) || sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        let parsed = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() >= opts.max_head_bytes => {
                        let _ = reply_error(
                            &stream,
                            &mut out,
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            &opts,
                        )
                        .await;
                        return;
                    }
                    Ok(None) => {}
                    Err(status) => {
                        let _ = reply_error(&stream, &mut out, status, &opts).await;
                        return;
                    }
                }
            }
            if buf.is_empty() {
                // Idle: hold no buffer while waiting.
                buf = BytesMut::new();
                if shutdown.is_set() {
                    return;
                }
            }
            tokio::select! {
                r = stream.readable() => {
                    if r.is_err() {
                        return;
                    }
                }
                _ = &mut sleep => {
                    // Waited too long for a head: close (a partial head gets
                    // a 408 first, like hyper).
                    if !buf.is_empty() {
                        let _ = reply_error(&stream, &mut out, StatusCode::REQUEST_TIMEOUT, &opts).await;
                    }
                    return;
                }
                _ = shutdown.wait(), if buf.is_empty() => return,
            }
            buf.reserve(READ_CHUNK);
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        };
        let head = buf.split_to(parsed.len).freeze();
        let built = parsed.simple.map(|h| request(h, &head)).transpose();
        let next = match built {
            Ok(Some((req, close))) => {
                // Nothing of the read buffer is held while the response is
                // sent (a slow download waits on the socket for minutes):
                // the request refers to the head's bytes until the service
                // is done with it, the buffer is let go if nothing follows.
                drop(head);
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                match respond(&stream, &mut out, &*service, req, peer, close, &opts).await {
                    Ok(true) => Next::Close,
                    Ok(false) => Next::KeepAlive,
                    Err(_) => return,
                }
            }
            Ok(None) => {
                let mut unread = BytesMut::with_capacity(head.len() + buf.len());
                unread.extend_from_slice(&head);
                unread.extend_from_slice(&buf);
                drop((head, buf));
                // Boxed: hyper's connection state is allocated only for the
                // connections handed to it, not inside every connection's task.
                Box::pin(hyper_conn(stream, unread.freeze())).await;
                return;
            }
            Err(status) => {
                let _ = reply_error(&stream, &mut out, status, &opts).await;
                return;
            }
        };
        match next {
            Next::KeepAlive if shutdown.is_set() => return,
            Next::KeepAlive => {
                if out.capacity() > 4 * COALESCE {
                    out = Vec::new();
                }
            }
            Next::Close => return,
        }
    }
}

/// A complete request head, parsed once: what the request is built from
/// once the head's bytes are frozen (positions are offsets into the head).
struct Head {
    len: usize,
    /// `None`: a request for hyper.
    simple: Option<SimpleHead>,
}

struct SimpleHead {
    method: Method,
    version: Version,
    path: std::ops::Range<usize>,
    headers: Vec<(HeaderName, std::ops::Range<usize>)>,
    close: bool,
}

/// Parses `buf`: `None` until it holds a complete head; an error status for
/// a malformed one.
fn parse(buf: &[u8]) -> Result<Option<Head>, StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    // Where a slice of `buf` starts (all of httparse's slices are of it).
    let at = |p: &[u8]| p.as_ptr() as usize - buf.as_ptr() as usize;
    let version = match r.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Ok(Some(Head { len, simple: None })),
    };
    let method = Method::from_bytes(r.method.unwrap_or("").as_bytes())
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let path = r.path.ok_or(StatusCode::BAD_REQUEST)?.as_bytes();
    let mut close = version == Version::HTTP_10;
    let mut out = Vec::with_capacity(r.headers.len());
    let mut hosts = 0;
    for h in r.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| StatusCode::BAD_REQUEST)?;
        if name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
            || (name == header::CONTENT_LENGTH && h.value != b"0")
        {
            return Ok(Some(Head { len, simple: None }));
        }
        if name == header::HOST {
            hosts += 1;
        } else if name == header::CONNECTION {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
        let v = at(h.value);
        out.push((name, v..v + h.value.len()));
    }
    if !crate::service::host_count_is_valid(version, hosts) {
        return Err(StatusCode::BAD_REQUEST);
    }
    let p = at(path);
    Ok(Some(Head {
        len,
        simple: Some(SimpleHead {
            method,
            version,
            path: p..p + path.len(),
            headers: out,
            close,
        }),
    }))
}

/// A request this loop answers, and whether the client asked to close.
type Simple = (Request<()>, bool);

/// Builds the request from its parsed head; the URI and header values are
/// slices of `bytes` (the head, frozen), not copies.
fn request(h: SimpleHead, bytes: &Bytes) -> Result<Simple, StatusCode> {
    let uri =
        http::Uri::from_maybe_shared(bytes.slice(h.path)).map_err(|_| StatusCode::BAD_REQUEST)?;
    let mut map = HeaderMap::with_capacity(h.headers.len());
    for (name, v) in h.headers {
        let value =
            HeaderValue::from_maybe_shared(bytes.slice(v)).map_err(|_| StatusCode::BAD_REQUEST)?;
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = h.method;
    *req.uri_mut() = uri;
    *req.version_mut() = h.version;
    *req.headers_mut() = map;
    Ok((req, h.close))
}

/// Answers one request; Ok(true) if the connection must close after it.
async fn respond<S: Service>(
    stream: &TcpStream,
    out: &mut Vec<u8>,
    service: &S,
    req: Request<()>,
    peer: SocketAddr,
    mut close: bool,
    opts: &ServerOptions,
) -> io::Result<bool> {
    let head_only = req.method() == Method::HEAD;
    let version = req.version();
    // Boxed: the service's state lives only while it runs, not in the
    // connection's task for as long as the body takes to send.
    let resp = Box::pin(service.call(req, peer)).await;
    let (parts, body) = resp.into_parts();
    if parts
        .headers
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
    {
        close = true;
    }
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let zero_copy = parts.extensions.get::<Arc<SendFile>>().cloned();
    let exact = hyper::body::Body::size_hint(&body).exact();
    let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
    // Without a known length: close-delimited (every response we make has
    // one; this is for completeness).
    if !has_length && exact.is_none() && !bodiless {
        close = true;
    }

    out.clear();
    write_head(out, version, status, &parts.headers, close);
    // A length the service did not state is the body's, and only for a
    // response that has one (a 304 or a HEAD answer must not claim 0).
    if !has_length
        && !bodiless
        && let Some(n) = exact
    {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        write_all(stream, out, opts.send_timeout).await?;
        return Ok(close);
    }
    drop(parts);
    if let Some(zc) = zero_copy {
        drop(body);
        write_all(stream, out, opts.send_timeout).await?;
        if zc.len() >= LONG_SEND {
            // A long send: no head buffer kept while it waits on the socket.
            *out = Vec::new();
        }
        send_segments(stream, &zc, opts.send_timeout).await?;
        return Ok(close);
    }
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() <= COALESCE {
                out.extend_from_slice(&data);
            } else {
                write_all(stream, out, opts.send_timeout).await?;
                out.clear();
                write_all(stream, &data, opts.send_timeout).await?;
            }
        }
    }
    write_all(stream, out, opts.send_timeout).await?;
    Ok(close)
}

fn write_head(
    out: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

thread_local! {
    /// The `Date` header value of the current second.
    static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((0, [0; 29])) };
}

fn date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                c.1.copy_from_slice(s.as_bytes());
                c.0 = secs;
            }
        }
        out.extend_from_slice(&c.1);
    });
}

/// A minimal error response, then the connection closes.
async fn reply_error(
    stream: &TcpStream,
    out: &mut Vec<u8>,
    status: StatusCode,
    opts: &ServerOptions,
) -> io::Result<()> {
    out.clear();
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    write_head(out, Version::HTTP_11, status, &h, true);
    out.extend_from_slice(b"\r\n");
    write_all(stream, out, opts.send_timeout).await?;
    linger_close(stream).await;
    Ok(())
}

/// Most time and bytes a lingering close reads and drops.
const LINGER_FOR: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Before a connection is closed after an error answer, the client may
/// still be sending its request (a head over the cap, say). Closing with
/// unread bytes makes the kernel send a reset, which can destroy the answer
/// before the client reads it. So the write side is shut first (the answer
/// is complete), and what still arrives is read and dropped, for at most
/// [`LINGER_FOR`] and [`LINGER_BYTES`] (nginx's lingering close).
async fn linger_close(stream: &TcpStream) {
    let _ = rustix::net::shutdown(stream, rustix::net::Shutdown::Write);
    // On the heap, and only here: an array would sit in every
    // connection's task for its whole life (the future holds it).
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let until = tokio::time::Instant::now() + LINGER_FOR;
    while left > 0 {
        match tokio::time::timeout_at(until, stream.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Writes all of `data`; waits for the socket at most `timeout` at a time
/// (a client that stops reading is dropped). No timer unless it blocks.
async fn write_all(stream: &TcpStream, mut data: &[u8], timeout: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, timeout).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writable(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    let timeout = crate::limits::send_timeout(timeout);
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading (send timeout)",
        )),
    }
}

/// Sends the file's segments: file ranges with sendfile(2), literal bytes
/// (multipart boundaries) with write. Counts egress. A file that ends early
/// is an error (the connection closes: a short body, never wrong bytes).
async fn send_segments(stream: &TcpStream, zc: &SendFile, timeout: Duration) -> io::Result<()> {
    let mut pace = crate::egress::Pace::default();
    for seg in &zc.segs {
        match seg {
            Segment::Bytes(b) => {
                pause(zc, b.len() as u64, &mut pace).await;
                write_all(stream, b, timeout).await?;
                if let Some(e) = &zc.sent {
                    e.count(b.len() as u64);
                }
            }
            Segment::File { offset, len } => {
                let mut at = *offset;
                let end = offset + len;
                while at < end {
                    let mut want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
                    if let Some(e) = &zc.sent {
                        want = e.chunk(want);
                    }
                    // Reserved once, whatever number of tries the socket
                    // takes; what it did not take is given back.
                    pause(zc, want as u64, &mut pace).await;
                    let n = loop {
                        let r = stream.try_io(Interest::WRITABLE, || {
                            let mut off = at;
                            rustix::fs::sendfile(stream, &zc.file, Some(&mut off), want)
                                .map_err(io::Error::from)
                        });
                        match r {
                            Ok(n) => break n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                writable(stream, timeout).await?;
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    if let Some(e) = &zc.sent {
                        e.count(n as u64);
                        e.refund((want - n) as u64, &mut pace);
                    }
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "file shorter than its manifest size",
                        ));
                    }
                    at += n as u64;
                }
            }
        }
    }
    Ok(())
}

/// Reserves `n` bytes under the egress caps and waits until they may go.
async fn pause(zc: &SendFile, n: u64, pace: &mut crate::egress::Pace) {
    if let Some(e) = &zc.sent {
        let wait = e.reserve(n, pace);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A stream that yields `prefix` before reading from `inner`: how a
/// connection whose first bytes this loop already read is handed to hyper.
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
