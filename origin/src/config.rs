//! Origin configuration (TOML, `deny_unknown_fields`; CLI flags override).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the origin needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginConfig {
    /// The directory whose content is published.
    pub content: PathBuf,
    /// Where generations, objects and the hash cache are kept.
    pub state: PathBuf,
    /// The ed25519 secret key file (0600; written by `meridian keygen`).
    pub key_file: PathBuf,
    /// HTTP listen address (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS, connection caps and timeouts (top-level keys, shared with the
    /// other node's config).
    #[serde(flatten)]
    pub listener: meridian_serve::ListenerConfig,
    /// Quiet period: changes are batched until nothing changed for this
    /// long, and a file is published only once it has been quiet this long.
    #[serde(default = "default_quiet", with = "humantime_serde")]
    pub quiet: Duration,
    /// How long a signed generation stays valid.
    #[serde(default = "default_expiry", with = "humantime_serde")]
    pub expiry: Duration,
    /// Re-sign (publish the same tree as a new generation) when the newest
    /// generation has less than this long left.
    #[serde(default = "default_resign", with = "humantime_serde")]
    pub resign_before: Duration,
    /// Full rescan interval, a fallback should the watcher miss events.
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan: Duration,
    /// Keep at least this many newest generations.
    #[serde(default = "default_retain")]
    pub retain_generations: usize,
    /// Also keep generations younger than this.
    #[serde(default = "default_retain_age", with = "humantime_serde")]
    pub retain_age: Duration,
    /// An object no longer referenced by a retained generation is deleted
    /// only after it has been unreferenced this long, so a mirror mid-sync
    /// on a just-dropped generation can finish.
    #[serde(default = "default_gc_grace", with = "humantime_serde")]
    pub gc_grace: Duration,
    /// Hashing threads (0: one per core).
    #[serde(default)]
    pub hash_threads: usize,
    /// How changed files are snapshotted: `link` (hash in place, hard-link,
    /// copy lazily) or `copy` (copy first, hash the copy).
    #[serde(default)]
    pub snapshot: crate::scan::Snapshot,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_quiet() -> Duration {
    Duration::from_secs(1)
}
fn default_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_resign() -> Duration {
    Duration::from_secs(3 * 24 * 3600)
}
fn default_rescan() -> Duration {
    Duration::from_secs(600)
}
fn default_retain() -> usize {
    10
}
fn default_retain_age() -> Duration {
    Duration::from_secs(3600)
}
fn default_gc_grace() -> Duration {
    Duration::from_secs(600)
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(
        "expiry ({expiry}) must be at least {MIN_SIGNED_LIFE:?} longer than resign_before ({resign_before}): otherwise every generation is due for re-signing as soon as it is signed, and the origin re-signs and pushes a new generation to every mirror over and over. Raise expiry (--expiry) or lower resign_before"
    )]
    ResignAfterExpiry {
        expiry: String,
        resign_before: String,
    },
}

/// Least time between signing a generation and it falling due for
/// re-signing.
pub const MIN_SIGNED_LIFE: Duration = Duration::from_secs(60);

impl OriginConfig {
    /// Checks the settings against each other (serde checks each alone).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.expiry < self.resign_before + MIN_SIGNED_LIFE {
            return Err(ConfigError::ResignAfterExpiry {
                expiry: humantime::format_duration(self.expiry).to_string(),
                resign_before: humantime::format_duration(self.resign_before).to_string(),
            });
        }
        Ok(())
    }

    /// A config with defaults for everything but the three paths.
    pub fn new(content: PathBuf, state: PathBuf, key_file: PathBuf) -> Self {
        OriginConfig {
            content,
            state,
            key_file,
            listen: default_listen(),
            listener: Default::default(),
            quiet: default_quiet(),
            expiry: default_expiry(),
            resign_before: default_resign(),
            rescan: default_rescan(),
            retain_generations: default_retain(),
            retain_age: default_retain_age(),
            gc_grace: default_gc_grace(),
            hash_threads: 0,
            snapshot: crate::scan::Snapshot::default(),
        }
    }

    /// Hashing threads to use.
    pub fn threads(&self) -> usize {
        if self.hash_threads > 0 {
            self.hash_threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}
