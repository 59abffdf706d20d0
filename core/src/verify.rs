//! Verification of signed roots: the TUF-style checks every reader applies.
//!
//! Order of checks: encoding, key, signature, the key's generations
//! ([`Keyring`]), expiry, rollback, chain. Each
//! failure is a distinct [`VerifyError`] variant.

use crate::encoding::DecodeError;
use crate::hash::Hash;
use crate::keyring::Keyring;
use crate::keys::PublicKey;
use crate::manifest::{Root, SignedRoot, signing_message};

/// Why a signed root was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("signed root is malformed: {0}")]
    Malformed(#[from] DecodeError),
    #[error("root is signed by {0}, which is not a trusted key (add it with --trust)")]
    UnknownKey(PublicKey),
    #[error(
        "generation {generation} is signed by {key}, which a key statement retired or revoked from generation {since}: refusing a root signed by a retired key"
    )]
    RetiredKey {
        key: PublicKey,
        generation: u64,
        since: u64,
    },
    #[error(
        "generation {generation} is signed by {key}, which signs roots only from generation {from} (its rotation statement says so)"
    )]
    NotYetTrusted {
        key: PublicKey,
        generation: u64,
        from: u64,
    },
    #[error("bad signature on generation root (signed by {0})")]
    BadSignature(PublicKey),
    #[error("generation {generation} expired at {expires} (now {now}): refusing a frozen manifest")]
    Expired {
        generation: u64,
        expires: i64,
        now: i64,
    },
    #[error(
        "rollback or replay: offered generation {offered}, but generation {held} is already held"
    )]
    Rollback { held: u64, offered: u64 },
    #[error(
        "broken chain: generation {generation} names previous {claimed}, but generation {} hashes to {actual}",
        generation - 1
    )]
    BrokenChain {
        generation: u64,
        claimed: Hash,
        actual: Hash,
    },
}

impl VerifyError {
    /// A short name of the reason, for metrics and status documents.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnknownKey(_) => "unknown_key",
            VerifyError::RetiredKey { .. } => "retired_key",
            VerifyError::NotYetTrusted { .. } => "key_not_yet_valid",
            VerifyError::BadSignature(_) => "bad_signature",
            VerifyError::Expired { .. } => "expired",
            VerifyError::Rollback { .. } => "rollback",
            VerifyError::BrokenChain { .. } => "broken_chain",
        }
    }
}

/// The set of public keys a reader trusts. Several keys may be trusted at
/// once, so a key can be rotated: trust old and new during the overlap.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        TrustedKeys(keys.into_iter().collect())
    }
    pub fn contains(&self, k: &PublicKey) -> bool {
        self.0.contains(k)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.0.iter()
    }
}

/// A root whose signature checked out, with its exact bytes and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRoot {
    pub root: Root,
    /// `root.hash()`: what the next generation's `previous` must be.
    pub hash: Hash,
    /// The signed envelope, byte for byte, for serving it on.
    pub envelope: Vec<u8>,
}

/// Applies the checks with a keyring: the trusted keys, and which
/// generations each may sign ([`Keyring`]).
#[derive(Debug, Clone)]
pub struct Verifier {
    keyring: Keyring,
}

impl Verifier {
    /// The trusted keys, each good for every generation.
    pub fn new(keys: TrustedKeys) -> Self {
        Verifier {
            keyring: Keyring::new(&keys),
        }
    }

    /// The trusted keys as changed by key statements.
    pub fn with_keyring(keyring: Keyring) -> Self {
        Verifier { keyring }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Encoding, key (for the root's generation) and signature only: for
    /// historical roots on a chain walk.
    pub fn open(&self, envelope: &[u8]) -> Result<VerifiedRoot, VerifyError> {
        let signed = SignedRoot::decode(envelope)?;
        if !self.keyring.knows(&signed.key) {
            return Err(VerifyError::UnknownKey(signed.key));
        }
        if !signed
            .key
            .verify(&signing_message(&signed.body), &signed.signature)
        {
            return Err(VerifyError::BadSignature(signed.key));
        }
        let root = Root::decode(&signed.body)?;
        self.keyring.check(&signed.key, root.generation)?;
        Ok(VerifiedRoot {
            hash: root.hash(),
            root,
            envelope: envelope.to_vec(),
        })
    }

    /// Every check, for a root offered as the newest generation. `now` is
    /// seconds since the Unix epoch; `held` is the newest root the reader
    /// already trusts, if any.
    pub fn verify_latest(
        &self,
        envelope: &[u8],
        now: i64,
        held: Option<&VerifiedRoot>,
    ) -> Result<VerifiedRoot, VerifyError> {
        let v = self.open(envelope)?;
        check_fresh(&v.root, now)?;
        if let Some(held) = held {
            if v.root.generation <= held.root.generation {
                return Err(VerifyError::Rollback {
                    held: held.root.generation,
                    offered: v.root.generation,
                });
            }
            if v.root.generation == held.root.generation + 1 {
                check_link(held, &v)?;
            }
        }
        Ok(v)
    }
}

/// Fails if the root has expired at `now`.
pub fn check_fresh(root: &Root, now: i64) -> Result<(), VerifyError> {
    if now >= root.expires {
        return Err(VerifyError::Expired {
            generation: root.generation,
            expires: root.expires,
            now,
        });
    }
    Ok(())
}

/// Fails unless `next` is the direct successor of `prev`.
pub fn check_link(prev: &VerifiedRoot, next: &VerifiedRoot) -> Result<(), VerifyError> {
    if next.root.generation != prev.root.generation + 1 || next.root.previous != prev.hash {
        return Err(VerifyError::BrokenChain {
            generation: next.root.generation,
            claimed: next.root.previous,
            actual: prev.hash,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn root(generation: u64, previous: Hash) -> Root {
        Root {
            generation,
            created: 1000,
            expires: 2000,
            previous,
            tree: Hash([9; 32]),
            tree_size: 10,
            files: 1,
            bytes: 5,
        }
    }

    fn setup() -> (SecretKey, Verifier, VerifiedRoot) {
        let sk = SecretKey::from_seed([1; 32]);
        let v = Verifier::new(TrustedKeys::new([sk.public()]));
        let g1 = SignedRoot::sign(&root(1, Hash::ZERO), &sk).encode();
        let held = v.verify_latest(&g1, 1500, None).expect("genesis verifies");
        (sk, v, held)
    }

    #[test]
    fn accepts_a_good_successor() {
        let (sk, v, held) = setup();
        let g2 = SignedRoot::sign(&root(2, held.hash), &sk).encode();
        let got = v.verify_latest(&g2, 1500, Some(&held)).expect("verifies");
        assert_eq!(got.root.generation, 2);
        assert_eq!(got.envelope, g2);
    }

    #[test]
    fn each_attack_has_its_own_error() {
        let (sk, v, held) = setup();
        // Bad signature: flip a byte of the signature.
        let mut bad = SignedRoot::sign(&root(2, held.hash), &sk).encode();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            v.verify_latest(&bad, 1500, Some(&held)),
            Err(VerifyError::BadSignature(_))
        ));
        // Tampered body under a valid-looking envelope.
        let mut signed = SignedRoot::sign(&root(2, held.hash), &sk);
        signed.body[20] ^= 1;
        assert!(matches!(
            v.verify_latest(&signed.encode(), 1500, Some(&held)),
            Err(VerifyError::BadSignature(_))
        ));
        // Unknown key.
        let other = SecretKey::from_seed([2; 32]);
        let foreign = SignedRoot::sign(&root(2, held.hash), &other).encode();
        assert!(matches!(
            v.verify_latest(&foreign, 1500, Some(&held)),
            Err(VerifyError::UnknownKey(_))
        ));
        // Expired (freeze).
        let g2 = SignedRoot::sign(&root(2, held.hash), &sk).encode();
        assert!(matches!(
            v.verify_latest(&g2, 2000, Some(&held)),
            Err(VerifyError::Expired { .. })
        ));
        // Replay of the held generation, and rollback to an older one.
        assert!(matches!(
            v.verify_latest(&held.envelope, 1500, Some(&held)),
            Err(VerifyError::Rollback {
                held: 1,
                offered: 1
            })
        ));
        // Broken chain.
        let fork = SignedRoot::sign(&root(2, Hash([3; 32])), &sk).encode();
        assert!(matches!(
            v.verify_latest(&fork, 1500, Some(&held)),
            Err(VerifyError::BrokenChain { .. })
        ));
        // Malformed.
        assert!(matches!(
            v.verify_latest(b"MSIG\x01junk", 1500, None),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn rotation_trusts_old_and_new() {
        let old = SecretKey::from_seed([1; 32]);
        let new = SecretKey::from_seed([2; 32]);
        let v = Verifier::new(TrustedKeys::new([old.public(), new.public()]));
        let g1 = v
            .verify_latest(
                &SignedRoot::sign(&root(1, Hash::ZERO), &old).encode(),
                1500,
                None,
            )
            .expect("old key");
        let g2 = SignedRoot::sign(&root(2, g1.hash), &new).encode();
        assert!(v.verify_latest(&g2, 1500, Some(&g1)).is_ok());
    }

    #[test]
    fn after_a_rotation_the_old_key_signs_only_older_generations() {
        use crate::keyring::{Change, Statement};
        let old = SecretKey::from_seed([1; 32]);
        let new = SecretKey::from_seed([2; 32]);
        let mut ring = Keyring::new(&TrustedKeys::new([old.public()]));
        let st = crate::SignedStatement::sign(
            Statement {
                from_generation: 2,
                created: 0,
                change: Change::Rotate {
                    old: old.public(),
                    new: new.public(),
                },
            },
            &[&old, &new],
        );
        ring.add(&st.encode()).expect("authorised");
        let v = Verifier::with_keyring(ring);
        let g1 = v
            .verify_latest(
                &SignedRoot::sign(&root(1, Hash::ZERO), &old).encode(),
                1500,
                None,
            )
            .expect("the old key signs generation 1");
        let by_new = SignedRoot::sign(&root(2, g1.hash), &new).encode();
        assert!(v.verify_latest(&by_new, 1500, Some(&g1)).is_ok());
        let by_old = SignedRoot::sign(&root(2, g1.hash), &old).encode();
        let err = v
            .verify_latest(&by_old, 1500, Some(&g1))
            .expect_err("retired");
        assert_eq!(err.reason(), "retired_key");
        assert!(err.to_string().contains("retired"), "{err}");
    }
}
