//! The origin's signing keys over time: rotation, revocation, and the lock
//! that keeps one origin (or one key command) on a state directory.
//!
//! The origin's keyring trusts its own key and every key that signed a
//! statement stored in its state (`keyring`): the state directory is its
//! own, and each statement's signatures are still checked. A rotation is
//! made in one of two ways, with the same statement:
//!
//! - a running origin whose `key_file` now holds another key is reloaded
//!   (SIGHUP): it signs "from generation N, roots are signed by NEW; OLD is
//!   retired" with both keys, N being its next generation, and signs that
//!   generation with NEW. Publishing and rotating share one thread, so no
//!   root signed by OLD can slip in at N;
//! - `meridian key rotate --state DIR --old OLD --new NEW` does the same for
//!   a stopped origin (it takes the state lock, so it refuses while an
//!   origin runs there), and the origin is then started with NEW.
//!
//! A revocation (`meridian key revoke`) is signed by another key in force;
//! a running origin takes it up on its next reload.

use crate::publisher::list_generations;
use meridian_core::{
    Change, Keyring, PublicKey, SecretKey, SignedStatement, Statement, TrustedKeys, VerifyError,
};
use std::path::{Path, PathBuf};

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyOpError {
    #[error(
        "state directory {path} is in use by a running origin (its lock {path}/lock is held); stop the origin first, or rotate a running origin by pointing its key_file at the new key and reloading it (systemctl reload, or kill -HUP)"
    )]
    Locked { path: PathBuf },
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} holds no published generation: there is nothing to rotate; start the origin with the new key"
    )]
    NothingPublished { path: PathBuf },
    #[error("the newest generation {generation} in {path} does not verify: {source}")]
    BadLatest {
        path: PathBuf,
        generation: u64,
        source: VerifyError,
    },
    #[error(
        "the key given as --old ({key}) may not sign generation {generation} of this origin: {source}; pass the key that signs its newest generation"
    )]
    NotInForce {
        key: PublicKey,
        generation: u64,
        source: VerifyError,
    },
    #[error("{0}")]
    Statement(#[from] meridian_core::StatementError),
    #[error(transparent)]
    Store(#[from] meridian_serve::StoreError),
}

/// An exclusive lock on an origin state directory, held while it lives.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// Takes the state directory's lock, or says who holds it.
pub fn lock_state(state: &Path) -> Result<StateLock, KeyOpError> {
    let io = |source| KeyOpError::Io {
        path: state.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(state).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state.join("lock"))
        .map_err(io)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |e| match e {
            rustix::io::Errno::WOULDBLOCK => KeyOpError::Locked {
                path: state.to_path_buf(),
            },
            e => io(e.into()),
        },
    )?;
    Ok(StateLock { _file: file })
}

/// The origin's keyring: its own key, every key that signed a stored
/// statement, and the stored statements.
pub(crate) fn load(state: &Path, own: PublicKey) -> Keyring {
    let mut trusted = vec![own];
    if let Ok(bytes) = std::fs::read(meridian_serve::keys::keyring_path(state))
        && let Ok(list) = meridian_core::keyring::decode_list(&bytes)
    {
        for env in list {
            if let Ok(s) = SignedStatement::decode(env) {
                trusted.extend(
                    s.signers()
                        .filter(|k| !trusted.contains(k))
                        .collect::<Vec<_>>(),
                );
            }
        }
    }
    meridian_serve::keys::load(state, &TrustedKeys::new(trusted))
}

/// The rotation statement from `old` to `new` at `from_generation`, taken
/// up by `ring` (which must let `old` sign that generation).
pub(crate) fn rotation(
    ring: &mut Keyring,
    old: &SecretKey,
    new: &SecretKey,
    from_generation: u64,
) -> Result<SignedStatement, KeyOpError> {
    ring.check(&old.public(), from_generation)
        .map_err(|source| KeyOpError::NotInForce {
            key: old.public(),
            generation: from_generation,
            source,
        })?;
    let s = SignedStatement::sign(
        Statement {
            from_generation,
            created: meridian_serve::unix_now(),
            change: Change::Rotate {
                old: old.public(),
                new: new.public(),
            },
        },
        &[old, new],
    );
    ring.add(&s.encode())?;
    Ok(s)
}

/// The number of the newest stored generation.
fn newest_number(state: &Path) -> Result<u64, KeyOpError> {
    list_generations(&state.join("roots"))
        .unwrap_or_default()
        .into_iter()
        .max()
        .ok_or_else(|| KeyOpError::NothingPublished {
            path: state.to_path_buf(),
        })
}

/// The newest stored generation of a stopped origin's state, verified
/// with its keyring.
fn latest(state: &Path, ring: &Keyring) -> Result<u64, KeyOpError> {
    let g = newest_number(state)?;
    let path = state.join("roots").join(format!("{g:020}.root"));
    let bytes = std::fs::read(&path).map_err(|source| KeyOpError::Io {
        path: path.clone(),
        source,
    })?;
    meridian_core::Verifier::with_keyring(ring.clone())
        .open(&bytes)
        .map_err(|source| KeyOpError::BadLatest {
            path,
            generation: g,
            source,
        })?;
    Ok(g)
}

/// `meridian key rotate` on a stopped origin: from its next generation,
/// roots are signed by `new`. Safe to rerun: a rotation from `old` to `new`
/// already held is returned as it is (`true`: it was already there).
pub fn rotate_offline(
    state: &Path,
    old: &SecretKey,
    new: &SecretKey,
) -> Result<(SignedStatement, bool), KeyOpError> {
    let _lock = lock_state(state)?;
    let mut ring = load(state, old.public());
    let done = ring.statements().iter().find(|s| {
        s.statement.change
            == Change::Rotate {
                old: old.public(),
                new: new.public(),
            }
    });
    if let Some(s) = done {
        return Ok((s.clone(), true));
    }
    let next = latest(state, &ring)? + 1;
    let s = rotation(&mut ring, old, new, next)?;
    meridian_serve::keys::save(state, &ring)?;
    Ok((s, false))
}

/// `meridian key revoke`: from `from_generation` (default: the next
/// generation), roots signed by `key` are refused. Signed by `signer`,
/// another key in force then. A running origin takes it up on reload.
pub fn revoke(
    state: &Path,
    key: PublicKey,
    signer: &SecretKey,
    from_generation: Option<u64>,
) -> Result<SignedStatement, KeyOpError> {
    let mut ring = load(state, signer.public());
    let from = match from_generation {
        Some(n) => n,
        // The default only names a generation; the signer need not be the
        // key that signed it.
        None => newest_number(state)? + 1,
    };
    let s = SignedStatement::sign(
        Statement {
            from_generation: from.max(1),
            created: meridian_serve::unix_now(),
            change: Change::Revoke { key },
        },
        &[signer],
    );
    ring.add(&s.encode())?;
    meridian_serve::keys::save(state, &ring)?;
    Ok(s)
}
