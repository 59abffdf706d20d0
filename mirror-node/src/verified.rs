//! Which stored objects are known to hash to their names, as they are on
//! disk now. The download server sends an object's bytes only once they
//! were checked since the object's inode last changed:
//!
//! - a small body is hashed in memory before it is sent;
//! - a large whole-file body is hashed as it streams, and the last chunk is
//!   held back until the whole hash matches: a bad body is cut (the
//!   connection closes short of its length), never completed;
//! - a range of a large object waits for one whole-object check (shared by
//!   every request for it that arrives meanwhile);
//! - the scrubber checks every object continuously, at a budgeted rate.
//!
//! A check is remembered by the object's [`Stamp`] (inode, change time,
//! size): any write, truncation, `chmod` or replacement of the file changes
//! its ctime, so a remembered check never covers bytes that changed through
//! the file system. Damage that bypasses it (the medium itself) is what the
//! continuous scrub is for.

use meridian_core::Hash;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

/// What identifies an object file's current contents to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    ctime_ns: i128,
    len: u64,
}

impl Stamp {
    pub(crate) fn of(md: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: md.ino(),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            len: md.len(),
        }
    }
}

const SHARDS: usize = 16;
/// Remembered checks per shard; a full shard is cleared (its objects are
/// checked again on their next download). 16 × 16,384 entries of about
/// 80 bytes: at most about 21 MB.
const SHARD_ENTRIES: usize = 16_384;

type Inflight = Arc<tokio::sync::OnceCell<bool>>;

/// The remembered checks, and the whole-object checks under way.
#[derive(Debug)]
pub(crate) struct Verified {
    shards: [Mutex<HashMap<Hash, Stamp>>; SHARDS],
    inflight: Mutex<HashMap<Hash, Inflight>>,
}

impl Default for Verified {
    fn default() -> Self {
        Verified {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl Verified {
    fn shard(&self, h: &Hash) -> &Mutex<HashMap<Hash, Stamp>> {
        &self.shards[usize::from(h.0[0]) % SHARDS]
    }

    /// Whether `h` was checked with the file as it is now.
    pub(crate) fn is_verified(&self, h: &Hash, stamp: Stamp) -> bool {
        self.shard(h)
            .lock()
            .map(|m| m.get(h) == Some(&stamp))
            .unwrap_or(false)
    }

    /// Remembers that the file with `stamp` hashes to `h`.
    pub(crate) fn remember(&self, h: Hash, stamp: Stamp) {
        if let Ok(mut m) = self.shard(&h).lock() {
            if m.len() >= SHARD_ENTRIES && !m.contains_key(&h) {
                m.clear();
            }
            m.insert(h, stamp);
        }
    }

    /// Forgets `h` (quarantined or removed).
    pub(crate) fn forget(&self, h: &Hash) {
        if let Ok(mut m) = self.shard(h).lock() {
            m.remove(h);
        }
    }

    /// Checks the whole file behind `file` against `h` on the blocking pool,
    /// once for every caller that asks while a check of `h` is under way.
    /// Remembers a match; returns whether it matched.
    pub(crate) async fn check_whole(
        self: &Arc<Self>,
        h: Hash,
        file: &std::fs::File,
        stamp: Stamp,
    ) -> bool {
        let cell = match self.inflight.lock() {
            Ok(mut m) => m.entry(h).or_default().clone(),
            Err(_) => return false,
        };
        let file = match file.try_clone() {
            Ok(f) => f,
            Err(_) => return false,
        };
        let ok = *cell
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    hashes_to(&file, &h, &mut buf)
                })
                .await
                .unwrap_or(false)
            })
            .await;
        if let Ok(mut m) = self.inflight.lock()
            && m.get(&h).is_some_and(|c| Arc::ptr_eq(c, &cell))
        {
            m.remove(&h);
        }
        if ok {
            self.remember(h, stamp);
        }
        ok
    }
}

/// Whether the bytes of `file` (from its start) hash to `h`; a read error
/// counts as no.
pub(crate) fn hashes_to(mut file: &std::fs::File, h: &Hash, buf: &mut [u8]) -> bool {
    use std::io::{Read, Seek};
    if file.seek(std::io::SeekFrom::Start(0)).is_err() {
        return false;
    }
    let mut hasher = blake3::Hasher::new();
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    meridian_core::Hash::from(hasher.finalize()) == *h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_check_is_remembered_only_for_the_file_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("obj");
        std::fs::write(&p, b"good bytes").expect("write");
        let h = meridian_core::hash_bytes(b"good bytes");
        let v = Arc::new(Verified::default());
        let f = std::fs::File::open(&p).expect("open");
        let stamp = Stamp::of(&f.metadata().expect("md"));
        assert!(!v.is_verified(&h, stamp));
        assert!(v.check_whole(h, &f, stamp).await);
        assert!(v.is_verified(&h, stamp));
        // The same size, other bytes: the ctime moves, the check no longer
        // covers it, and a new check fails.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|mut w| w.write_all(b"evil"))
            .expect("damage");
        let f = std::fs::File::open(&p).expect("open");
        let stamp2 = Stamp::of(&f.metadata().expect("md"));
        assert_ne!(stamp, stamp2);
        assert!(!v.is_verified(&h, stamp2));
        assert!(!v.check_whole(h, &f, stamp2).await);
        assert!(!v.is_verified(&h, stamp2));
    }
}
