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

fn set(t: &mut toml::Table, key: &str, v: Option<impl ToString>) {
    if let Some(v) = v {
        t.insert(key.to_owned(), toml::Value::String(v.to_string()));
    }
}

/// Flags of `meridian origin`.
#[derive(Debug, Args)]
pub struct OriginArgs {
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
    /// HTTPS listen address (needs --tls-cert and --tls-key).
    #[arg(long, value_name = "ADDR")]
    listen_tls: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Quiet period before publishing, e.g. `1s`, `500ms` [default: 1s].
    #[arg(long, value_name = "DURATION")]
    quiet: Option<String>,
    /// Validity of each signed generation, e.g. `7d` [default: 7d].
    #[arg(long, value_name = "DURATION")]
    expiry: Option<String>,
}

impl OriginArgs {
    pub fn into_config(self) -> anyhow::Result<meridian_origin::OriginConfig> {
        let mut t = load_table(self.config.as_ref())?;
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
        set(&mut t, "listen", self.listen);
        set(&mut t, "listen_tls", self.listen_tls);
        set(
            &mut t,
            "tls_cert",
            self.tls_cert.map(|p| p.display().to_string()),
        );
        set(
            &mut t,
            "tls_key",
            self.tls_key.map(|p| p.display().to_string()),
        );
        set(&mut t, "quiet", self.quiet);
        set(&mut t, "expiry", self.expiry);
        t.try_into()
            .context("invalid origin configuration (need at least content, state and key_file)")
    }
}
