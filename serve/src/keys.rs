//! The key statements a node holds, as it stores and serves them.
//!
//! Origin and mirrors keep their [`Keyring`]'s statements in one file,
//! `keyring` in the state directory, written atomically. Every read API
//! answer names the set in `X-Meridian-Keys` (its [`Keyring::id`]), and
//! `GET /.meridian/v1/keys` serves the list, so a mirror learns of a
//! rotation or revocation from any upstream, checks each statement itself
//! and passes it on.

use crate::store::{StoreError, write_atomic};
use meridian_core::{Hash, Keyring, TrustedKeys};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The response header naming a node's statement set.
pub const KEYS_HEADER: &str = "x-meridian-keys";
/// Media type of a statement list.
pub(crate) const KEYS_CONTENT_TYPE: &str = "application/x-meridian-keys";

/// A keyring's statements, ready to serve.
#[derive(Debug)]
pub struct KeysDoc {
    pub id: Hash,
    pub(crate) header: http::HeaderValue,
    pub(crate) bytes: bytes::Bytes,
}

impl KeysDoc {
    pub fn of(ring: &Keyring) -> Arc<Self> {
        let id = ring.id();
        Arc::new(KeysDoc {
            id,
            header: http::HeaderValue::from_str(&id.to_string())
                .expect("a hash is a valid header value"),
            bytes: ring.encode().into(),
        })
    }
}

/// Where a state directory keeps its statements.
pub fn keyring_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keyring")
}

/// The keyring of `trusted` and the statements stored in `state_dir`. A
/// damaged file or a statement that is not authorised is logged and left
/// out: trust only ever shrinks from damage, and an upstream's list
/// restores it.
pub fn load(state_dir: &Path, trusted: &TrustedKeys) -> Keyring {
    let mut ring = Keyring::new(trusted);
    let path = keyring_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => match ring.add_list(&bytes) {
            Ok((_, refused)) => {
                for e in refused {
                    tracing::warn!(path = %path.display(), error = %e, "stored key statement left out");
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "stored key statements are damaged and left out; an upstream's list restores them")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the stored key statements; left out")
        }
    }
    ring
}

/// Stores `ring`'s statements in `state_dir` (atomically, durably).
pub fn save(state_dir: &Path, ring: &Keyring) -> Result<(), StoreError> {
    write_atomic(&keyring_path(state_dir), &ring.encode())
}

/// Reads a config's `trust = ["ed25519:<hex>", ...]`, naming a bad key.
pub fn de_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<meridian_core::PublicKey>, D::Error> {
    use serde::Deserialize;
    let v: Vec<String> = Vec::deserialize(d)?;
    v.iter()
        .map(|s| {
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("trust key {s:?}: {e}")))
        })
        .collect()
}
