//! Running the origin: key loading, the publish loop and the HTTP service.

use crate::config::OriginConfig;
use crate::linked::{LinkedStore, Promoted};
use crate::publisher::{PublishError, PublishOutcome, Publisher, Shared};
use crate::watcher::{ChangeSignal, watch};
use http::{Method, Response, StatusCode};
use meridian_core::{SecretKey, VerifiedRoot};
use meridian_serve::files::text;
use meridian_serve::readapi::{self, Published};
use meridian_serve::shutdown::{Shutdown, Stopping};
use meridian_serve::{Body, ServerHandle, Service, full};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why the origin could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    #[error("cannot read key file {path}: {source}")]
    KeyRead {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error(
        "key file {path} is owned by uid {owner}, but the origin runs as uid {me}; run `chown {me} {path}` (or run the origin as its owner)"
    )]
    KeyOwner { path: String, owner: u32, me: u32 },
    #[error("key file {path}: {source}")]
    KeyFormat {
        path: String,
        source: meridian_core::KeyError,
    },
    #[error("content directory {0} does not exist or is not a directory")]
    NoContent(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Listen(#[from] meridian_serve::ListenError),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: String,
        source: std::io::Error,
    },
}

/// Reads the signing key, refusing a file readable by group or others or
/// owned by another user (who could then replace it); the one exception is
/// the shape of a Kubernetes Secret volume (root's, read-only, readable by
/// the origin's own group alone). The checks and the
/// read are on one open descriptor, so the file checked is the file read.
pub fn load_key(path: &Path) -> Result<SecretKey, OriginError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let p = path.display().to_string();
    let read_err = |source| OriginError::KeyRead {
        path: p.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let md = f.metadata().map_err(read_err)?;
    let mode = md.permissions().mode() & 0o777;
    let me = rustix::process::geteuid().as_raw();
    // A Kubernetes Secret volume with `fsGroup` (deploy/kubernetes): the
    // file belongs to root, only the pod's own group may read it (mode
    // 0440 at most) and nobody may write it. Root owning it is no risk:
    // root can read any file anyway.
    let secret_volume = md.uid() == 0
        && me != 0
        && md.gid() == rustix::process::getegid().as_raw()
        && mode & 0o337 == 0;
    if !secret_volume {
        if mode & 0o077 != 0 {
            return Err(OriginError::KeyPermissions { path: p, mode });
        }
        if md.uid() != me {
            return Err(OriginError::KeyOwner {
                path: p,
                owner: md.uid(),
                me,
            });
        }
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read_err)?;
    SecretKey::from_file_text(&text).map_err(|source| OriginError::KeyFormat { path: p, source })
}

/// The HTTP face of the origin.
#[derive(Debug, Clone)]
pub struct Origin {
    shared: Arc<Shared>,
    /// True once shutdown begins (long-polls are answered at once).
    stopping: Stopping,
}

impl Published for Origin {
    fn latest(&self) -> Option<Arc<VerifiedRoot>> {
        self.shared.latest.load_full()
    }
    fn stopping(&self) -> Option<Stopping> {
        Some(self.stopping.clone())
    }
    fn keys(&self) -> Arc<meridian_serve::keys::KeysDoc> {
        self.shared.keys.load_full()
    }
    fn root_envelope(&self, generation: u64) -> Option<Vec<u8>> {
        std::fs::read(self.shared.root_path(generation)).ok()
    }
    type Objects = LinkedStore;
    fn objects(&self) -> &Arc<LinkedStore> {
        &self.shared.store
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.notify.subscribe()
    }
    fn deltas(&self) -> Option<&meridian_serve::readapi::DeltaCache> {
        Some(&self.shared.deltas)
    }
    fn count_object_bytes(&self, bytes: u64) {
        self.shared.metrics.bytes_served.inc_by(bytes);
        let now = self.shared.started.elapsed().as_millis() as u64;
        self.shared
            .last_served_ms
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Service for Origin {
    async fn call(&self, req: http::Request<()>, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path();
        let waiting = path.strip_prefix(readapi::PREFIX) == Some("wait");
        if waiting {
            self.shared.metrics.waiters.inc();
        }
        let resp = readapi::handle(self, &req, peer.ip()).await;
        if waiting {
            self.shared.metrics.waiters.dec();
        }
        if let Some(resp) = resp {
            return resp;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        }
        match path {
            "/.meridian/metrics" => Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(full(self.shared.metrics.render()))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "")),
            "/.meridian/health" => {
                let generation = self.latest().map(|l| l.root.generation).unwrap_or(0);
                let status = if generation > 0 {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut r = text(
                    status,
                    format!("{{\"role\":\"origin\",\"generation\":{generation}}}\n"),
                );
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "this is a Meridian origin; downloads are served by mirrors\n",
            ),
        }
    }
}

/// A running origin.
#[derive(Debug)]
pub struct OriginHandle {
    pub http_addr: SocketAddr,
    pub https_addr: Option<SocketAddr>,
    pub public_key: meridian_core::PublicKey,
    servers: Vec<ServerHandle>,
    shutdown: Shutdown,
    publish_loop: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    /// The configuration and key in force; a reload sends the next ones
    /// to the publish loop.
    config: tokio::sync::watch::Sender<(OriginConfig, SecretKey)>,
}

impl OriginHandle {
    /// The newest generation.
    pub fn latest(&self) -> Option<Arc<VerifiedRoot>> {
        self.shared.latest.load_full()
    }
    /// Puts a new configuration in force without a restart: the publishing
    /// settings (`quiet`, `expiry`, `resign_before`, `rescan`, retention,
    /// `gc_grace`, `hash_threads`) from the next publish on, connection
    /// caps and timeouts from the next connection on. The key file is read
    /// again: another key in it is a rotation ([`crate::keys`]), signed
    /// with both keys and published before the next generation, which the
    /// new key signs. What only a restart can change (`content`, `state`,
    /// `snapshot`, the listen address, TLS) is left as it was and named in
    /// the answer. A configuration that does not validate, or a key file
    /// that cannot be read, is refused and the running one stays.
    pub fn reload(&self, mut cfg: OriginConfig) -> Result<Vec<&'static str>, OriginError> {
        cfg.validate().map_err(PublishError::from)?;
        let key = load_key(&cfg.key_file)?;
        let now = self.config.borrow().0.clone();
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if cfg.$field != now.$field {
                    kept.push(stringify!($field));
                    cfg.$field = now.$field.clone();
                }
            )*};
        }
        keep!(content, state, snapshot, listen);
        let (l, n) = (&mut cfg.listener, &now.listener);
        if l.listen_tls != n.listen_tls || l.tls_cert != n.tls_cert || l.tls_key != n.tls_key {
            kept.push("TLS");
            l.listen_tls = n.listen_tls;
            l.tls_cert = n.tls_cert.clone();
            l.tls_key = n.tls_key.clone();
        }
        // Connection caps and timeouts: from the next connection on.
        for s in &self.servers {
            s.set_limits(&cfg.listener);
        }
        self.config.send_replace((cfg, key));
        Ok(kept)
    }

    /// Stops publishing and serving.
    pub async fn shutdown(self) {
        self.shutdown.trigger();
        let _ = self.publish_loop.await;
        for s in self.servers {
            s.shutdown().await;
        }
    }
}

impl Origin {
    /// Loads the key and state, publishes once, and starts serving and watching.
    pub async fn start(cfg: OriginConfig) -> Result<OriginHandle, OriginError> {
        if !cfg.content.is_dir() {
            return Err(OriginError::NoContent(cfg.content.display().to_string()));
        }
        let key = load_key(&cfg.key_file)?;
        let key2 = key.clone();
        let public_key = key.public();
        let c2 = cfg.clone();
        let mut publisher = tokio::task::spawn_blocking(move || Publisher::open(c2, key))
            .await
            .map_err(|e| PublishError::State {
                path: cfg.state.clone(),
                source: std::io::Error::other(e),
            })??;
        let shared = publisher.shared();

        let signal = Arc::new(ChangeSignal::default());
        let watcher = watch(&cfg.content, signal.clone()).map_err(|source| OriginError::Watch {
            path: cfg.content.display().to_string(),
            source,
        })?;
        publisher.watch(signal.closes.clone(), signal.changed.clone());
        // Publish once before serving, so the first answer is current.
        publisher = run_blocking(publisher, |p| {
            if let Err(e) = p.publish() {
                tracing::error!(error = %e, "initial publish failed; serving the last complete generation");
            }
        })
        .await;

        let tx = Shutdown::new();
        let rx = tx.subscribe();
        let origin = Arc::new(Origin {
            shared: shared.clone(),
            stopping: rx.clone(),
        });
        let opts = cfg.listener.server_options();
        let listen = cfg.listener.listen(cfg.listen);
        let servers = meridian_serve::serve_listeners("origin", listen, opts, origin)?;
        let http_addr = servers[0].local_addr;
        let https_addr = servers.get(1).map(|s| s.local_addr);

        tokio::spawn(promote_loop(shared.clone(), rx.clone()));
        let (config, reloads) = tokio::sync::watch::channel((cfg, key2));
        let publish_loop = tokio::spawn(publish_loop(publisher, reloads, signal, rx, watcher));
        Ok(OriginHandle {
            http_addr,
            https_addr,
            public_key,
            servers,
            shutdown: tx,
            publish_loop,
            shared,
            config,
        })
    }
}

/// Makes private copies of hashed-in-place (linked) objects in the
/// background, one at a time: at start every linked object without a copy
/// (a full listing, to finish what a restart interrupted), then after each
/// publish only the objects that publish added. Until then such an object
/// is copied on its first read.
async fn promote_loop(shared: Arc<Shared>, mut shutdown: Stopping) {
    let mut generations = shared.notify.subscribe();
    let mut first = true;
    loop {
        let s = shared.clone();
        let stop = shutdown.clone();
        let full = std::mem::take(&mut first);
        let _ = tokio::task::spawn_blocking(move || promote_linked(&s, &stop, full)).await;
        tokio::select! {
            r = generations.changed() => if r.is_err() { return },
            _ = shutdown.wait() => return,
        }
    }
}

fn promote_linked(shared: &Shared, stop: &Stopping, full: bool) {
    let queued = shared
        .to_promote
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default();
    let linked = if full {
        match shared.store.list_linked() {
            Ok(l) => l,
            Err(_) => return,
        }
    } else {
        queued
    };
    let (mut copied, mut withdrawn) = (0u64, 0u64);
    tracing::debug!(
        objects = linked.len(),
        full,
        "copying hashed-in-place files"
    );
    for h in linked {
        if stop.is_set() {
            break;
        }
        // Mirrors fetching right now get the disk: while objects were served
        // in the last second, copy at most about 20 objects a second.
        let last = shared
            .last_served_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if shared.started.elapsed().as_millis() as u64 <= last + 1000 {
            std::thread::sleep(Duration::from_millis(50));
        }
        match shared.store.promote(&h) {
            Ok(Promoted::Copied) => copied += 1,
            Ok(Promoted::Withdrawn) => {
                withdrawn += 1;
                tracing::warn!(object = %h, "a published file was edited in place before it was copied; withdrawn");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "copying hashed-in-place files stopped");
                break;
            }
        }
    }
    if copied + withdrawn > 0 {
        // One flush for the round (and for copies made on first read since).
        if let Err(e) = shared.store.sync_all() {
            tracing::warn!(error = %e, "flushing private copies");
        }
        tracing::info!(
            copied,
            withdrawn,
            "made private copies of hashed-in-place files"
        );
    }
}

async fn run_blocking(
    mut p: Publisher,
    f: impl FnOnce(&mut Publisher) + Send + 'static,
) -> Publisher {
    match tokio::task::spawn_blocking(move || {
        f(&mut p);
        p
    })
    .await
    {
        Ok(p) => p,
        // A panic in the publisher is a bug: make it loud.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// How long a burst of finished files (each closed after writing or
/// renamed into place) may go on before they are published together.
const FINISHED_COALESCE: Duration = Duration::from_millis(25);
/// The longest a finished file waits for other files' events to pause, or
/// twice the last publish, if longer: during a storm of changes (a big
/// rsync into the content directory) the publishes then take at most a
/// third of the time, however big the tree.
const FINISHED_MAX_WAIT: Duration = Duration::from_millis(200);
/// The longest a storm of finished files goes unpublished: each publish
/// mid-storm costs a walk and a flush that slow the copy itself.
const FINISHED_STORM_MAX: Duration = Duration::from_secs(10);

/// The longest wait between a publish and the garbage collection after it.
const GC_DELAY: Duration = Duration::from_secs(30);

async fn publish_loop(
    mut publisher: Publisher,
    mut reloads: tokio::sync::watch::Receiver<(OriginConfig, SecretKey)>,
    signal: Arc<ChangeSignal>,
    mut shutdown: Stopping,
    _watcher: crate::watcher::Watch,
) {
    // Settling files are retried after one quiet period; failed publishes
    // (disk full, unreadable content directory) back off up to 30 s.
    let mut cfg = reloads.borrow_and_update().0.clone();
    let mut backoff = cfg.quiet;
    let mut failed = false;
    // Garbage collection reads every retained tree and lists the store, so
    // it does not run in the publish that mirrors are about to sync: it runs
    // GC_DELAY (at most; gc_grace if shorter) after the first publish of a
    // burst, and again when an unreferenced object's grace ends. It shares
    // this loop with publishing, so the two never overlap (a publish writes
    // objects before any root references them).
    let mut gc_delay = cfg.gc_grace.min(GC_DELAY);
    let mut gc_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now() + gc_delay);
    // When the last scan began: files finished since are not in it yet.
    let mut last_scan = std::time::SystemTime::now();
    let mut last_publish_took = Duration::ZERO;
    loop {
        let mut wait = cfg.rescan.min(publisher.resign_in());
        if failed {
            wait = wait.min(backoff);
        } else if publisher.needs_retry {
            wait = wait.min(cfg.quiet);
        }
        let gc_sleep = async {
            match gc_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signal.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            r = reloads.changed() => {
                if r.is_err() {
                    return;
                }
                // A reload: the next scan and publish use the new settings
                // (and a shorter expiry may make the newest generation due
                // for re-signing now).
                let key;
                (cfg, key) = reloads.borrow_and_update().clone();
                gc_delay = cfg.gc_grace.min(GC_DELAY);
                publisher.reconfigure(cfg.clone());
                publisher = run_blocking(publisher, move |p| match p.take_key(key) {
                    Ok(Some(s)) => tracing::info!(
                        statement = %s.statement,
                        "key rotated: the statement is published, and the new key signs from generation {} on",
                        s.statement.from_generation
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "key rotation refused; the key in use stays"),
                })
                .await;
                continue;
            }
            _ = gc_sleep => {
                publisher = run_blocking(publisher, |p| {
                    if let Err(e) = p.gc() {
                        tracing::warn!(error = %e, "garbage collection failed");
                    }
                })
                .await;
                gc_at = publisher.gc_next().map(tokio::time::Instant::from_std);
                continue;
            }
            _ = shutdown.wait() => return,
        }
        // Debounce: wait until nothing changed for a while. A file closed
        // after writing or renamed into place since the last scan is
        // published after a moment (which takes a burst of them in one
        // generation), and within FINISHED_MAX_WAIT however busy other
        // files are; files still being written are left out by the scan
        // and retried after the quiet period. With writes and no finished
        // file, the quiet period, as before.
        let debounce = tokio::time::Instant::now();
        let mut seen = signal.count();
        let mut last_event = tokio::time::Instant::now();
        loop {
            let finished = signal.closes.finished_since(last_scan);
            let pause = if finished || !signal.closes.any_writing(cfg.quiet) {
                cfg.quiet.min(FINISHED_COALESCE)
            } else {
                cfg.quiet
            };
            let mut due = last_event + pause;
            if finished {
                // Others' writes hold a finished file back a moment at
                // most; a storm of finished files (a copy into the
                // content directory) is taken whole once it pauses, or
                // every FINISHED_STORM_MAX while it lasts.
                let cap = if signal.closes.finishing(FINISHED_COALESCE) {
                    FINISHED_STORM_MAX
                } else {
                    FINISHED_MAX_WAIT.max(last_publish_took * 2)
                };
                due = due.min(debounce + cap);
            }
            if tokio::time::Instant::now() >= due {
                break;
            }
            // A new event moves the pause on, and may finish a file.
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = signal.wake.notified() => {}
                _ = shutdown.wait() => return,
            }
            let c = signal.count();
            if c != seen {
                seen = c;
                last_event = tokio::time::Instant::now();
            }
        }
        last_scan = std::time::SystemTime::now();
        let ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok2 = ok.clone();
        let published = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let published2 = published.clone();
        let t_publish = tokio::time::Instant::now();
        publisher = run_blocking(publisher, move |p| match p.publish() {
            Ok(outcome) => {
                ok2.store(true, std::sync::atomic::Ordering::Relaxed);
                if matches!(outcome, PublishOutcome::Published { .. }) {
                    published2.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "publish failed; the last complete generation stays current");
            }
        })
        .await;
        last_publish_took = t_publish.elapsed();
        failed = !ok.load(std::sync::atomic::Ordering::Relaxed);
        if published.load(std::sync::atomic::Ordering::Relaxed) {
            let due = tokio::time::Instant::now() + gc_delay;
            gc_at = Some(gc_at.map_or(due, |t| t.min(due)));
        }
        backoff = if failed {
            (backoff * 2).min(Duration::from_secs(30))
        } else {
            cfg.quiet
        };
    }
}
