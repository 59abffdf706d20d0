//! The content-addressed object store.
//!
//! Layout under the store directory:
//!
//! ```text
//! objects/ab/abcdef…   one read-only file per blob or directory node, named
//!                      by the blake3 hash of its bytes
//! tmp/                 fresh writers' staging files; cleared on open
//! partial/abcdef…      resumable downloads, one writer each; kept across
//!                      restarts so a cut transfer resumes
//! ```
//!
//! **Architecture invariant: an object enters `objects/` only through an
//! [`ObjectWriter`]**, which hashes exactly the bytes it writes, owns its
//! staging file alone, and commits (renames into place, read-only) only if
//! those bytes have the declared length and hash to the object's name.
//! Nothing else in the workspace can rename into `objects/`: there is no
//! other commit. A process killed mid-write leaves at most a file in `tmp/`
//! (cleared by [`ObjectStore::open`]) or a prefix in `partial/` (re-hashed
//! by the next writer). Tests:
//! `store::tests::a_writer_commits_only_bytes_that_hash_to_its_name`,
//! `store::tests::two_writers_can_never_share_a_partial`, and the e2e test
//! `mirror::damaged_objects_are_never_served_and_are_repaired_on_first_read`
//! (objects on a mirror are mode 0444).

mod atomic;
mod writer;

pub use atomic::{write_atomic, write_atomic_mode, write_atomic_with};
use meridian_core::Hash;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
pub use writer::ObjectWriter;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("object store I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("object {expected} does not match its hash (got {actual}); discarded")]
    HashMismatch { expected: Hash, actual: Hash },
    #[error("object {hash} is {got} bytes, but {expected} were declared")]
    SizeMismatch { hash: Hash, expected: u64, got: u64 },
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
    /// Whether this is the disk running out of space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
    /// Whether the bytes were wrong (length or hash), not the disk.
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            StoreError::HashMismatch { .. } | StoreError::SizeMismatch { .. }
        )
    }
}

/// A directory of objects addressed by blake3 hash.
#[derive(Debug)]
pub struct ObjectStore {
    root: PathBuf,
    objects: PathBuf,
    tmp_seq: AtomicU64,
}

/// `base/ab/abcdef…`: the sharded place of `h` under `base`, in one
/// allocation. The one layout rule for every area that holds objects by
/// hash.
pub fn sharded(base: &Path, h: &Hash) -> PathBuf {
    let hex = h.hex_bytes();
    let hex = std::str::from_utf8(&hex).unwrap_or_default();
    let mut p = PathBuf::with_capacity(base.as_os_str().len() + 70);
    p.push(base);
    p.push(&hex[..2]);
    p.push(hex);
    p
}

impl ObjectStore {
    /// Opens (creating if needed) a store, clearing leftover staging files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let objects = root.join("objects");
        fs::create_dir_all(&objects).map_err(|e| StoreError::io(&objects, e))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        Ok(ObjectStore {
            root,
            objects,
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Where the object with this hash lives (whether or not it exists).
    pub fn path(&self, h: &Hash) -> PathBuf {
        sharded(&self.objects, h)
    }

    /// Whether the object is present.
    pub fn contains(&self, h: &Hash) -> bool {
        self.path(h).exists()
    }

    /// A writer for object `h` of `size` bytes, staged in a fresh file.
    pub fn writer(&self, h: &Hash, size: u64) -> Result<ObjectWriter, StoreError> {
        ObjectWriter::fresh(self.tmp_path("w"), self.objects.clone(), Some(*h), size)
    }

    /// A writer for an object of exactly `size` bytes whose name is the
    /// hash of what is written (a snapshot of a file).
    pub fn unnamed_writer(&self, size: u64) -> Result<ObjectWriter, StoreError> {
        ObjectWriter::fresh(self.tmp_path("u"), self.objects.clone(), None, size)
    }

    /// A writer for object `h` that resumes the partial download kept from
    /// an earlier writer (re-hashing its prefix). Fails with an I/O error of
    /// kind `WouldBlock` while another writer holds it.
    pub fn resume(&self, h: &Hash, size: u64) -> Result<ObjectWriter, StoreError> {
        ObjectWriter::resume(self.partial_path(h), self.objects.clone(), *h, size)
    }

    fn partial_path(&self, h: &Hash) -> PathBuf {
        let mut p = self.root.join("partial");
        p.push(h.to_hex());
        p
    }

    /// Bytes already downloaded toward `h` (its partial file), if any.
    pub fn partial_len(&self, h: &Hash) -> Option<u64> {
        fs::metadata(self.partial_path(h)).ok().map(|m| m.len())
    }

    /// Removes partial downloads that `keep` does not want and that no
    /// writer holds and that were last written at least `grace` ago.
    /// Returns how many were removed.
    pub fn remove_stale_partials(
        &self,
        keep: impl Fn(&Hash) -> bool,
        grace: std::time::Duration,
    ) -> usize {
        let Ok(rd) = fs::read_dir(self.root.join("partial")) else {
            return 0;
        };
        let mut removed = 0;
        for e in rd.flatten() {
            let Some(h) = e.file_name().to_str().and_then(|s| s.parse::<Hash>().ok()) else {
                continue;
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= grace);
            if keep(&h) || !old {
                continue;
            }
            // Only one that no writer holds (the lock is taken first).
            let Ok(f) = File::open(e.path()) else {
                continue;
            };
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
                && fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Writes an in-memory object. The bytes are hashed again by the
    /// writer: a caller's wrong name is refused, never stored. Not fsynced:
    /// call [`ObjectStore::sync_objects`] before publishing or switching to
    /// a generation that references it.
    pub fn put_bytes(&self, h: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        if self.contains(h) {
            return Ok(());
        }
        let mut w = self.writer(h, bytes.len() as u64)?;
        io::Write::write_all(&mut w, bytes).map_err(|e| StoreError::io(w.staged_path(), e))?;
        w.commit().map(drop)
    }

    /// Copies `src` into the store as `h` of `size` bytes, verified by the
    /// writer: `Ok(false)` (nothing kept) when the bytes are not `h`'s
    /// (another length, another hash). Not fsynced.
    pub fn copy_verified(
        &self,
        src: &mut impl io::Read,
        h: &Hash,
        size: u64,
    ) -> Result<bool, StoreError> {
        let w = self.writer(h, size)?;
        let staged = w.staged_path().to_path_buf();
        let mut out = io::BufWriter::with_capacity(1 << 16, w);
        let mut src = io::Read::take(&mut *src, size.saturating_add(1));
        match io::copy(&mut src, &mut out) {
            Ok(_) => {}
            // More bytes than `size`: not this object.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(false),
            Err(e) => return Err(StoreError::io(staged, e)),
        }
        let w = out
            .into_inner()
            .map_err(|e| StoreError::io(&staged, e.into_error()))?;
        match w.commit() {
            Ok(_) => Ok(true),
            Err(e) if e.is_mismatch() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A fresh staging path in `tmp/`.
    fn tmp_path(&self, label: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}-{label}", std::process::id()))
    }

    /// Reads a whole object (for small ones: nodes).
    pub fn read(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        let p = self.path(h);
        fs::read(&p).map_err(|e| StoreError::io(p, e))
    }

    /// The length of a held object.
    pub fn held_len(&self, h: &Hash) -> Option<u64> {
        match fs::metadata(self.path(h)) {
            Ok(m) if m.is_file() => Some(m.len()),
            _ => None,
        }
    }

    /// Opens an object for reading.
    pub fn open_object(&self, h: &Hash) -> Result<File, StoreError> {
        let p = self.path(h);
        File::open(&p).map_err(|e| StoreError::io(p, e))
    }

    /// Makes every object written so far durable (`syncfs`): one call per
    /// generation instead of one fsync per object.
    pub fn sync_all(&self) -> Result<(), StoreError> {
        let d = File::open(&self.root).map_err(|e| StoreError::io(&self.root, e))?;
        rustix::fs::syncfs(&d).map_err(|e| StoreError::io(&self.root, io::Error::from(e)))
    }

    /// Makes the given objects durable: each file and its shard directory
    /// fsynced for a small set (spread over a few threads, since each fsync
    /// mostly waits on the device), one `syncfs` for a large one.
    pub fn sync_objects(&self, hashes: &[Hash]) -> Result<(), StoreError> {
        if hashes.len() > Self::SYNC_ONE_BY_ONE {
            return self.sync_all();
        }
        self.sync_paths(hashes.iter().map(|h| self.path(h)).collect())
    }

    /// Most objects [`ObjectStore::sync_objects`] fsyncs one by one; past
    /// it, one `syncfs` (a million paths are not even listed).
    pub const SYNC_ONE_BY_ONE: usize = 512;

    /// [`ObjectStore::sync_objects`] for objects at the given paths (the
    /// origin also fsyncs hashed-in-place links).
    pub fn sync_paths(&self, mut paths: Vec<PathBuf>) -> Result<(), StoreError> {
        const THREADS: usize = 4;
        if paths.len() > Self::SYNC_ONE_BY_ONE {
            return self.sync_all();
        }
        let mut shards: Vec<PathBuf> = paths
            .iter()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        shards.sort();
        shards.dedup();
        paths.extend(shards);
        let per = paths.len().div_ceil(THREADS).max(8);
        std::thread::scope(|s| {
            let workers: Vec<_> = paths
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        for p in chunk {
                            File::open(p)
                                .and_then(|f| f.sync_all())
                                .map_err(|e| StoreError::io(p, e))?;
                        }
                        Ok::<(), StoreError>(())
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join().unwrap_or_else(|_| {
                    Err(StoreError::io(
                        &self.root,
                        io::Error::other("fsync worker panicked"),
                    ))
                })
            })
        })
    }

    /// Removes an object.
    pub fn remove(&self, h: &Hash) -> Result<(), StoreError> {
        let p = self.path(h);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(p, e)),
        }
    }

    /// Whether any object is held (a cheap look, not a count).
    pub fn holds_any(&self) -> bool {
        fs::read_dir(&self.objects).is_ok_and(|mut rd| rd.next().is_some())
    }

    /// Every object hash present, for garbage collection and scrubbing.
    pub fn list(&self) -> Result<Vec<Hash>, StoreError> {
        list_sharded(&self.objects)
    }

    /// Bytes free on the store's file system, for the pre-sync space check.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| StoreError::io(&self.root, io::Error::from(e)))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Hashes named by the files in the shards of `dir` (missing: none).
pub fn list_sharded(dir: &Path) -> Result<Vec<Hash>, StoreError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    for shard in rd {
        let shard = shard.map_err(|e| StoreError::io(dir, e))?;
        let Ok(rd) = fs::read_dir(shard.path()) else {
            continue;
        };
        for f in rd.flatten() {
            if let Some(h) = f.file_name().to_str().and_then(|s| s.parse::<Hash>().ok()) {
                out.push(h);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::hash_bytes;
    use std::io::Write;

    #[test]
    fn put_read_list_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(dir.path()).expect("open");
        let h = hash_bytes(b"hello");
        assert!(!store.contains(&h));
        store.put_bytes(&h, b"hello").expect("put");
        assert!(store.contains(&h));
        assert_eq!(store.read(&h).expect("read"), b"hello");
        assert_eq!(store.list().expect("list"), vec![h]);
        assert!(
            fs::metadata(store.path(&h))
                .expect("meta")
                .permissions()
                .readonly()
        );
        store.remove(&h).expect("remove");
        assert!(!store.contains(&h));
    }

    #[test]
    fn a_writer_commits_only_bytes_that_hash_to_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(dir.path()).expect("open");
        let h = hash_bytes(b"right bytes");
        // A caller's wrong name is refused, whatever path it takes.
        let e = store
            .put_bytes(&h, b"wrong bytes")
            .expect_err("wrong bytes");
        assert!(matches!(e, StoreError::HashMismatch { .. }), "{e}");
        assert!(!store.contains(&h));
        assert!(
            !store
                .copy_verified(&mut &b"right byteZ"[..], &h, 11)
                .expect("copy")
        );
        // Too few or too many bytes.
        let mut w = store.writer(&h, 11).expect("writer");
        w.write_all(b"right").expect("write");
        assert!(matches!(w.commit(), Err(StoreError::SizeMismatch { .. })));
        let mut w = store.writer(&h, 11).expect("writer");
        w.write_all(b"right bytes").expect("write");
        assert!(w.write_all(b"!").is_err(), "a byte past the declared size");
        drop(w);
        // Resumed: a prefix on disk that was tampered with between writers
        // is re-hashed, so the tampering is caught.
        let mut w = store.resume(&h, 11).expect("resume");
        w.write_all(b"right").expect("write");
        drop(w);
        let partial = dir.path().join("partial").join(h.to_hex());
        fs::write(&partial, b"wrong").expect("tamper");
        let mut w = store.resume(&h, 11).expect("resume again");
        assert_eq!(w.written(), 5);
        w.write_all(b" bytes").expect("write");
        assert!(matches!(w.commit(), Err(StoreError::HashMismatch { .. })));
        assert!(!store.contains(&h));
        assert!(!partial.exists(), "a bad download is discarded whole");
        // Nothing was left in staging by any of them.
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0
        );
        // And the right bytes go in, read-only.
        let mut w = store.resume(&h, 11).expect("resume");
        w.write_all(b"right ").expect("write");
        drop(w);
        let mut w = store.resume(&h, 11).expect("resume");
        w.write_all(b"bytes").expect("write");
        assert_eq!(w.commit().expect("commit"), h);
        assert_eq!(store.read(&h).expect("read"), b"right bytes");
        assert!(
            fs::metadata(store.path(&h))
                .expect("meta")
                .permissions()
                .readonly()
        );
        // Unnamed: named by its bytes.
        let mut w = store.unnamed_writer(3).expect("unnamed");
        w.write_all(b"abc").expect("write");
        assert_eq!(w.commit().expect("commit"), hash_bytes(b"abc"));
        assert!(store.contains(&hash_bytes(b"abc")));
    }

    #[test]
    fn two_writers_can_never_share_a_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(dir.path()).expect("open");
        let h = hash_bytes(b"0123456789");
        let mut first = store.resume(&h, 10).expect("first writer");
        first.write_all(b"012").expect("write");
        let second = store.resume(&h, 10);
        assert!(
            matches!(&second, Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::WouldBlock),
            "a second writer opened a partial that is being written: {second:?}"
        );
        // A stale-partial sweep leaves a held partial alone.
        assert_eq!(
            store.remove_stale_partials(|_| false, std::time::Duration::ZERO),
            0
        );
        // Once the first writer is done, the download resumes from its
        // prefix.
        drop(first);
        let w = store.resume(&h, 10).expect("resumed");
        assert_eq!(w.written(), 3);
        drop(w);
        assert_eq!(store.partial_len(&h), Some(3));
        assert_eq!(
            store.remove_stale_partials(|_| false, std::time::Duration::ZERO),
            1
        );
        assert_eq!(store.partial_len(&h), None);
    }

    #[test]
    fn reopen_clears_staging() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(dir.path()).expect("open");
        let t = store.tmp_path("x");
        fs::write(&t, b"half").expect("write");
        drop(store);
        let _store = ObjectStore::open(dir.path()).expect("reopen");
        assert!(!t.exists());
    }
}
