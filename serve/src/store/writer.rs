//! The one way bytes become an object: [`ObjectWriter`].

use super::StoreError;
use meridian_core::Hash;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where a writer stages its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staging {
    /// A fresh file in `tmp/` (unique name, created exclusively, read-only
    /// from birth); removed if the writer is dropped uncommitted.
    Fresh,
    /// `partial/<hash>`, locked (`flock`) by this writer for as long as it
    /// lives; kept if the writer is dropped, so a later writer resumes from
    /// its prefix.
    Resumable,
}

/// Writes one object into the store, hashing exactly the bytes it writes,
/// and commits it under its name only if they hash to it.
///
/// A writer owns its staging file alone: a fresh one by `O_EXCL`, a
/// resumable one by an exclusive `flock` held until it commits or is
/// dropped, so no two writers (threads or processes) can ever interleave
/// bytes in one file. A resumed writer re-hashes the prefix already on disk,
/// so its verdict is always on the file's bytes. The committed object is
/// read-only (mode 0444).
///
/// Created by [`super::ObjectStore::writer`] (the name is known: a blob or
/// node being fetched, a copy), [`super::ObjectStore::resume`] (a download
/// that may be cut and resumed) or [`super::ObjectStore::unnamed_writer`]
/// (the name is what the bytes hash to: a snapshot of a published file).
/// Blocking: use it on a blocking thread.
#[derive(Debug)]
pub struct ObjectWriter {
    file: File,
    staged: PathBuf,
    objects: PathBuf,
    /// The name the bytes must hash to; `None`: named by them at commit.
    name: Option<Hash>,
    /// Exact length of the object (named) or the most it may have (unnamed).
    size: u64,
    hasher: blake3::Hasher,
    written: u64,
    staging: Staging,
    /// A write failed part-way: the file and the hash may disagree.
    poisoned: bool,
    finished: bool,
}

impl ObjectWriter {
    pub(super) fn fresh(
        staged: PathBuf,
        objects: PathBuf,
        name: Option<Hash>,
        size: u64,
    ) -> Result<ObjectWriter, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&staged)
            .map_err(|e| StoreError::io(&staged, e))?;
        Ok(ObjectWriter {
            file,
            staged,
            objects,
            name,
            size,
            hasher: blake3::Hasher::new(),
            written: 0,
            staging: Staging::Fresh,
            poisoned: false,
            finished: false,
        })
    }

    /// Opens (or creates) the resumable staging file of `name`, takes its
    /// lock (failing with `WouldBlock` if another writer holds it) and
    /// re-hashes the prefix already there. A prefix longer than the object
    /// is discarded.
    pub(super) fn resume(
        staged: PathBuf,
        objects: PathBuf,
        name: Hash,
        size: u64,
    ) -> Result<ObjectWriter, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io_err = |e| StoreError::io(&staged, e);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&staged)
        };
        let mut file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = staged.parent() {
                    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
                }
                open()
            }
            r => r,
        }
        .map_err(io_err)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                io_err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("it is being written by another download ({e})"),
                ))
            },
        )?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut hasher = blake3::Hasher::new();
        let mut done = 0u64;
        if len > size {
            file.set_len(0).map_err(io_err)?;
        } else if len > 0 {
            let mut buf = vec![0u8; (len as usize).min(1 << 20)];
            while done < len {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err(e)),
                };
                hasher.update(&buf[..n]);
                done += n as u64;
            }
        }
        file.seek(SeekFrom::Start(done)).map_err(io_err)?;
        Ok(ObjectWriter {
            file,
            staged,
            objects,
            name: Some(name),
            size,
            hasher,
            written: done,
            staging: Staging::Resumable,
            poisoned: false,
            finished: false,
        })
    }

    /// Bytes written so far (a resumed writer starts at its prefix).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The declared length of the object.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the bytes are staged (for error messages).
    pub fn staged_path(&self) -> &Path {
        &self.staged
    }

    /// The hash of the bytes written so far.
    pub fn digest(&self) -> Hash {
        self.hasher.finalize().into()
    }

    /// Throws away what was written (an upstream answered a resume with the
    /// whole object) and starts again at byte 0.
    pub fn restart(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.hasher = blake3::Hasher::new();
        self.written = 0;
        self.poisoned = false;
        Ok(())
    }

    /// Fills a fresh, empty writer with a copy of `src` (at most `limit`
    /// bytes): a reflink where the file system can, else an in-kernel copy.
    /// Then the copy itself is read back and hashed, so the hash is of the
    /// bytes that will be served whatever `src` does next. `buf` is the
    /// read buffer. Returns the length copied.
    pub fn snapshot_from(&mut self, src: &mut File, limit: u64, buf: &mut [u8]) -> io::Result<u64> {
        if self.written != 0 || self.poisoned {
            return Err(io::Error::other("snapshot into a writer that holds bytes"));
        }
        self.poisoned = true;
        if rustix::fs::ioctl_ficlone(&self.file, &*src).is_err() {
            let mut limited = (&mut *src).take(limit.min(self.size.saturating_add(1)));
            io::copy(&mut limited, &mut self.file)?;
        }
        self.file.seek(SeekFrom::Start(0))?;
        let mut hasher = blake3::Hasher::new();
        let mut n_total = 0u64;
        loop {
            let n = match self.file.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            n_total += n as u64;
        }
        self.hasher = hasher;
        self.written = n_total;
        self.poisoned = false;
        Ok(n_total)
    }

    /// Moves the object into place if its bytes are exactly the declared
    /// length and hash to its name (or, unnamed, names it by their hash).
    /// Returns the object's name. On a mismatch the staged bytes are
    /// discarded ([`StoreError::HashMismatch`], [`StoreError::SizeMismatch`]).
    /// Not fsynced: see [`super::ObjectStore::sync_objects`].
    pub fn commit(mut self) -> Result<Hash, StoreError> {
        if self.poisoned {
            return Err(StoreError::io(
                &self.staged,
                io::Error::other("an earlier write to it failed; not committed"),
            ));
        }
        let got = self.digest();
        let name = self.name.unwrap_or(got);
        if self.written < self.size {
            if self.staging == Staging::Fresh {
                let _ = fs::remove_file(&self.staged);
            }
            // (A resumable writer's prefix is kept for the next writer.)
            self.finished = true;
            return Err(StoreError::SizeMismatch {
                hash: name,
                expected: self.size,
                got: self.written,
            });
        }
        // The file holds exactly what was hashed: no one else can have
        // written it (exclusive), and its length agrees.
        let on_disk = self.file.metadata().map(|m| m.len()).ok();
        let wrong = if self.written != self.size {
            Some(StoreError::SizeMismatch {
                hash: name,
                expected: self.size,
                got: self.written,
            })
        } else if got != name || on_disk != Some(self.written) {
            Some(StoreError::HashMismatch {
                expected: name,
                actual: got,
            })
        } else {
            None
        };
        if let Some(e) = wrong {
            let _ = fs::remove_file(&self.staged);
            self.finished = true;
            return Err(e);
        }
        if self.staging == Staging::Resumable {
            use std::os::unix::fs::PermissionsExt;
            self.file
                .set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(|e| StoreError::io(&self.staged, e))?;
        }
        let dest = super::sharded(&self.objects, &name);
        // Renamed while the writer still holds the file (and a resumable
        // one its lock), so no other writer can open it in between.
        match fs::rename(&self.staged, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let parent = dest.parent().unwrap_or(&self.objects);
                fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
                fs::rename(&self.staged, &dest).map_err(|e| StoreError::io(&dest, e))?;
            }
            Err(e) => return Err(StoreError::io(&dest, e)),
        }
        self.finished = true;
        Ok(name)
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(io::Error::other("an earlier write to this object failed"));
        }
        if self.written + b.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than the {} bytes declared for this object", self.size),
            ));
        }
        match self.file.write(b) {
            Ok(n) => {
                self.hasher.update(&b[..n]);
                self.written += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        match self.staging {
            Staging::Fresh => {
                let _ = fs::remove_file(&self.staged);
            }
            // A prefix that may not match the hash is kept too: the next
            // writer re-hashes it, and a mismatch discards the whole blob at
            // commit. A poisoned one is cut back to what was hashed.
            Staging::Resumable if self.poisoned => {
                let _ = self.file.set_len(self.written);
            }
            Staging::Resumable => {}
        }
    }
}
