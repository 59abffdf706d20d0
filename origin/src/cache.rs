//! The stat cache: a file whose (device, inode, size, mtime, ctime) are
//! unchanged since it was last hashed is not hashed again. It is saved
//! atomically after every full scan, so it survives restarts.
//!
//! ctime is part of the key because it cannot be set from user space: a
//! writer that restores the old mtime with `touch -d` still changes ctime.
//!
//! The cache is keyed by inode, not by path: a hash is a property of the
//! bytes of an inode in a given state, wherever it is linked (a rename or
//! a hard link is recognised too). It holds no path, so a million files
//! cost 72 bytes each, in one sorted array (binary search), plus a small
//! map of the files hashed since the last full scan. A full scan marks
//! what it finds and drops the rest ([`HashCache::apply`]); a scan of
//! changed paths only adds (an inode gone never matches again: its key
//! would need the same device, inode and ctime to the nanosecond).

use meridian_core::Hash;
use meridian_serve::store::{StoreError, write_atomic_with};
use std::collections::HashMap;
use std::path::Path;

/// The identity of a file's content as far as `lstat` can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl StatKey {
    pub fn of(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        StatKey {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        }
    }

    fn inode(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// One file's stat key and the hash of its bytes in that state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    pub key: StatKey,
    pub hash: Hash,
}

/// Where a lookup matched: the scan that found it says so in its
/// [`CacheUpdate`], so that a full scan keeps exactly what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    /// The sorted array, at this index.
    Sorted(usize),
    /// The files hashed since the last full scan.
    Recent,
}

/// What a scan learnt of the stat cache.
#[derive(Debug, Default)]
pub struct CacheUpdate {
    /// Files hashed (and recognised in the recent map): their new entries.
    pub added: Vec<Cached>,
    /// One bit per entry of the sorted array: found by this scan.
    pub seen: Vec<u64>,
}

impl CacheUpdate {
    /// Records a hit (`found` is what the lookup returned).
    pub fn hit(&mut self, hit: Hit, found: Cached) {
        match hit {
            Hit::Sorted(i) => {
                if self.seen.len() <= i / 64 {
                    self.seen.resize(i / 64 + 1, 0);
                }
                self.seen[i / 64] |= 1 << (i % 64);
            }
            Hit::Recent => self.added.push(found),
        }
    }

    fn seen(&self, i: usize) -> bool {
        self.seen
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Inode → (stat key, content hash).
#[derive(Debug, Default, Clone)]
pub struct HashCache {
    /// By (device, inode), each inode once.
    sorted: Vec<Cached>,
    /// Hashed since the last full scan, by (device, inode).
    recent: HashMap<(u64, u64), Cached>,
}

const MAGIC: &[u8; 8] = b"MHCACHE2";
/// The format before the cache was keyed by inode: path, key, hash.
const MAGIC_V1: &[u8; 8] = b"MHCACHE1";
const RECORD: usize = 5 * 8 + 32;

impl HashCache {
    /// The hash of the file in the state `key`, if it was hashed in it.
    pub fn get(&self, key: &StatKey) -> Option<(Hit, Cached)> {
        if let Some(c) = self.recent.get(&key.inode()) {
            return (c.key == *key).then_some((Hit::Recent, *c));
        }
        let i = self
            .sorted
            .binary_search_by_key(&key.inode(), |c| c.key.inode())
            .ok()?;
        let c = self.sorted[i];
        (c.key == *key).then_some((Hit::Sorted(i), c))
    }

    /// Entries in the cache.
    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in what a scan learnt. After a full scan (`full`) the cache
    /// holds exactly the files it found (`update.seen` and
    /// `update.added`); after a scan of changed paths, the added files
    /// join the others.
    pub fn apply(&mut self, update: CacheUpdate, full: bool) {
        if !full {
            self.recent
                .extend(update.added.into_iter().map(|c| (c.key.inode(), c)));
            return;
        }
        let mut i = 0;
        self.sorted.retain(|_| {
            i += 1;
            update.seen(i - 1)
        });
        self.recent.clear();
        self.merge(update.added);
    }

    /// Adds `added` to the sorted array. The two hold different inodes
    /// (after a full scan's sweep, what it found and what it hashed are
    /// apart; a hard link found twice is one entry twice), so the order
    /// of equal keys does not matter: the bigger array is the base, and
    /// the sort is in place (a million entries need no second copy).
    fn merge(&mut self, mut added: Vec<Cached>) {
        let mut base = std::mem::take(&mut self.sorted);
        if base.len() < added.len() {
            std::mem::swap(&mut base, &mut added);
        }
        base.extend(added);
        base.sort_unstable_by_key(|c| c.key.inode());
        base.dedup_by_key(|c| c.key.inode());
        base.shrink_to_fit();
        self.sorted = base;
    }

    /// Loads the cache; a missing or damaged file gives an empty cache (it is
    /// only an optimisation: everything is re-hashed).
    pub fn load(path: &Path) -> Self {
        let Ok(bytes) = std::fs::read(path) else {
            return HashCache::default();
        };
        match Self::decode(&bytes) {
            Some(c) => c,
            None => {
                tracing::warn!(path = %path.display(), "hash cache is damaged; every file will be re-hashed");
                HashCache::default()
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let (v1, mut p) = match (b.strip_prefix(MAGIC), b.strip_prefix(MAGIC_V1)) {
            (Some(p), _) => (false, p),
            (None, Some(p)) => (true, p),
            (None, None) => return None,
        };
        fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if p.len() < n {
                return None;
            }
            let (a, rest) = p.split_at(n);
            *p = rest;
            Some(a)
        }
        fn u64_(p: &mut &[u8]) -> Option<u64> {
            Some(u64::from_le_bytes(take(p, 8)?.try_into().ok()?))
        }
        let mut added = Vec::with_capacity(if v1 { 0 } else { p.len() / RECORD });
        while !p.is_empty() {
            if v1 {
                // A path, which the inode-keyed cache does not need.
                let n = u64_(&mut p)? as usize;
                take(&mut p, n)?;
            }
            let key = StatKey {
                dev: u64_(&mut p)?,
                ino: u64_(&mut p)?,
                size: u64_(&mut p)?,
                mtime_ns: u64_(&mut p)? as i64,
                ctime_ns: u64_(&mut p)? as i64,
            };
            let hash = Hash(take(&mut p, 32)?.try_into().ok()?);
            added.push(Cached { key, hash });
        }
        let mut c = HashCache::default();
        c.merge(added);
        Some(c)
    }

    /// Saves atomically, streaming (a million entries are 72 MB).
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        write_atomic_with(path, 0o644, |w| {
            w.write_all(MAGIC)?;
            for c in self.sorted.iter().chain(self.recent.values()) {
                let k = &c.key;
                for v in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64] {
                    w.write_all(&v.to_le_bytes())?;
                }
                w.write_all(c.hash.as_bytes())?;
            }
            Ok(())
        })
    }
}

/// Seeds the stat cache of an origin state for a content directory whose
/// files are known to hash as `files` says (`meridian restore` just wrote
/// them from verified objects), so the origin started on it does not hash
/// them again. Each file's stat key is read now; a file changed after this
/// no longer matches and is hashed as usual. Returns the entries written.
pub fn seed(state: &Path, content: &Path, files: &[(String, Hash)]) -> Result<usize, StoreError> {
    let mut added = Vec::with_capacity(files.len());
    for (rel, h) in files {
        let p = content.join(rel);
        let md = std::fs::symlink_metadata(&p).map_err(|e| StoreError::io(&p, e))?;
        added.push(Cached {
            key: StatKey::of(&md),
            hash: *h,
        });
    }
    let mut cache = HashCache::default();
    cache.merge(added);
    cache.save(&state.join("hashcache"))?;
    Ok(cache.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64, ctime_ns: i64) -> StatKey {
        StatKey {
            dev: 1,
            ino,
            size: 3,
            mtime_ns: 4,
            ctime_ns,
        }
    }

    #[test]
    fn round_trips_and_survives_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("cache");
        let mut c = HashCache::default();
        let (k, h) = (key(2, 5), Hash([7; 32]));
        let added = vec![Cached { key: k, hash: h }];
        c.apply(
            CacheUpdate {
                added,
                seen: vec![],
            },
            true,
        );
        c.save(&p).expect("save");
        let back = HashCache::load(&p);
        assert_eq!(back.get(&k).map(|(_, c)| c.hash), Some(h));
        // Another state of the same inode is not a match.
        assert_eq!(back.get(&key(2, 6)), None);
        std::fs::write(&p, b"MHCACHE2\x05").expect("write");
        assert!(HashCache::load(&p).is_empty());
        // The path-keyed format before it loads as the same cache.
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(b"a/b");
        for v in [1u64, 2, 3, 4, 5] {
            v1.extend_from_slice(&v.to_le_bytes());
        }
        v1.extend_from_slice(&[7; 32]);
        std::fs::write(&p, &v1).expect("write");
        assert_eq!(HashCache::load(&p).get(&k).map(|(_, c)| c.hash), Some(h));
    }

    #[test]
    fn a_full_scan_keeps_what_it_found_and_a_scan_of_changes_adds() {
        let mut c = HashCache::default();
        let all: Vec<Cached> = (0..200)
            .map(|i| Cached {
                key: key(1000 - i, 9),
                hash: Hash([i as u8; 32]),
            })
            .collect();
        c.apply(
            CacheUpdate {
                added: all.clone(),
                seen: vec![],
            },
            true,
        );
        assert_eq!(c.len(), 200);
        // A scan of changes: one inode hashed again in a new state.
        let newer = Cached {
            key: key(1000, 10),
            hash: Hash([99; 32]),
        };
        c.apply(
            CacheUpdate {
                added: vec![newer],
                seen: vec![],
            },
            false,
        );
        assert_eq!(c.get(&key(1000, 10)).map(|(_, x)| x.hash), Some(newer.hash));
        assert_eq!(
            c.get(&key(1000, 9)),
            None,
            "the old state no longer matches"
        );
        // A full scan that found the even inodes (and the newer state).
        let mut u = CacheUpdate::default();
        for x in &all {
            if x.key.ino % 2 == 0
                && let Some((hit, found)) = c.get(&x.key)
            {
                u.hit(hit, found);
            }
        }
        let (hit, found) = c.get(&newer.key).expect("recent");
        assert_eq!(hit, Hit::Recent);
        u.hit(hit, found);
        c.apply(u, true);
        assert_eq!(c.len(), 100);
        for x in &all {
            let want = (x.key.ino % 2 == 0 && x.key.ino != 1000).then_some(x.hash);
            assert_eq!(c.get(&x.key).map(|(_, f)| f.hash), want, "{}", x.key.ino);
        }
        assert_eq!(c.get(&newer.key).map(|(_, f)| f.hash), Some(newer.hash));
    }
}
