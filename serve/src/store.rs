//! The content-addressed object store.
//!
//! Layout under the store directory:
//!
//! ```text
//! objects/ab/abcdef…   one read-only file per blob or directory node, named
//!                      by the blake3 hash of its bytes
//! tmp/                 staging: objects are written here, fsynced, then
//!                      renamed into objects/ (atomic on POSIX)
//! linked/ab/abcdef…    (origin only) hard links to content files that were
//!                      hashed in place; not yet private copies
//! ```
//!
//! An object file exists under `objects/` only once all of its bytes are on
//! disk and hash to its name. A process killed mid-write leaves at most a
//! file in `tmp/`, which [`ObjectStore::open`] clears.
//!
//! A `linked/` object shares its inode with a file in the origin's content
//! directory, so an in-place edit there changes it. It is never served as
//! it is: [`ObjectStore::promote`] copies it into `objects/` from the very
//! bytes it hashes, and only when they hash to the object's name; an object
//! edited in place is withdrawn instead. The origin promotes in the
//! background after each publish, and on first read.

use meridian_core::Hash;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// Whether `linked/` may hold objects.
    links: AtomicBool,
}

/// What [`ObjectStore::promote`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promoted {
    /// Already a private copy.
    Present,
    /// Copied from its link, verified.
    Promoted,
    /// Its link no longer hashes to its name; removed.
    Withdrawn,
    /// Neither a copy nor a link exists.
    Missing,
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
        let links = root.join("linked").exists();
        Ok(ObjectStore {
            root,
            tmp_seq: AtomicU64::new(0),
            links: AtomicBool::new(links),
        })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the object with this hash lives (whether or not it exists).
    pub fn path(&self, h: &Hash) -> PathBuf {
        self.sharded("objects", h)
    }

    /// Where a hashed-in-place (hard-linked) object lives.
    pub fn linked_path(&self, h: &Hash) -> PathBuf {
        self.sharded("linked", h)
    }

    /// `root/area/ab/abcdef…`, in one allocation.
    fn sharded(&self, area: &str, h: &Hash) -> PathBuf {
        let hex = h.hex_bytes();
        let hex = std::str::from_utf8(&hex).unwrap_or_default();
        let mut p = PathBuf::with_capacity(self.root.as_os_str().len() + 80);
        p.push(&self.root);
        p.push(area);
        p.push(&hex[..2]);
        p.push(hex);
        p
    }

    /// Whether the object is present (as a private copy or a link).
    pub fn contains(&self, h: &Hash) -> bool {
        // Links stay after their copy is made, so where links are in use
        // the link is the one place to look for most objects.
        (self.has_links() && self.linked_path(h).exists()) || self.path(h).exists()
    }

    fn has_links(&self) -> bool {
        self.links.load(Ordering::Relaxed)
    }

    /// Hard-links the open file `src` (a content file that hashed to `h`)
    /// into `linked/`: the very inode that was read, through
    /// `/proc/self/fd`, so a rename over its path cannot slip another file
    /// in. Returns whether the link is new. Fails (and the caller copies
    /// instead) across file systems, without `/proc`, or where the kernel
    /// refuses links to files the process does not own.
    pub fn link_in(&self, src: &File, h: &Hash) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let dest = self.linked_path(h);
        self.links.store(true, Ordering::Relaxed);
        // Linking the open file itself (AT_EMPTY_PATH) needs
        // CAP_DAC_READ_SEARCH; where that is refused (ENOENT with the
        // destination's directory present), the /proc/self/fd path is used
        // from then on. Both link the inode that was read.
        const UNKNOWN: u8 = 0;
        const DIRECT: u8 = 1;
        const VIA_PROC: u8 = 2;
        static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNKNOWN);
        let link = |dest: &Path| {
            use rustix::fs::{AtFlags, CWD, linkat};
            let mode = MODE.load(Ordering::Relaxed);
            if mode != VIA_PROC {
                match linkat(src, "", CWD, dest, AtFlags::EMPTY_PATH) {
                    Ok(()) => {
                        MODE.store(DIRECT, Ordering::Relaxed);
                        return Ok(());
                    }
                    // (Not for a file that has lost its last name: no way
                    // links that.)
                    Err(e)
                        if mode == UNKNOWN
                            && (e == rustix::io::Errno::NOENT || e == rustix::io::Errno::PERM)
                            && dest.parent().is_some_and(Path::exists)
                            && src.metadata().is_ok_and(|m| m.nlink() > 0) =>
                    {
                        MODE.store(VIA_PROC, Ordering::Relaxed);
                    }
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
            let proc_path = format!("/proc/self/fd/{}", src.as_raw_fd());
            linkat(CWD, proc_path.as_str(), CWD, dest, AtFlags::SYMLINK_FOLLOW)
                .map_err(io::Error::from)
        };
        match link(&dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)?;
                }
                match link(&dest) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Makes `h` a private copy under `objects/` if it is only linked:
    /// streams the link's bytes into a staging file while hashing them and
    /// commits the copy only if they hash to `h`. A link whose bytes no
    /// longer match (its source was edited in place) is removed. The copy
    /// is not fsynced here (a process kill loses nothing: the page cache
    /// stays); call [`ObjectStore::sync_all`] after a batch of promotions.
    pub fn promote(&self, h: &Hash) -> Result<Promoted, StoreError> {
        if !self.has_links() || self.path(h).exists() {
            return Ok(Promoted::Present);
        }
        let linked = self.linked_path(h);
        let mut src = match File::open(&linked) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(if self.path(h).exists() {
                    Promoted::Present
                } else {
                    Promoted::Missing
                });
            }
            Err(e) => return Err(StoreError::io(&linked, e)),
        };
        // Bounded by the length now: a file that keeps growing cannot hash
        // right, and is not copied forever.
        let limit = src.metadata().map_or(u64::MAX, |m| m.len() + 1);
        if !self.copy_verified(&mut src, h, limit, "promote")? {
            let _ = fs::remove_file(&linked);
            return Ok(Promoted::Withdrawn);
        }
        // The link stays until the object is garbage: unlinking would bump
        // the content file's ctime and make the origin hash it again.
        Ok(Promoted::Promoted)
    }

    /// Copies `src` (at most `limit` bytes) into `objects/` as `h`, hashing
    /// the very bytes it writes, and commits the copy only if they hash to
    /// `h`: `Ok(false)` (and nothing kept) if they do not. Not fsynced (see
    /// [`ObjectStore::promote`]).
    pub fn copy_verified(
        &self,
        src: &mut impl io::Read,
        h: &Hash,
        limit: u64,
        label: &str,
    ) -> Result<bool, StoreError> {
        let (tmp, dst) = self.create_tmp(label)?;
        let res = (|| {
            let mut src = io::Read::take(&mut *src, limit);
            let mut out = io::BufWriter::with_capacity(1 << 16, &dst);
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match io::Read::read(&mut src, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            out.flush()?;
            Ok(Hash::from(hasher.finalize()))
        })();
        match res {
            Ok(got) if got == *h => {
                drop(dst);
                self.commit(&tmp, h)?;
                Ok(true)
            }
            Ok(_) => {
                let _ = fs::remove_file(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(StoreError::io(&tmp, e))
            }
        }
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

    /// The length of a held object (copy or link).
    pub fn held_len(&self, h: &Hash) -> Option<u64> {
        let p = self.path(h);
        match fs::metadata(&p) {
            Ok(m) if m.is_file() => Some(m.len()),
            _ if self.has_links() => fs::metadata(self.linked_path(h)).ok().map(|m| m.len()),
            _ => None,
        }
    }

    /// Makes the private copy of linked object `h` from `bytes` the caller
    /// has just read from the link and checked against `h` (no second read).
    /// Like [`ObjectStore::promote`], not fsynced per object.
    pub fn promote_from(&self, h: &Hash, bytes: &[u8]) -> Result<(), StoreError> {
        if self.path(h).exists() {
            return Ok(());
        }
        let (tmp, mut f) = self.create_tmp("promote")?;
        if let Err(e) = f.write_all(bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(&tmp, e));
        }
        drop(f);
        self.commit(&tmp, h)
    }

    /// Whether `h` is held only as a link (no private copy yet).
    pub fn is_linked_only(&self, h: &Hash) -> bool {
        self.has_links() && !self.path(h).exists() && self.linked_path(h).exists()
    }

    /// Reads a whole object whose bytes are known to match its name: a
    /// private copy as it is, a link only if its bytes hash to `h` now.
    /// `Ok(None)`: not held, or a link that no longer matches.
    pub fn read_verified(&self, h: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.path(h);
        match fs::read(&p) {
            Ok(b) => return Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(p, e)),
        }
        if !self.has_links() {
            return Ok(None);
        }
        let l = self.linked_path(h);
        match fs::read(&l) {
            Ok(b) if Hash::from(blake3::hash(&b)) == *h => Ok(Some(b)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(l, e)),
        }
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
        use std::os::unix::fs::PermissionsExt;
        // Every object is read-only, whoever wrote it.
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444))
            .map_err(|e| StoreError::io(tmp, e))?;
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
        let mut paths: Vec<PathBuf> = hashes
            .iter()
            .map(|h| {
                let p = self.path(h);
                if self.has_links() && !p.exists() {
                    self.linked_path(h)
                } else {
                    p
                }
            })
            .collect();
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

    /// Removes an object (its copy and its link).
    pub fn remove(&self, h: &Hash) -> Result<(), StoreError> {
        let mut paths = vec![self.path(h)];
        if self.has_links() {
            paths.push(self.linked_path(h));
        }
        for p in paths {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(p, e)),
            }
        }
        Ok(())
    }

    /// Objects held only as links (no private copy yet), for background
    /// promotion.
    pub fn list_linked(&self) -> Result<Vec<Hash>, StoreError> {
        if !self.has_links() {
            return Ok(Vec::new());
        }
        let mut out = list_dir(&self.root.join("linked"))?;
        out.retain(|h| !self.path(h).exists());
        Ok(out)
    }

    /// Every object hash present (copies and links), for garbage
    /// collection and scrubbing.
    pub fn list(&self) -> Result<Vec<Hash>, StoreError> {
        let mut out = list_dir(&self.root.join("objects"))?;
        if self.has_links() {
            out.extend(list_dir(&self.root.join("linked"))?);
            out.sort();
            out.dedup();
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

/// Hashes named by the files in the shards of `dir` (missing: none).
fn list_dir(dir: &Path) -> Result<Vec<Hash>, StoreError> {
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

/// Fsyncs a directory so renames into it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Writes a small state file atomically (mode 0644): see [`write_atomic_mode`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_mode(path, bytes, 0o644)
}

/// Writes a small file atomically: a temp file, fsync, rename, fsync of the
/// directory. The one way Meridian writes a file that holds state or a
/// secret.
///
/// The temp file has a random name in the target's directory and is
/// created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`) with `mode`, so a
/// file or symlink planted there beforehand is never written through, and
/// a secret never exists with wider permissions than `mode`. The rename
/// replaces `path` itself (a symlink at `path` is replaced, not followed).
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut last = None;
    for _ in 0..8 {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::io(path, io::Error::other(e.to_string())))?;
        let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .mode(mode)
            .open(&tmp);
        let mut f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(StoreError::io(&tmp, e)),
        };
        let res = f
            .write_all(bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(path, e));
        }
        return sync_dir(dir);
    }
    Err(StoreError::io(
        path,
        last.unwrap_or_else(|| io::Error::other("no free temp file name")),
    ))
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
    fn atomic_writes_never_follow_or_reuse_a_planted_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("key");
        // Every name the old writer used, planted as a symlink to a file
        // someone else can read.
        let bait = dir.path().join("bait");
        fs::write(&bait, b"").expect("bait");
        for planted in [
            format!(".key.tmp-{}", std::process::id()),
            "key.tmp".to_owned(),
        ] {
            std::os::unix::fs::symlink(&bait, dir.path().join(planted)).expect("symlink");
        }
        write_atomic_mode(&target, b"secret", 0o600).expect("write");
        assert_eq!(fs::read(&bait).expect("bait"), b"");
        assert_eq!(fs::read(&target).expect("target"), b"secret");
        let mode = fs::metadata(&target).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp file is left behind.
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter(|e| !e.path().is_symlink())
            .collect();
        assert!(left.is_empty(), "{left:?}");
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
