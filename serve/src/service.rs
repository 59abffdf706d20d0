//! What a listener serves and under which limits: the [`Service`] a
//! connection loop calls, the [`ServerOptions`] it honours, and the HTTP
//! rules both connection loops (`plain` and hyper's, in `server`) apply.
//! Kept apart from both loops so that neither depends on the other.

use crate::body::Body;
use hyper::{Request, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `Host`
/// header field, an HTTP/1.0 one at most one; a server answers anything else
/// with 400.
pub(crate) fn host_count_is_valid(version: http::Version, hosts: usize) -> bool {
    hosts == 1 || (hosts == 0 && version == http::Version::HTTP_10)
}

/// The answer to a request that breaks [`host_count_is_valid`]; the
/// connection closes after it.
pub(crate) fn bad_host() -> http::Response<crate::body::Body> {
    let mut r = crate::files::text(
        http::StatusCode::BAD_REQUEST,
        "an HTTP/1.1 request needs exactly one Host header\n",
    );
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    r
}

/// A request handler: what a listener serves. It sees the request head
/// only (no Meridian endpoint reads a request body).
pub trait Service: Send + Sync + 'static {
    fn call(
        &self,
        req: Request<()>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Limits and TLS for one listener.
#[derive(Clone)]
pub struct ServerOptions {
    pub max_connections: usize,
    /// Most connections open at once from one client (an IPv4 address or
    /// an IPv6 /64); 0: no cap. Bounds what one host can pin: slots, and
    /// the kernel's send buffers of downloads it does not read.
    pub max_connections_per_client: usize,
    pub header_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub drain_timeout: Duration,
    /// Maximum size of a request head (request line plus headers).
    pub max_head_bytes: usize,
    /// A response write that makes no progress for this long closes the
    /// connection (a client that stops reading must not hold a slot forever;
    /// nginx's `send_timeout`).
    pub send_timeout: Duration,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: defaults::max_connections(),
            max_connections_per_client: defaults::max_connections_per_client(),
            header_timeout: defaults::header_timeout(),
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: defaults::drain_timeout(),
            max_head_bytes: 16 * 1024,
            send_timeout: defaults::send_timeout(),
            tls: None,
        }
    }
}

/// Default cap on connections from one client.
pub const DEFAULT_PER_CLIENT: usize = 256;

/// The listener defaults origin and mirror configs share (serde default
/// functions; one owner for each number).
pub mod defaults {
    use std::time::Duration;
    pub fn max_connections() -> usize {
        16_384
    }
    pub fn max_connections_per_client() -> usize {
        super::DEFAULT_PER_CLIENT
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn send_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(60)
    }
}

impl ServerOptions {
    /// The defaults with a config's connection caps and timeouts (origin
    /// and mirror configs carry the same five settings, under the same
    /// names, with [`defaults`]).
    pub fn with_limits(
        max_connections: usize,
        max_connections_per_client: usize,
        header_timeout: Duration,
        send_timeout: Duration,
        drain_timeout: Duration,
    ) -> Self {
        ServerOptions {
            max_connections,
            max_connections_per_client,
            header_timeout,
            send_timeout,
            drain_timeout,
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_connections", &self.max_connections)
            .field("header_timeout", &self.header_timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}
