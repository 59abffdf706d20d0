//! The tree of a walk, built while the walk goes: each directory's node
//! is encoded and written to the store as soon as its last file is
//! hashed and its last subdirectory encoded, and its entries are let go.
//! A walk of a million files so holds the directories in progress (those
//! on the walk's path and those with files still being hashed), never the
//! whole tree as entries or paths.

use super::{Previous, ScanError};
use crate::linked::LinkedStore;
use meridian_core::{DirNode, Entry, EntryKind, Hash, hash_bytes};

/// A directory walked whole (the full scan's is the top, ""): its node is
/// in the store with every node below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subtree {
    /// Relative to the content directory.
    pub rel: String,
    /// Its entry in its parent (name: its last component; "" for the top).
    pub entry: Entry,
    /// Files and their bytes below it.
    pub files: u64,
    pub bytes: u64,
}

/// Which directory a found entry belongs to.
pub(super) type Slot = u32;

struct Dir {
    /// `None`: the top of a walk.
    parent: Option<Slot>,
    name: String,
    /// Set for the top of a walk (its path), and for a directory that
    /// could not be read (its previous version is kept).
    rel: Option<String>,
    entries: Vec<Entry>,
    /// Files out for hashing, subdirectories not yet encoded, and one
    /// while the directory is being listed.
    pending: u32,
    /// Could not be listed: its previous version stands in for it.
    unreadable: bool,
    files: u64,
    bytes: u64,
}

/// Directories in progress, and what was made of those done.
pub(super) struct Builder<'a> {
    store: &'a LinkedStore,
    previous: &'a dyn Previous,
    dirs: Vec<Dir>,
    /// Directory nodes this walk wrote to the store.
    pub(super) written: Vec<Hash>,
    /// The walked directories, as each was finished.
    pub(super) done: Vec<Subtree>,
    error: Option<ScanError>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(store: &'a LinkedStore, previous: &'a dyn Previous) -> Self {
        Builder {
            store,
            previous,
            dirs: Vec::new(),
            written: Vec::new(),
            done: Vec::new(),
            error: None,
        }
    }

    /// Starts the directory `name` below `parent` (or the top of a walk,
    /// at `rel`), being listed.
    pub(super) fn open(&mut self, parent: Option<Slot>, name: &str, rel: Option<String>) -> Slot {
        if let Some(p) = parent {
            self.dirs[p as usize].pending += 1;
        }
        self.dirs.push(Dir {
            parent,
            name: name.to_owned(),
            rel,
            entries: Vec::new(),
            pending: 1,
            unreadable: false,
            files: 0,
            bytes: 0,
        });
        (self.dirs.len() - 1) as Slot
    }

    /// The directory could not be listed: it keeps its previous version
    /// (if it had one), read from the published tree at `rel`.
    pub(super) fn unreadable(&mut self, slot: Slot, rel: &str) {
        let d = &mut self.dirs[slot as usize];
        d.unreadable = true;
        d.rel = Some(rel.to_owned());
    }

    /// The directory is listed: what it holds is out for hashing or found.
    pub(super) fn listed(&mut self, slot: Slot) {
        self.settle(slot);
    }

    /// A file handed out for hashing in `slot`; [`Builder::resolved`]
    /// comes when it is done.
    pub(super) fn expect(&mut self, slot: Slot) {
        self.dirs[slot as usize].pending += 1;
    }

    /// An entry found in `slot` (a file the stat cache knew, a symlink,
    /// a file's previous version).
    pub(super) fn put(&mut self, slot: Slot, entry: Entry) {
        let d = &mut self.dirs[slot as usize];
        if entry.kind == EntryKind::File {
            d.files += 1;
            d.bytes += entry.size;
        }
        d.entries.push(entry);
    }

    /// A file handed out is done: its entry, if it is published.
    pub(super) fn resolved(&mut self, slot: Slot, entry: Option<Entry>) {
        if let Some(e) = entry {
            self.put(slot, e);
        }
        self.settle(slot);
    }

    /// Whether every directory opened is finished.
    pub(super) fn all_done(&self) -> bool {
        self.dirs.iter().all(|d| d.pending == 0)
    }

    /// The first error (a node that cannot be written or encoded).
    pub(super) fn take_error(&mut self) -> Result<(), ScanError> {
        self.error.take().map_or(Ok(()), Err)
    }

    /// One thing pending in `slot` is done; a directory with nothing
    /// pending is encoded, and so on up.
    fn settle(&mut self, mut slot: Slot) {
        loop {
            let d = &mut self.dirs[slot as usize];
            d.pending -= 1;
            if d.pending > 0 {
                return;
            }
            let done = self.finish(slot);
            let d = &mut self.dirs[slot as usize];
            let parent = d.parent;
            let top = d.rel.take().filter(|_| parent.is_none());
            match (done, parent, top) {
                (Ok(Some(sub)), Some(p), _) => {
                    let pd = &mut self.dirs[p as usize];
                    pd.files += sub.files;
                    pd.bytes += sub.bytes;
                    pd.entries.push(sub.entry);
                }
                (Ok(Some(mut sub)), None, Some(rel)) => {
                    sub.rel = rel;
                    self.done.push(sub);
                }
                (Ok(_), _, _) => {}
                (Err(e), _, _) => {
                    self.error.get_or_insert(e);
                }
            }
            match parent {
                Some(p) => slot = p,
                None => return,
            }
        }
    }

    /// Encodes a directory with nothing pending and writes its node; an
    /// unreadable one gives its previous version (`None` if it had none).
    fn finish(&mut self, slot: Slot) -> Result<Option<Subtree>, ScanError> {
        let d = &mut self.dirs[slot as usize];
        let entries = std::mem::take(&mut d.entries);
        let (files, bytes) = (d.files, d.bytes);
        if d.unreadable {
            let name = std::mem::take(&mut d.name);
            let rel = d.rel.clone().unwrap_or_default();
            return Ok(self.previous.dir(&rel).map(|(mut entry, files, bytes)| {
                entry.name = name;
                Subtree {
                    rel: String::new(),
                    entry,
                    files,
                    bytes,
                }
            }));
        }
        let node = DirNode::new(entries).map_err(|error| ScanError::Tree {
            dir: self.path_of(slot),
            error,
        })?;
        let encoded = node.encode();
        drop(node);
        let name = std::mem::take(&mut self.dirs[slot as usize].name);
        let hash = hash_bytes(&encoded);
        if !self.store.contains(&hash) {
            self.store.objects.put_bytes(&hash, &encoded)?;
            self.written.push(hash);
        }
        Ok(Some(Subtree {
            rel: String::new(),
            entry: Entry::dir(&name, encoded.len() as u64, hash, 0),
            files,
            bytes,
        }))
    }

    /// The path of `slot`, for an error message.
    fn path_of(&self, slot: Slot) -> String {
        let mut parts = Vec::new();
        let mut s = Some(slot);
        while let Some(i) = s {
            let d = &self.dirs[i as usize];
            match (&d.rel, d.parent) {
                (Some(rel), None) => {
                    parts.push(rel.clone());
                    break;
                }
                _ => parts.push(d.name.clone()),
            }
            s = d.parent;
        }
        parts.reverse();
        parts.retain(|p| !p.is_empty());
        parts.join("/")
    }
}
