//! Directory nodes, roots and the signed envelope.
//!
//! The tree is a Merkle tree of directory nodes, addressed by the blake3 hash
//! of their canonical encoding, exactly as git addresses tree objects. A
//! generation's [`Root`] names the hash of the top directory node; only the
//! root is signed. A mirror that holds generation N and learns of N+1 fetches
//! the new root, then only the nodes whose hashes it does not already have,
//! then only the blobs it does not have: O(changed), not O(tree).

use crate::encoding::{DecodeError, Reader, Writer};
use crate::hash::{Hash, hash_bytes};
use crate::keys::{PublicKey, SecretKey};
use crate::path::{PathError, nfc_key, validate_name};
use std::collections::HashSet;

/// Most entries in one directory node.
pub const MAX_DIR_ENTRIES: usize = 1_000_000;
/// Largest encoded directory node (64 MiB; a million entries of short names).
pub const MAX_NODE_BYTES: u64 = 64 << 20;
/// Largest encoded root body, and largest signed envelope.
pub const MAX_ROOT_BYTES: u64 = 4096;
/// Longest symlink target.
pub const MAX_SYMLINK_BYTES: usize = 4096;

pub(crate) const DIR_MAGIC: &[u8; 4] = b"MDIR";
const ROOT_MAGIC: &[u8; 4] = b"MROT";
const SIG_MAGIC: &[u8; 4] = b"MSIG";
pub(crate) const VERSION: u8 = 1;
/// Domain separation: a Meridian root signature can never be mistaken for a
/// signature over anything else signed with the same key.
pub const SIGNING_CONTEXT: &[u8] = b"meridian root v1\0";

/// What kind of thing an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    fn tag(self) -> u8 {
        match self {
            EntryKind::File => 0,
            EntryKind::Dir => 1,
            EntryKind::Symlink => 2,
        }
    }
    fn from_tag(t: u8) -> Result<Self, DecodeError> {
        Ok(match t {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            _ => return Err(DecodeError::Invalid("entry kind")),
        })
    }
}

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// A single validated path component.
    pub name: String,
    pub kind: EntryKind,
    /// File: content length. Dir: encoded length of the child node.
    /// Symlink: target length. A reader never reads more than this.
    pub size: u64,
    /// File: blake3 of the content. Dir: hash of the child node.
    /// Symlink: blake3 of the target.
    pub hash: Hash,
    /// The executable bit (files only).
    pub executable: bool,
    /// Modification time, seconds since the Unix epoch (for Last-Modified).
    pub mtime: i64,
    /// Symlink target, relative; `None` for other kinds.
    pub target: Option<String>,
}

impl Entry {
    /// A regular file.
    pub fn file(name: &str, size: u64, hash: Hash, executable: bool, mtime: i64) -> Self {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::File,
            size,
            hash,
            executable,
            mtime,
            target: None,
        }
    }
    /// A directory whose node encodes to `node_size` bytes and hashes to `hash`.
    pub fn dir(name: &str, node_size: u64, hash: Hash, mtime: i64) -> Self {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::Dir,
            size: node_size,
            hash,
            executable: false,
            mtime,
            target: None,
        }
    }
    /// A symlink to a relative target.
    pub fn symlink(name: &str, target: &str, mtime: i64) -> Self {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::Symlink,
            size: target.len() as u64,
            hash: hash_bytes(target.as_bytes()),
            executable: false,
            mtime,
            target: Some(target.to_owned()),
        }
    }

    /// Appends the canonical encoding of this entry (as in a node).
    pub(crate) fn write(&self, w: &mut Writer) {
        w.short_bytes(self.name.as_bytes());
        w.u8(self.kind.tag());
        w.u8(u8::from(self.executable));
        w.u64(self.size);
        w.raw(self.hash.as_bytes());
        w.i64(self.mtime);
        if let Some(t) = &self.target {
            w.short_bytes(t.as_bytes());
        }
    }

    /// Reads one entry (shape only; [`DirNode::validate`] checks the rules).
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = std::str::from_utf8(r.short_bytes("name")?)
            .map_err(|_| DecodeError::Invalid("name is not UTF-8"))?
            .to_owned();
        let kind = EntryKind::from_tag(r.u8("kind")?)?;
        let flags = r.u8("flags")?;
        if flags > 1 || (flags == 1 && kind != EntryKind::File) {
            return Err(DecodeError::Invalid("entry flags"));
        }
        let size = r.u64("size")?;
        let hash = Hash(r.array("hash")?);
        let mtime = r.i64("mtime")?;
        let target = if kind == EntryKind::Symlink {
            Some(
                std::str::from_utf8(r.short_bytes("symlink target")?)
                    .map_err(|_| DecodeError::Invalid("symlink target is not UTF-8"))?
                    .to_owned(),
            )
        } else {
            None
        };
        Ok(Entry {
            name,
            kind,
            size,
            hash,
            executable: flags == 1,
            mtime,
            target,
        })
    }

    pub(crate) fn validate(&self) -> Result<(), DecodeError> {
        validate_name(&self.name)?;
        match self.kind {
            EntryKind::File => {
                if self.target.is_some() {
                    return Err(DecodeError::Invalid("file with a symlink target"));
                }
            }
            EntryKind::Dir => {
                if self.executable || self.target.is_some() {
                    return Err(DecodeError::Invalid("directory flags"));
                }
                if self.size > MAX_NODE_BYTES {
                    return Err(DecodeError::TooLarge {
                        what: "directory node",
                        got: self.size,
                        limit: MAX_NODE_BYTES,
                    });
                }
            }
            EntryKind::Symlink => {
                let t = self
                    .target
                    .as_deref()
                    .ok_or(DecodeError::Invalid("symlink without target"))?;
                if self.executable
                    || t.is_empty()
                    || t.starts_with('/')
                    || t.len() > MAX_SYMLINK_BYTES
                    || t.contains('\0')
                    || t.contains('\\')
                    || self.size != t.len() as u64
                    || self.hash != hash_bytes(t.as_bytes())
                {
                    return Err(DecodeError::Invalid("symlink target"));
                }
            }
        }
        Ok(())
    }
}

/// One directory: its entries in canonical order (sorted by name bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirNode {
    /// Read them; to change them, build a new node ([`DirNode::new`]):
    /// [`DirNode::get`]'s index is made with the node.
    pub entries: Vec<Entry>,
    /// The first 8 bytes of each entry's name, big-endian, zero-padded:
    /// [`DirNode::get`] searches this contiguous array and reads a name
    /// only where the prefixes tie (two cache lines a probe become one).
    keys: Box<[u64]>,
}

/// A name's first 8 bytes as a number that orders as the bytes do (a
/// shorter name is padded with zeros, which sort first).
fn name_key(name: &str) -> u64 {
    let b = name.as_bytes();
    let mut k = [0u8; 8];
    let n = b.len().min(8);
    k[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(k)
}

impl DirNode {
    /// Builds a node, sorting the entries and checking every rule.
    pub fn new(mut entries: Vec<Entry>) -> Result<Self, DecodeError> {
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        let node = DirNode::unchecked(entries);
        node.validate()?;
        Ok(node)
    }

    /// A node of these entries as they are, not sorted nor checked (the
    /// caller checks, or a test wants a node that breaks the rules).
    pub(crate) fn unchecked(entries: Vec<Entry>) -> Self {
        let keys = entries.iter().map(|e| name_key(&e.name)).collect();
        DirNode { entries, keys }
    }

    /// Checks names, order, duplicates and normalisation collisions.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.entries.len() > MAX_DIR_ENTRIES {
            return Err(DecodeError::TooLarge {
                what: "directory",
                got: self.entries.len() as u64,
                limit: MAX_DIR_ENTRIES as u64,
            });
        }
        let mut any_non_ascii = false;
        for (i, e) in self.entries.iter().enumerate() {
            e.validate()?;
            any_non_ascii |= !e.name.is_ascii();
            if i > 0 {
                let prev = &self.entries[i - 1].name;
                match prev.as_bytes().cmp(e.name.as_bytes()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => {
                        return Err(PathError::Duplicate(e.name.clone()).into());
                    }
                    std::cmp::Ordering::Greater => {
                        return Err(PathError::Unsorted(e.name.clone()).into());
                    }
                }
            }
        }
        if any_non_ascii {
            let mut seen: HashSet<String> = HashSet::with_capacity(self.entries.len());
            for e in &self.entries {
                let key = nfc_key(&e.name);
                if !seen.insert(key.clone()) {
                    let other = self
                        .entries
                        .iter()
                        .find(|o| o.name != e.name && nfc_key(&o.name) == key)
                        .map(|o| o.name.clone())
                        .unwrap_or_default();
                    return Err(PathError::NormalisationCollision(other, e.name.clone()).into());
                }
            }
        }
        Ok(())
    }

    /// The canonical bytes of this node.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + self.entries.len() * 64);
        w.raw(DIR_MAGIC);
        w.u8(VERSION);
        w.u32(self.entries.len() as u32);
        for e in &self.entries {
            e.write(&mut w);
        }
        w.buf
    }

    /// Parses and validates a node. Refuses anything over [`MAX_NODE_BYTES`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() as u64 > MAX_NODE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "directory node",
                got: bytes.len() as u64,
                limit: MAX_NODE_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.header(DIR_MAGIC, VERSION, "directory node")?;
        let count = r.u32("entry count")? as usize;
        if count > MAX_DIR_ENTRIES {
            return Err(DecodeError::TooLarge {
                what: "directory",
                got: count as u64,
                limit: MAX_DIR_ENTRIES as u64,
            });
        }
        // Each entry takes at least 52 bytes, so a lying count cannot make
        // us allocate more than the input justifies.
        if count > r.remaining() / 52 + 1 {
            return Err(DecodeError::Truncated("entries"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push(Entry::read(&mut r)?);
        }
        r.finish()?;
        let node = DirNode::unchecked(entries);
        node.validate()?;
        Ok(node)
    }

    /// Finds an entry by name (binary search over the canonical order).
    pub fn get(&self, name: &str) -> Option<&Entry> {
        let by_name = |e: &Entry| e.name.as_bytes().cmp(name.as_bytes());
        if self.keys.len() != self.entries.len() {
            return self
                .entries
                .binary_search_by(by_name)
                .ok()
                .map(|i| &self.entries[i]);
        }
        // (prefix, name) orders as the name does: a smaller prefix is a
        // smaller name, and equal prefixes are settled by the names.
        let key = name_key(name);
        let (mut lo, mut hi) = (0, self.keys.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.keys[mid]
                .cmp(&key)
                .then_with(|| by_name(&self.entries[mid]))
            {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(&self.entries[mid]),
            }
        }
        None
    }
}

/// The body of a generation: what the origin signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Starts at 1 and increases by one with every publish.
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created: i64,
    /// After this instant the root must not be trusted (freeze attacks).
    pub expires: i64,
    /// [`Root::hash`] of the previous generation; [`Hash::ZERO`] for generation 1.
    pub previous: Hash,
    /// Hash of the top directory node.
    pub tree: Hash,
    /// Encoded length of the top directory node.
    pub tree_size: u64,
    /// Number of regular files in the tree.
    pub files: u64,
    /// Total bytes of all regular files.
    pub bytes: u64,
}

impl Root {
    /// The canonical bytes of the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        w.raw(ROOT_MAGIC);
        w.u8(VERSION);
        w.u64(self.generation);
        w.i64(self.created);
        w.i64(self.expires);
        w.raw(self.previous.as_bytes());
        w.raw(self.tree.as_bytes());
        w.u64(self.tree_size);
        w.u64(self.files);
        w.u64(self.bytes);
        w.buf
    }

    /// Parses and checks a body.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        r.header(ROOT_MAGIC, VERSION, "root")?;
        let root = Root {
            generation: r.u64("generation")?,
            created: r.i64("created")?,
            expires: r.i64("expires")?,
            previous: Hash(r.array("previous")?),
            tree: Hash(r.array("tree")?),
            tree_size: r.u64("tree size")?,
            files: r.u64("file count")?,
            bytes: r.u64("byte count")?,
        };
        r.finish()?;
        if root.generation == 0 {
            return Err(DecodeError::Invalid("generation 0"));
        }
        if root.expires <= root.created {
            return Err(DecodeError::Invalid("expiry not after creation"));
        }
        if (root.generation == 1) != (root.previous == Hash::ZERO) {
            return Err(DecodeError::Invalid("previous hash of generation 1"));
        }
        if root.tree_size > MAX_NODE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "top directory node",
                got: root.tree_size,
                limit: MAX_NODE_BYTES,
            });
        }
        Ok(root)
    }

    /// The identity of this generation, used by the next one's `previous`.
    pub fn hash(&self) -> Hash {
        hash_bytes(&self.encode())
    }
}

/// A root with the ed25519 signature of the key it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRoot {
    pub key: PublicKey,
    /// The canonical root body, exactly as signed.
    pub body: Vec<u8>,
    pub signature: [u8; 64],
}

impl SignedRoot {
    /// Signs a root.
    pub fn sign(root: &Root, key: &SecretKey) -> Self {
        let body = root.encode();
        let signature = key.sign(&signing_message(&body));
        SignedRoot {
            key: key.public(),
            body,
            signature,
        }
    }

    /// The envelope's canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.body.len() + 112);
        w.raw(SIG_MAGIC);
        w.u8(VERSION);
        w.raw(self.key.as_bytes());
        w.u32(self.body.len() as u32);
        w.raw(&self.body);
        w.raw(&self.signature);
        w.buf
    }

    /// Parses an envelope (does not check the signature: see [`crate::Verifier`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() as u64 > MAX_ROOT_BYTES {
            return Err(DecodeError::TooLarge {
                what: "signed root",
                got: bytes.len() as u64,
                limit: MAX_ROOT_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.header(SIG_MAGIC, VERSION, "signed root")?;
        let key = PublicKey::from_bytes(&r.array("public key")?)
            .map_err(|_| DecodeError::Invalid("public key"))?;
        let len = r.u32("body length")? as usize;
        let body = r.take(len, "root body")?.to_vec();
        let signature = r.array("signature")?;
        r.finish()?;
        Ok(SignedRoot {
            key,
            body,
            signature,
        })
    }
}

/// The message that is actually signed: context string, then the body.
pub fn signing_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._ -]{1,24}".prop_filter("valid names", |s| validate_name(s).is_ok())
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (
            name_strategy(),
            0u8..3,
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<bool>(),
            any::<i64>(),
            "[a-z]{1,10}(/[a-z]{1,10}){0,3}",
        )
            .prop_map(|(name, kind, size, hash, exec, mtime, target)| match kind {
                0 => Entry::file(&name, size, Hash(hash), exec, mtime),
                1 => Entry::dir(&name, size % MAX_NODE_BYTES, Hash(hash), mtime),
                _ => Entry::symlink(&name, &target, mtime),
            })
    }

    proptest! {
        #[test]
        fn dir_node_round_trips(entries in proptest::collection::vec(entry_strategy(), 0..40)) {
            let mut entries = entries;
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let node = DirNode::new(entries).expect("valid node");
            let bytes = node.encode();
            let back = DirNode::decode(&bytes).expect("decodes");
            prop_assert_eq!(&back, &node);
            prop_assert_eq!(back.encode(), bytes);
        }

        /// `get` finds every entry and nothing else, with names that
        /// share long prefixes, are prefixes of each other or are short
        /// (the prefix index's ties and padding).
        #[test]
        fn get_finds_exactly_the_entries(
            names in proptest::collection::btree_set("(pkg-1\\.2\\.)?[ab\u{e9}]{0,10}[a-c]", 0..60),
            probes in proptest::collection::vec("(pkg-1\\.2\\.)?[ab\u{e9}]{0,10}[a-c]?", 0..30),
        ) {
            let h = Hash::ZERO;
            let node = DirNode::new(
                names.iter().enumerate().map(|(i, n)| Entry::file(n, i as u64, h, false, 0)).collect(),
            );
            // Names that NFC would merge are refused; skip those sets.
            let Ok(node) = node else { return Ok(()) };
            for e in &node.entries {
                prop_assert_eq!(node.get(&e.name).map(|f| &f.name), Some(&e.name));
            }
            for p in &probes {
                prop_assert_eq!(node.get(p).is_some(), names.contains(p), "{:?}", p);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = DirNode::decode(&bytes);
            let _ = Root::decode(&bytes);
            let _ = SignedRoot::decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(entries in proptest::collection::vec(entry_strategy(), 1..10), cut in 1usize..64) {
            let mut entries = entries;
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let bytes = DirNode::new(entries).expect("valid").encode();
            let cut = cut.min(bytes.len());
            prop_assert!(DirNode::decode(&bytes[..bytes.len() - cut]).is_err());
        }
    }

    #[test]
    fn rejects_duplicates_and_collisions() {
        let h = Hash::ZERO;
        let dup = DirNode::new(vec![
            Entry::file("a", 1, h, false, 0),
            Entry::file("a", 2, h, false, 0),
        ]);
        assert!(matches!(
            dup,
            Err(DecodeError::Path(PathError::Duplicate(_)))
        ));
        let nfc = DirNode::new(vec![
            Entry::file("caf\u{e9}", 1, h, false, 0),
            Entry::file("cafe\u{301}", 1, h, false, 0),
        ]);
        assert!(matches!(
            nfc,
            Err(DecodeError::Path(PathError::NormalisationCollision(_, _)))
        ));
        // An unsorted encoding is refused by the decoder.
        let mut node = DirNode::new(vec![
            Entry::file("a", 1, h, false, 0),
            Entry::file("b", 1, h, false, 0),
        ])
        .expect("valid");
        node.entries.swap(0, 1);
        assert!(matches!(
            DirNode::decode(&node.encode()),
            Err(DecodeError::Path(PathError::Unsorted(_)))
        ));
    }

    #[test]
    fn rejects_bad_names_in_encoded_nodes() {
        let h = Hash::ZERO;
        for bad in ["..", ".", "a/b", "a\\b", "", "a\0b"] {
            let node = DirNode::unchecked(vec![Entry::file(bad, 1, h, false, 0)]);
            assert!(DirNode::decode(&node.encode()).is_err(), "{bad:?} accepted");
        }
        let escaping = DirNode::unchecked(vec![Entry::symlink("l", "/etc/passwd", 0)]);
        assert!(DirNode::decode(&escaping.encode()).is_err());
    }

    #[test]
    fn size_caps_are_enforced() {
        let huge = vec![0u8; (MAX_ROOT_BYTES + 1) as usize];
        assert!(matches!(
            SignedRoot::decode(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        // A count that promises more entries than the bytes could hold.
        let mut w = Writer::default();
        w.raw(DIR_MAGIC);
        w.u8(VERSION);
        w.u32(900_000);
        assert!(DirNode::decode(&w.buf).is_err());
    }

    #[test]
    fn get_finds_by_binary_search() {
        let h = Hash::ZERO;
        let node = DirNode::new(vec![
            Entry::file("zeta", 1, h, false, 0),
            Entry::file("alpha", 2, h, false, 0),
            Entry::dir("mid", 10, h, 0),
        ])
        .expect("valid");
        assert_eq!(node.get("alpha").map(|e| e.size), Some(2));
        assert_eq!(node.get("mid").map(|e| e.kind), Some(EntryKind::Dir));
        assert!(node.get("nope").is_none());
    }
}
