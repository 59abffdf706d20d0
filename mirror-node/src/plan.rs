//! The sync plan: from the served generation and a new tree, which
//! directory nodes and which blobs a sync has to fetch.
//!
//! Pure: the plan does no I/O. The syncer walks the new tree one depth at a
//! time: it asks [`Plan::frontier`] for the nodes of the next depth, finds
//! each (a tree delta, the store, or an upstream) and hands it back with
//! [`Plan::add`], with a lookup of the blobs the store already holds. Work
//! is O(changed): a node the served tree already has is never asked for
//! (its whole subtree is complete), and an entry unchanged since the served
//! tree is skipped without a lookup. A changed file is paired with the file
//! at the same path in the served tree, so it can be patched from it.

use crate::fetch::{PATCH_MIN, Want};
use crate::generation::Generation;
use meridian_core::{DirNode, EntryKind, Hash};
use std::collections::HashSet;
use std::sync::Arc;

/// A directory node the walk needs: its hash, its encoded size, and the
/// node at the same path in the served tree (for pairing its entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) hash: Hash,
    pub(crate) size: u64,
    old: Option<Hash>,
}

/// A sync's plan, filled in as the new tree is walked.
#[derive(Debug)]
pub(crate) struct Plan {
    served: Option<Arc<Generation>>,
    new_nodes: meridian_core::NodeMap,
    blobs: Vec<Want>,
    seen_blobs: HashSet<Hash>,
    queued: HashSet<Hash>,
    next: Vec<Pending>,
}

impl Plan {
    /// A plan for the tree `tree` (its top node `tree_size` bytes), from
    /// the served generation, if any.
    pub(crate) fn new(served: Option<Arc<Generation>>, tree: Hash, tree_size: u64) -> Plan {
        let old = served.as_ref().map(|g| g.root.root.tree);
        Plan {
            served,
            new_nodes: meridian_core::NodeMap::default(),
            blobs: Vec::new(),
            seen_blobs: HashSet::new(),
            queued: HashSet::from([tree]),
            next: vec![Pending {
                hash: tree,
                size: tree_size,
                old,
            }],
        }
    }

    /// The nodes of the next depth the walk needs (each once); empty when
    /// the plan is complete. Nodes the served tree has are left out.
    pub(crate) fn frontier(&mut self) -> Vec<Pending> {
        let mut next = std::mem::take(&mut self.next);
        if let Some(g) = &self.served {
            next.retain(|p| !g.nodes.contains_key(&p.hash));
        }
        next
    }

    /// Adds node `p` of the new tree: its changed subdirectories join the
    /// next depth, and its changed files join the blobs to fetch unless
    /// `held` says the store has them (or another path already wants the
    /// same blob). A changed file at a path that held a file the store has,
    /// both small enough, gets that file as its patch base.
    pub(crate) fn add(&mut self, p: Pending, node: Arc<DirNode>, held: &impl Fn(&Hash) -> bool) {
        let served = self.served.clone();
        let old_node = p
            .old
            .and_then(|o| served.as_ref().and_then(|g| g.nodes.get(&o)));
        for (e, was) in paired(&node, old_node.map(|o| o.as_ref())) {
            if was.is_some_and(|w| w.kind == e.kind && w.hash == e.hash) {
                // Unchanged since the served generation, which is complete:
                // nothing to fetch, nothing to look up.
                continue;
            }
            match e.kind {
                EntryKind::Dir if self.queued.insert(e.hash) => self.next.push(Pending {
                    hash: e.hash,
                    size: e.size,
                    old: was.filter(|w| w.kind == EntryKind::Dir).map(|w| w.hash),
                }),
                EntryKind::File if self.seen_blobs.insert(e.hash) && !held(&e.hash) => {
                    let patchable = |size: u64| size <= meridian_serve::readapi::PATCH_MAX_BYTES;
                    let base = was
                        .filter(|w| {
                            w.kind == EntryKind::File
                                && e.size >= PATCH_MIN
                                && patchable(e.size)
                                && patchable(w.size)
                                && held(&w.hash)
                        })
                        .map(|w| w.hash);
                    self.blobs.push(Want {
                        hash: e.hash,
                        size: e.size,
                        base,
                    });
                }
                _ => {}
            }
        }
        self.new_nodes.insert(p.hash, node);
    }

    /// The new tree's nodes the served tree does not have, and the blobs to
    /// fetch.
    pub(crate) fn finish(self) -> (meridian_core::NodeMap, Vec<Want>) {
        (self.new_nodes, self.blobs)
    }
}

/// Each entry of `new` with the entry of the same name in `old`, by one
/// merge of the two sorted lists (no search per entry).
pub(crate) fn paired<'a>(
    new: &'a DirNode,
    old: Option<&'a DirNode>,
) -> impl Iterator<Item = (&'a meridian_core::Entry, Option<&'a meridian_core::Entry>)> + 'a {
    let old: &[meridian_core::Entry] = old.map_or(&[], |o| &o.entries);
    let mut i = 0;
    new.entries.iter().map(move |e| {
        while i < old.len() && old[i].name.as_bytes() < e.name.as_bytes() {
            i += 1;
        }
        let was = old.get(i).filter(|o| o.name == e.name);
        (e, was)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::{
        Entry, RelPath, Root, SecretKey, SignedRoot, TreeBuilder, TrustedKeys, Verifier, hash_bytes,
    };
    use std::cell::RefCell;

    /// A tree of `(path, bytes)` files: its top hash and size, and every
    /// node by hash.
    fn tree(files: &[(&str, &[u8])]) -> (Hash, u64, meridian_core::NodeMap) {
        let mut tb = TreeBuilder::new();
        for (p, data) in files {
            tb.insert(
                &RelPath::parse(p).expect("path"),
                Entry::file("", data.len() as u64, hash_bytes(data), false, 0),
            )
            .expect("insert");
        }
        let built = tb.finish().expect("tree");
        let nodes = built
            .nodes
            .iter()
            .map(|(h, b)| (*h, Arc::new(DirNode::decode(b).expect("node"))))
            .collect();
        (built.tree, built.tree_size, nodes)
    }

    fn served(files: &[(&str, &[u8])]) -> Arc<Generation> {
        let (top, size, nodes) = tree(files);
        let key = SecretKey::from_seed([5; 32]);
        let root = Root {
            generation: 1,
            created: 0,
            expires: 10,
            previous: Hash::ZERO,
            tree: top,
            tree_size: size,
            files: files.len() as u64,
            bytes: 0,
        };
        let env = SignedRoot::sign(&root, &key).encode();
        let root = Verifier::new(TrustedKeys::new([key.public()]))
            .open(&env)
            .expect("verifies");
        // Every node is known: the store is never read.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = meridian_serve::ObjectStore::open(dir.path()).expect("store");
        Arc::new(Generation::assemble(&store, root, Some(&nodes)).expect("assemble"))
    }

    /// Walks the plan to the end, finding every node in `nodes`; returns
    /// the nodes asked for, the blobs wanted, and the blobs looked up.
    fn walk(
        mut plan: Plan,
        nodes: &meridian_core::NodeMap,
        held: &[Hash],
    ) -> (Vec<Hash>, Vec<Want>, Vec<Hash>) {
        let looked = RefCell::new(Vec::new());
        let lookup = |h: &Hash| {
            looked.borrow_mut().push(*h);
            held.contains(h)
        };
        let mut asked = Vec::new();
        loop {
            let frontier = plan.frontier();
            if frontier.is_empty() {
                break;
            }
            for p in frontier {
                asked.push(p.hash);
                plan.add(p, nodes[&p.hash].clone(), &lookup);
            }
        }
        let (new_nodes, blobs) = plan.finish();
        assert_eq!(new_nodes.len(), asked.len());
        (asked, blobs, looked.into_inner())
    }

    #[test]
    fn a_cold_mirror_fetches_every_node_and_each_blob_once() {
        let big = vec![7u8; 5000];
        let files: &[(&str, &[u8])] = &[
            ("a/x", &big),
            ("a/y", b"same"),
            ("b/c/z", b"same"),
            ("top", b"t"),
        ];
        let (top, size, nodes) = tree(files);
        let (asked, blobs, _) = walk(Plan::new(None, top, size), &nodes, &[]);
        assert_eq!(asked.len(), nodes.len(), "every node, each once");
        let mut want: Vec<Hash> = blobs.iter().map(|w| w.hash).collect();
        want.sort();
        let mut expected = vec![hash_bytes(&big), hash_bytes(b"same"), hash_bytes(b"t")];
        expected.sort();
        assert_eq!(want, expected, "one fetch per distinct blob");
        assert!(
            blobs.iter().all(|w| w.base.is_none()),
            "nothing to patch from"
        );
    }

    #[test]
    fn an_incremental_plan_walks_only_what_changed_and_patches_from_the_old_file() {
        let v1 = vec![1u8; 6000];
        let v2 = vec![2u8; 6000];
        let old_files: &[(&str, &[u8])] = &[("a/x", &v1), ("a/y", b"kept"), ("b/z", b"untouched")];
        let new_files: &[(&str, &[u8])] = &[
            ("a/x", &v2),
            ("a/y", b"kept"),
            ("b/z", b"untouched"),
            ("c/w", b"new"),
            ("c/held", b"already here"),
        ];
        let g = served(old_files);
        let (top, size, nodes) = tree(new_files);
        let b_node = g.nodes[&g.root.root.tree]
            .entries
            .iter()
            .find(|e| e.name == "b")
            .expect("b")
            .hash;
        let held = [hash_bytes(&v1), hash_bytes(b"already here")];
        let (asked, blobs, looked) = walk(Plan::new(Some(g), top, size), &nodes, &held);
        // The top, a/ and c/ changed; b/ did not and is never asked for.
        assert_eq!(asked.len(), 3, "{asked:?}");
        assert!(!asked.contains(&b_node));
        assert_eq!(blobs.len(), 2, "{blobs:?}");
        let x = blobs
            .iter()
            .find(|w| w.hash == hash_bytes(&v2))
            .expect("the changed file");
        assert_eq!(
            x.base,
            Some(hash_bytes(&v1)),
            "patched from its old version"
        );
        let w = blobs
            .iter()
            .find(|w| w.hash == hash_bytes(b"new"))
            .expect("the new file");
        assert_eq!(w.base, None);
        // Unchanged entries cost no lookup.
        assert!(!looked.contains(&hash_bytes(b"kept")));
        assert!(!looked.contains(&hash_bytes(b"untouched")));
    }

    #[test]
    fn a_plan_to_the_served_tree_is_empty() {
        let files: &[(&str, &[u8])] = &[("a/x", b"x")];
        let g = served(files);
        let (top, size, nodes) = tree(files);
        let (asked, blobs, looked) = walk(Plan::new(Some(g), top, size), &nodes, &[]);
        assert!(asked.is_empty() && blobs.is_empty() && looked.is_empty());
    }
}
