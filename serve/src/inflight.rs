//! Downloads in flight: a response body being sent holds one count until
//! its last byte is written or its connection ends, whichever way it is
//! sent (the plain loop's sendfile, or a polled body over hyper). What a
//! drain waits on: a health probe or an idle keep-alive connection is not
//! a download.

use crate::Body;
use crate::files::SendFile;
use http::Response;
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

/// One download's share of the count, given back on drop.
#[derive(Debug)]
pub(crate) struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts `resp` in `count` for as long as its body is being sent.
pub fn track(mut resp: Response<Body>, count: &Arc<AtomicUsize>) -> Response<Body> {
    count.fetch_add(1, Ordering::Relaxed);
    let held = Arc::new(Held(count.clone()));
    // The sendfile twin of the body holds it too: the plain loop drops the
    // body before it sends the file.
    if let Some(zc) = resp.extensions_mut().remove::<Arc<SendFile>>() {
        let zc = match Arc::try_unwrap(zc) {
            Ok(mut z) => {
                z.held = Some(held.clone());
                Arc::new(z)
            }
            Err(shared) => shared,
        };
        resp.extensions_mut().insert(zc);
    }
    resp.map(|body| {
        Holding {
            inner: body,
            _held: held,
        }
        .boxed()
    })
}

/// A body that holds a count while it lives.
struct Holding {
    inner: Body,
    _held: Arc<Held>,
}

impl hyper::body::Body for Holding {
    type Data = bytes::Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_holds_its_count_until_it_is_dropped() {
        let count = Arc::new(AtomicUsize::new(0));
        let r = track(Response::new(crate::full("abc")), &count);
        let r2 = track(Response::new(crate::full("d")), &count);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        let body = r.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"abc");
        assert_eq!(count.load(Ordering::Relaxed), 1, "a body sent and dropped");
        drop(r2);
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
