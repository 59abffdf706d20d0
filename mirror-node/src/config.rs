//! Mirror configuration (TOML, `deny_unknown_fields`; CLI flags override).

use meridian_core::PublicKey;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a mirror needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Name of this mirror, reported in status (e.g. `eu-west-1`).
    pub id: String,
    /// Region label, reported in status (e.g. `eu-west`).
    #[serde(default)]
    pub region: String,
    /// Upstreams (origin or other mirrors), tried in this order.
    pub upstreams: Vec<String>,
    /// Public keys trusted to sign generations (`ed25519:<hex>`); list both
    /// old and new during a key rotation.
    #[serde(deserialize_with = "meridian_serve::keys::de_keys")]
    pub trust: Vec<PublicKey>,
    /// State directory: objects, verified roots, partial downloads.
    pub state: PathBuf,
    /// HTTP listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS, connection caps and timeouts (top-level keys, shared with the
    /// other node's config).
    #[serde(flatten)]
    pub listener: meridian_serve::ListenerConfig,
    /// Egress capacity in bytes per second, reported to GeoDNS (with a
    /// cap, the lower of the two: see [`MirrorConfig::reported_capacity`]).
    #[serde(default = "default_capacity")]
    pub capacity_bytes_per_sec: u64,
    /// Most body bytes per second sent in all, enforced (0: no cap).
    #[serde(default)]
    pub egress_cap_bytes_per_sec: u64,
    /// Most body bytes per second sent on one connection, enforced (0: no
    /// cap).
    #[serde(default)]
    pub egress_cap_per_connection_bytes_per_sec: u64,
    /// Fallback poll interval when the long-poll feed is unavailable.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Blob downloads in parallel during a sync.
    #[serde(default = "default_parallel")]
    pub parallel_fetches: usize,
    /// How long blobs that left the served generation are kept.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub gc_grace: Duration,
    /// Refuse to serve once the served generation has expired (default:
    /// keep serving it and report stale).
    #[serde(default)]
    pub refuse_expired: bool,
    /// Bearer token for the admin API (drain/undrain). No token: admin API off.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Start a scrub pass (re-verify every served object) this often; the
    /// first starts at boot (0: never scrub). An object that no longer
    /// matches its hash is quarantined and fetched again.
    #[serde(default = "default_scrub", with = "humantime_serde")]
    pub scrub_interval: Duration,
    /// Most bytes per second a scrub pass reads.
    #[serde(default = "default_scrub_rate")]
    pub scrub_bytes_per_sec: u64,
    /// Keep this much disk free; a sync that would eat into it is refused.
    #[serde(default = "default_reserve")]
    pub reserve_free_bytes: u64,
    /// Start without a rollback floor: accept the first root an upstream
    /// offers even if it is older than one this mirror verified before.
    /// Only for recovering a mirror whose record of the highest generation
    /// was lost (it then refuses every root and says so).
    #[serde(default)]
    pub accept_lower_generation: bool,
    /// How long the mirror may lag behind the newest generation an
    /// upstream offers and still answer `GET /.meridian/ready` with 200
    /// (0: not at all). Replicas that sync the same generation lag
    /// together, so this should exceed a typical sync.
    #[serde(default = "default_ready_lag", with = "humantime_serde")]
    pub ready_max_lag: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_capacity() -> u64 {
    1_250_000_000 // 10 Gbit/s
}
fn default_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_parallel() -> usize {
    16
}
fn default_ready_lag() -> Duration {
    Duration::from_secs(300)
}
fn default_grace() -> Duration {
    Duration::from_secs(600)
}
fn default_scrub() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_scrub_rate() -> u64 {
    32 << 20
}
fn default_reserve() -> u64 {
    64 << 20
}

/// A mirror configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("mirror needs at least one upstream (--upstream URL, or upstreams = [...])")]
    NoUpstream,
    #[error("mirror needs at least one trusted key (--trust ed25519:..., or trust = [...])")]
    NoTrust,
    #[error("admin_token: {0}")]
    Token(&'static str),
}

impl MirrorConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::NoUpstream);
        }
        if self.trust.is_empty() {
            return Err(ConfigError::NoTrust);
        }
        if let Some(t) = &self.admin_token {
            meridian_serve::auth::check_token(t).map_err(ConfigError::Token)?;
        }
        Ok(())
    }

    /// The capacity reported to GeoDNS (status and metrics): the
    /// configured one, or the egress cap if that is lower, so GeoDNS's
    /// load rule works on a rate the mirror really holds.
    pub fn reported_capacity(&self) -> u64 {
        match self.egress_cap_bytes_per_sec {
            0 => self.capacity_bytes_per_sec,
            cap => cap.min(self.capacity_bytes_per_sec),
        }
    }

    /// Defaults for everything but identity, upstreams, trust and state.
    pub fn new(id: &str, upstreams: Vec<String>, trust: Vec<PublicKey>, state: PathBuf) -> Self {
        MirrorConfig {
            id: id.to_owned(),
            region: String::new(),
            upstreams,
            trust,
            state,
            listen: default_listen(),
            listener: Default::default(),
            capacity_bytes_per_sec: default_capacity(),
            egress_cap_bytes_per_sec: 0,
            egress_cap_per_connection_bytes_per_sec: 0,
            poll_interval: default_poll(),
            parallel_fetches: default_parallel(),
            gc_grace: default_grace(),
            refuse_expired: false,
            admin_token: None,
            scrub_interval: default_scrub(),
            scrub_bytes_per_sec: default_scrub_rate(),
            reserve_free_bytes: default_reserve(),
            accept_lower_generation: false,
            ready_max_lag: default_ready_lag(),
        }
    }
}
