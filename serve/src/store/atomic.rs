//! The one atomic writer of small state and secret files.

use super::StoreError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Fsyncs a directory so renames into it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
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
    write_atomic_with(path, mode, |f| f.write_all(bytes))
}

/// As [`write_atomic_mode`], for a file too big to build in memory first:
/// `fill` writes the content (through a buffer) into the temp file.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    mut fill: impl FnMut(&mut dyn Write) -> io::Result<()>,
) -> Result<(), StoreError> {
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
        let f = match f {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(StoreError::io(&tmp, e)),
        };
        let mut w = io::BufWriter::with_capacity(1 << 16, f);
        let res = fill(&mut w)
            .and_then(|()| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
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
}
