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
pub(crate) const DEFAULT_PER_CLIENT: usize = 256;

/// The listener defaults origin and mirror configs share (serde default
/// functions; one owner for each number).
pub(crate) mod defaults {
    use std::time::Duration;
    pub(crate) fn max_connections() -> usize {
        16_384
    }
    pub(crate) fn max_connections_per_client() -> usize {
        super::DEFAULT_PER_CLIENT
    }
    pub(crate) fn header_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub(crate) fn send_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn drain_timeout() -> Duration {
        Duration::from_secs(60)
    }
}

/// The listener settings the origin's and the mirror's configs share: TLS,
/// connection caps and timeouts, as top-level keys of each (flattened into
/// both config structs, so each key is declared and defaulted once). The
/// plain-HTTP `listen` address stays in each config, with its own default.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Optional HTTPS listener, with `tls_cert` and `tls_key`.
    #[serde(default)]
    pub listen_tls: Option<SocketAddr>,
    #[serde(default)]
    pub tls_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Most connections at once.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Most connections at once from one client (an IPv4 address or an
    /// IPv6 /64); 0: no cap. Past it, new connections from that client are
    /// closed: one host cannot take every slot, nor pin the kernel's send
    /// buffers with downloads it never reads.
    #[serde(default = "defaults::max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// On SIGTERM (or a mirror's drain-and-exit), wait at most this long for
    /// responses in flight.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Time allowed to receive a request head.
    #[serde(default = "defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A response write that makes no progress for this long (the client
    /// stopped reading) closes the connection.
    #[serde(default = "defaults::send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            listen_tls: None,
            tls_cert: None,
            tls_key: None,
            max_connections: defaults::max_connections(),
            max_connections_per_client: defaults::max_connections_per_client(),
            drain_timeout: defaults::drain_timeout(),
            header_timeout: defaults::header_timeout(),
            send_timeout: defaults::send_timeout(),
        }
    }
}

impl ListenerConfig {
    /// The limits of every listener this config opens (every timeout in
    /// it honoured).
    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            max_connections: self.max_connections,
            max_connections_per_client: self.max_connections_per_client,
            header_timeout: self.header_timeout,
            send_timeout: self.send_timeout,
            drain_timeout: self.drain_timeout,
            ..Default::default()
        }
    }

    /// The listeners to open: plain HTTP on `http`, HTTPS if configured.
    pub fn listen(&self, http: SocketAddr) -> crate::server::Listen<'_> {
        crate::server::Listen {
            http,
            https: self.listen_tls,
            cert: self.tls_cert.as_deref(),
            key: self.tls_key.as_deref(),
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
