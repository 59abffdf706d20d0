//! The Meridian mirror node.
//!
//! A mirror pulls each generation from its upstreams (the origin or other
//! mirrors), verifies every byte against the signed manifest, switches to
//! the new generation in one atomic step and serves downloads.
//! `sync` is the pull side, `server` the serving side, and `verified` and
//! `scrub` are how damage on the mirror's own disk is caught. The public
//! surface is [`start`], [`MirrorConfig`], [`MirrorHandle`] and
//! [`MirrorError`].
#![forbid(unsafe_code)]

pub mod config;
mod durable;
mod fetch;
mod floor;
mod gc;
mod generation;
mod keys;
mod metrics;
mod plan;
mod progress;
mod rawget;
mod rebuild;
mod refusal;
mod restore;
mod scrub;
mod server;
mod state;
mod sync;
mod upstreams;
mod verified;

pub use config::MirrorConfig;
pub use rebuild::{RestoreConfig, RestoreError, RestoreProgress, Restored, restore_origin};
use state::MirrorState;

use meridian_serve::ServerHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    #[error("mirror configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] meridian_serve::StoreError),
    #[error(transparent)]
    Sync(#[from] sync::SyncError),
    #[error(transparent)]
    Listen(#[from] meridian_serve::ListenError),
}

/// A running mirror.
#[derive(Debug)]
pub struct MirrorHandle {
    state: Arc<MirrorState>,
    pub http_addr: SocketAddr,
    pub https_addr: Option<SocketAddr>,
    servers: Vec<ServerHandle>,
    shutdown: meridian_serve::shutdown::Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MirrorHandle {
    /// Puts a new configuration in force without a restart and without
    /// touching a download: trusted keys at once (the next root is checked
    /// against them), upstreams before the next sync step, the rest
    /// (capacity, poll interval, parallel fetches, grace, scrub rate,
    /// reserve, admin token, `refuse_expired`) as each part next reads it,
    /// connection caps and timeouts from the next connection on. What only
    /// a restart can change (`id`, `state`, listen addresses and TLS) is
    /// left as it was and named in the answer. A configuration that does
    /// not validate is refused and the running one stays.
    pub fn reload(&self, mut cfg: MirrorConfig) -> Result<Vec<&'static str>, MirrorError> {
        cfg.validate()?;
        let now = self.state.cfg();
        let mut kept = Vec::new();
        if cfg.id != now.id {
            kept.push("id");
            cfg.id = now.id.clone();
        }
        if cfg.state != now.state {
            kept.push("state");
            cfg.state = now.state.clone();
        }
        let (l, n) = (&mut cfg.listener, &now.listener);
        if cfg.listen != now.listen
            || l.listen_tls != n.listen_tls
            || l.tls_cert != n.tls_cert
            || l.tls_key != n.tls_key
        {
            kept.push("listen addresses and TLS");
            cfg.listen = now.listen;
            l.listen_tls = n.listen_tls;
            l.tls_cert = n.tls_cert.clone();
            l.tls_key = n.tls_key.clone();
        }
        drop(now);
        // Connection caps and timeouts: from the next connection on.
        for s in &self.servers {
            s.set_limits(&cfg.listener);
        }
        self.state.reconfigure(cfg);
        Ok(kept)
    }

    /// Resolves when an operator asks the mirror to stop through its
    /// admin API (`POST /.meridian/admin/stop`): the caller then shuts it
    /// down as on SIGTERM.
    pub async fn stop_requested(&self) {
        self.state.stop_asked.notified().await
    }

    /// Reports draining, stops accepting, lets in-flight downloads finish
    /// (up to the drain timeout), then stops syncing.
    pub async fn shutdown(self) {
        self.state.set_draining(true);
        self.state.stopping.trigger();
        for s in self.servers {
            s.shutdown().await;
        }
        self.shutdown.trigger();
        for t in self.tasks {
            let _ = t.await;
        }
        // Nothing writes to the store any more: flush, and mark the stop clean.
        let st = self.state;
        let _ = tokio::task::spawn_blocking(move || durable::finish(&st)).await;
    }
}

/// Starts a mirror: restores the last served generation, starts syncing,
/// scrubbing and serving.
pub async fn start(cfg: MirrorConfig) -> Result<MirrorHandle, MirrorError> {
    cfg.validate()?;
    let state = Arc::new(MirrorState::open(cfg.clone())?);
    // Before anything is restored or served: objects a crash of the machine
    // may have left unwritten are re-checked.
    let s1 = state.clone();
    let recovered = tokio::task::spawn_blocking(move || durable::recover(&s1))
        .await
        .map_err(|e| meridian_serve::StoreError::io(&cfg.state, std::io::Error::other(e)))??;
    let syncer = Arc::new(sync::Syncer::new(state.clone()));
    let s2 = syncer.clone();
    match tokio::task::spawn_blocking(move || s2.restore()).await {
        Ok(Ok(Some(n))) => tracing::info!(generation = n, "restored served generation"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not restore the last generation; starting empty")
        }
        Err(e) => tracing::warn!(error = %e, "restore task failed"),
    }

    let service = Arc::new(server::MirrorService::new(state.clone()));
    let opts = cfg.listener.server_options();
    let listen = cfg.listener.listen(cfg.listen);
    let servers = meridian_serve::serve_listeners("mirror", listen, opts, service)?;
    let http_addr = servers[0].local_addr;
    let https_addr = servers.get(1).map(|s| s.local_addr);
    let _ = state
        .listeners
        .set(servers.iter().map(|s| s.active.clone()).collect());

    let tx = meridian_serve::shutdown::Shutdown::new();
    let rx = tx.subscribe();
    let mut tasks = vec![
        tokio::spawn(syncer.run(rx.clone())),
        tokio::spawn(scrub::run(state.clone(), rx.clone())),
        tokio::spawn(durable::run(state.clone(), rx.clone())),
    ];
    if recovered.damaged > 0 {
        state.repair.notify_one();
    }
    // Egress rate, once a second.
    let st = state.clone();
    let mut stop = rx;
    tasks.push(tokio::spawn(async move {
        let mut last = st.egress.sent.load(Ordering::Relaxed);
        let mut rate = 0f64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait() => return,
            }
            let now = st.egress.sent.load(Ordering::Relaxed);
            rate = 0.5 * rate + 0.5 * (now - last) as f64;
            last = now;
            st.egress_rate.store(rate as u64, Ordering::Relaxed);
        }
    }));
    Ok(MirrorHandle {
        state,
        http_addr,
        https_addr,
        servers,
        shutdown: tx,
        tasks,
    })
}
