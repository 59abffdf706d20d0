//! A tree as a reader holds it: every directory node by hash, and the one
//! way a request path is resolved in it (O(depth) binary searches,
//! symlinks followed inside the tree). The mirror serves files with it and
//! GeoDNS's redirector decides which mirror has a file with it, so both
//! read a path the same way.

use crate::{DirNode, Entry, EntryKind, Hash};
use std::collections::HashMap;
use std::sync::Arc;

/// Directory nodes by hash. A new generation shares every unchanged node
/// with the old one. Hashed with Fx, not SipHash: every key is a blake3
/// hash of a node in a signed tree (uniform, and chosen only by the key's
/// holder), and a path lookup hashes one per directory level.
pub type NodeMap = HashMap<Hash, Arc<DirNode>, rustc_hash::FxBuildHasher>;

/// Most symlinks followed while resolving one path.
pub const MAX_SYMLINK_HOPS: usize = 8;

/// What a request path resolves to.
#[derive(Debug, Clone)]
pub enum Resolved<'a> {
    File(&'a Entry),
    /// A directory, with its canonical path (symlinks followed).
    Dir(String, &'a DirNode),
}

/// Resolves a normalised path ("" is the top; no leading slash) in the tree
/// whose top node is `top`, following symlinks inside the tree (at most
/// [`MAX_SYMLINK_HOPS`]). None: no such path, a file used as a directory, a
/// symlink out of the tree or too many hops, or a node missing from
/// `nodes`.
pub fn resolve<'a>(nodes: &'a NodeMap, top: &Hash, path: &str) -> Option<Resolved<'a>> {
    // No allocation on the way to a file (the download hot path); the
    // walked prefix is only spelled out for a directory or a symlink.
    let mut owned: Option<String> = None;
    'hops: for _ in 0..MAX_SYMLINK_HOPS {
        let current: &str = owned.as_deref().unwrap_or(path);
        let comps = || current.split('/').filter(|c| !c.is_empty());
        let walked = |n: usize| comps().take(n).collect::<Vec<_>>().join("/");
        let mut dir: &DirNode = nodes.get(top)?;
        let mut it = comps().enumerate().peekable();
        while let Some((i, comp)) = it.next() {
            let e = dir.get(comp)?;
            let last = it.peek().is_none();
            match e.kind {
                EntryKind::Dir => {
                    dir = nodes.get(&e.hash)?;
                }
                EntryKind::File if last => return Some(Resolved::File(e)),
                EntryKind::File => return None,
                EntryKind::Symlink => {
                    let target = e.target.as_deref()?;
                    let mut next = crate::resolve_symlink(&walked(i), target)?;
                    for (_, rest) in it {
                        next.push('/');
                        next.push_str(rest);
                    }
                    owned = Some(next);
                    continue 'hops;
                }
            }
        }
        return Some(Resolved::Dir(walked(usize::MAX), dir));
    }
    None
}
