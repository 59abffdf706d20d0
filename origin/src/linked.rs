//! The origin's object store: the shared [`ObjectStore`] plus `linked/`,
//! files hashed in place.
//!
//! ```text
//! objects/ab/abcdef…   private copies (the shared store)
//! linked/ab/abcdef…    hard links to content files that were hashed in
//!                      place; not yet private copies
//! ```
//!
//! A `linked/` object shares its inode with a file in the content
//! directory, so an in-place edit there changes it. **Architecture
//! invariant: a linked object is never served as it is.** Before a byte of
//! one goes out, [`LinkedStore`] either reads it whole and checks it against
//! its name (small ones, then written as a private copy from those same
//! bytes), or copies it into `objects/` through the store's verified writer
//! and serves the copy; an object edited in place is withdrawn instead.
//! The origin also copies in the background after each publish. Tests:
//! `scan::tests::linked_files_are_copied_only_when_they_still_hash_right`
//! and the e2e test
//! `origin::files_edited_in_place_before_their_copy_are_withdrawn_never_served`.

use meridian_core::{Hash, hash_bytes};
use meridian_serve::readapi::{Objects, Ready};
use meridian_serve::store::{list_sharded, sharded};
use meridian_serve::{ObjectStore, StoreError};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Largest linked object served from a verified in-memory read.
pub(crate) const VERIFY_IN_MEMORY_MAX: u64 = 8 << 20;
/// In-memory verified reads at once; past it, objects are copied first.
const IN_MEMORY_AT_ONCE: usize = 16;

/// What [`LinkedStore::promote`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Promoted {
    /// Already a private copy.
    Present,
    /// Copied from its link, verified.
    Copied,
    /// Its link no longer hashes to its name; removed.
    Withdrawn,
    /// Neither a copy nor a link exists.
    Missing,
}

/// The origin's store: private copies and hashed-in-place links.
#[derive(Debug)]
pub struct LinkedStore {
    pub(crate) objects: ObjectStore,
    linked: PathBuf,
    /// Whether `linked/` may hold objects.
    links: AtomicBool,
    in_memory: AtomicUsize,
}

impl LinkedStore {
    pub fn open(root: &Path) -> Result<LinkedStore, StoreError> {
        let objects = ObjectStore::open(root)?;
        let linked = root.join("linked");
        let links = linked.exists();
        Ok(LinkedStore {
            objects,
            linked,
            links: AtomicBool::new(links),
            in_memory: AtomicUsize::new(0),
        })
    }

    fn has_links(&self) -> bool {
        self.links.load(Ordering::Relaxed)
    }

    /// Where a hashed-in-place (hard-linked) object lives.
    pub(crate) fn linked_path(&self, h: &Hash) -> PathBuf {
        sharded(&self.linked, h)
    }

    /// Where the private copy of `h` lives.
    pub(crate) fn path(&self, h: &Hash) -> PathBuf {
        self.objects.path(h)
    }

    /// Whether the object is present (as a private copy or a link).
    pub(crate) fn contains(&self, h: &Hash) -> bool {
        // Links stay after their copy is made, so where links are in use
        // the link is the one place to look for most objects.
        (self.has_links() && self.linked_path(h).exists()) || self.objects.contains(h)
    }

    /// Reads a whole directory node (always a private copy).
    pub(crate) fn read(&self, h: &Hash) -> Result<Vec<u8>, StoreError> {
        self.objects.read(h)
    }

    /// Hard-links the open file `src` (a content file that hashed to `h`)
    /// into `linked/`: the very inode that was read, through
    /// `/proc/self/fd`, so a rename over its path cannot slip another file
    /// in. Returns whether the link is new. Fails (and the caller copies
    /// instead) across file systems, without `/proc`, or where the kernel
    /// refuses links to files the process does not own.
    pub(crate) fn link_in(&self, src: &File, h: &Hash) -> io::Result<bool> {
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

    /// Makes `h` a private copy under `objects/` if it is only linked,
    /// through the store's verified writer (so only if the link's bytes
    /// hash to `h` now). A link whose bytes no longer match (its source was
    /// edited in place) is removed. Not fsynced here (a process kill loses
    /// nothing: the page cache stays); call [`ObjectStore::sync_all`] after
    /// a batch of promotions.
    pub(crate) fn promote(&self, h: &Hash) -> Result<Promoted, StoreError> {
        if !self.has_links() || self.objects.contains(h) {
            return Ok(Promoted::Present);
        }
        let linked = self.linked_path(h);
        let mut src = match File::open(&linked) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(if self.objects.contains(h) {
                    Promoted::Present
                } else {
                    Promoted::Missing
                });
            }
            Err(e) => return Err(StoreError::io(&linked, e)),
        };
        let len = src
            .metadata()
            .map_err(|e| StoreError::io(&linked, e))?
            .len();
        if !self.objects.copy_verified(&mut src, h, len)? {
            let _ = fs::remove_file(&linked);
            return Ok(Promoted::Withdrawn);
        }
        // The link stays until the object is garbage: unlinking would bump
        // the content file's ctime and make the origin hash it again.
        Ok(Promoted::Copied)
    }

    /// Whether `h` is held only as a link (no private copy yet).
    pub(crate) fn is_linked_only(&self, h: &Hash) -> bool {
        self.has_links() && !self.objects.contains(h) && self.linked_path(h).exists()
    }

    /// Reads a whole object whose bytes are known to match its name: a
    /// private copy as it is, a link only if its bytes hash to `h` now.
    /// `Ok(None)`: not held, or a link that no longer matches.
    pub(crate) fn read_verified(&self, h: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.objects.path(h);
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
            Ok(b) if hash_bytes(&b) == *h => Ok(Some(b)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(l, e)),
        }
    }

    /// The length of a held object (copy or link).
    pub(crate) fn held_len(&self, h: &Hash) -> Option<u64> {
        self.objects.held_len(h).or_else(|| {
            self.has_links()
                .then(|| fs::metadata(self.linked_path(h)).ok().map(|m| m.len()))
                .flatten()
        })
    }

    /// Makes the given objects durable (each copy, or its link), given
    /// in groups (the files and the nodes of a publish).
    pub(crate) fn sync_objects(&self, groups: &[&[Hash]]) -> Result<(), StoreError> {
        if groups.iter().map(|g| g.len()).sum::<usize>() > ObjectStore::SYNC_ONE_BY_ONE {
            return self.sync_all();
        }
        let paths = groups
            .iter()
            .flat_map(|g| g.iter())
            .map(|h| {
                let p = self.objects.path(h);
                if self.has_links() && !p.exists() {
                    self.linked_path(h)
                } else {
                    p
                }
            })
            .collect();
        self.objects.sync_paths(paths)
    }

    /// Makes every object written so far durable.
    pub(crate) fn sync_all(&self) -> Result<(), StoreError> {
        self.objects.sync_all()
    }

    /// Removes an object (its copy and its link).
    pub(crate) fn remove(&self, h: &Hash) -> Result<(), StoreError> {
        self.objects.remove(h)?;
        if self.has_links() {
            let p = self.linked_path(h);
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
    pub(crate) fn list_linked(&self) -> Result<Vec<Hash>, StoreError> {
        if !self.has_links() {
            return Ok(Vec::new());
        }
        let mut out = list_sharded(&self.linked)?;
        out.retain(|h| !self.objects.contains(h));
        Ok(out)
    }

    /// Every object hash present (copies and links), for garbage
    /// collection.
    pub(crate) fn list(&self) -> Result<Vec<Hash>, StoreError> {
        let mut out = self.objects.list()?;
        if self.has_links() {
            out.extend(list_sharded(&self.linked)?);
            out.sort();
            out.dedup();
        }
        Ok(out)
    }

    /// Serves a linked object that is small enough from one verified read,
    /// writing its private copy from those same bytes (so an in-place edit
    /// of the source later cannot take away a version a mirror has begun
    /// to fetch). `None`: not a candidate (too large, too many at once, or
    /// changed at its source).
    fn read_in_memory(&self, h: &Hash) -> Option<Vec<u8>> {
        if self.held_len(h)? > VERIFY_IN_MEMORY_MAX {
            return None;
        }
        // Bounds memory: past the limit, objects are copied first instead.
        if self.in_memory.fetch_add(1, Ordering::AcqRel) >= IN_MEMORY_AT_ONCE {
            self.in_memory.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let bytes = self.read_verified(h).ok().flatten();
        self.in_memory.fetch_sub(1, Ordering::AcqRel);
        let bytes = bytes?;
        if let Err(e) = self.objects.put_bytes(h, &bytes) {
            tracing::warn!(object = %h, error = %e, "could not copy a linked object");
        }
        Some(bytes)
    }
}

impl Objects for LinkedStore {
    fn ready(&self, h: &Hash) -> Ready {
        if self.is_linked_only(h)
            && let Some(bytes) = self.read_in_memory(h)
        {
            return Ready::Bytes(bytes);
        }
        match self.promote(h) {
            Ok(Promoted::Withdrawn) => {
                tracing::warn!(
                    object = %h,
                    "a published file was edited in place before it was copied; withdrawn"
                );
                Ready::Withdrawn
            }
            Ok(_) => self.objects.ready(h),
            Err(e) => {
                tracing::warn!(object = %h, error = %e, "could not copy a linked object");
                Ready::Failed
            }
        }
    }

    fn read_checked(&self, h: &Hash) -> Option<Vec<u8>> {
        // A private copy, checked; else the link, checked (each hashed once).
        self.objects.read_checked(h).or_else(|| {
            let b = fs::read(self.linked_path(h)).ok()?;
            (self.has_links() && hash_bytes(&b) == *h).then_some(b)
        })
    }

    fn held_len(&self, h: &Hash) -> Option<u64> {
        LinkedStore::held_len(self, h)
    }
}
