//! Tree deltas: the directory nodes of one generation, written as edits of
//! the nodes of another.
//!
//! A mirror that serves generation N already holds every node of N. For N+1
//! it needs the nodes on the paths from each change to the top; sent whole,
//! a change to one file in a directory of 10,000 costs the whole directory.
//! A [`TreeDelta`] sends only the changed entries: "node X is node Y with
//! these names removed and these entries put". The receiver rebuilds each
//! node, encodes it canonically and checks that it hashes to X, so a delta
//! needs no trust of its own: every node it yields is checked against a hash
//! that the signed root reaches, exactly as a node fetched by hash is.
//!
//! Encoding (`MDLT` version 1), integers big-endian:
//!
//! ```text
//! "MDLT" u8:1  from:[32]  to:[32]  u32:nodes
//!   node: hash:[32]  u8:has_base  [base:[32]]  u32:ops
//!     op: u8:0 name:short_bytes        remove a name from the base
//!         u8:1 entry (as in a node)     put (add or replace) an entry
//! ```
//!
//! Ops are in canonical (byte) order of names and name each at most once.

use crate::encoding::{DecodeError, Reader, Writer};
use crate::hash::{Hash, hash_bytes};
use crate::manifest::{DirNode, Entry, MAX_DIR_ENTRIES, MAX_NODE_BYTES};
use std::collections::HashSet;

const MAGIC: &[u8; 4] = b"MDLT";
const VERSION: u8 = 1;
/// Largest encoded delta a reader accepts (the same bound as one node).
pub const MAX_DELTA_BYTES: u64 = MAX_NODE_BYTES;
/// Most nodes one delta may describe.
pub const MAX_DELTA_NODES: usize = 1_000_000;

/// One change to a directory node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditOp {
    /// Remove this name.
    Remove(String),
    /// Add this entry, or replace the entry of the same name.
    Put(Entry),
}

impl EditOp {
    fn name(&self) -> &str {
        match self {
            EditOp::Remove(n) => n,
            EditOp::Put(e) => &e.name,
        }
    }
}

/// One node of the target tree, as edits of a base node (or from nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEdit {
    /// The hash the rebuilt node must have.
    pub hash: Hash,
    /// The node the edits apply to; `None` builds from an empty directory.
    pub base: Option<Hash>,
    pub ops: Vec<EditOp>,
}

impl NodeEdit {
    /// Applies the edits to `base` (which must be the node named by
    /// [`NodeEdit::base`]) and checks the result against [`NodeEdit::hash`].
    /// Returns the node and its canonical bytes.
    pub fn apply(&self, base: Option<&DirNode>) -> Result<(DirNode, Vec<u8>), DecodeError> {
        let empty: &[Entry] = &[];
        let old = base.map_or(empty, |b| b.entries.as_slice());
        let mut entries = Vec::with_capacity(old.len() + self.ops.len());
        let mut i = 0;
        let mut any_non_ascii = false;
        for op in &self.ops {
            if let EditOp::Put(e) = op {
                e.validate()?;
                any_non_ascii |= !e.name.is_ascii();
            }
            let name = op.name().as_bytes();
            while i < old.len() && old[i].name.as_bytes() < name {
                entries.push(old[i].clone());
                i += 1;
            }
            let present = i < old.len() && old[i].name.as_bytes() == name;
            match op {
                EditOp::Remove(_) if !present => {
                    return Err(DecodeError::Invalid("delta removes a name that is absent"));
                }
                EditOp::Remove(_) => {}
                EditOp::Put(e) => entries.push(e.clone()),
            }
            if present {
                i += 1;
            }
        }
        entries.extend_from_slice(&old[i..]);
        let node = DirNode::unchecked(entries);
        // The base was validated when it was accepted, the ops are in
        // strict name order (checked by `decode`) and the merge keeps the
        // order, so only the new entries need their rules checked; the
        // whole node is re-checked only for the rare rules that span
        // entries (size, and normalisation collisions, which need a non-ASCII
        // name on one side).
        let ordered = self
            .ops
            .windows(2)
            .all(|w| w[0].name().as_bytes() < w[1].name().as_bytes());
        if !ordered
            || node.entries.len() > MAX_DIR_ENTRIES
            || any_non_ascii
            || base.is_none()
            || old.iter().any(|e| !e.name.is_ascii())
        {
            node.validate()?;
        }
        let bytes = node.encode();
        if bytes.len() as u64 > MAX_NODE_BYTES || hash_bytes(&bytes) != self.hash {
            return Err(DecodeError::Invalid(
                "delta rebuilds a node that does not match its hash",
            ));
        }
        Ok((node, bytes))
    }
}

/// Every node of tree `to` that tree `from` lacks, as edits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDelta {
    pub from: Hash,
    pub to: Hash,
    /// Parents before children (the order of a walk from the top).
    pub nodes: Vec<NodeEdit>,
}

impl TreeDelta {
    /// The canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128 + self.nodes.len() * 160);
        w.raw(MAGIC);
        w.u8(VERSION);
        w.raw(self.from.as_bytes());
        w.raw(self.to.as_bytes());
        w.u32(self.nodes.len() as u32);
        for n in &self.nodes {
            w.raw(n.hash.as_bytes());
            match &n.base {
                Some(b) => {
                    w.u8(1);
                    w.raw(b.as_bytes());
                }
                None => w.u8(0),
            }
            w.u32(n.ops.len() as u32);
            for op in &n.ops {
                match op {
                    EditOp::Remove(name) => {
                        w.u8(0);
                        w.short_bytes(name.as_bytes());
                    }
                    EditOp::Put(e) => {
                        w.u8(1);
                        e.write(&mut w);
                    }
                }
            }
        }
        w.buf
    }

    /// Parses a delta, refusing anything over [`MAX_DELTA_BYTES`], counts
    /// the input cannot justify, and ops out of canonical order.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() as u64 > MAX_DELTA_BYTES {
            return Err(DecodeError::TooLarge {
                what: "tree delta",
                got: bytes.len() as u64,
                limit: MAX_DELTA_BYTES,
            });
        }
        let mut r = Reader::new(bytes);
        r.header(MAGIC, VERSION, "tree delta")?;
        let from = Hash(r.array("from")?);
        let to = Hash(r.array("to")?);
        let count = r.u32("node count")? as usize;
        // Each node takes at least 37 bytes.
        if count > MAX_DELTA_NODES || count > r.remaining() / 37 {
            return Err(DecodeError::Truncated("delta nodes"));
        }
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let hash = Hash(r.array("node hash")?);
            let base = match r.u8("base flag")? {
                0 => None,
                1 => Some(Hash(r.array("base hash")?)),
                _ => return Err(DecodeError::Invalid("base flag")),
            };
            let n_ops = r.u32("op count")? as usize;
            // Each op takes at least 3 bytes.
            if n_ops > MAX_DIR_ENTRIES || n_ops > r.remaining() / 3 {
                return Err(DecodeError::Truncated("delta ops"));
            }
            let mut ops: Vec<EditOp> = Vec::with_capacity(n_ops);
            for _ in 0..n_ops {
                let op = match r.u8("op tag")? {
                    0 => EditOp::Remove(
                        std::str::from_utf8(r.short_bytes("name")?)
                            .map_err(|_| DecodeError::Invalid("name is not UTF-8"))?
                            .to_owned(),
                    ),
                    1 => EditOp::Put(Entry::read(&mut r)?),
                    _ => return Err(DecodeError::Invalid("op tag")),
                };
                if let Some(prev) = ops.last()
                    && prev.name().as_bytes() >= op.name().as_bytes()
                {
                    return Err(DecodeError::Invalid("delta ops out of order"));
                }
                ops.push(op);
            }
            nodes.push(NodeEdit { hash, base, ops });
        }
        r.finish()?;
        Ok(TreeDelta { from, to, nodes })
    }
}

/// Why [`encode_between`] could not write a delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    #[error("directory node {0} is not held")]
    Missing(Hash),
    #[error("directory node {0} is malformed: {1}")]
    Malformed(Hash, DecodeError),
}

/// One entry of an encoded node, borrowed: its name, kind tag, hash and
/// exact encoded bytes.
struct RawEntry<'a> {
    name: &'a [u8],
    kind: u8,
    hash: [u8; 32],
    raw: &'a [u8],
}

/// Splits an encoded node into its entries without copying or validating
/// them (the caller's nodes were validated when they were stored).
fn raw_entries(bytes: &[u8]) -> Result<Vec<RawEntry<'_>>, DecodeError> {
    let mut r = Reader::new(bytes);
    r.header(
        crate::manifest::DIR_MAGIC,
        crate::manifest::VERSION,
        "directory node",
    )?;
    let count = r.u32("entry count")? as usize;
    if count > r.remaining() / 52 + 1 {
        return Err(DecodeError::Truncated("entries"));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let start = bytes.len() - r.remaining();
        let name = r.short_bytes("name")?;
        let kind = r.u8("kind")?;
        r.take(1 + 8, "flags and size")?;
        let hash = r.array::<32>("hash")?;
        r.take(8, "mtime")?;
        if kind == 2 {
            r.short_bytes("symlink target")?;
        }
        let end = bytes.len() - r.remaining();
        out.push(RawEntry {
            name,
            kind,
            hash,
            raw: &bytes[start..end],
        });
    }
    r.finish()?;
    Ok(out)
}

/// Writes the encoded [`TreeDelta`] from tree `from` to tree `to` straight
/// from encoded nodes (`load` returns one by hash): every node of `to` that
/// `from` lacks, parents first, each as the entries that differ from the
/// node at the same path in `from`. Entries are compared and copied as
/// bytes, never decoded, so the cost is a scan of the changed nodes and no
/// allocation per entry; unchanged subtrees are never loaded. This is what
/// an upstream serves. (The tests check it against a typed reference.)
pub fn encode_between(
    from: Hash,
    to: Hash,
    mut load: impl FnMut(&Hash) -> Option<Vec<u8>>,
) -> Result<Vec<u8>, DeltaError> {
    const DIR: u8 = 1;
    let mut w = Writer::with_capacity(4096);
    w.raw(MAGIC);
    w.u8(VERSION);
    w.raw(from.as_bytes());
    w.raw(to.as_bytes());
    let count_at = w.buf.len();
    w.u32(0);
    let mut count: u32 = 0;
    let mut emitted: HashSet<Hash> = HashSet::new();
    let mut stack: Vec<(Option<Hash>, Hash)> = vec![(Some(from), to)];
    let mut fetch = |h: &Hash| load(h).ok_or(DeltaError::Missing(*h));
    while let Some((old, new)) = stack.pop() {
        if old == Some(new) || !emitted.insert(new) {
            continue;
        }
        let new_bytes = fetch(&new)?;
        let old_bytes = match old {
            Some(h) => Some((h, fetch(&h)?)),
            None => None,
        };
        let b = raw_entries(&new_bytes).map_err(|e| DeltaError::Malformed(new, e))?;
        let a = match &old_bytes {
            Some((h, bytes)) => raw_entries(bytes).map_err(|e| DeltaError::Malformed(*h, e))?,
            None => Vec::new(),
        };
        w.raw(new.as_bytes());
        match old {
            Some(h) => {
                w.u8(1);
                w.raw(h.as_bytes());
            }
            None => w.u8(0),
        }
        let ops_at = w.buf.len();
        w.u32(0);
        let mut ops: u32 = 0;
        let mut children: Vec<(Option<Hash>, Hash)> = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let ord = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            let (was, now) = match ord {
                std::cmp::Ordering::Less => {
                    w.u8(0);
                    w.short_bytes(a[i].name);
                    ops += 1;
                    i += 1;
                    continue;
                }
                std::cmp::Ordering::Greater => {
                    j += 1;
                    (None, &b[j - 1])
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                    (Some(&a[i - 1]), &b[j - 1])
                }
            };
            if was.is_some_and(|x| x.raw == now.raw) {
                continue;
            }
            w.u8(1);
            w.raw(now.raw);
            ops += 1;
            if now.kind == DIR {
                let old_child = was.filter(|x| x.kind == DIR).map(|x| Hash(x.hash));
                children.push((old_child, Hash(now.hash)));
            }
        }
        w.buf[ops_at..ops_at + 4].copy_from_slice(&ops.to_be_bytes());
        count += 1;
        // Children in name order, depth first.
        stack.extend(children.into_iter().rev());
    }
    w.buf[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    Ok(w.buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::EntryKind;
    use std::sync::Arc;
    // The typed reference: the delta as values, computed node by node. The
    // byte-level writer the upstreams serve (`encode_between`) must match it.

    /// The ops that turn `old` into `new` (both canonical).
    fn diff_nodes(old: &DirNode, new: &DirNode) -> Vec<EditOp> {
        let (a, b) = (&old.entries, &new.entries);
        let (mut i, mut j) = (0, 0);
        let mut ops = Vec::new();
        while i < a.len() || j < b.len() {
            let ord = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) => x.name.as_bytes().cmp(y.name.as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    ops.push(EditOp::Remove(a[i].name.clone()));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    ops.push(EditOp::Put(b[j].clone()));
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if a[i] != b[j] {
                        ops.push(EditOp::Put(b[j].clone()));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        ops
    }

    /// Computes the delta from tree `from` to tree `to`; `load` returns a
    /// node by hash. Unchanged subtrees (equal hashes) are never loaded.
    fn between<E>(
        from: Hash,
        to: Hash,
        mut load: impl FnMut(&Hash) -> Result<Arc<DirNode>, E>,
    ) -> Result<TreeDelta, E> {
        let mut nodes = Vec::new();
        let mut emitted: HashSet<Hash> = HashSet::new();
        let mut stack: Vec<(Option<Hash>, Hash)> = vec![(Some(from), to)];
        while let Some((old, new)) = stack.pop() {
            if old == Some(new) || !emitted.insert(new) {
                continue;
            }
            let new_node = load(&new)?;
            let old_node = match old {
                Some(h) => Some(load(&h)?),
                None => None,
            };
            let ops = match &old_node {
                Some(o) => diff_nodes(o, &new_node),
                None => new_node.entries.iter().cloned().map(EditOp::Put).collect(),
            };
            for e in new_node.entries.iter().rev() {
                if e.kind != EntryKind::Dir {
                    continue;
                }
                let old_child = old_node
                    .as_ref()
                    .and_then(|o| o.get(&e.name))
                    .filter(|o| o.kind == EntryKind::Dir)
                    .map(|o| o.hash);
                stack.push((old_child, e.hash));
            }
            nodes.push(NodeEdit {
                hash: new,
                base: old,
                ops,
            });
        }
        Ok(TreeDelta { from, to, nodes })
    }

    use crate::path::RelPath;
    use crate::tree::TreeBuilder;
    use proptest::prelude::*;

    fn tree(files: &[(String, u8)]) -> (Hash, crate::NodeMap) {
        let mut tb = TreeBuilder::new();
        for (p, v) in files {
            tb.insert(
                &RelPath::parse(p).expect("path"),
                Entry::file("", 1, hash_bytes(&[*v]), false, 0),
            )
            .expect("insert");
        }
        let built = tb.finish().expect("tree");
        let nodes = built
            .nodes
            .iter()
            .map(|(h, b)| (*h, Arc::new(DirNode::decode(b).expect("node"))))
            .collect();
        (built.tree, nodes)
    }

    /// Applies a delta the way a mirror does: bases from what it holds,
    /// then rebuilt nodes, each checked against its hash.
    fn apply_all(d: &TreeDelta, have: &crate::NodeMap) -> Result<crate::NodeMap, DecodeError> {
        let mut out = have.clone();
        for n in &d.nodes {
            let base = match &n.base {
                Some(b) => Some(out.get(b).cloned().ok_or(DecodeError::Invalid("base"))?),
                None => None,
            };
            let (node, _) = n.apply(base.as_deref())?;
            out.insert(n.hash, Arc::new(node));
        }
        Ok(out)
    }

    fn load(all: &crate::NodeMap) -> impl FnMut(&Hash) -> Result<Arc<DirNode>, ()> + '_ {
        |h| all.get(h).cloned().ok_or(())
    }

    #[test]
    fn one_change_in_a_big_directory_is_one_small_edit() {
        let mut files: Vec<(String, u8)> = (0..2000).map(|i| (format!("d/f{i:05}"), 1)).collect();
        let (t1, n1) = tree(&files);
        files[777].1 = 2;
        files.push(("e/new".into(), 3));
        let (t2, n2) = tree(&files);
        let mut all = n1.clone();
        all.extend(n2.clone());
        let d = between(t1, t2, load(&all)).expect("delta");
        let bytes = d.encode();
        let full: usize = n2.values().map(|n| n.encode().len()).sum();
        assert!(bytes.len() * 50 < full, "{} vs {full}", bytes.len());
        let back = TreeDelta::decode(&bytes).expect("decode");
        assert_eq!(back, d);
        let raw = encode_between(t1, t2, |h| all.get(h).map(|n| n.encode())).expect("raw");
        assert_eq!(raw, bytes, "the byte-level writer matches the typed one");
        let got = apply_all(&back, &n1).expect("apply");
        for h in n2.keys() {
            assert!(got.contains_key(h), "node {h} rebuilt");
        }
    }

    #[test]
    fn tampered_edit_is_refused() {
        let files: Vec<(String, u8)> = (0..10).map(|i| (format!("f{i}"), 1)).collect();
        let (t1, n1) = tree(&files);
        let mut f2 = files.clone();
        f2[3].1 = 9;
        let (t2, n2) = tree(&f2);
        let mut all = n1.clone();
        all.extend(n2);
        let mut d = between(t1, t2, load(&all)).expect("delta");
        let EditOp::Put(e) = &mut d.nodes[0].ops[0] else {
            panic!("expected a put")
        };
        e.hash = hash_bytes(b"evil");
        let err = apply_all(&d, &n1).expect_err("must not rebuild");
        assert!(err.to_string().contains("does not match its hash"), "{err}");
        // A removal of an absent name, and ops out of order, are refused too.
        let mut d2 = between(t1, t2, load(&all)).expect("delta");
        d2.nodes[0].ops = vec![EditOp::Remove("zz".into())];
        assert!(apply_all(&d2, &n1).is_err());
        d2.nodes[0].ops = vec![EditOp::Remove("f2".into()), EditOp::Remove("f1".into())];
        assert!(TreeDelta::decode(&d2.encode()).is_err());
    }

    #[test]
    fn a_put_that_collides_under_normalisation_is_refused() {
        // The base holds the Kelvin sign; the edit adds a plain K, which is
        // the same name after NFC.
        let base = DirNode::new(vec![Entry::file("\u{212A}", 1, hash_bytes(b"a"), false, 0)])
            .expect("base");
        let mut evil = base.entries.clone();
        evil.insert(0, Entry::file("K", 1, hash_bytes(b"b"), false, 0));
        let evil_node = DirNode::unchecked(evil);
        let edit = NodeEdit {
            hash: hash_bytes(&evil_node.encode()),
            base: Some(hash_bytes(&base.encode())),
            ops: diff_nodes(&base, &evil_node),
        };
        let err = edit.apply(Some(&base)).expect_err("refused");
        assert!(err.to_string().contains("normalisation"), "{err}");
    }

    #[test]
    fn truncations_and_lying_counts_are_refused() {
        let (t1, n1) = tree(&[("a".into(), 1)]);
        let (t2, n2) = tree(&[("a".into(), 2), ("b/c".into(), 1)]);
        let mut all = n1;
        all.extend(n2);
        let bytes = between(t1, t2, load(&all)).expect("delta").encode();
        for cut in 0..bytes.len() {
            assert!(TreeDelta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = bytes.clone();
        lying[69..73].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(TreeDelta::decode(&lying).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(TreeDelta::decode(&trailing).is_err());
    }

    proptest! {
        #[test]
        fn delta_rebuilds_every_node(
            a in proptest::collection::btree_map("[a-c]{1,2}(/[a-c]{1,2}){0,2}", 0u8..3, 0..24),
            b in proptest::collection::btree_map("[a-c]{1,2}(/[a-c]{1,2}){0,2}", 0u8..3, 0..24),
        ) {
            // A path that is a directory of another path is dropped.
            let leaves = |m: std::collections::BTreeMap<String, u8>| -> Vec<(String, u8)> {
                let keys: Vec<String> = m.keys().cloned().collect();
                m.into_iter()
                    .filter(|(k, _)| !keys.iter().any(|o| o.starts_with(&format!("{k}/"))))
                    .collect()
            };
            let fa = leaves(a);
            let fb = leaves(b);
            let (t1, n1) = tree(&fa);
            let (t2, n2) = tree(&fb);
            let mut all = n1.clone();
            all.extend(n2.clone());
            let d = between(t1, t2, load(&all)).expect("delta");
            let back = TreeDelta::decode(&d.encode()).expect("decode");
            prop_assert_eq!(&back, &d);
            let raw = encode_between(t1, t2, |h| all.get(h).map(|n| n.encode())).expect("raw");
            prop_assert_eq!(raw, d.encode());
            let got = apply_all(&back, &n1).expect("apply");
            for h in n2.keys() {
                prop_assert!(got.contains_key(h));
            }
        }
    }
}
