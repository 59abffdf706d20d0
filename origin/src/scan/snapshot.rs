//! Taking one changed file into the store: hashed in place and
//! hard-linked (`link`), or snapshotted and hashed from the snapshot
//! (`copy`), each checked against the stat key the walk saw so that a file
//! changing meanwhile is skipped and retried, never published half-written.

use super::SkipReason;
use crate::cache::StatKey;
use crate::linked::LinkedStore;
use meridian_core::Hash;
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub(super) enum IngestError {
    Skip(SkipReason),
    Store(meridian_serve::StoreError),
    /// No hard link possible here (another file system, or refused): copy.
    CannotLink,
}

/// Opens a file that must still have the stat key the walk saw.
pub(super) fn open_unchanged(abs: &Path, before: StatKey) -> Result<File, IngestError> {
    let src = File::open(abs).map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
    let md = src
        .metadata()
        .map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
    if StatKey::of(&md) != before {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    Ok(src)
}

/// Hashes one file where it is (the first half of a link snapshot): reads
/// exactly the size the walk saw and returns the open file, so that the
/// inode that was read can be linked later even if a rename replaces its
/// path meanwhile.
pub(super) fn hash_in_place(
    abs: &Path,
    before: StatKey,
    buf: &mut [u8],
) -> Result<(File, Hash), IngestError> {
    let mut src = open_unchanged(abs, before)?;
    let mut hasher = blake3::Hasher::new();
    let mut read = 0u64;
    // Read exactly the size the stat gave; growth shows up in the mtime.
    while read < before.size {
        let want = buf.len().min((before.size - read) as usize);
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(IngestError::Skip(SkipReason::Unreadable)),
        };
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != before.size {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    Ok((src, hasher.finalize().into()))
}

/// The second half of a link snapshot: hard-links the inode that hashed to
/// `h` into the store's `linked/` area. `held` is that inode's open file; a
/// file closed after hashing (more were waiting than the descriptor budget
/// allows) is opened again and must still have the walk's stat key, which
/// no write can leave unchanged. Returns the hash, whether the object was
/// new, and the file's stat key after linking (a link bumps the ctime;
/// caching the new key lets the next scan recognise the file). The file
/// must keep its inode, size and mtime from before the read to after the
/// link; whatever slips past that is caught when the link is copied, which
/// hashes again.
pub(super) fn link_hashed(
    store: &LinkedStore,
    abs: &Path,
    before: StatKey,
    held: Option<File>,
    h: Hash,
) -> Result<(Hash, bool, StatKey), IngestError> {
    let was_held = held.is_some();
    let src = match held {
        Some(f) => f,
        None => open_unchanged(abs, before)?,
    };
    let new = match store.link_in(&src, &h) {
        Ok(new) => new,
        // Renamed over or deleted since it was hashed: the inode has no name
        // left to link, but its bytes are still here; they are copied, and
        // kept only if they still hash to `h`.
        Err(_) if was_held && src.metadata().is_ok_and(|m| m.nlink() == 0) => {
            if store.contains(&h) {
                return Ok((h, false, before));
            }
            let mut src = src;
            src.seek(std::io::SeekFrom::Start(0))
                .map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
            return match store.objects.copy_verified(&mut src, &h, before.size) {
                Ok(true) => Ok((h, true, before)),
                Ok(false) => Err(IngestError::Skip(SkipReason::ChangedWhileHashing)),
                Err(e) => Err(IngestError::Store(e)),
            };
        }
        Err(_) => return Err(IngestError::CannotLink),
    };
    let after = src.metadata().map(|m| StatKey::of(&m)).ok();
    match after {
        Some(k)
            if k.dev == before.dev
                && k.ino == before.ino
                && k.size == before.size
                && k.mtime_ns == before.mtime_ns
                && (new || k.ctime_ns == before.ctime_ns) =>
        {
            Ok((h, new, k))
        }
        _ => Err(IngestError::Skip(SkipReason::ChangedWhileHashing)),
    }
}

/// Snapshots one file into the store and returns its hash and whether the
/// object was new. The hash is of the snapshot's bytes.
pub(super) fn ingest(
    store: &LinkedStore,
    abs: &Path,
    before: StatKey,
    buf: &mut [u8],
) -> Result<(Hash, bool, StatKey), IngestError> {
    let mut src = open_unchanged(abs, before)?;
    let store_err = |e| IngestError::Store(e);
    let mut w = store
        .objects
        .unnamed_writer(before.size)
        .map_err(store_err)?;
    // Snapshot first (a reflink where the file system can, else an
    // in-kernel copy), then hash the snapshot itself: the hash is of the
    // bytes that will be served, whatever the source does next.
    match w.snapshot_from(&mut src, before.size + 1, buf) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(28) => {
            return Err(store_err(meridian_serve::StoreError::io(
                w.staged_path(),
                e,
            )));
        }
        Err(_) => return Err(IngestError::Skip(SkipReason::Unreadable)),
    }
    let after = fs::symlink_metadata(abs).map(|m| StatKey::of(&m)).ok();
    if after != Some(before) || w.written() != before.size {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    let h = w.digest();
    if store.contains(&h) {
        return Ok((h, false, before));
    }
    let h = w.commit().map_err(store_err)?;
    Ok((h, true, before))
}
