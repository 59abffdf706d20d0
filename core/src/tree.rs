//! Builds the Merkle tree of directory nodes from a flat list of paths.

use crate::encoding::DecodeError;
use crate::hash::{Hash, hash_bytes};
use crate::manifest::{DirNode, Entry, EntryKind};
use crate::path::{PathError, RelPath};
use std::collections::BTreeMap;

enum Node {
    Leaf(Entry),
    Dir(DirBuild),
    /// A directory encoded already (its node is in the store), with the
    /// files and bytes below it.
    Graft(Entry, u64, u64),
    /// Taken out of the base tree (a file, a symlink or a whole directory).
    Removed,
}

/// What a directory being built starts from.
#[derive(Debug, Clone, Copy)]
enum Base {
    /// Nothing: its entries are what was inserted.
    Empty,
    /// The node its parent's base names under this name, if that is a
    /// directory (else nothing).
    Inherit,
    /// This node (the top of a base tree).
    Node(Hash),
}

struct DirBuild {
    children: BTreeMap<String, Node>,
    /// `None`: the base entry's mtime (0 for a new directory).
    mtime: Option<i64>,
    base: Base,
}

impl DirBuild {
    fn new(base: Base) -> Self {
        DirBuild {
            children: BTreeMap::new(),
            mtime: None,
            base,
        }
    }

    /// Whether this directory was made only on the way to removals: over
    /// a base without it, it is nothing.
    fn is_nothing(&self) -> bool {
        matches!(self.base, Base::Inherit)
            && self.mtime.is_none()
            && self.children.values().all(|c| match c {
                Node::Removed => true,
                Node::Dir(d) => d.is_nothing(),
                Node::Leaf(_) | Node::Graft(..) => false,
            })
    }
}

/// Collects files, symlinks and directories by path, then encodes the tree.
///
/// Built from nothing ([`TreeBuilder::new`]) it takes every path; built
/// over a base tree ([`TreeBuilder::over`]) it takes only the changes
/// (entries set, paths removed, directories replaced whole) and, on
/// [`TreeBuilder::finish_over`], reads and re-encodes only the directories
/// on the paths from the changes to the top: the work is O(changed), and
/// every directory nobody touched keeps its node.
pub struct TreeBuilder {
    root: DirBuild,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The encoded tree: every node with its hash, and totals for the root.
#[derive(Debug, Clone)]
pub struct BuiltTree {
    /// Every directory node built, children before parents, the top node
    /// last (over a base tree: only the nodes on changed paths).
    pub nodes: Vec<(Hash, Vec<u8>)>,
    pub tree: Hash,
    pub tree_size: u64,
    /// Files and their bytes in the whole tree.
    pub files: u64,
    pub bytes: u64,
}

/// Files and bytes gained (or, negative, lost) by the changes.
#[derive(Default)]
struct Totals {
    files: i64,
    bytes: i64,
}

impl TreeBuilder {
    /// A tree built from nothing.
    pub fn new() -> Self {
        TreeBuilder {
            root: DirBuild::new(Base::Empty),
        }
    }

    /// Changes to the tree whose top node is `top`.
    pub fn over(top: Hash) -> Self {
        TreeBuilder {
            root: DirBuild::new(Base::Node(top)),
        }
    }

    fn dir_mut(&mut self, path: &RelPath) -> Result<&mut DirBuild, PathError> {
        let mut dir = &mut self.root;
        for comp in path.components() {
            let node = dir
                .children
                .entry(comp.to_owned())
                .or_insert_with(|| Node::Dir(DirBuild::new(Base::Inherit)));
            if matches!(node, Node::Removed) {
                // Removed, then made again: a new directory.
                *node = Node::Dir(DirBuild::new(Base::Empty));
            }
            dir = match node {
                Node::Dir(d) => d,
                Node::Leaf(_) | Node::Graft(..) | Node::Removed => {
                    return Err(PathError::InsideFile(path.to_string()));
                }
            };
        }
        Ok(dir)
    }

    /// Adds a directory (so empty directories are published) with its mtime.
    pub fn insert_dir(&mut self, path: &RelPath, mtime: i64) -> Result<(), PathError> {
        self.dir_mut(path)?.mtime = Some(mtime);
        Ok(())
    }

    /// Takes `path` (a file, a symlink or a directory with everything
    /// below it) out of the tree; nothing happens if it is not there.
    pub fn remove(&mut self, path: &RelPath) -> Result<(), PathError> {
        let (parent, name) = split_last(path)?;
        let mut dir = &mut self.root;
        for comp in parent.components() {
            let node = dir
                .children
                .entry(comp.to_owned())
                .or_insert_with(|| Node::Dir(DirBuild::new(Base::Inherit)));
            dir = match node {
                Node::Dir(d) => d,
                // Below a path removed, set to a file or grafted: gone
                // already, or given whole.
                Node::Removed | Node::Leaf(_) | Node::Graft(..) => return Ok(()),
            };
        }
        dir.children.insert(name.to_owned(), Node::Removed);
        Ok(())
    }

    /// Adds a file or symlink at `path`, in place of whatever the base
    /// tree has there; `entry.name` is replaced by the last component of
    /// `path`.
    pub fn insert(&mut self, path: &RelPath, mut entry: Entry) -> Result<(), PathError> {
        if entry.kind == EntryKind::Dir {
            return self.insert_dir(path, entry.mtime);
        }
        let (parent, name) = split_last(path)?;
        let dir = self.dir_mut(&parent)?;
        if let Some(Node::Leaf(_)) = dir.children.get(name) {
            return Err(PathError::Duplicate(path.to_string()));
        }
        entry.name = name.to_owned();
        dir.children.insert(name.to_owned(), Node::Leaf(entry));
        Ok(())
    }

    /// Puts the directory `entry`, encoded already (its node and those
    /// below it are in the store) with `files` files of `bytes` bytes
    /// below it, at `path`, in place of whatever the base tree has there.
    pub fn graft(
        &mut self,
        path: &RelPath,
        mut entry: Entry,
        files: u64,
        bytes: u64,
    ) -> Result<(), PathError> {
        let (parent, name) = split_last(path)?;
        let dir = self.dir_mut(&parent)?;
        entry.name = name.to_owned();
        dir.children
            .insert(name.to_owned(), Node::Graft(entry, files, bytes));
        Ok(())
    }

    /// Encodes every directory node, bottom-up (a tree built from nothing).
    pub fn finish(self) -> Result<BuiltTree, DecodeError> {
        self.finish_over(0, 0, |_| Err(DecodeError::Invalid("no base tree")))
    }

    /// Encodes the directories on changed paths, bottom-up, reading the
    /// base tree's nodes through `load` (which must check each against its
    /// hash). `files` and `bytes` are the base tree's totals; the result's
    /// are those of the new tree. A directory removed or replaced is read
    /// whole, to take its files out of the totals.
    pub fn finish_over<E: From<DecodeError>>(
        self,
        files: u64,
        bytes: u64,
        mut load: impl FnMut(&Hash) -> Result<DirNode, E>,
    ) -> Result<BuiltTree, E> {
        let mut out = BuiltTree {
            nodes: Vec::new(),
            tree: Hash::ZERO,
            tree_size: 0,
            files: 0,
            bytes: 0,
        };
        let base = match self.root.base {
            Base::Node(h) => Some(load(&h)?),
            Base::Empty | Base::Inherit => None,
        };
        let mut totals = Totals::default();
        let (hash, size) = encode_dir(self.root, base, &mut load, &mut out, &mut totals)?;
        out.tree = hash;
        out.tree_size = size;
        out.files = files.saturating_add_signed(totals.files);
        out.bytes = bytes.saturating_add_signed(totals.bytes);
        Ok(out)
    }
}

fn split_last(path: &RelPath) -> Result<(RelPath, &str), PathError> {
    let mut comps: Vec<&str> = path.components().collect();
    let name = comps
        .pop()
        .ok_or_else(|| PathError::Empty(path.to_string()))?;
    Ok((RelPath::parse(&comps.join("/"))?, name))
}

impl Totals {
    fn add(&mut self, e: &Entry, sign: i64) {
        if e.kind == EntryKind::File {
            self.files += sign;
            self.bytes += sign * e.size as i64;
        }
    }

    /// Takes an entry of the base tree out: a directory with every file
    /// below it.
    fn take_out<E: From<DecodeError>>(
        &mut self,
        e: &Entry,
        load: &mut impl FnMut(&Hash) -> Result<DirNode, E>,
    ) -> Result<(), E> {
        if e.kind != EntryKind::Dir {
            self.add(e, -1);
            return Ok(());
        }
        let mut stack = vec![e.hash];
        while let Some(h) = stack.pop() {
            for c in load(&h)?.entries {
                if c.kind == EntryKind::Dir {
                    stack.push(c.hash);
                } else {
                    self.add(&c, -1);
                }
            }
        }
        Ok(())
    }
}

fn encode_dir<E: From<DecodeError>>(
    dir: DirBuild,
    base: Option<DirNode>,
    load: &mut impl FnMut(&Hash) -> Result<DirNode, E>,
    out: &mut BuiltTree,
    totals: &mut Totals,
) -> Result<(Hash, u64), E> {
    let base = base.map(|n| n.entries).unwrap_or_default();
    let mut entries = Vec::with_capacity(base.len() + dir.children.len());
    let mut olds = base.into_iter().peekable();
    for (name, child) in dir.children {
        // Base entries before this name stay as they are.
        while let Some(o) = olds.next_if(|o| o.name.as_bytes() < name.as_bytes()) {
            entries.push(o);
        }
        let old = olds.next_if(|o| o.name == name);
        match child {
            Node::Leaf(e) => {
                if let Some(o) = &old {
                    totals.take_out(o, load)?;
                }
                totals.add(&e, 1);
                entries.push(e);
            }
            Node::Graft(e, files, bytes) => {
                if let Some(o) = &old {
                    totals.take_out(o, load)?;
                }
                totals.files += files as i64;
                totals.bytes += bytes as i64;
                entries.push(e);
            }
            Node::Removed => {
                if let Some(o) = &old {
                    totals.take_out(o, load)?;
                }
            }
            Node::Dir(d)
                if !matches!(&old, Some(o) if o.kind == EntryKind::Dir) && d.is_nothing() =>
            {
                // Only the way to paths removed that were never there.
                entries.extend(old);
            }
            Node::Dir(d) => {
                let child_base = match (d.base, &old) {
                    (Base::Inherit, Some(o)) if o.kind == EntryKind::Dir => Some(load(&o.hash)?),
                    (Base::Node(h), _) => Some(load(&h)?),
                    (_, Some(o)) => {
                        totals.take_out(o, load)?;
                        None
                    }
                    (_, None) => None,
                };
                let mtime = d
                    .mtime
                    .or(old
                        .as_ref()
                        .filter(|o| o.kind == EntryKind::Dir)
                        .map(|o| o.mtime))
                    .unwrap_or_default();
                let (h, size) = encode_dir(d, child_base, load, out, totals)?;
                entries.push(Entry::dir(&name, size, h, mtime));
            }
        }
    }
    entries.extend(olds);
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

    /// A tree of these (path, size) files, with its nodes kept by hash.
    fn full(
        files: &[(&str, u64)],
        store: &mut std::collections::HashMap<Hash, Vec<u8>>,
    ) -> BuiltTree {
        let mut t = TreeBuilder::new();
        for (path, size) in files {
            let h = hash_bytes(format!("{path}{size}").as_bytes());
            t.insert(&p(path), Entry::file("", *size, h, false, 1))
                .expect("insert");
        }
        let built = t.finish().expect("finish");
        store.extend(built.nodes.iter().cloned());
        built
    }

    #[test]
    fn changes_over_a_base_tree_give_the_tree_built_from_nothing_and_read_only_changed_paths() {
        let mut store = std::collections::HashMap::new();
        let before = [
            ("a/b/c", 3),
            ("a/b/d", 4),
            ("a/e", 5),
            ("f", 6),
            ("g/h/i", 7),
            ("g/j", 8),
            ("k/l", 9),
            ("untouched/x/y", 10),
            ("untouched/z", 11),
            ("gone/sub/s", 16),
        ];
        let base = full(&before, &mut store);
        assert_eq!((base.files, base.bytes), (10, 79));
        // Set a file, add one in a new directory, remove a file and a whole
        // directory, replace a directory by a file and a file by a
        // directory, and graft a directory encoded apart over one.
        let after = [
            ("a/b/c", 30),
            ("a/b/d", 4),
            ("a/new/n", 12),
            ("f/now_dir", 13),
            ("g", 14),
            ("k/m", 15),
            ("untouched/x/y", 10),
            ("untouched/z", 11),
        ];
        let want = full(&after, &mut std::collections::HashMap::new());
        let mut loads = Vec::new();
        let mut t = TreeBuilder::over(base.tree);
        let mut k = TreeBuilder::new();
        let km = hash_bytes(b"k/m15");
        k.insert(&p("m"), Entry::file("", 15, km, false, 1))
            .expect("insert");
        let k = k.finish().expect("finish");
        let k_entry = Entry::dir("", k.tree_size, k.tree, 0);
        t.graft(&p("k"), k_entry, k.files, k.bytes).expect("graft");
        t.remove(&p("a/e")).expect("remove");
        t.remove(&p("g")).expect("remove");
        t.remove(&p("no/such")).expect("removing nothing");
        // Removals below one already removed (events come in any order)
        // leave nothing behind, not an empty directory.
        t.remove(&p("gone")).expect("remove");
        t.remove(&p("gone/sub/s"))
            .expect("remove below a removed directory");
        t.remove(&p("gone/sub"))
            .expect("remove below a removed directory");
        for (path, size) in [("a/b/c", 30), ("a/new/n", 12), ("f/now_dir", 13), ("g", 14)] {
            let h = hash_bytes(format!("{path}{size}").as_bytes());
            let _ = t.remove(&p(path));
            t.insert(&p(path), Entry::file("", size, h, false, 1))
                .expect("insert");
        }
        let got = t
            .finish_over(base.files, base.bytes, |h| {
                loads.push(*h);
                let b = store.get(h).ok_or(DecodeError::Invalid("missing"))?;
                DirNode::decode(b)
            })
            .expect("finish over");
        let top = |b: &BuiltTree| DirNode::decode(&b.nodes.last().expect("top").1).expect("top");
        assert_eq!(top(&got), top(&want));
        assert_eq!(got.tree, want.tree, "the same tree as built from nothing");
        assert_eq!((got.files, got.bytes), (want.files, want.bytes));
        assert_eq!((got.files, got.bytes), (8, 109));
        // Only nodes on changed paths are read or built: never `untouched/`.
        let untouched: Vec<Hash> = DirNode::decode(&store[&base.tree])
            .expect("top")
            .entries
            .iter()
            .filter(|e| e.name == "untouched")
            .map(|e| e.hash)
            .collect();
        assert!(!loads.contains(&untouched[0]), "untouched/ was read");
        assert!(got.nodes.len() < want.nodes.len());
        // No change at all gives the base tree back.
        let same = TreeBuilder::over(base.tree)
            .finish_over(base.files, base.bytes, |h| {
                DirNode::decode(store.get(h).ok_or(DecodeError::Invalid("missing"))?)
            })
            .expect("finish over");
        assert_eq!((same.tree, same.files, same.bytes), (base.tree, 10, 79));
    }

    #[test]
    fn a_missing_base_node_is_an_error_not_an_empty_directory() {
        let mut store = std::collections::HashMap::new();
        let base = full(&[("a/b", 1), ("c", 2)], &mut store);
        let mut t = TreeBuilder::over(base.tree);
        t.insert(&p("a/z"), Entry::file("", 1, Hash::ZERO, false, 0))
            .expect("insert");
        let top = base.tree;
        let r = t.finish_over(base.files, base.bytes, |h| {
            if *h == top {
                DirNode::decode(&store[h])
            } else {
                Err(DecodeError::Invalid("missing"))
            }
        });
        assert!(r.is_err());
    }

    #[test]
    fn empty_tree_is_valid() {
        let t = TreeBuilder::new().finish().expect("finish");
        assert_eq!(t.files, 0);
        assert_eq!(t.nodes.len(), 1);
    }
}
