//! Builds the Merkle tree of directory nodes from a flat list of paths.

use crate::encoding::DecodeError;
use crate::hash::{Hash, hash_bytes};
use crate::manifest::{DirNode, Entry, EntryKind};
use crate::path::{PathError, RelPath};
use std::collections::BTreeMap;

enum Node {
    Leaf(Entry),
    Dir(DirBuild),
}

#[derive(Default)]
struct DirBuild {
    children: BTreeMap<String, Node>,
    mtime: i64,
}

/// Collects files, symlinks and directories by path, then encodes the tree.
#[derive(Default)]
pub struct TreeBuilder {
    root: DirBuild,
}

/// The encoded tree: every node with its hash, and totals for the root.
#[derive(Debug, Clone)]
pub struct BuiltTree {
    /// Every directory node, children before parents, the top node last.
    pub nodes: Vec<(Hash, Vec<u8>)>,
    pub tree: Hash,
    pub tree_size: u64,
    pub files: u64,
    pub bytes: u64,
}

impl TreeBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn dir_mut(&mut self, path: &RelPath) -> Result<&mut DirBuild, PathError> {
        let mut dir = &mut self.root;
        for comp in path.components() {
            let node = dir
                .children
                .entry(comp.to_owned())
                .or_insert_with(|| Node::Dir(DirBuild::default()));
            dir = match node {
                Node::Dir(d) => d,
                Node::Leaf(_) => return Err(PathError::InsideFile(path.to_string())),
            };
        }
        Ok(dir)
    }

    /// Adds a directory (so empty directories are published) with its mtime.
    pub fn insert_dir(&mut self, path: &RelPath, mtime: i64) -> Result<(), PathError> {
        self.dir_mut(path)?.mtime = mtime;
        Ok(())
    }

    /// Adds a file or symlink at `path`; `entry.name` is replaced by the last
    /// component of `path`.
    pub fn insert(&mut self, path: &RelPath, mut entry: Entry) -> Result<(), PathError> {
        let mut comps: Vec<&str> = path.components().collect();
        let name = comps
            .pop()
            .ok_or_else(|| PathError::Empty(path.to_string()))?;
        if entry.kind == EntryKind::Dir {
            return self.insert_dir(path, entry.mtime);
        }
        let parent = RelPath::parse(&comps.join("/"))?;
        let dir = self.dir_mut(&parent)?;
        if dir.children.contains_key(name) {
            return Err(PathError::Duplicate(path.to_string()));
        }
        entry.name = name.to_owned();
        dir.children.insert(name.to_owned(), Node::Leaf(entry));
        Ok(())
    }

    /// Encodes every directory node, bottom-up.
    pub fn finish(self) -> Result<BuiltTree, DecodeError> {
        let mut out = BuiltTree {
            nodes: Vec::new(),
            tree: Hash::ZERO,
            tree_size: 0,
            files: 0,
            bytes: 0,
        };
        let (hash, size) = encode_dir(self.root, &mut out)?;
        out.tree = hash;
        out.tree_size = size;
        Ok(out)
    }
}

fn encode_dir(dir: DirBuild, out: &mut BuiltTree) -> Result<(Hash, u64), DecodeError> {
    let mut entries = Vec::with_capacity(dir.children.len());
    for (name, child) in dir.children {
        match child {
            Node::Leaf(e) => {
                if e.kind == EntryKind::File {
                    out.files += 1;
                    out.bytes += e.size;
                }
                entries.push(e);
            }
            Node::Dir(d) => {
                let mtime = d.mtime;
                let (h, size) = encode_dir(d, out)?;
                entries.push(Entry::dir(&name, size, h, mtime));
            }
        }
    }
    let node = DirNode::new(entries)?;
    let bytes = node.encode();
    let hash = hash_bytes(&bytes);
    let size = bytes.len() as u64;
    out.nodes.push((hash, bytes));
    Ok((hash, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).expect("valid path")
    }

    #[test]
    fn builds_nested_tree_deterministically() {
        let build = |order: &[&str]| {
            let mut t = TreeBuilder::new();
            for path in order {
                t.insert(
                    &p(path),
                    Entry::file("", 3, hash_bytes(path.as_bytes()), false, 1),
                )
                .expect("insert");
            }
            t.finish().expect("finish")
        };
        let a = build(&["a/b/c", "a/d", "e"]);
        let b = build(&["e", "a/d", "a/b/c"]);
        assert_eq!(a.tree, b.tree);
        assert_eq!(a.files, 3);
        assert_eq!(a.bytes, 9);
        assert_eq!(a.nodes.len(), 3);
        let top = DirNode::decode(&a.nodes.last().expect("top").1).expect("decodes");
        assert_eq!(top.entries.len(), 2);
        // Changing one file changes only the nodes on its path.
        let c = build(&["a/b/c", "a/d", "x"]);
        let shared = c
            .nodes
            .iter()
            .filter(|(h, _)| a.nodes.iter().any(|(g, _)| g == h))
            .count();
        assert_eq!(shared, 2, "a/ and a/b/ are unchanged");
    }

    #[test]
    fn rejects_file_inside_file_and_duplicates() {
        let mut t = TreeBuilder::new();
        t.insert(&p("a"), Entry::file("", 1, Hash::ZERO, false, 0))
            .expect("insert");
        assert!(matches!(
            t.insert(&p("a/b"), Entry::file("", 1, Hash::ZERO, false, 0)),
            Err(PathError::InsideFile(_))
        ));
        assert!(matches!(
            t.insert(&p("a"), Entry::file("", 1, Hash::ZERO, false, 0)),
            Err(PathError::Duplicate(_))
        ));
    }

    #[test]
    fn empty_tree_is_valid() {
        let t = TreeBuilder::new().finish().expect("finish");
        assert_eq!(t.files, 0);
        assert_eq!(t.nodes.len(), 1);
    }
}
