//! The rollback floor: the highest generation this mirror has ever verified.
//! A root below it is never accepted, whatever happened to the local state.
//!
//! The served generation guards against a replay while the mirror runs
//! ([`meridian_core::Verifier::verify_latest`] refuses anything not newer).
//! Across a restart the guard must survive damage to `current` or to
//! `roots/`, so the floor is kept in two independent places and the higher
//! one wins:
//!
//! - `highest`: `<generation> <root hash>`, written (atomically) as soon as
//!   a root newer than the floor verifies, before anything is fetched for it;
//! - the retained roots in `roots/`: each is re-verified at start, and the
//!   highest that verifies counts.
//!
//! At the floor itself only the very root recorded there is accepted (a
//! second root with the same number would be a fork). When neither place
//! gives a floor but the store holds objects, the record was lost: the
//! mirror says so loudly and accepts no root at all until an operator
//! restarts it with `accept_lower_generation` (`--accept-lower-generation`).

use crate::state::MirrorState;
use meridian_core::{Hash, VerifiedRoot};
use meridian_serve::StoreError;
use meridian_serve::store::write_atomic;
use std::path::{Path, PathBuf};

/// What a mirror may accept, as established at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Floor {
    /// Nothing below `generation`; at `generation`, only the root `hash`.
    Known { generation: u64, hash: Option<Hash> },
    /// The record of the highest verified generation is lost and could not
    /// be rebuilt: every root is refused until an operator decides.
    Lost(String),
}

impl Default for Floor {
    fn default() -> Self {
        Floor::Known {
            generation: 0,
            hash: None,
        }
    }
}

/// Why a root is below the floor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BelowFloor {
    #[error(
        "rollback: offered generation {offered}, but this mirror has verified generation {floor} before (recorded in `highest` and `roots/`)"
    )]
    Older { floor: u64, offered: u64 },
    #[error(
        "fork: offered a different root for generation {generation} than the one this mirror verified before ({known}, offered {offered})"
    )]
    Fork {
        generation: u64,
        known: Hash,
        offered: Hash,
    },
    #[error(
        "{0}; refusing every root, since accepting one could roll this mirror back. If the upstream is trusted to be current, restart with --accept-lower-generation (accept_lower_generation = true)"
    )]
    Lost(String),
}

fn highest_path(state_dir: &Path) -> PathBuf {
    state_dir.join("highest")
}

/// `highest` as written: `Ok(None)` if there is none, `Err` with a reason
/// if it is damaged.
fn read_highest(path: &Path) -> Result<Option<(u64, Hash)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let damaged = || format!("{} is damaged", path.display());
    let text = std::str::from_utf8(&bytes).map_err(|_| damaged())?;
    let (n, h) = text.trim().split_once(' ').ok_or_else(damaged)?;
    let n = n.parse::<u64>().map_err(|_| damaged())?;
    let h = h.parse::<Hash>().map_err(|_| damaged())?;
    Ok(Some((n, h)))
}

/// Establishes the floor at start from `highest` and the retained roots
/// (those that verify), stores it in `state` and returns it.
pub(crate) fn establish(state: &MirrorState, retained: &[VerifiedRoot]) -> Floor {
    let path = highest_path(&state.cfg().state);
    let recorded = read_highest(&path);
    let from_roots = retained
        .iter()
        .max_by_key(|v| v.root.generation)
        .map(|v| (v.root.generation, v.hash));
    let best = match (&recorded, from_roots) {
        (Ok(Some(a)), Some(b)) => Some(if b.0 > a.0 { b } else { *a }),
        (Ok(Some(a)), None) => Some(*a),
        (_, b) => b,
    };
    if let Err(why) = &recorded {
        tracing::error!(path = %path.display(), "{why}; the rollback floor is taken from the retained roots");
    }
    let floor = match best {
        _ if state.cfg().accept_lower_generation => {
            tracing::warn!(
                "accept_lower_generation is set: starting without a rollback floor; the first root an upstream offers is accepted, whatever its generation"
            );
            Floor::default()
        }
        Some((generation, hash)) => Floor::Known {
            generation,
            hash: Some(hash),
        },
        None if recorded.is_err() || store_has_objects(state) => {
            let why = match &recorded {
                Err(why) => format!("{why} and no retained root verifies"),
                Ok(_) => format!(
                    "{} holds objects but no record of the highest generation it verified (`highest` and `roots/` are gone)",
                    state.cfg().state.display()
                ),
            };
            tracing::error!(
                "{why}: refusing every root until an operator restarts this mirror with --accept-lower-generation"
            );
            Floor::Lost(why)
        }
        None => Floor::default(),
    };
    // Re-record what was rebuilt, so the next start does not depend on the
    // roots alone.
    if let Floor::Known {
        generation,
        hash: Some(hash),
    } = &floor
        && recorded != Ok(Some((*generation, *hash)))
        && let Err(e) = write_highest(&state.cfg().state, *generation, hash)
    {
        tracing::error!(error = %e, "cannot record the rollback floor");
    }
    if let Ok(mut f) = state.floor.lock() {
        *f = floor.clone();
    }
    floor
}

fn store_has_objects(state: &MirrorState) -> bool {
    state.store.holds_any()
}

fn write_highest(state_dir: &Path, generation: u64, hash: &Hash) -> Result<(), StoreError> {
    write_atomic(
        &highest_path(state_dir),
        format!("{generation} {hash}\n").as_bytes(),
    )
}

/// Whether `vr` may be accepted: not below the floor, and at the floor only
/// the recorded root.
pub(crate) fn check(state: &MirrorState, vr: &VerifiedRoot) -> Result<(), BelowFloor> {
    let floor = state.floor.lock().map(|f| f.clone()).unwrap_or_default();
    match floor {
        Floor::Lost(why) => Err(BelowFloor::Lost(why)),
        Floor::Known { generation, .. } if vr.root.generation < generation => {
            Err(BelowFloor::Older {
                floor: generation,
                offered: vr.root.generation,
            })
        }
        Floor::Known {
            generation,
            hash: Some(known),
        } if vr.root.generation == generation && vr.hash != known => Err(BelowFloor::Fork {
            generation,
            known,
            offered: vr.hash,
        }),
        Floor::Known { .. } => Ok(()),
    }
}

/// Raises the floor to a root that just verified (blocking: writes and
/// fsyncs `highest`). A root at or below the floor changes nothing. The
/// lock is held through the write, so records can never land out of order.
pub(crate) fn raise(state: &MirrorState, vr: &VerifiedRoot) -> Result<(), StoreError> {
    let n = vr.root.generation;
    let Ok(mut floor) = state.floor.lock() else {
        return Ok(());
    };
    let above = match &*floor {
        Floor::Known { generation, .. } => n > *generation,
        Floor::Lost(_) => true,
    };
    if !above {
        return Ok(());
    }
    write_highest(&state.cfg().state, n, &vr.hash)?;
    *floor = Floor::Known {
        generation: n,
        hash: Some(vr.hash),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_round_trips_and_damage_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = meridian_core::hash_bytes(b"root");
        assert_eq!(read_highest(&dir.path().join("highest")), Ok(None));
        write_highest(dir.path(), 7, &h).expect("write");
        assert_eq!(read_highest(&dir.path().join("highest")), Ok(Some((7, h))));
        for bad in [&b"garbage"[..], b"", b"999", b"\xff\xfe 1", b"7 nothex"] {
            std::fs::write(dir.path().join("highest"), bad).expect("write");
            assert!(
                read_highest(&dir.path().join("highest")).is_err(),
                "{bad:?}"
            );
        }
    }
}
