//! Config files plus CLI overrides: the file is read as a TOML table, each
//! flag given on the command line replaces its key, and the result is
//! deserialised with `deny_unknown_fields`.

use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

fn load_table(path: Option<&PathBuf>) -> anyhow::Result<toml::Table> {
    match path {
        None => Ok(toml::Table::new()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("config {} is not valid TOML", p.display()))
        }
    }
}

/// Deserialises a config table (file plus flags), with an error that names
/// the file, what is wrong, and where the keys are documented.
fn parse<T: serde::de::DeserializeOwned>(
    t: toml::Table,
    role: &str,
    file: Option<&std::path::Path>,
    required: &str,
) -> anyhow::Result<T> {
    t.try_into().map_err(|e: toml::de::Error| {
        let from = match file {
            Some(p) => format!("{} and the flags", p.display()),
            None => "the flags".to_owned(),
        };
        anyhow::anyhow!(
            "invalid {role} configuration (from {from}): {}; {required} are required, and every key is described in deploy/{role}.toml",
            e.message().trim_end()
        )
    })
}

fn set(t: &mut toml::Table, key: &str, v: Option<impl ToString>) {
    if let Some(v) = v {
        t.insert(key.to_owned(), toml::Value::String(v.to_string()));
    }
}

/// TLS and connection-cap flags, shared by `origin` and `mirror` (each
/// has its own `--listen`, with its own default).
#[derive(Debug, Clone, Args)]
struct ListenArgs {
    /// Most connections at once from one client (an IPv4 address or an
    /// IPv6 /64); 0 for no cap [default: 256].
    #[arg(long, value_name = "N")]
    max_connections_per_client: Option<u64>,
    /// Time allowed to send a request head (slowloris guard) [default: 20s].
    #[arg(long, value_name = "DURATION")]
    header_timeout: Option<String>,
    /// Close a connection whose client stopped reading for this long
    /// [default: 60s].
    #[arg(long, value_name = "DURATION")]
    send_timeout: Option<String>,
    /// On SIGTERM, wait at most this long for responses in flight
    /// [default: 60s].
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<String>,
    /// HTTPS listen address (needs --tls-cert and --tls-key).
    #[arg(long, value_name = "ADDR")]
    listen_tls: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

impl ListenArgs {
    fn apply(self, listen: Option<SocketAddr>, t: &mut toml::Table) {
        set(t, "listen", listen);
        set(t, "header_timeout", self.header_timeout);
        set(t, "send_timeout", self.send_timeout);
        set(t, "drain_timeout", self.drain_timeout);
        if let Some(n) = self.max_connections_per_client {
            t.insert(
                "max_connections_per_client".into(),
                toml::Value::Integer(n.min(i64::MAX as u64) as i64),
            );
        }
        set(t, "listen_tls", self.listen_tls);
        set(
            t,
            "tls_cert",
            self.tls_cert.map(|p| p.display().to_string()),
        );
        set(t, "tls_key", self.tls_key.map(|p| p.display().to_string()));
    }
}

/// Flags of `meridian origin`.
#[derive(Debug, Clone, Args)]
pub(crate) struct OriginArgs {
    /// TOML config file (see deploy/origin.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory whose content is published.
    #[arg(long, value_name = "DIR")]
    content: Option<PathBuf>,
    /// State directory: objects, signed generations, hash cache.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Secret key file written by `meridian keygen` (must be mode 0600).
    #[arg(long = "key", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    tls: ListenArgs,
    /// Quiet period before publishing, e.g. `1s`, `500ms` [default: 1s].
    #[arg(long, value_name = "DURATION")]
    quiet: Option<String>,
    /// Validity of each signed generation, e.g. `7d` [default: 7d].
    #[arg(long, value_name = "DURATION")]
    expiry: Option<String>,
    /// How changed files enter the store: `link` (hash in place and
    /// hard-link; private copies are made lazily) or `copy` [default: link].
    #[arg(long, value_name = "MODE")]
    snapshot: Option<String>,
    /// Scan and publish once (if anything changed), print a summary and exit.
    #[arg(long)]
    pub once: bool,
    /// Check the configuration (with the key file and content directory),
    /// print a summary and exit: 0 if it would start, 1 with the reason if
    /// not.
    #[arg(long)]
    pub check: bool,
}

impl OriginArgs {
    pub(crate) fn into_config(self) -> anyhow::Result<meridian_origin::OriginConfig> {
        let mut t = load_table(self.config.as_ref())?;
        if self.once && self.quiet.is_none() && !t.contains_key("quiet") {
            // A one-shot publish does not wait for files to settle.
            t.insert("quiet".into(), toml::Value::String("0s".into()));
        }
        set(
            &mut t,
            "content",
            self.content.map(|p| p.display().to_string()),
        );
        set(&mut t, "state", self.state.map(|p| p.display().to_string()));
        set(
            &mut t,
            "key_file",
            self.key_file.map(|p| p.display().to_string()),
        );
        self.tls.apply(self.listen, &mut t);
        set(&mut t, "quiet", self.quiet);
        set(&mut t, "expiry", self.expiry);
        set(&mut t, "snapshot", self.snapshot);
        parse(
            t,
            "origin",
            self.config.as_deref(),
            "content, state and key_file",
        )
    }
}

/// Flags of `meridian mirror`.
#[derive(Debug, Clone, Args)]
pub(crate) struct MirrorArgs {
    /// TOML config file (see deploy/mirror.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Name of this mirror, shown in status.
    #[arg(long, env = "MERIDIAN_ID")]
    id: Option<String>,
    /// Region label, shown in status.
    #[arg(long, env = "MERIDIAN_REGION")]
    region: Option<String>,
    /// Upstream base URL (origin or another mirror); repeat for failover, in
    /// order (the variable: comma-separated).
    #[arg(
        long = "upstream",
        value_name = "URL",
        env = "MERIDIAN_UPSTREAMS",
        value_delimiter = ','
    )]
    upstreams: Vec<String>,
    /// Trusted public key `ed25519:<hex>`; repeat to trust several (a backup
    /// key; the variable: comma-separated).
    #[arg(
        long = "trust",
        value_name = "PUBKEY",
        env = "MERIDIAN_TRUST",
        value_delimiter = ','
    )]
    trust: Vec<String>,
    /// State directory: objects, verified roots, partial downloads.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    tls: ListenArgs,
    /// Egress capacity in bytes per second (not bits), reported to GeoDNS,
    /// which steers clients elsewhere near it; e.g. 125000000 for 1 Gbit/s
    /// [default: 1250000000, 10 Gbit/s].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    capacity: Option<u64>,
    /// Enforce an egress cap: most body bytes per second sent in all (the
    /// capacity reported is then at most this) [default: no cap].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    egress_cap: Option<u64>,
    /// Enforce an egress cap per connection, in bytes per second [default:
    /// no cap].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    egress_cap_per_connection: Option<u64>,
    /// Bearer token that enables the admin API (drain/undrain).
    #[arg(long, value_name = "TOKEN", env = "MERIDIAN_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Start a pass that re-verifies every served object this often, e.g.
    /// `24h` (the first starts at boot); `0s` disables [default: 24h].
    #[arg(long, value_name = "DURATION")]
    scrub_interval: Option<String>,
    /// Most bytes per second a scrub pass reads [default: 33554432, 32 MiB/s].
    #[arg(long, value_name = "BYTES_PER_SEC")]
    scrub_rate: Option<u64>,
    /// Fallback poll interval / long-poll length, e.g. `30s`.
    #[arg(long, value_name = "DURATION")]
    poll_interval: Option<String>,
    /// How long blobs that left the served generation are kept, e.g. `10m`.
    #[arg(long, value_name = "DURATION")]
    gc_grace: Option<String>,
    /// Bytes of disk to keep free; a sync that would eat into them is refused.
    #[arg(long, value_name = "BYTES")]
    reserve_free: Option<u64>,
    /// Start without the rollback floor: accept the first root an upstream
    /// offers even if it is older than one this mirror verified before.
    /// Only for a mirror that lost its record of the highest generation it
    /// verified (it then refuses every root until started with this).
    #[arg(long)]
    accept_lower_generation: bool,
    /// Check the configuration, print a summary and exit: 0 if it would
    /// start, 1 with the reason if not.
    #[arg(long)]
    pub check: bool,
}

impl MirrorArgs {
    pub(crate) fn into_config(self) -> anyhow::Result<meridian_mirror::MirrorConfig> {
        let mut t = load_table(self.config.as_ref())?;
        if let Some(p) = &self.config
            && t.contains_key("admin_token")
        {
            meridian_serve::auth::warn_if_readable(p, "admin_token");
        }
        set(&mut t, "id", self.id);
        set(&mut t, "region", self.region);
        if !self.upstreams.is_empty() {
            t.insert(
                "upstreams".into(),
                toml::Value::Array(
                    self.upstreams
                        .into_iter()
                        .map(toml::Value::String)
                        .collect(),
                ),
            );
        }
        if !self.trust.is_empty() {
            t.insert(
                "trust".into(),
                toml::Value::Array(self.trust.into_iter().map(toml::Value::String).collect()),
            );
        }
        set(&mut t, "state", self.state.map(|p| p.display().to_string()));
        self.tls.apply(self.listen, &mut t);
        for (key, v) in [
            ("capacity_bytes_per_sec", self.capacity),
            ("egress_cap_bytes_per_sec", self.egress_cap),
            (
                "egress_cap_per_connection_bytes_per_sec",
                self.egress_cap_per_connection,
            ),
        ] {
            if let Some(c) = v {
                t.insert(
                    key.into(),
                    toml::Value::Integer(c.min(i64::MAX as u64) as i64),
                );
            }
        }
        set(&mut t, "admin_token", self.admin_token);
        set(&mut t, "scrub_interval", self.scrub_interval);
        if let Some(r) = self.scrub_rate {
            t.insert(
                "scrub_bytes_per_sec".into(),
                toml::Value::Integer(r.min(i64::MAX as u64) as i64),
            );
        }
        set(&mut t, "poll_interval", self.poll_interval);
        set(&mut t, "gc_grace", self.gc_grace);
        if self.accept_lower_generation {
            t.insert("accept_lower_generation".into(), toml::Value::Boolean(true));
        }
        if let Some(r) = self.reserve_free {
            t.insert(
                "reserve_free_bytes".into(),
                toml::Value::Integer(r.min(i64::MAX as u64) as i64),
            );
        }
        parse(
            t,
            "mirror",
            self.config.as_deref(),
            "id, upstreams, trust and state",
        )
    }
}

#[cfg(test)]
mod tests {
    /// The commented examples in deploy/ are real configs: each parses, with
    /// every key it sets known to its type.
    #[test]
    fn deploy_examples_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("example");
        let o: meridian_origin::OriginConfig =
            toml::from_str(&read("origin.toml")).expect("origin");
        assert_eq!(o.snapshot, meridian_origin::scan::Snapshot::Link);
        let _: meridian_mirror::config::MirrorConfig =
            toml::from_str(&read("mirror.toml")).expect("mirror");
        meridian_geodns::config::GeoDnsConfig::load(&dir.join("geodns.toml")).expect("geodns");
    }
}
