//! The HTTP/1.1 accept loop shared by origin and mirror.
//!
//! * At most `max_connections` connections at once; past that a new
//!   connection is closed at once (as nginx does past `worker_connections`),
//!   so 10,000 idle sockets cost a bounded, known amount of memory.
//! * `header_timeout` bounds the time to receive a request head, on a new
//!   connection and between keep-alive requests: a slowloris client is cut
//!   off, and idle keep-alive connections are reaped.
//! * TLS handshakes have their own deadline.
//! * Shutdown stops accepting, lets in-flight responses finish up to
//!   `drain_timeout`, then closes what is left.

use crate::service::{ServerOptions, Service, bad_host, host_count_is_valid};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    pub local_addr: SocketAddr,
    /// Connections open right now.
    pub active: Arc<AtomicUsize>,
    /// The limits in force, which [`ServerHandle::set_limits`] replaces.
    live: Arc<Live>,
    shutdown: crate::shutdown::Shutdown,
    done: tokio::task::JoinHandle<()>,
}

/// What an accept loop reads per connection: the options (caps and
/// timeouts) and the admission that counts connections against the caps.
#[derive(Debug)]
struct Live {
    opts: arc_swap::ArcSwap<ServerOptions>,
    admission: Arc<crate::limits::Admission>,
}

impl ServerHandle {
    /// Puts new connection caps and timeouts in force (a config reload):
    /// for every connection accepted from now on; open ones keep theirs,
    /// and TLS stays as it was.
    pub fn set_limits(&self, listener: &crate::service::ListenerConfig) {
        let mut opts = ServerOptions::clone(&self.live.opts.load());
        let new = listener.server_options();
        opts.max_connections = new.max_connections;
        opts.max_connections_per_client = new.max_connections_per_client;
        opts.header_timeout = new.header_timeout;
        opts.send_timeout = new.send_timeout;
        opts.drain_timeout = new.drain_timeout;
        self.live.admission.set_limits(crate::limits::ConnLimits {
            total: opts.max_connections,
            per_client: opts.max_connections_per_client,
        });
        self.live.opts.store(Arc::new(opts));
    }

    /// Stops accepting, drains in-flight requests (up to the drain timeout)
    /// and returns when every connection is closed.
    pub async fn shutdown(self) {
        self.shutdown.trigger();
        let _ = self.done.await;
    }
}

struct ConnGuard(Arc<AtomicUsize>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Listen backlog: large, so a burst of connections is queued rather than
/// dropped (the kernel caps it at `net.core.somaxconn`).
pub(crate) const BACKLOG: u32 = 8192;

/// Binds a listening socket with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

/// Why listeners could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("an HTTPS listener needs both tls_cert and tls_key")]
    TlsIncomplete,
}

/// Where a node listens: plain HTTP, and HTTPS if `https` is set.
#[derive(Debug, Clone, Copy)]
pub struct Listen<'a> {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub cert: Option<&'a std::path::Path>,
    pub key: Option<&'a std::path::Path>,
}

/// Binds and serves the HTTP listener and, if configured, the HTTPS one
/// (same service and limits). Logs `{role} listening on ADDR` (and
/// `https://ADDR`), which operators and tests read. Returns the HTTP handle
/// first.
pub fn serve_listeners<S: Service>(
    role: &str,
    listen: Listen<'_>,
    opts: ServerOptions,
    service: Arc<S>,
) -> Result<Vec<ServerHandle>, ListenError> {
    let bind_at =
        |addr: SocketAddr| bind(addr).map_err(|source| ListenError::Bind { addr, source });
    let tls = match listen.https {
        Some(_) => match (listen.cert, listen.key) {
            (Some(c), Some(k)) => Some(crate::tls::server_config(c, k)?),
            _ => return Err(ListenError::TlsIncomplete),
        },
        None => None,
    };
    let http = serve(bind_at(listen.http)?, opts.clone(), service.clone());
    tracing::info!("{role} listening on {}", http.local_addr);
    let mut handles = vec![http];
    if let (Some(addr), Some(tls)) = (listen.https, tls) {
        let s = serve(
            bind_at(addr)?,
            ServerOptions {
                tls: Some(tls),
                ..opts
            },
            service,
        );
        tracing::info!("{role} listening on https://{}", s.local_addr);
        handles.push(s);
    }
    Ok(handles)
}

/// Serves `service` on `listener` until the handle is shut down.
pub fn serve<S: Service>(
    listener: TcpListener,
    opts: ServerOptions,
    service: Arc<S>,
) -> ServerHandle {
    let local_addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let active = Arc::new(AtomicUsize::new(0));
    let tx = crate::shutdown::Shutdown::new();
    let live = Arc::new(Live {
        admission: crate::limits::Admission::new(crate::limits::ConnLimits {
            total: opts.max_connections,
            per_client: opts.max_connections_per_client,
        }),
        opts: arc_swap::ArcSwap::from_pointee(opts),
    });
    let done = tokio::spawn(accept_loop(
        listener,
        live.clone(),
        service,
        active.clone(),
        tx.subscribe(),
    ));
    ServerHandle {
        local_addr,
        active,
        live,
        shutdown: tx,
        done,
    }
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    live: Arc<Live>,
    service: Arc<S>,
    active: Arc<AtomicUsize>,
    mut shutdown: crate::shutdown::Stopping,
) {
    let admission = live.admission.clone();
    let mut accept_errors = crate::limits::AcceptErrors::new("http");
    crate::limits::watch_tcp_memory();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let hyper_builder = |opts: &ServerOptions| {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout)
            .keep_alive(true)
            .max_buf_size(opts.max_head_bytes.max(8192));
        Arc::new(builder)
    };
    let mut opts: Arc<ServerOptions> = live.opts.load_full();
    let tls = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut builder = hyper_builder(&opts);
    loop {
        // Options a reload replaced apply from this connection on.
        let now = live.opts.load();
        if !Arc::ptr_eq(&now, &opts) {
            opts = arc_swap::Guard::into_inner(now);
            builder = hyper_builder(&opts);
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                accept_errors.accepted();
                x
            }
            Err(e) => {
                accept_errors.failed(&e).await;
                continue;
            }
        };
        let permit = match admission.try_admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection cap reached, closing");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let send_timeout = opts.send_timeout;
        active.fetch_add(1, Ordering::Relaxed);
        let guard = ConnGuard(active.clone());
        let svc = service.clone();
        let builder = builder.clone();
        let hs_timeout = opts.tls_handshake_timeout;
        let svc2 = service.clone();
        let handler = hyper::service::service_fn(move |req: Request<Incoming>| {
            let svc = svc2.clone();
            async move {
                let hosts = req.headers().get_all(http::header::HOST).iter().count();
                if !host_count_is_valid(req.version(), hosts) {
                    return Ok::<_, std::convert::Infallible>(bad_host());
                }
                Ok(svc.call(req.map(|_| ()), peer).await)
            }
        });
        match &tls {
            None => {
                // Plain HTTP: the lean loop, which hands the connection to
                // hyper if a request needs more than it does.
                let watcher = graceful.watcher();
                let (opts, stop) = (ServerOptions::clone(&opts), shutdown.clone());
                let fut = async move {
                    let _permit = permit;
                    let _guard = guard;
                    let hand_off = move |stream: tokio::net::TcpStream, read: bytes::Bytes| async move {
                        let io =
                            crate::plain::Rewind::new(read, SendTimeout::new(stream, send_timeout));
                        let conn = builder.serve_connection(TokioIo::new(io), handler);
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(%peer, error = %e, "connection ended with error");
                        }
                    };
                    crate::plain::serve_conn(stream, peer, svc, opts, stop, hand_off).await;
                };
                // Read once, not per connection: a benchmark aid
                // (BENCHMARKS.md, memory per slow download).
                static PRINT_SIZE: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
                    std::env::var_os("MERIDIAN_PRINT_TASK_SIZE").is_some()
                });
                if *PRINT_SIZE {
                    eprintln!("connection task: {} bytes", std::mem::size_of_val(&fut));
                }
                tokio::spawn(fut);
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _guard = guard;
                    let stream = SendTimeout::new(stream, send_timeout);
                    let tls_stream =
                        match tokio::time::timeout(hs_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection(TokioIo::new(tls_stream), handler);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with error");
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(opts.drain_timeout, graceful.shutdown()).await;
}

/// Fails a write (or flush) that has been stuck for longer than `timeout`.
struct SendTimeout<S> {
    inner: S,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        SendTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        match r {
            Poll::Ready(v) => {
                self.stalled = None;
                Poll::Ready(v)
            }
            Poll::Pending => {
                let timeout = crate::limits::send_timeout(self.timeout);
                let sleep = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client stopped reading (send timeout)",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
