//! Meridian GeoDNS: an authoritative DNS server (on hickory-server) that
//! answers each client with the nearest mirror that is healthy, current and
//! not overloaded.
//!
//! * [`geoip`]: MaxMind GeoIP2/GeoLite2 and DB-IP City lookups, hot reload.
//! * `select`: the pure selection function.
//! * `health`: active probes of each mirror's status endpoint.
//! * `dns`: the request handler; `wire`: strict ECS validation.
//! * `admin`: metrics, mirror state, operator overrides.
//! * `public`: the read-only status page (map, steering) and its JSON.
//! * [`mmdb`]: a MaxMind DB writer (the demo's database, the tests' databases).
#![forbid(unsafe_code)]

mod admin;
mod answer;
pub mod config;
mod dns;
mod fast;
pub mod geoip;
mod health;
mod metrics;
pub mod mmdb;
mod public;
mod redirect;
mod registry;
mod select;
mod tcp;
mod wire;
mod zone;

use arc_swap::ArcSwap;
use config::GeoDnsConfig;
use geoip::{GeoHandle, GeoSet, Location};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why GeoDNS could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoDnsError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("zone: {0}")]
    Zone(String),
    #[error(transparent)]
    Geo(#[from] geoip::GeoError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("redirector: {0}")]
    Listen(#[from] meridian_serve::ListenError),
    #[error(transparent)]
    State(#[from] registry::StateFileError),
}

/// Builds the query-time runtime from a validated config.
pub fn build_runtime(cfg: &GeoDnsConfig) -> Result<answer::Runtime, GeoDnsError> {
    let zones = cfg
        .zones
        .iter()
        .map(zone::ZoneData::build)
        .collect::<Result<Vec<_>, _>>()
        .map_err(GeoDnsError::Zone)?;
    let overrides = cfg
        .overrides
        .iter()
        .filter_map(|o| {
            let (net, len) = select::parse_cidr(&o.network)?;
            let loc = match (&o.region, o.latitude, o.longitude) {
                (_, Some(lat), Some(lon)) => Location {
                    lat,
                    lon,
                    country: None,
                    continent: None,
                },
                (Some(r), _, _) => {
                    let m = cfg.mirrors.iter().find(|m| &m.region == r)?;
                    Location {
                        lat: m.latitude,
                        lon: m.longitude,
                        country: None,
                        continent: None,
                    }
                }
                _ => return None,
            };
            Some((net, len, Arc::new(loc)))
        })
        .collect();
    let s = &cfg.selection;
    let hot_names = zones
        .iter()
        .flat_map(|z| z.dynamic.iter())
        .map(|n| {
            let mut w = Vec::with_capacity(64);
            for label in n.iter() {
                w.push(label.len() as u8);
                w.extend(label.iter().map(u8::to_ascii_lowercase));
            }
            w.push(0);
            w
        })
        .collect();
    Ok(answer::Runtime {
        bases: cfg
            .mirrors
            .iter()
            .map(|m| (m.id.clone(), Arc::from(m.base_url())))
            .collect(),
        countries: cfg
            .mirrors
            .iter()
            .filter_map(|m| {
                Some((
                    m.id.clone(),
                    m.country.as_ref()?.to_ascii_lowercase().into(),
                ))
            })
            .collect(),
        hot_names,
        zones,
        params: select::Params {
            answers: s.answers,
            band: s.band,
            band_km: s.band_km,
            full_at: s.full_at,
            fallback: s.fallback.clone(),
        },
        ttl: s.ttl,
        ttl_changing: s.ttl_changing,
        default_location: s.default_location.map(|(lat, lon)| {
            Arc::new(Location {
                lat,
                lon,
                country: None,
                continent: None,
            })
        }),
        overrides,
    })
}

/// A running GeoDNS server.
pub struct GeoDnsHandle {
    /// The DNS listen addresses (each bound for UDP and TCP).
    pub dns_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// The public status page's address.
    pub public_addr: Option<SocketAddr>,
    /// The redirector's plain-HTTP address.
    pub redirector_addr: Option<SocketAddr>,
    pub tracker: Arc<health::Tracker>,
    shutdown: meridian_serve::shutdown::Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: Option<meridian_serve::ServerHandle>,
    public: Option<meridian_serve::ServerHandle>,
    redirector: Vec<meridian_serve::ServerHandle>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GeoDnsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDnsHandle")
            .field("dns_addrs", &self.dns_addrs)
            .field("admin_addr", &self.admin_addr)
            .field("public_addr", &self.public_addr)
            .finish()
    }
}

impl GeoDnsHandle {
    pub async fn shutdown(mut self) {
        self.shutdown.trigger();
        for t in std::mem::take(&mut self.udp_threads) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        for server in [self.admin, self.public]
            .into_iter()
            .flatten()
            .chain(self.redirector)
        {
            server.shutdown().await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds UDP (one socket, shared by the per-core threads) and TCP on the same
/// address (for port 0: the same free port).
fn bind_pair(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, tokio::net::TcpListener), GeoDnsError> {
    let mut last = None;
    for _ in 0..20 {
        let udp = fast::bind_udp(addr).map_err(|source| GeoDnsError::Bind { addr, source })?;
        let bound = udp
            .local_addr()
            .map_err(|source| GeoDnsError::Bind { addr, source })?;
        match meridian_serve::bind(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(source) => return Err(GeoDnsError::Bind { addr, source }),
        }
    }
    Err(GeoDnsError::Bind {
        addr,
        source: last.unwrap_or_else(|| std::io::Error::other("no free port")),
    })
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Starts GeoDNS from a config file; reloads it on SIGHUP and on change.
pub async fn start(config_path: PathBuf) -> Result<GeoDnsHandle, GeoDnsError> {
    let cfg = GeoDnsConfig::load(&config_path)?;
    start_with(cfg, Some(config_path)).await
}

/// Starts GeoDNS from a config value (`config_path` enables reloading).
pub async fn start_with(
    file_cfg: GeoDnsConfig,
    config_path: Option<PathBuf>,
) -> Result<GeoDnsHandle, GeoDnsError> {
    // What is served: the file's config and the registrations.
    let registry = Arc::new(registry::Registry::open(&file_cfg)?);
    let cfg = registry.merge(&file_cfg);
    cfg.validate()?;
    let runtime = Arc::new(ArcSwap::from_pointee(build_runtime(&cfg)?));
    let open = |p: &Option<PathBuf>| -> Result<GeoHandle, GeoDnsError> {
        Ok(GeoHandle::new(match p {
            Some(p) => Some(geoip::GeoDb::open(p)?),
            None => None,
        }))
    };
    let geo = Arc::new(GeoSet {
        main: open(&cfg.geoip)?,
        v6: open(&cfg.geoip_v6)?,
    });
    let tracker = Arc::new(health::Tracker::new());
    for (id, f) in registry.forced() {
        if cfg.mirrors.iter().any(|m| m.id == id) {
            tracker.force(&id, f);
        }
    }
    tracker.refresh_views(&cfg);
    let metrics = metrics::DnsMetrics::new();
    let config = Arc::new(ArcSwap::from_pointee(cfg.clone()));
    let handler = dns::GeoHandler::new(
        runtime.clone(),
        geo.clone(),
        tracker.clone(),
        metrics.clone(),
    );
    let handler = Arc::new(handler);
    let tcp_limits = tcp::fit_to_descriptors(meridian_serve::limits::ConnLimits {
        total: cfg.tcp_max_connections,
        per_client: cfg.tcp_max_connections_per_client,
    });
    let mut dns_addrs = Vec::new();
    let tx = meridian_serve::shutdown::Shutdown::new();
    let rx = tx.subscribe();
    let mut tasks = Vec::new();
    let mut udp_threads = Vec::new();
    for addr in &cfg.listen {
        let (udp, tcp) = bind_pair(*addr)?;
        let bound = udp.local_addr().map_err(|source| GeoDnsError::Bind {
            addr: *addr,
            source,
        })?;
        // UDP: our per-core loops (fast path for mirror names, hickory's
        // handler for everything else). TCP: our accept loop and the same
        // handler (`tcp`).
        // One socket per thread (one thread per core by default) in one
        // SO_REUSEPORT group, each datagram steered to the socket of the CPU
        // it arrived on (`fast::steer_by_cpu`). Where the kernel refuses the
        // steering program, every thread reads the one socket instead
        // (whichever is free takes the next batch): the kernel's own flow
        // hash would put a few busy clients on one thread while others idle.
        let first = Arc::new(udp);
        let threads = if cfg.udp_threads > 0 {
            cfg.udp_threads
        } else {
            cores()
        };
        let steered = threads > 1
            && match fast::steer_by_cpu(&first, threads) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot steer UDP by CPU; the serving threads share one socket");
                    false
                }
            };
        for i in 0..threads {
            let sock = if steered && i > 0 {
                Arc::new(fast::bind_udp(bound).map_err(|source| GeoDnsError::Bind {
                    addr: bound,
                    source,
                })?)
            } else {
                first.clone()
            };
            let (h, rt, stop) = (
                handler.clone(),
                tokio::runtime::Handle::current(),
                rx.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("geodns-udp-{i}"))
                .spawn(move || fast::serve(sock, h, rt, stop))
                .map_err(|source| GeoDnsError::Bind {
                    addr: *addr,
                    source,
                })?;
            udp_threads.push(t);
        }
        tasks.push(tokio::spawn(tcp::serve(
            tcp,
            handler.clone(),
            tcp_limits,
            rx.clone(),
        )));
        tracing::info!("geodns listening on {bound} (udp+tcp)");
        dns_addrs.push(bound);
    }

    // Health probes.
    {
        let (tracker, config, metrics, mut stop) =
            (tracker.clone(), config.clone(), metrics.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let cfg = config.load_full();
                for (id, took, ok) in tracker.round(&cfg).await {
                    metrics.probe(&id, took, ok);
                }
                metrics.mirror_states(&tracker.views.load(), cfg.selection.full_at);
                tokio::select! {
                    _ = tokio::time::sleep(cfg.health.interval) => {}
                    _ = stop.wait() => return,
                }
            }
        }));
    }
    // The steering view's samples (the public page's last minute).
    let steering = Arc::new(public::Steering::default());
    if cfg.public.is_some() {
        let (steering, metrics, mut stop) = (steering.clone(), metrics.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                steering.sample(&metrics, std::time::Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(public::SAMPLE_EVERY) => {}
                    _ = stop.wait() => return,
                }
            }
        }));
    }
    // GeoIP reload (geoipupdate replaces the file by rename).
    for (v6, path) in [(false, cfg.geoip.clone()), (true, cfg.geoip_v6.clone())] {
        let Some(path) = path else { continue };
        let (geo, mut stop) = (geo.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait() => return,
                }
                let (g, p) = (geo.clone(), path.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    let h = if v6 { &g.v6 } else { &g.main };
                    h.reload_if_changed(&p)
                })
                .await;
            }
        }));
    }
    // Config reload on SIGHUP and when the file changes.
    if let Some(path) = config_path {
        let (runtime, config, tracker, registry, mut stop) = (
            runtime.clone(),
            config.clone(),
            tracker.clone(),
            registry.clone(),
            rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut seen = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            loop {
                let by_signal = tokio::select! {
                    _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    _ = stop.wait() => return,
                };
                let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                if !by_signal && now == seen {
                    continue;
                }
                seen = now;
                reload(&path, &registry, &runtime, &config, &tracker);
            }
        }));
    }
    let public = match &cfg.public {
        Some(p) => {
            let l = meridian_serve::bind(p.listen).map_err(|source| GeoDnsError::Bind {
                addr: p.listen,
                source,
            })?;
            let svc = Arc::new(public::PublicService::new(
                tracker.clone(),
                steering,
                runtime.clone(),
            ));
            let h = meridian_serve::serve(l, meridian_serve::ServerOptions::default(), svc);
            tracing::info!(
                "geodns status page listening on {} (http://{}/)",
                h.local_addr,
                h.local_addr
            );
            Some(h)
        }
        None => None,
    };
    let redirector = match &cfg.redirector {
        Some(r) => {
            let trees = Arc::new(redirect::trees::Trees::new(
                &r.upstreams,
                &r.trust,
                r.generations,
            ));
            let svc = Arc::new(redirect::Redirector::new(
                trees.clone(),
                Arc::new(redirect::digest::Digests::new(&r.upstreams)),
                tracker.clone(),
                runtime.clone(),
                geo.clone(),
                &r.trusted_proxies,
                redirect::RedirectMetrics::new(
                    metrics.registry(),
                    cfg.mirrors.iter().map(|m| m.id.as_str()),
                ),
            ));
            let servers = meridian_serve::serve_listeners(
                "geodns redirector",
                r.listener.listen(r.listen),
                r.listener.server_options(),
                svc,
            )?;
            // The newest generation, by long-poll.
            {
                let (trees, mut stop) = (trees.clone(), rx.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let r = tokio::select! {
                            r = trees.follow_once() => r,
                            _ = stop.wait() => return,
                        };
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "redirector: no new generation from any upstream");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                                _ = stop.wait() => return,
                            }
                        }
                    }
                }));
            }
            // The recent generations the mirrors report serving.
            {
                let (trees, tracker, mut stop) = (trees.clone(), tracker.clone(), rx.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let reported: Vec<u64> =
                            tracker.views.load().iter().map(|v| v.generation).collect();
                        tokio::select! {
                            _ = trees.load_older(reported) => {}
                            _ = stop.wait() => return,
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.wait() => return,
                        }
                    }
                }));
            }
            servers
        }
        None => Vec::new(),
    };
    let admin = match &cfg.admin {
        Some(a) => {
            let l = meridian_serve::bind(a.listen).map_err(|source| GeoDnsError::Bind {
                addr: a.listen,
                source,
            })?;
            let svc = Arc::new(admin::AdminService {
                token: a.token.clone(),
                tracker: tracker.clone(),
                metrics,
                served: Served {
                    runtime,
                    config,
                    tracker: tracker.clone(),
                },
                registry,
            });
            let h = meridian_serve::serve(l, meridian_serve::ServerOptions::default(), svc);
            tracing::info!("geodns admin listening on {}", h.local_addr);
            Some(h)
        }
        None => None,
    };
    Ok(GeoDnsHandle {
        udp_threads,
        admin_addr: admin.as_ref().map(|a| a.local_addr),
        public_addr: public.as_ref().map(|p| p.local_addr),
        redirector_addr: redirector.first().map(|p| p.local_addr),
        dns_addrs,
        tracker,
        shutdown: tx,
        tasks,
        admin,
        public,
        redirector,
    })
}

/// What the query path serves, and the one way to change it: every new
/// configuration (a reload, a registration) goes through [`Served::apply`].
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub runtime: Arc<ArcSwap<answer::Runtime>>,
    pub config: Arc<ArcSwap<GeoDnsConfig>>,
    pub tracker: Arc<health::Tracker>,
}

impl Served {
    /// Serves `cfg` (validated, merged): its runtime, the mirrors' views
    /// and the config every task reads.
    pub(crate) fn apply(&self, cfg: GeoDnsConfig) -> Result<(), String> {
        let rt = build_runtime(&cfg).map_err(|e| e.to_string())?;
        self.runtime.store(Arc::new(rt));
        self.tracker.refresh_views(&cfg);
        self.config.store(Arc::new(cfg));
        Ok(())
    }
}

fn reload(
    path: &Path,
    registry: &registry::Registry,
    runtime: &Arc<ArcSwap<answer::Runtime>>,
    config: &Arc<ArcSwap<GeoDnsConfig>>,
    tracker: &Arc<health::Tracker>,
) {
    let served = Served {
        runtime: runtime.clone(),
        config: config.clone(),
        tracker: tracker.clone(),
    };
    let res = GeoDnsConfig::load(path)
        .map_err(|e| e.to_string())
        .and_then(|file| {
            // (A port 0 pinned to the port bound is no change.)
            let old = config.load();
            if file.listen.len() != old.listen.len()
                || file
                    .listen
                    .iter()
                    .zip(&old.listen)
                    .any(|(n, o)| n.ip() != o.ip() || (o.port() != 0 && n.port() != o.port()))
            {
                tracing::warn!("listen addresses changed in the config; that takes a restart");
            }
            let cfg = registry.merge(&file);
            cfg.validate().map_err(|e| e.to_string())?;
            build_runtime(&cfg).map_err(|e| e.to_string())?;
            Ok((file, cfg))
        });
    match res {
        Ok((file, cfg)) => {
            let n = cfg.mirrors.len();
            registry.set_file(file);
            match served.apply(cfg) {
                Ok(()) => tracing::info!(mirrors = n, "configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "configuration NOT reloaded"),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "configuration NOT reloaded; the previous one stays in service")
        }
    }
}
