//! The stat cache: a file whose (device, inode, size, mtime, ctime) are
//! unchanged since it was last hashed is not hashed again. The cache is saved
//! atomically after every publish, so it survives restarts.
//!
//! ctime is part of the key because it cannot be set from user space: a
//! writer that restores the old mtime with `touch -d` still changes ctime.

use meridian_core::Hash;
use meridian_serve::store::{StoreError, write_atomic};
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
}

/// Path → (stat key, content hash).
#[derive(Debug, Default, Clone)]
pub struct HashCache {
    pub map: HashMap<String, (StatKey, Hash)>,
}

const MAGIC: &[u8; 8] = b"MHCACHE1";

impl HashCache {
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
        let mut map = HashMap::new();
        let mut p = b.strip_prefix(MAGIC)?;
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
        while !p.is_empty() {
            let n = u64_(&mut p)? as usize;
            let path = std::str::from_utf8(take(&mut p, n)?).ok()?.to_owned();
            let key = StatKey {
                dev: u64_(&mut p)?,
                ino: u64_(&mut p)?,
                size: u64_(&mut p)?,
                mtime_ns: u64_(&mut p)? as i64,
                ctime_ns: u64_(&mut p)? as i64,
            };
            let h = Hash(take(&mut p, 32)?.try_into().ok()?);
            map.insert(path, (key, h));
        }
        Some(HashCache { map })
    }

    /// Saves atomically.
    pub fn save(&self, path: &Path) -> Result<(), StoreError> {
        let mut b = Vec::with_capacity(8 + self.map.len() * 120);
        b.extend_from_slice(MAGIC);
        for (p, (k, h)) in &self.map {
            b.extend_from_slice(&(p.len() as u64).to_le_bytes());
            b.extend_from_slice(p.as_bytes());
            for v in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(h.as_bytes());
        }
        write_atomic(path, &b)
    }
}

/// Seeds the stat cache of an origin state for a content directory whose
/// files are known to hash as `files` says (`meridian restore` just wrote
/// them from verified objects), so the origin started on it does not hash
/// them again. Each file's stat key is read now; a file changed after this
/// no longer matches and is hashed as usual. Returns the entries written.
pub fn seed(state: &Path, content: &Path, files: &[(String, Hash)]) -> Result<usize, StoreError> {
    let mut cache = HashCache::default();
    for (rel, h) in files {
        let p = content.join(rel);
        let md = std::fs::symlink_metadata(&p).map_err(|e| StoreError::io(&p, e))?;
        cache.map.insert(rel.clone(), (StatKey::of(&md), *h));
    }
    cache.save(&state.join("hashcache"))?;
    Ok(cache.map.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("cache");
        let mut c = HashCache::default();
        let k = StatKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        c.map.insert("a/b".into(), (k, Hash([7; 32])));
        c.save(&p).expect("save");
        let back = HashCache::load(&p);
        assert_eq!(back.map.get("a/b"), Some(&(k, Hash([7; 32]))));
        std::fs::write(&p, b"MHCACHE1\x05").expect("write");
        assert!(HashCache::load(&p).map.is_empty());
    }
}
