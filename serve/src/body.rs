//! Response bodies: small in-memory ones, and files streamed in bounded chunks.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Frame;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every response body in Meridian.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A body held in memory.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Chunk size for streamed files: large enough for throughput, small enough
/// that 10,000 concurrent downloads stay within a bounded amount of memory.
pub(crate) const CHUNK: usize = 1024 * 1024;

/// A piece of a streamed response: literal bytes, or a range of the file.
#[derive(Debug, Clone)]
pub(crate) enum Segment {
    Bytes(Bytes),
    File { offset: u64, len: u64 },
}

/// Streams segments lazily: the next chunk is read (on the blocking pool)
/// only when the connection asks for it, so a slow client costs at most one
/// chunk of memory and a stalled one none beyond what the socket holds. A
/// file that turns out shorter than promised ends the body with an error
/// rather than a silent short response, so the client sees a broken
/// transfer, not bad data. `sent`, if given, counts body bytes (egress).
pub(crate) fn segments(
    file: std::fs::File,
    segs: Vec<Segment>,
    sent: Option<Arc<crate::egress::Egress>>,
) -> Body {
    segments_checked(file, segs, sent, None)
}

/// A whole-file body to be hashed as it streams. The chunk that completes
/// the file is held back until the hash of everything read matches
/// `expected`; on a mismatch (or a short file) the body ends with an error
/// instead, so the connection closes short of its length and the client
/// never receives a complete wrong body.
pub struct StreamCheck {
    pub expected: meridian_core::Hash,
    /// Called once, on the blocking pool, with the verdict (true: the bytes
    /// matched). Not called if the download is abandoned first.
    pub verdict: Box<dyn FnOnce(bool) + Send + Sync>,
}

impl std::fmt::Debug for StreamCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCheck")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

/// A [`StreamCheck`] under way.
struct Checking {
    hasher: blake3::Hasher,
    check: StreamCheck,
}

/// [`segments`], hashing the file as it streams when `check` is given (the
/// segments must then be the whole file, once).
pub(crate) fn segments_checked(
    file: std::fs::File,
    segs: Vec<Segment>,
    sent: Option<Arc<crate::egress::Egress>>,
    check: Option<StreamCheck>,
) -> Body {
    SegmentBody {
        file: Some(file),
        segs: segs.into(),
        pending: None,
        sent,
        chunk: MIN_CHUNK,
        handed_out: None,
        pace: crate::egress::Pace::default(),
        paused: None,
        reserved: 0,
        checking: check.map(|check| {
            Box::new(Checking {
                hasher: blake3::Hasher::new(),
                check,
            })
        }),
    }
    .boxed()
}

type ReadResult = (std::fs::File, std::io::Result<Bytes>);
type CheckedRead = (std::fs::File, std::io::Result<Bytes>, Option<Box<Checking>>);

/// A read, then the check's step over its bytes (the verdict after the
/// last one).
fn read_checked(
    file: std::fs::File,
    offset: u64,
    len: usize,
    reserved: u64,
    checking: Option<Box<Checking>>,
    last: bool,
) -> CheckedRead {
    let (file, res) = read_at(file, offset, len, reserved);
    let Some(mut c) = checking else {
        return (file, res, None);
    };
    match res {
        Ok(b) => {
            c.hasher.update(&b);
            if !last {
                return (file, Ok(b), Some(c));
            }
            let ok = meridian_core::Hash::from(c.hasher.finalize()) == c.check.expected;
            (c.check.verdict)(ok);
            if ok {
                (file, Ok(b), None)
            } else {
                (
                    file,
                    Err(std::io::Error::other(
                        "stored object does not match its hash; download cut",
                    )),
                    None,
                )
            }
        }
        Err(e) => {
            (c.check.verdict)(false);
            (file, Err(e), None)
        }
    }
}

struct SegmentBody {
    /// The file, when no read is in flight.
    file: Option<std::fs::File>,
    segs: std::collections::VecDeque<Segment>,
    pending: Option<tokio::task::JoinHandle<CheckedRead>>,
    sent: Option<Arc<crate::egress::Egress>>,
    /// The hash check of a whole-file body, between reads.
    checking: Option<Box<Checking>>,
    /// Current chunk size: doubles (up to [`CHUNK`]) while the connection
    /// asks for the next chunk quickly, halves (down to [`MIN_CHUNK`]) when
    /// it is slow. A stalled download then pins at most one small chunk,
    /// and a fast one moves big chunks.
    chunk: u64,
    /// When the last chunk was handed to the connection.
    handed_out: Option<std::time::Instant>,
    /// This connection's pacing under a per-connection egress cap, and the
    /// wait before its next chunk.
    pace: crate::egress::Pace,
    paused: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Bytes reserved for the chunk being read.
    reserved: u64,
}

/// Smallest chunk (slow clients, first bytes of a response).
pub(crate) const MIN_CHUNK: u64 = 16 * 1024;

/// Bytes of chunks larger than [`MIN_CHUNK`] that may be in memory at once,
/// across all responses. A chunk holds its share until the connection has
/// written it (the buffer is dropped). So file-serving memory is at most
/// this budget plus one [`MIN_CHUNK`] per open download, however many
/// clients stall.
pub(crate) const BIG_CHUNK_BUDGET: u64 = 64 << 20;
static BIG_CHUNKS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// Reserves `want` bytes of the big-chunk budget, or returns false.
fn reserve_big(want: u64) -> bool {
    BIG_CHUNKS_IN_FLIGHT
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur + want <= BIG_CHUNK_BUDGET).then_some(cur + want)
        })
        .is_ok()
}

/// A buffer that gives its budget back when the connection drops it.
struct Budgeted {
    buf: Vec<u8>,
    reserved: u64,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Budgeted {
    fn drop(&mut self) {
        BIG_CHUNKS_IN_FLIGHT.fetch_sub(self.reserved, Ordering::AcqRel);
    }
}
/// A connection that asks for the next chunk within this time is keeping up.
const KEEPING_UP: std::time::Duration = std::time::Duration::from_millis(20);

fn read_at(mut file: std::fs::File, offset: u64, len: usize, reserved: u64) -> ReadResult {
    let res = (|| {
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shorter than its manifest size",
            ));
        }
        Ok(if reserved > 0 {
            Bytes::from_owner(Budgeted { buf, reserved })
        } else {
            Bytes::from(buf)
        })
    })();
    if res.is_err() && reserved > 0 {
        BIG_CHUNKS_IN_FLIGHT.fetch_sub(reserved, Ordering::AcqRel);
    }
    (file, res)
}

impl hyper::body::Body for SegmentBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if let Some(h) = this.pending.as_mut() {
                // Held to the egress caps: a chunk is handed out once its
                // reserved time has come (it is read from disk meanwhile).
                if let Some(p) = this.paused.as_mut() {
                    if p.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.paused = None;
                }
                let (file, res, checking) = match std::pin::Pin::new(h).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(x)) => x,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(std::io::Error::other(e)))),
                };
                this.pending = None;
                this.file = Some(file);
                this.checking = checking;
                this.handed_out = Some(std::time::Instant::now());
                return Poll::Ready(Some(res.map(|b| {
                    if let Some(e) = &this.sent {
                        e.count(b.len() as u64);
                        e.refund(this.reserved.saturating_sub(b.len() as u64), &mut this.pace);
                    }
                    this.reserved = 0;
                    Frame::data(b)
                })));
            }
            match this.segs.front_mut() {
                None => return Poll::Ready(None),
                Some(Segment::Bytes(_)) => {
                    if let Some(Segment::Bytes(b)) = this.segs.pop_front() {
                        return Poll::Ready(Some(Ok(Frame::data(b))));
                    }
                }
                Some(Segment::File { len: 0, .. }) => {
                    this.segs.pop_front();
                }
                Some(Segment::File { offset, len }) => {
                    let Some(file) = this.file.take() else {
                        return Poll::Ready(Some(Err(std::io::Error::other("file handle lost"))));
                    };
                    this.chunk = match this.handed_out {
                        Some(t) if t.elapsed() <= KEEPING_UP => (this.chunk * 2).min(CHUNK as u64),
                        Some(_) => (this.chunk / 2).max(MIN_CHUNK),
                        None => this.chunk,
                    };
                    let mut want = (*len).min(this.chunk);
                    if let Some(e) = &this.sent {
                        want = want.min(e.chunk(CHUNK) as u64);
                    }
                    let mut reserved = 0;
                    if want > MIN_CHUNK {
                        if reserve_big(want) {
                            reserved = want;
                        } else {
                            want = MIN_CHUNK;
                            this.chunk = MIN_CHUNK;
                        }
                    }
                    if let Some(e) = &this.sent {
                        let wait = e.reserve(want, &mut this.pace);
                        this.reserved = want;
                        if !wait.is_zero() {
                            this.paused = Some(Box::pin(tokio::time::sleep(wait)));
                        }
                    }
                    let at = *offset;
                    *offset += want;
                    *len -= want;
                    let last = *len == 0 && this.segs.len() == 1;
                    let checking = this.checking.take();
                    this.pending = Some(tokio::task::spawn_blocking(move || {
                        read_checked(file, at, want as usize, reserved, checking, last)
                    }));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.segs.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let n: u64 = self
            .segs
            .iter()
            .map(|s| match s {
                Segment::Bytes(b) => b.len() as u64,
                Segment::File { len, .. } => *len,
            })
            .sum();
        if self.pending.is_some() {
            hyper::body::SizeHint::default()
        } else {
            hyper::body::SizeHint::with_exact(n)
        }
    }
}
