//! Response bodies: small in-memory ones, and files streamed in bounded chunks.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
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
pub const CHUNK: usize = 128 * 1024;

/// A piece of a streamed response: literal bytes, or a range of the file.
#[derive(Debug, Clone)]
pub enum Segment {
    Bytes(Bytes),
    File { offset: u64, len: u64 },
}

/// Streams `len` bytes of `file` from `offset`.
pub fn file_range(file: std::fs::File, offset: u64, len: u64) -> Body {
    segments(file, vec![Segment::File { offset, len }], None)
}

/// Streams segments, reading the file on the blocking pool one chunk at a
/// time (memory per download: at most two chunks in flight). A file that
/// turns out shorter than promised ends the body with an error rather than a
/// silent short response, so the client sees a broken transfer, not bad data.
/// `sent`, if given, is increased by every body byte handed to the
/// connection (for egress-rate accounting).
pub fn segments(file: std::fs::File, segs: Vec<Segment>, sent: Option<Arc<AtomicU64>>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        for seg in segs {
            let (offset, len) = match seg {
                Segment::Bytes(b) => {
                    if tx.blocking_send(Ok(Frame::data(b))).is_err() {
                        return;
                    }
                    continue;
                }
                Segment::File { offset, len } => (offset, len),
            };
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            let mut left = len;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; want];
                let mut got = 0;
                while got < want {
                    match file.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    }
                }
                if got < want {
                    let _ = tx.blocking_send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shorter than its manifest size",
                    )));
                    return;
                }
                left -= got as u64;
                if let Some(c) = &sent {
                    c.fetch_add(got as u64, Ordering::Relaxed);
                }
                if tx.blocking_send(Ok(Frame::data(Bytes::from(buf)))).is_err() {
                    return; // client went away
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}
