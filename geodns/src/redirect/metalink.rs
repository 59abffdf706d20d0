//! Metalink v4 (RFC 5854) for one file: its size, SHA-256, piece hashes
//! and every mirror that serves its exact bytes, nearest first, so a
//! download manager (aria2) fetches from several at once and checks every
//! piece. The hashes come from [`super::digest`]: verified bytes only.

use super::digest::FileDigest;
use meridian_core::Hash;
use meridian_serve::files::html_escape as esc;
use std::fmt::Write;

/// The Metalink v4 media type (RFC 5854 §4.1).
pub(crate) const MEDIA_TYPE: &str = "application/metalink4+xml";

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The document for file `name` (the last path component) with blake3
/// `hash`, its digest, and `urls` (with the mirror's country), best first.
pub(crate) fn render(
    name: &str,
    hash: Hash,
    d: &FileDigest,
    urls: &[(String, Option<&str>)],
    generation: u64,
) -> String {
    let mut x = String::with_capacity(1024 + 80 * d.pieces.len() + 160 * urls.len());
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str("<metalink xmlns=\"urn:ietf:params:xml:ns:metalink\">\n");
    let _ = writeln!(
        x,
        "  <generator>meridian/{} (generation {generation}, blake3 {hash})</generator>",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(x, "  <file name=\"{}\">", esc(name));
    let _ = writeln!(x, "    <size>{}</size>", d.size);
    let _ = writeln!(x, "    <hash type=\"sha-256\">{}</hash>", hex(&d.sha256));
    let _ = writeln!(
        x,
        "    <pieces length=\"{}\" type=\"sha-256\">",
        d.piece_len
    );
    for p in &d.pieces {
        let _ = writeln!(x, "      <hash>{}</hash>", hex(p));
    }
    x.push_str("    </pieces>\n");
    for (i, (url, country)) in urls.iter().enumerate() {
        let loc = country
            .map(|c| format!(" location=\"{}\"", esc(c)))
            .unwrap_or_default();
        let _ = writeln!(
            x,
            "    <url{loc} priority=\"{}\">{}</url>",
            (i + 1).min(999_999),
            esc(url)
        );
    }
    x.push_str("  </file>\n</metalink>\n");
    x
}
