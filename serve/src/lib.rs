//! What the origin and the mirrors share.
//!
//! * [`store`]: the content-addressed object store on disk (blobs and
//!   directory nodes, addressed by blake3), written atomically.
//! * [`server`]: the HTTP/1.1 accept loop, with optional rustls, a connection
//!   cap, header timeouts (no slowloris) and graceful drain.
//! * [`range`]: `Range` / `If-Range` parsing for byte-range requests.
//! * [`readapi`]: the `/.meridian/v1/...` read API every node exposes, so a
//!   mirror can feed other mirrors exactly as the origin does.
// No unsafe code, but for `memory::release_free_heap` (one libc call).
#![deny(unsafe_code)]

pub mod auth;
pub mod body;
pub mod egress;
pub mod files;
pub mod inflight;
pub mod keys;
pub mod limits;
pub mod memory;
pub mod metrics;
mod plain;
pub mod range;
pub mod readapi;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod tls;
pub mod urlpath;

pub use body::{Body, empty, full};
pub use server::{Listen, ListenError, ServerHandle, bind, serve, serve_listeners};
pub use service::{ListenerConfig, ServerOptions, Service};
pub use store::{ObjectStore, ObjectWriter, StoreError};

/// One line for an error and everything that caused it, outermost first
/// (`error sending request for url (…): client error (Connect): tcp
/// connect error: Connection refused (os error 111)`), so that a refused
/// connection, a timeout, a TLS failure and an HTTP status read apart in
/// logs and status documents. A cause whose text the line already holds is
/// not repeated.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    describe_chain(std::iter::successors(Some(e), |e| e.source()))
}

/// [`describe`] for a chain already walked (e.g. `anyhow::Error::chain`).
pub fn describe_chain<'a>(
    chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out = String::new();
    for e in chain {
        let t = e.to_string();
        if out.contains(&t) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&t);
    }
    out
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
