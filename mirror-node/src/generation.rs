//! A generation as the mirror serves it: the verified root plus every
//! directory node, keyed by hash. Paths are resolved from the top node down
//! (O(depth) binary searches), so a new generation shares every unchanged
//! node with the old one and building it costs O(changed).

use meridian_core::{DirNode, EntryKind, Hash, NodeMap, VerifiedRoot, hash_bytes};
use meridian_serve::ObjectStore;
use std::sync::Arc;

/// Why a generation could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("directory node {0} is missing from the store")]
    MissingNode(Hash),
    #[error("directory node {0} does not match its hash")]
    CorruptNode(Hash),
    #[error("directory node {hash}: {source}")]
    Malformed {
        hash: Hash,
        source: meridian_core::DecodeError,
    },
}

/// An immutable, fully verified generation.
#[derive(Debug)]
pub(crate) struct Generation {
    pub root: VerifiedRoot,
    /// Every directory node of the tree by hash, and no other.
    pub nodes: NodeMap,
    /// How many directory entries of the tree (and the top, once) name
    /// each node: what lets the next generation be made from the change
    /// alone ([`Generation::next`]).
    refs: Refs,
}

type Refs = std::collections::HashMap<Hash, u32, rustc_hash::FxBuildHasher>;

pub(crate) use meridian_core::Resolved;

/// Reads and checks one node from the store.
pub(crate) fn read_node(store: &ObjectStore, h: &Hash) -> Result<DirNode, LoadError> {
    let bytes = store.read(h).map_err(|_| LoadError::MissingNode(*h))?;
    if hash_bytes(&bytes) != *h {
        return Err(LoadError::CorruptNode(*h));
    }
    DirNode::decode(&bytes).map_err(|source| LoadError::Malformed { hash: *h, source })
}

impl Generation {
    /// Assembles a generation from nodes already known (`known`, e.g. the
    /// previous generation's) and the store, checking every node read.
    pub(crate) fn assemble(
        store: &ObjectStore,
        root: VerifiedRoot,
        known: Option<&NodeMap>,
    ) -> Result<Self, LoadError> {
        let mut g = Generation {
            root,
            nodes: NodeMap::default(),
            refs: Refs::default(),
        };
        let top = g.root.root.tree;
        g.take_ref(top, store, known)?;
        Ok(g)
    }

    /// The generation after this one, made from the change alone: this
    /// generation's nodes, plus `new_nodes` (those a sync fetched; any
    /// other missing node is read from the store), less the nodes the new
    /// tree no longer names. The work is O(changed nodes) beyond copying
    /// the node index (a pointer per node); no tree is walked.
    pub(crate) fn next(
        &self,
        store: &ObjectStore,
        root: VerifiedRoot,
        new_nodes: &NodeMap,
    ) -> Result<Self, LoadError> {
        let mut g = Generation {
            root,
            nodes: self.nodes.clone(),
            refs: self.refs.clone(),
        };
        g.take_ref(g.root.root.tree, store, Some(new_nodes))?;
        g.drop_ref(self.root.root.tree);
        Ok(g)
    }

    /// Counts one more reference to node `h`: a node not yet held is
    /// added (from `known`, else read from the store and checked), and
    /// its children counted in turn.
    fn take_ref(
        &mut self,
        h: Hash,
        store: &ObjectStore,
        known: Option<&NodeMap>,
    ) -> Result<(), LoadError> {
        let mut stack = vec![h];
        while let Some(h) = stack.pop() {
            let count = self.refs.entry(h).or_insert(0);
            *count += 1;
            if *count > 1 {
                continue;
            }
            let node = match known.and_then(|k| k.get(&h)) {
                Some(n) => n.clone(),
                None => Arc::new(read_node(store, &h)?),
            };
            stack.extend(
                node.entries
                    .iter()
                    .filter(|e| e.kind == EntryKind::Dir)
                    .map(|e| e.hash),
            );
            self.nodes.insert(h, node);
        }
        Ok(())
    }

    /// Counts one reference fewer to node `h`: a node no longer named
    /// is dropped, and its children counted down in turn.
    fn drop_ref(&mut self, h: Hash) {
        let mut stack = vec![h];
        while let Some(h) = stack.pop() {
            let Some(count) = self.refs.get_mut(&h) else {
                continue;
            };
            *count -= 1;
            if *count > 0 {
                continue;
            }
            self.refs.remove(&h);
            if let Some(node) = self.nodes.remove(&h) {
                stack.extend(
                    node.entries
                        .iter()
                        .filter(|e| e.kind == EntryKind::Dir)
                        .map(|e| e.hash),
                );
            }
        }
    }

    pub(crate) fn number(&self) -> u64 {
        self.root.root.generation
    }

    /// Every file blob (hash, size) in the tree; a blob shared by several
    /// paths appears once per distinct node that names it.
    pub(crate) fn blobs(&self) -> impl Iterator<Item = (Hash, u64)> + '_ {
        self.nodes
            .values()
            .flat_map(|d| d.entries.iter())
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| (e.hash, e.size))
    }

    /// Resolves a normalised path ("" is the top; no leading slash),
    /// following symlinks inside the tree ([`meridian_core::resolve`]).
    pub(crate) fn resolve(&self, path: &str) -> Option<Resolved<'_>> {
        meridian_core::resolve(&self.nodes, &self.root.root.tree, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::{
        Entry, RelPath, Root, SecretKey, SignedRoot, TreeBuilder, TrustedKeys, Verifier,
    };

    fn build(
        files: &[(&str, &[u8])],
        links: &[(&str, &str)],
    ) -> (tempfile::TempDir, ObjectStore, Generation) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectStore::open(dir.path()).expect("store");
        let vr = stored_root(&store, files, links, 1);
        let g = Generation::assemble(&store, vr, None).expect("assemble");
        (dir, store, g)
    }

    /// A signed root of these files, every object put in `store`.
    fn stored_root(
        store: &ObjectStore,
        files: &[(&str, &[u8])],
        links: &[(&str, &str)],
        generation: u64,
    ) -> VerifiedRoot {
        let mut tb = TreeBuilder::new();
        for (p, data) in files {
            let h = hash_bytes(data);
            store.put_bytes(&h, data).expect("put");
            tb.insert(
                &RelPath::parse(p).expect("path"),
                Entry::file("", data.len() as u64, h, false, 0),
            )
            .expect("insert");
        }
        for (p, t) in links {
            tb.insert(&RelPath::parse(p).expect("path"), Entry::symlink("x", t, 0))
                .expect("insert");
        }
        let built = tb.finish().expect("tree");
        for (h, b) in &built.nodes {
            if !store.contains(h) {
                store.put_bytes(h, b).expect("put node");
            }
        }
        let key = SecretKey::from_seed([3; 32]);
        let root = Root {
            generation,
            created: 0,
            expires: 10,
            previous: if generation == 1 {
                Hash::ZERO
            } else {
                Hash([1; 32])
            },
            tree: built.tree,
            tree_size: built.tree_size,
            files: built.files,
            bytes: built.bytes,
        };
        let env = SignedRoot::sign(&root, &key).encode();
        Verifier::new(TrustedKeys::new([key.public()]))
            .open(&env)
            .expect("verifies")
    }

    #[test]
    fn the_next_generation_made_from_the_change_holds_exactly_the_nodes_of_its_tree() {
        let files1: &[(&str, &[u8])] = &[
            ("a/b/c", b"1"),
            ("a/d", b"2"),
            ("twin1/f", b"same"),
            ("twin2/f", b"same"),
            ("gone/deep/x", b"3"),
            ("keep/y", b"4"),
        ];
        let (_d, store, g1) = build(files1, &[]);
        // twin1/ and twin2/ are one node named twice.
        assert_eq!(g1.nodes.len(), 7);
        let files2: &[(&str, &[u8])] = &[
            ("a/b/c", b"changed"),
            ("a/d", b"2"),
            ("twin2/f", b"same"),
            ("keep/y", b"4"),
            ("new/z", b"5"),
        ];
        let vr2 = stored_root(&store, files2, &[], 2);
        let full = Generation::assemble(&store, vr2.clone(), None).expect("assemble");
        // What a sync would have fetched: the nodes g1 lacks.
        let fetched: NodeMap = full
            .nodes
            .iter()
            .filter(|(h, _)| !g1.nodes.contains_key(*h))
            .map(|(h, n)| (*h, n.clone()))
            .collect();
        let g2 = g1.next(&store, vr2, &fetched).expect("next");
        let keys = |g: &Generation| {
            let mut k: Vec<Hash> = g.nodes.keys().copied().collect();
            k.sort_unstable_by_key(|h| h.0);
            k
        };
        assert_eq!(
            keys(&g2),
            keys(&full),
            "the nodes of the new tree, no more, no fewer"
        );
        assert_eq!(g2.refs, full.refs);
        assert!(matches!(g2.resolve("twin2/f"), Some(Resolved::File(_))));
        assert!(g2.resolve("twin1/f").is_none() && g2.resolve("gone").is_none());
        // The old generation is untouched (requests may still hold it).
        assert!(matches!(g1.resolve("gone/deep/x"), Some(Resolved::File(_))));
        // Back to g1's tree: the nodes come from the store again.
        let vr3 = stored_root(&store, files1, &[], 3);
        let g3 = g2.next(&store, vr3, &NodeMap::default()).expect("next");
        assert_eq!(keys(&g3), keys(&g1));
        assert_eq!(g3.refs, g1.refs);
    }

    #[test]
    fn resolves_files_dirs_and_symlinks() {
        let (_d, _s, g) = build(
            &[("a/b/c.txt", b"hello"), ("top", b"x")],
            &[("a/latest", "b"), ("a/b/up", "../../top"), ("loop", "loop")],
        );
        assert!(matches!(g.resolve("a/b/c.txt"), Some(Resolved::File(e)) if e.size == 5));
        assert!(matches!(g.resolve(""), Some(Resolved::Dir(p, _)) if p.is_empty()));
        assert!(matches!(g.resolve("a/b"), Some(Resolved::Dir(p, _)) if p == "a/b"));
        assert!(matches!(g.resolve("a/latest/c.txt"), Some(Resolved::File(e)) if e.size == 5));
        assert!(matches!(g.resolve("a/latest"), Some(Resolved::Dir(p, _)) if p == "a/b"));
        assert!(matches!(g.resolve("a/b/up"), Some(Resolved::File(e)) if e.size == 1));
        assert!(g.resolve("loop").is_none());
        assert!(g.resolve("top/below").is_none());
        assert!(g.resolve("missing").is_none());
    }

    #[test]
    fn corrupt_node_is_refused() {
        let (_d, store, g) = build(&[("f", b"data")], &[]);
        let path = store.path(&g.root.root.tree);
        let mut perm = std::fs::metadata(&path).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&path, perm).expect("chmod");
        std::fs::write(&path, b"MDIR\x01garbage").expect("tamper");
        assert!(matches!(
            Generation::assemble(&store, g.root.clone(), None),
            Err(LoadError::CorruptNode(_))
        ));
    }
}
