//! The status document a mirror publishes at `GET /.meridian/status`: one
//! type, written by the mirror and read by GeoDNS (and by anything else
//! that watches mirrors, tests included). Readers take what they know:
//! every field but `generation` has a default, so an older or newer mirror
//! still parses.

use serde::{Deserialize, Serialize};

/// What a mirror reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// The mirror's name and region label, from its config.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub region: String,
    /// The served generation (0: none yet).
    pub generation: u64,
    /// The newest served generation flushed to disk.
    #[serde(default)]
    pub durable_generation: u64,
    #[serde(default)]
    pub root_hash: Option<String>,
    /// When the served generation expires (Unix seconds).
    #[serde(default)]
    pub expires: Option<i64>,
    /// The served generation has expired.
    #[serde(default)]
    pub stale: bool,
    /// The newest generation seen at any upstream.
    #[serde(default)]
    pub upstream_generation: u64,
    /// Unix time of the last successful sync or up-to-date check.
    #[serde(default)]
    pub last_sync: Option<i64>,
    #[serde(default)]
    pub sync_state: SyncState,
    /// The last sync error, with its whole cause, while `sync_state` is
    /// `error`.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Client connections open as the document is made, besides the one
    /// asking for it.
    #[serde(default)]
    pub active_connections: u64,
    /// File downloads being sent as the document is made (health probes
    /// and idle keep-alive connections are not downloads): a drained
    /// mirror is done when this is 0.
    #[serde(default)]
    pub downloads_in_flight: u64,
    /// Body bytes sent per second (smoothed over about 2 s).
    #[serde(default)]
    pub egress_bytes_per_sec: u64,
    /// Configured egress capacity, bytes per second.
    #[serde(default)]
    pub capacity_bytes_per_sec: u64,
    /// Set by SIGTERM or the drain admin call: give it no new clients.
    #[serde(default)]
    pub draining: bool,
    /// The sync under way, if any.
    #[serde(default)]
    pub sync_progress: Option<SyncProgress>,
    /// The keys this mirror trusts to sign roots, for any generation (its
    /// configured keys and those key statements brought in).
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Bytes its store holds.
    #[serde(default)]
    pub store_bytes: u64,
    /// Bytes free on the store's file system (`None`: not known).
    #[serde(default)]
    pub disk_free_bytes: Option<u64>,
    /// The newest root this mirror refused (or an upstream found behind
    /// it), while that lasts: the mirror keeps serving what it has.
    #[serde(default)]
    pub refused: Option<RefusedRoot>,
}

impl MirrorStatus {
    /// The document as a page for a browser (`Accept: text/html`): every
    /// field, times as dates (UTC) and ages, no script and nothing loaded
    /// from elsewhere.
    pub fn to_html(&self, now: i64) -> String {
        use crate::files::html_escape as esc;
        let date = |t: i64| {
            let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64);
            humantime::format_rfc3339_seconds(st).to_string()
        };
        let span = |secs: i64| {
            humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()))
                .to_string()
        };
        let when = |t: Option<i64>, future: bool| match t {
            None => "never".to_owned(),
            Some(t) if future && t >= now => format!("{} (in {})", date(t), span(t - now)),
            Some(t) if future => format!("{} (expired {} ago)", date(t), span(now - t)),
            Some(t) => format!("{} ({} ago)", date(t), span(now - t)),
        };
        let lag = self.upstream_generation.saturating_sub(self.generation);
        let load = match self.capacity_bytes_per_sec {
            0 => format!("{} B/s", self.egress_bytes_per_sec),
            c => format!(
                "{} B/s of {} B/s ({:.1}%)",
                self.egress_bytes_per_sec,
                c,
                self.egress_bytes_per_sec as f64 * 100.0 / c as f64
            ),
        };
        let state = match self.sync_state {
            SyncState::Starting => "starting",
            SyncState::Idle => "idle (up to date)",
            SyncState::Syncing => "syncing",
            SyncState::Error => "error",
        };
        let mut rows: Vec<(&str, String)> = vec![
            ("Serving generation", self.generation.to_string()),
            ("Flushed to disk", self.durable_generation.to_string()),
            (
                "Newest upstream generation",
                self.upstream_generation.to_string(),
            ),
            (
                "Behind by",
                match lag {
                    0 => "0: current".to_owned(),
                    n => format!("{n} generation(s)"),
                },
            ),
            (
                "Root hash",
                self.root_hash.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "Signature expires",
                when(self.expires, true) + if self.stale { " — STALE" } else { "" },
            ),
            ("Sync state", state.to_owned()),
            ("Last sync or check", when(self.last_sync, false)),
            ("Open connections", self.active_connections.to_string()),
            ("Downloads in flight", self.downloads_in_flight.to_string()),
            ("Egress", load),
            (
                "Draining",
                if self.draining {
                    "yes: no new clients"
                } else {
                    "no"
                }
                .to_owned(),
            ),
        ];
        rows.push(("Store", format!("{} bytes", self.store_bytes)));
        if let Some(f) = self.disk_free_bytes {
            rows.push(("Disk free", format!("{f} bytes")));
        }
        if !self.trusted_keys.is_empty() {
            rows.push(("Trusted keys", self.trusted_keys.join(", ")));
        }
        if let Some(e) = &self.last_error {
            rows.push(("Last error", e.clone()));
        }
        if let Some(p) = &self.sync_progress {
            rows.push(("Sync under way", p.to_string()));
        }
        if let Some(r) = &self.refused {
            rows.push((
                "Refused root",
                format!(
                    "{}: generation {} from {} (serving {}), since {}: {}",
                    r.reason,
                    r.offered,
                    r.upstream,
                    r.served,
                    when(Some(r.since), false),
                    r.error
                ),
            ));
        }
        let mut body = String::new();
        for (k, v) in rows {
            body.push_str(&format!(
                "<tr><th scope=\"row\">{k}</th><td>{}</td></tr>\n",
                esc(&v)
            ));
        }
        let title = if self.region.is_empty() {
            format!("Mirror {}", self.id)
        } else {
            format!("Mirror {} ({})", self.id, self.region)
        };
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><meta http-equiv=\"refresh\" content=\"10\"><title>{t}</title><style>body{{font-family:system-ui,sans-serif;margin:1em;max-width:60em}}th{{text-align:left;padding-right:1em;vertical-align:top}}td{{word-break:break-word}}</style></head>\n<body><h1>{t}</h1>\n<table>\n{body}</table>\n<p>Times in UTC, as of {now}. This page reloads every 10 s. The same document as JSON: <code>curl {path}</code>.</p></body></html>\n",
            t = esc(&title),
            now = date(now),
            path = "/.meridian/status",
        )
    }
}

/// A root a mirror would not take, with both generations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRoot {
    pub upstream: String,
    /// The generation the upstream offers.
    pub offered: u64,
    /// The generation this mirror serves.
    pub served: u64,
    /// `rollback`, `broken_chain`, `unknown_key`, `bad_signature`,
    /// `expired`, `malformed`, `below_floor` or `upstream_behind`.
    pub reason: String,
    /// The whole message, with what to do.
    pub error: String,
    /// Unix time it was first seen.
    pub since: i64,
}

/// What the syncer is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    #[default]
    Starting,
    Idle,
    Syncing,
    Error,
}

/// How far a sync has got: the blobs it has to fetch, done and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub generation: u64,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

impl SyncProgress {
    /// `57` for 57% of the bytes (100 for nothing to fetch).
    pub fn percent(&self) -> u64 {
        (self.bytes_done.saturating_mul(100))
            .checked_div(self.bytes_total)
            .unwrap_or(100)
            .min(100)
    }
}

impl std::fmt::Display for SyncProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {}: {} of {} files, {} of {} bytes ({}%)",
            self.generation,
            self.files_done,
            self.files_total,
            self.bytes_done,
            self.bytes_total,
            self.percent()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_a_sparse_document_still_parses() {
        let s = MirrorStatus {
            id: "m".into(),
            generation: 7,
            sync_state: SyncState::Syncing,
            sync_progress: Some(SyncProgress {
                generation: 8,
                files_done: 1,
                files_total: 4,
                bytes_done: 400,
                bytes_total: 1000,
            }),
            ..Default::default()
        };
        let text = serde_json::to_string(&s).expect("json");
        assert!(text.contains("\"sync_state\":\"syncing\""), "{text}");
        assert_eq!(
            serde_json::from_str::<MirrorStatus>(&text).expect("parse"),
            s
        );
        let sparse: MirrorStatus =
            serde_json::from_str(r#"{"generation": 3, "unknown": 1}"#).expect("sparse");
        assert_eq!(
            (sparse.generation, sparse.sync_state),
            (3, SyncState::Starting)
        );
        assert!(
            serde_json::from_str::<MirrorStatus>("{}").is_err(),
            "generation is required"
        );
    }
}
