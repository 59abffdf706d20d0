//! ed25519 keys and their text forms.
//!
//! A public key is written `ed25519:` followed by 64 hex digits, so it can be
//! pasted into a command line or a config file. A secret key file holds one
//! line, `meridian-secret-key-v1 <64 hex digits of the seed>`.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::fmt;
use std::str::FromStr;

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "meridian-secret-key-v1 ";

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("public key must look like `ed25519:<64 hex digits>`")]
    PublicFormat,
    #[error("not a valid ed25519 public key (not a curve point)")]
    NotAPoint,
    #[error("secret key file must hold one line `meridian-secret-key-v1 <64 hex digits>`")]
    SecretFormat,
}

/// A public key that may verify roots: 32 bytes known to be a valid point
/// (kept compressed so errors and envelopes that carry it stay small).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(b: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(b)
            .map(|_| PublicKey(*b))
            .map_err(|_| KeyError::NotAPoint)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Strict verification (rejects malleable and small-order signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hexpart = s
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or(KeyError::PublicFormat)?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(hexpart, &mut b).map_err(|_| KeyError::PublicFormat)?;
        PublicKey::from_bytes(&b)
    }
}

/// A signing key. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A key from 32 bytes of good randomness (the caller supplies them:
    /// this crate does no I/O).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
    /// The text of a secret key file.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", hex::encode(self.0.to_bytes()))
    }
    /// Parses the text of a secret key file.
    pub fn from_file_text(text: &str) -> Result<Self, KeyError> {
        let hexpart = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(KeyError::SecretFormat)?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(hexpart.trim(), &mut b).map_err(|_| KeyError::SecretFormat)?;
        Ok(SecretKey::from_seed(b))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {}, secret redacted)", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip_and_debug_hides_secret() {
        let sk = SecretKey::from_seed([7; 32]);
        let text = sk.to_file_text();
        let back = SecretKey::from_file_text(&text).expect("parses");
        assert_eq!(back.public(), sk.public());
        let pk_text = sk.public().to_string();
        assert!(pk_text.starts_with("ed25519:"));
        assert_eq!(pk_text.parse::<PublicKey>(), Ok(sk.public()));
        let dbg = format!("{sk:?}");
        assert!(!dbg.contains(&hex::encode([7u8; 32])));
        assert_eq!(
            "ed25519:zz".parse::<PublicKey>(),
            Err(KeyError::PublicFormat)
        );
        assert!(SecretKey::from_file_text("garbage").is_err());
    }
}
