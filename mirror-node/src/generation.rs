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
    /// Every directory node of the tree by hash.
    pub nodes: NodeMap,
}

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
        let mut nodes = NodeMap::default();
        let mut stack = vec![root.root.tree];
        while let Some(h) = stack.pop() {
            if nodes.contains_key(&h) {
                continue;
            }
            let node = match known.and_then(|k| k.get(&h)) {
                Some(n) => n.clone(),
                None => Arc::new(read_node(store, &h)?),
            };
            for e in &node.entries {
                if e.kind == EntryKind::Dir && !nodes.contains_key(&e.hash) {
                    stack.push(e.hash);
                }
            }
            nodes.insert(h, node);
        }
        Ok(Generation { root, nodes })
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
            store.put_bytes(h, b).expect("put node");
        }
        let key = SecretKey::from_seed([3; 32]);
        let root = Root {
            generation: 1,
            created: 0,
            expires: 10,
            previous: Hash::ZERO,
            tree: built.tree,
            tree_size: built.tree_size,
            files: built.files,
            bytes: built.bytes,
        };
        let env = SignedRoot::sign(&root, &key).encode();
        let vr = Verifier::new(TrustedKeys::new([key.public()]))
            .open(&env)
            .expect("verifies");
        let g = Generation::assemble(&store, vr, None).expect("assemble");
        (dir, store, g)
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
