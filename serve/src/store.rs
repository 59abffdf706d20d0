//! The content-addressed object store.
//!
//! Layout under the store directory:
//!
//! ```text
//! objects/ab/abcdef…   one read-only file per blob or directory node, named
//!                      by the blake3 hash of its bytes
//! tmp/                 staging: objects are written here, fsynced, then
//!                      renamed into objects/ (atomic on POSIX)
//! ```
//!
//! An object file exists under `objects/` only once all of its bytes are on
//! disk and hash to its name. A process killed mid-write leaves at most a
//! file in `tmp/`, which [`ObjectStore::open`] clears.

use meridian_core::Hash;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// A directory of objects addressed by blake3 hash.
#[derive(Debug)]
pub struct ObjectStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
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
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object with this hash lives (whether or not it exists).
    pub fn path(&self, h: &Hash) -> PathBuf {
        let hex = h.hex_bytes();
        let hex = std::str::from_utf8(&hex).unwrap_or_default();
        // One allocation: root + "/objects/" + 2 + "/" + 64.
        let mut p = PathBuf::with_capacity(self.root.as_os_str().len() + 80);
        p.push(&self.root);
        p.push("objects");
        p.push(&hex[..2]);
        p.push(hex);
        p
    }

    /// Whether the object is present.
    pub fn contains(&self, h: &Hash) -> bool {
        self.path(h).exists()
    }

    /// A fresh staging path in `tmp/`.
    pub fn tmp_path(&self, label: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}-{label}", std::process::id()))
    }

    /// Creates a staging file, read-only from birth (the returned handle is
    /// still writable).
    pub fn create_tmp(&self, label: &str) -> Result<(PathBuf, File), StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.tmp_path(label);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&p)
            .map_err(|e| StoreError::io(&p, e))?;
        Ok((p, f))
    }

    /// Reads a whole object (for small ones: nodes).
    pub fn read(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        let p = self.path(h);
        fs::read(&p).map_err(|e| StoreError::io(p, e))
    }

    /// Opens an object for reading.
    pub fn open_object(&self, h: &Hash) -> Result<File, StoreError> {
        let p = self.path(h);
        File::open(&p).map_err(|e| StoreError::io(p, e))
    }

    /// Writes an in-memory object whose hash the caller computed. Not
    /// fsynced: call [`ObjectStore::sync_all`] before publishing or switching
    /// to a generation that references it.
    pub fn put_bytes(&self, h: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        if self.contains(h) {
            return Ok(());
        }
        let (tmp, mut f) = self.create_tmp("put")?;
        let res = f.write_all(bytes);
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(&tmp, e));
        }
        drop(f);
        self.commit(&tmp, h)
    }

    /// Moves a fully written and verified staging file into place. Staging
    /// files are created read-only ([`ObjectStore::create_tmp`]), so objects
    /// are read-only without a chmod per object.
    pub fn commit(&self, tmp: &Path, h: &Hash) -> Result<(), StoreError> {
        let dest = self.path(h);
        let parent = dest.parent().unwrap_or(&self.root);
        match fs::rename(tmp, &dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !parent.exists() => {
                fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
                fs::rename(tmp, &dest).map_err(|e| {
                    let _ = fs::remove_file(tmp);
                    StoreError::io(&dest, e)
                })
            }
            Err(e) => {
                let _ = fs::remove_file(tmp);
                Err(StoreError::io(&dest, e))
            }
        }
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
        const ONE_BY_ONE: usize = 512;
        const THREADS: usize = 4;
        if hashes.len() > ONE_BY_ONE {
            return self.sync_all();
        }
        let mut paths: Vec<PathBuf> = hashes.iter().map(|h| self.path(h)).collect();
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

    /// Every object hash present, for garbage collection and scrubbing.
    pub fn list(&self) -> Result<Vec<Hash>, StoreError> {
        let objects = self.root.join("objects");
        let mut out = Vec::new();
        for shard in fs::read_dir(&objects).map_err(|e| StoreError::io(&objects, e))? {
            let shard = shard.map_err(|e| StoreError::io(&objects, e))?;
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

    /// Bytes free on the store's file system, for the pre-sync space check.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| StoreError::io(&self.root, io::Error::from(e)))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// Fsyncs a directory so renames into it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Writes a small file atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::io(path, e));
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::hash_bytes;

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
