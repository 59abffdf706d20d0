//! Walks the content directory and snapshots changed files into the store.
//!
//! Each regular file is hashed at most once per change: the stat cache
//! recognises unchanged files. A changed file is snapshotted into the object
//! store (a reflink where the file system supports it, else a copy), and the
//! hash is computed over the bytes of the snapshot itself, so the stored
//! object always matches its name even if the source is edited meanwhile. A
//! source that changed during the copy is detected by comparing its stat key
//! before and after, and is retried on a later scan.

use crate::cache::{CacheUpdate, Cached, HashCache, StatKey};
use crate::linked::LinkedStore;
pub use build::Subtree;
use build::{Builder, Slot};
use meridian_core::{Entry, Hash, RelPath, resolve_symlink, validate_name};
use snapshot::{IngestError, hash_in_place, ingest, link_hashed};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod build;
mod snapshot;

/// A whole scan failed (the content directory itself is unusable).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("cannot read content directory {path}: {source}")]
    ContentDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot store failed: {0}")]
    Store(#[from] meridian_serve::StoreError),
    #[error("directory {dir:?} cannot be published: {error}")]
    Tree {
        dir: String,
        error: meridian_core::encoding::DecodeError,
    },
    #[error("the scan of {0:?} ended with files unaccounted for (a hashing thread died?)")]
    Incomplete(String),
}

/// Why one file was not (re)published in this scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    NotUtf8,
    BadName,
    SymlinkEscapes,
    Unreadable,
    Special,
    Settling,
    ChangedWhileHashing,
    Reserved,
}

impl SkipReason {
    /// Every reason (each label's series exists at 0 from the start).
    pub const ALL: [SkipReason; 8] = [
        SkipReason::NotUtf8,
        SkipReason::BadName,
        SkipReason::SymlinkEscapes,
        SkipReason::Unreadable,
        SkipReason::Special,
        SkipReason::Settling,
        SkipReason::ChangedWhileHashing,
        SkipReason::Reserved,
    ];
    /// What an operator reads in the log.
    pub fn explain(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "file name is not valid UTF-8; not published (rename it)",
            SkipReason::BadName => {
                "name not allowed (control character or backslash); not published"
            }
            SkipReason::SymlinkEscapes => {
                "symlink points outside the content directory; not published"
            }
            SkipReason::Unreadable => {
                "cannot be read; its previous version (if any) stays published"
            }
            SkipReason::Special => "not a regular file, directory or symlink; not published",
            SkipReason::Settling => "still being written; will be published once quiet",
            SkipReason::ChangedWhileHashing => "changed while being hashed; will be retried",
            SkipReason::Reserved => {
                "top-level `.meridian` is reserved for the read API; not published"
            }
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SkipReason::NotUtf8 => "not_utf8",
            SkipReason::BadName => "bad_name",
            SkipReason::SymlinkEscapes => "symlink_escapes",
            SkipReason::Unreadable => "unreadable",
            SkipReason::Special => "special_file",
            SkipReason::Settling => "settling",
            SkipReason::ChangedWhileHashing => "changed_while_hashing",
            SkipReason::Reserved => "reserved_name",
        }
    }
    /// Whether a later scan may succeed without anyone fixing anything.
    pub fn retry(self) -> bool {
        matches!(self, SkipReason::Settling | SkipReason::ChangedWhileHashing)
    }
}

/// The entries of the generation before a scan, for files and
/// directories that cannot be read right now (their previous version
/// stays published).
pub trait Previous: Sync {
    /// The file or symlink at `rel`, if there was one.
    fn leaf(&self, rel: &str) -> Option<Entry>;
    /// The directory at `rel`, if there was one, with the files and bytes
    /// below it.
    fn dir(&self, rel: &str) -> Option<(Entry, u64, u64)>;
}

/// The previous generation's files as a map by path (the scan's tests:
/// no directory of it is known).
#[cfg(test)]
impl Previous for HashMap<String, Entry> {
    fn leaf(&self, rel: &str) -> Option<Entry> {
        self.get(rel).cloned()
    }
    fn dir(&self, _: &str) -> Option<(Entry, u64, u64)> {
        None
    }
}

/// Inputs of a scan.
pub struct ScanInput<'a> {
    pub content: &'a Path,
    pub store: &'a LinkedStore,
    pub cache: &'a HashCache,
    /// The previous generation, carried forward for files that cannot be
    /// read right now.
    pub previous: &'a dyn Previous,
    pub quiet: Duration,
    /// Files the watcher saw finished (closed after writing, or renamed
    /// into place): one not changed since is published without waiting
    /// out `quiet`.
    pub closes: Option<&'a crate::watcher::Closes>,
    pub threads: usize,
    /// How changed files are snapshotted.
    pub snapshot: Snapshot,
}

/// How the origin snapshots a changed file into its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Snapshot {
    /// Hash the file in place and hard-link it into the store; a private
    /// copy is made in the background and on first read, from bytes that
    /// are hashed again as they are copied. A file edited in place before
    /// then is withdrawn from its generation (never served wrong). Falls
    /// back to `copy` across file systems or where links are refused.
    #[default]
    Link,
    /// Reflink (or copy) every changed file into the store, then hash the
    /// copy: each generation is immune to later edits from the start.
    Copy,
}

/// What a scan found. A full scan ([`scan`]) gives the whole tree, as one
/// subtree: the top, "". A scan of changed paths ([`scan_paths`]) gives
/// changes to the previous generation, applied in this order: `removed`
/// taken out, `subtrees` put in whole, then `leaves` put in.
#[derive(Debug, Default)]
pub struct ScanOutput {
    /// Files and symlinks examined one by one (a scan of changed paths),
    /// by path.
    pub leaves: HashMap<String, Entry>,
    /// Paths examined that the new generation may not have: whatever is
    /// in `subtrees` or `leaves` is put back.
    pub removed: Vec<String>,
    /// Directories walked whole, each encoded with everything below it:
    /// the new generation has at each path exactly this.
    pub subtrees: Vec<Subtree>,
    /// Directory nodes the scan wrote to the store.
    pub new_nodes: Vec<Hash>,
    /// What the scan learnt of the stat cache ([`HashCache::apply`]).
    pub cache: CacheUpdate,
    pub skipped: Vec<(String, SkipReason)>,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    /// Thread-seconds spent snapshotting.
    pub hash_seconds: f64,
    /// Objects newly written to the store.
    pub new_objects: Vec<Hash>,
    /// Directories walked (for the watched-directories gauge).
    pub dir_count: usize,
}

impl ScanOutput {
    /// Whether something should be retried after the quiet period.
    pub fn needs_retry(&self) -> bool {
        self.skipped.iter().any(|(_, r)| r.retry())
    }
}

struct Work {
    rel: String,
    /// The directory being built it belongs to (`None`: a file examined
    /// on its own, put in `leaves` by path).
    slot: Option<Slot>,
    abs: PathBuf,
    key: StatKey,
    executable: bool,
    mtime: i64,
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// What a scan has found so far: the output, and the directories being
/// built (the walks' trees).
struct Found<'a> {
    out: ScanOutput,
    build: Builder<'a>,
}

impl Found<'_> {
    /// An entry found at `rel`: into its directory being built, or (a
    /// file examined on its own) into `leaves`.
    fn put(&mut self, slot: Option<Slot>, rel: String, entry: Entry) {
        match slot {
            Some(s) => self.build.put(s, entry),
            None => {
                self.out.leaves.insert(rel, entry);
            }
        }
    }

    /// The previous version of `rel`, if it had one, in place of a file
    /// that cannot be published now.
    fn carry(&mut self, previous: &dyn Previous, slot: Option<Slot>, rel: &str) {
        if let Some(e) = previous.leaf(rel) {
            self.put(slot, rel.to_owned(), e);
        }
    }

    /// Takes in the files the hashing threads are done with.
    fn take_outcomes(&mut self, previous: &dyn Previous, results: &Mutex<Vec<Outcome>>) {
        let done = match results.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        for (w, r, dt) in done {
            self.out.hash_seconds += dt;
            let entry = match r {
                Ok((h, was_new, key)) => {
                    self.out.files_hashed += 1;
                    self.out.bytes_hashed += w.key.size;
                    if was_new {
                        self.out.new_objects.push(h);
                    }
                    self.out.cache.added.push(Cached { key, hash: h });
                    let name = w.rel.rsplit('/').next().unwrap_or(&w.rel);
                    Some(Entry::file(name, w.key.size, h, w.executable, w.mtime))
                }
                Err(reason) => {
                    let e = previous.leaf(&w.rel);
                    self.out.skipped.push((w.rel.clone(), reason));
                    e
                }
            };
            match (w.slot, entry) {
                (Some(s), e) => self.build.resolved(s, e),
                (None, Some(e)) => {
                    self.out.leaves.insert(w.rel, e);
                }
                (None, None) => {}
            }
        }
    }
}

/// How often a long walk logs how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A file handed out for hashing, and how that went.
type Outcome = (Work, Result<(Hash, bool, StatKey), SkipReason>, f64);

/// Walks the directories `roots` (absolute, relative; the content
/// directory itself is ""), each into a subtree built as it goes, and
/// hands every file that needs hashing to `sink`. Between directories it
/// takes in what hashing is done with (`results`), so that finished
/// directories are encoded and let go while the walk goes on. Returns how
/// many files it handed over.
fn walk(
    input: &ScanInput<'_>,
    found: &mut Found<'_>,
    now: SystemTime,
    roots: Vec<(PathBuf, String)>,
    results: &Mutex<Vec<Outcome>>,
    sink: &mut impl FnMut(Work),
) -> Result<usize, ScanError> {
    let mut handed = 0usize;
    let started = Instant::now();
    let mut next_note = started + PROGRESS_EVERY;
    let mut stack: Vec<(PathBuf, String, Slot)> = roots
        .into_iter()
        .map(|(abs, rel)| {
            let name = rel.rsplit('/').next().unwrap_or_default().to_owned();
            let slot = found.build.open(None, &name, Some(rel.clone()));
            (abs, rel, slot)
        })
        .collect();
    while let Some((abs, rel, slot)) = stack.pop() {
        let rd = match fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(source) if rel.is_empty() => {
                return Err(ScanError::ContentDir { path: abs, source });
            }
            Err(e) => {
                tracing::warn!(dir = %abs.display(), error = %e, "cannot read directory; keeping its previous content");
                found.build.unreadable(slot, &rel);
                found.build.listed(slot);
                found.out.skipped.push((rel, SkipReason::Unreadable));
                continue;
            }
        };
        found.out.dir_count += 1;
        for dent in rd {
            let Ok(dent) = dent else { continue };
            let os_name = dent.file_name();
            let child_abs = dent.path();
            let Some(name) = os_name.to_str() else {
                tracing::debug!(path = %child_abs.display(), "file name is not valid UTF-8");
                found
                    .out
                    .skipped
                    .push((child_abs.display().to_string(), SkipReason::NotUtf8));
                continue;
            };
            let child_rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && name == ".meridian" {
                found.out.skipped.push((child_rel, SkipReason::Reserved));
                continue;
            }
            if let Err(e) = validate_name(name) {
                tracing::debug!(path = %child_rel.escape_debug(), error = %e, "name not allowed");
                found.out.skipped.push((child_rel, SkipReason::BadName));
                continue;
            }
            let md = match fs::symlink_metadata(&child_abs) {
                Ok(md) => md,
                Err(_) => continue, // vanished between readdir and stat
            };
            if md.file_type().is_dir() {
                let child = found.build.open(Some(slot), name, None);
                stack.push((child_abs, child_rel, child));
            } else {
                let leaf = Leaf {
                    dir: &rel,
                    name,
                    slot: Some(slot),
                };
                if visit_leaf(input, found, now, leaf, child_rel, child_abs, &md, sink) {
                    handed += 1;
                }
            }
        }
        found.build.listed(slot);
        found.take_outcomes(input.previous, results);
        found.build.take_error()?;
        if Instant::now() >= next_note {
            // A walk of a big tree takes minutes on a cold disk: say how
            // far it is.
            next_note += PROGRESS_EVERY;
            let out = &found.out;
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                directories = out.dir_count,
                files_to_hash = handed,
                files_hashed = out.files_hashed,
                mb_per_second = (out.bytes_hashed as f64 / 1e6 / secs).round(),
                "scanning"
            );
        }
    }
    Ok(handed)
}

/// Where a file a walk or a change found sits.
struct Leaf<'a> {
    /// Its directory, relative.
    dir: &'a str,
    name: &'a str,
    /// The directory being built it goes into (`None`: into `leaves`).
    slot: Option<Slot>,
}

/// Examines one file, symlink or special file that a walk or a change
/// found (`leaf`: where): a symlink or a file the stat cache knows is
/// found, one to hash goes to `sink` (then the return is true), anything
/// else is skipped with its reason.
#[allow(clippy::too_many_arguments)]
fn visit_leaf(
    input: &ScanInput<'_>,
    found: &mut Found<'_>,
    now: SystemTime,
    leaf: Leaf<'_>,
    child_rel: String,
    child_abs: PathBuf,
    md: &fs::Metadata,
    sink: &mut impl FnMut(Work),
) -> bool {
    let Leaf { dir, name, slot } = leaf;
    let ft = md.file_type();
    let mtime = md.modified().map(secs).unwrap_or(0);
    if ft.is_symlink() {
        let target = fs::read_link(&child_abs).ok();
        let target = target.as_deref().and_then(Path::to_str).map(str::to_owned);
        match target {
            Some(t)
                if resolve_symlink(dir, &t).is_some() && !t.contains('\\') && t.len() <= 4096 =>
            {
                found.put(slot, child_rel, Entry::symlink(name, &t, mtime));
            }
            _ => {
                found
                    .out
                    .skipped
                    .push((child_rel, SkipReason::SymlinkEscapes));
            }
        }
    } else if ft.is_file() {
        let key = StatKey::of(md);
        let executable = md.permissions().mode() & 0o111 != 0;
        if let Some((hit, cached)) = input.cache.get(&key)
            && input.store.contains(&cached.hash)
        {
            found.out.cache.hit(hit, cached);
            let entry = Entry::file(name, key.size, cached.hash, executable, mtime);
            found.put(slot, child_rel, entry);
            return false;
        }
        let changed_at = md.modified().ok().max(Some(ctime_of(md)));
        // Settled: quiet for the quiet period, or finished (closed
        // after writing, or renamed in) and not changed since.
        let finished = input
            .closes
            .and_then(|c| c.finished_at(&child_abs))
            .zip(changed_at)
            .is_some_and(|(closed, changed)| changed <= closed);
        let settled = finished
            || changed_at
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= input.quiet);
        if !settled {
            found.carry(input.previous, slot, &child_rel);
            found.out.skipped.push((child_rel, SkipReason::Settling));
            return false;
        }
        if let Some(s) = slot {
            found.build.expect(s);
        }
        sink(Work {
            rel: child_rel,
            slot,
            abs: child_abs,
            key,
            executable,
            mtime,
        });
        return true;
    } else {
        found.out.skipped.push((child_rel, SkipReason::Special));
    }
    false
}

/// A file hashed in place, waiting to be linked into the store.
struct Hashed {
    work: Work,
    /// The very inode that was read, while the descriptor budget lasts.
    file: Option<File>,
    hash: Hash,
    seconds: f64,
}

/// How many hashed files may wait for a linker; past it, the hashing
/// threads link what they hash themselves (the backlog's memory is
/// bounded, however large the tree).
const LINK_BACKLOG: usize = 1 << 16;

/// How many hashed files may wait for their link with their descriptor
/// still open: half the soft descriptor limit, at most 65,536. Files past
/// that are closed and reopened (and their stat key checked) to be linked.
fn open_budget() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 17);
    (limit / 2).min(1 << 16) as usize
}

/// Lowers the calling thread to the lowest CPU priority: `SCHED_IDLE`,
/// which any other runnable thread preempts at once; where that is refused,
/// nice 19 (on Linux the nice value is per thread). Best effort.
fn lower_thread_priority() {
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    let idle = set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    );
    if idle.is_err() {
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
    }
}

/// Scans the content directory. Files are hashed by `threads` workers
/// while the walk is still running.
///
/// With link snapshots the hashing and the linking are separate stages:
/// linking is directory work in the store (about a third of the CPU a
/// small file costs), so it is kept out of the hashing workers' way. While
/// files are being hashed, one linker runs at the lowest priority
/// (`SCHED_IDLE`) and takes only CPU the hashing leaves idle (waits for the
/// disk on a cold tree); once the last file is hashed, one linker per
/// hashing thread at normal priority finishes the queue. The scan returns
/// when every file is linked (or skipped): a generation never names an
/// object the store does not hold.
pub fn scan(input: &ScanInput<'_>) -> Result<ScanOutput, ScanError> {
    scan_with_budget(input, open_budget())
}

/// Scans only the paths the watcher reported changed (relative to the
/// content directory), as [`scan`] does the whole tree: each is looked up
/// with `lstat`; a file or symlink is examined (and hashed if the stat
/// cache does not know it), a directory is walked whole, a path that is
/// gone is removed. The output describes changes to the previous
/// generation ([`ScanOutput`]): the work is O(changed), not O(tree).
pub fn scan_paths(input: &ScanInput<'_>, paths: &[String]) -> Result<ScanOutput, ScanError> {
    scan_scope(input, open_budget(), Scope::Paths(paths))
}

/// What a scan looks at.
#[derive(Clone, Copy)]
enum Scope<'a> {
    All,
    Paths(&'a [String]),
}

/// [`scan`] with at most `budget` hashed files waiting to be linked with
/// their descriptors open.
fn scan_with_budget(input: &ScanInput<'_>, budget: usize) -> Result<ScanOutput, ScanError> {
    scan_scope(input, budget, Scope::All)
}

/// The changed paths' part of a [`scan_paths`]: sorts them into
/// directories to walk, leaves to examine and paths gone, then walks and
/// examines. Returns how many files it handed to `sink` to hash.
fn walk_changes(
    input: &ScanInput<'_>,
    found: &mut Found<'_>,
    now: SystemTime,
    paths: &[String],
    results: &Mutex<Vec<Outcome>>,
    sink: &mut impl FnMut(Work),
) -> Result<usize, ScanError> {
    let mut dirs: Vec<(PathBuf, String)> = Vec::new();
    let mut leaves: Vec<(PathBuf, String, fs::Metadata)> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::with_capacity(paths.len());
    let mut ancestors: HashMap<String, bool> = HashMap::new();
    for rel in paths {
        if !seen.insert(rel.as_str()) {
            continue;
        }
        if !rel.is_empty() && RelPath::parse(rel).is_err() {
            // Only a bad last name is news: below a bad directory name
            // nothing was ever published (the full scan said so).
            let name = rel.rsplit('/').next().unwrap_or(rel);
            if validate_name(name).is_err() {
                found.out.skipped.push((rel.clone(), SkipReason::BadName));
            }
            continue;
        }
        if rel == ".meridian" || rel.starts_with(".meridian/") {
            found.out.skipped.push((rel.clone(), SkipReason::Reserved));
            continue;
        }
        if !real_dirs_above(input.content, rel, &mut ancestors) {
            // Below a symlink, or below something that is no directory
            // now: that path has its own event; this one names nothing
            // the tree can hold (and must never reach outside it).
            continue;
        }
        let abs = input.content.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(md) if md.file_type().is_dir() => dirs.push((abs, rel.clone())),
            Ok(md) => leaves.push((abs, rel.clone(), md)),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
            {
                found.out.removed.push(rel.clone());
            }
            Err(e) => {
                tracing::warn!(path = %abs.display(), error = %e, "cannot look up a changed path; keeping its previous version");
                found.carry(input.previous, None, rel);
                found
                    .out
                    .skipped
                    .push((rel.clone(), SkipReason::Unreadable));
            }
        }
    }
    // A directory walked whole covers every path below it.
    let walked: HashSet<String> = dirs.iter().map(|(_, r)| r.clone()).collect();
    let covered = |rel: &str| {
        walked.contains("")
            || rel
                .match_indices('/')
                .any(|(i, _)| walked.contains(&rel[..i]))
    };
    dirs.retain(|(_, r)| !covered(r));
    leaves.retain(|(_, r, _)| !covered(r));
    found.out.removed.retain(|r| !covered(r));
    // Whatever was at a walked directory goes: the walk puts back what
    // is there now.
    found
        .out
        .removed
        .extend(dirs.iter().map(|(_, r)| r.clone()));
    let mut handed = walk(input, found, now, dirs, results, sink)?;
    for (abs, rel, md) in leaves {
        // Whatever was there goes, unless this scan puts it back.
        found.out.removed.push(rel.clone());
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
        let (parent, name) = (parent.to_owned(), name.to_owned());
        let leaf = Leaf {
            dir: &parent,
            name: &name,
            slot: None,
        };
        if visit_leaf(input, found, now, leaf, rel, abs, &md, sink) {
            handed += 1;
        }
    }
    Ok(handed)
}

/// Whether every directory above `rel` (below the content directory) is a
/// real directory, not a symlink (`lstat`, each answer kept in `known`
/// for the other paths of the scan). `lstat` follows symlinks in the
/// middle of a path, so a path seen below a symlinked directory would
/// otherwise publish what it points to, even outside the content.
fn real_dirs_above(content: &Path, rel: &str, known: &mut HashMap<String, bool>) -> bool {
    rel.match_indices('/').all(|(i, _)| {
        let dir = &rel[..i];
        if let Some(&ok) = known.get(dir) {
            return ok;
        }
        let ok = fs::symlink_metadata(content.join(dir)).is_ok_and(|m| m.file_type().is_dir());
        known.insert(dir.to_owned(), ok);
        ok
    })
}

fn scan_scope(
    input: &ScanInput<'_>,
    budget: usize,
    scope: Scope<'_>,
) -> Result<ScanOutput, ScanError> {
    let mut found = Found {
        out: ScanOutput::default(),
        build: Builder::new(input.store, input.previous),
    };
    let now = SystemTime::now();
    let t_start = Instant::now();
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    let disk_error: Mutex<Option<meridian_serve::StoreError>> = Mutex::new(None);
    let finish = |w: Work, r: Result<(Hash, bool, StatKey), IngestError>, dt: f64| {
        let r = match r {
            Ok(x) => Ok(x),
            Err(IngestError::Skip(reason)) => Err(reason),
            Err(IngestError::CannotLink) => Err(SkipReason::Unreadable),
            Err(IngestError::Store(e)) => {
                if let Ok(mut d) = disk_error.lock() {
                    d.get_or_insert(e);
                }
                Err(SkipReason::Unreadable)
            }
        };
        if let Ok(mut v) = results.lock() {
            v.push((w, r, dt));
        }
    };
    let threads = input.threads.max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(4096);
    let rx = Mutex::new(rx);
    let (link_tx, link_rx) = std::sync::mpsc::channel::<Hashed>();
    let link_rx = Mutex::new(link_rx);
    let hashing_done = AtomicBool::new(false);
    let held = AtomicUsize::new(0);
    // Hashed files waiting for a linker.
    let queued = AtomicUsize::new(0);
    // Links one hashed file (a copy where no link can be made).
    let link_one = |item: Hashed, buf: &mut Vec<u8>| {
        let t0 = Instant::now();
        if item.file.is_some() {
            held.fetch_sub(1, Ordering::Relaxed);
        }
        let w = item.work;
        let r = match link_hashed(input.store, &w.abs, w.key, item.file, item.hash) {
            Err(IngestError::CannotLink) => {
                buf.resize(1 << 20, 0);
                ingest(input.store, &w.abs, w.key, buf)
            }
            r => r,
        };
        finish(w, r, item.seconds + t0.elapsed().as_secs_f64());
    };
    let linker = |idle: bool| {
        if idle {
            lower_thread_priority();
        }
        let mut buf = Vec::new();
        loop {
            if idle && hashing_done.load(Ordering::Relaxed) {
                break;
            }
            let next = link_rx.lock().ok().and_then(|r| r.recv().ok());
            let Some(item) = next else { break };
            queued.fetch_sub(1, Ordering::Relaxed);
            link_one(item, &mut buf);
        }
    };
    let handed = std::thread::scope(|s| {
        let hashers: Vec<_> = (0..threads)
            .map(|_| {
                let link_tx = link_tx.clone();
                let (rx, finish, held, queued) = (&rx, &finish, &held, &queued);
                s.spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let next = rx.lock().ok().and_then(|r| r.recv().ok());
                        let Some(w) = next else { break };
                        let t0 = Instant::now();
                        match input.snapshot {
                            Snapshot::Link => match hash_in_place(&w.abs, w.key, &mut buf) {
                                Ok((file, hash)) => {
                                    let keep = held.fetch_add(1, Ordering::Relaxed) < budget;
                                    if !keep {
                                        held.fetch_sub(1, Ordering::Relaxed);
                                    }
                                    let item = Hashed {
                                        work: w,
                                        file: keep.then_some(file),
                                        hash,
                                        seconds: t0.elapsed().as_secs_f64(),
                                    };
                                    // Past the backlog the hasher links it
                                    // itself: what waits stays bounded.
                                    if queued.fetch_add(1, Ordering::Relaxed) >= LINK_BACKLOG {
                                        queued.fetch_sub(1, Ordering::Relaxed);
                                        link_one(item, &mut buf);
                                    } else if let Err(back) = link_tx.send(item) {
                                        queued.fetch_sub(1, Ordering::Relaxed);
                                        link_one(back.0, &mut buf);
                                    }
                                }
                                Err(e) => finish(w, Err(e), t0.elapsed().as_secs_f64()),
                            },
                            Snapshot::Copy => {
                                let r = ingest(input.store, &w.abs, w.key, &mut buf);
                                finish(w, r, t0.elapsed().as_secs_f64());
                            }
                        }
                    }
                })
            })
            .collect();
        drop(link_tx);
        if input.snapshot == Snapshot::Link {
            s.spawn(|| linker(true));
        }
        let tx = tx;
        let mut send = |w: Work| {
            let _ = tx.send(w);
        };
        let handed = match scope {
            Scope::All => {
                let top = vec![(input.content.to_path_buf(), String::new())];
                walk(input, &mut found, now, top, &results, &mut send)
            }
            Scope::Paths(paths) => walk_changes(input, &mut found, now, paths, &results, &mut send),
        };
        drop(tx);
        for h in hashers {
            let _ = h.join();
        }
        hashing_done.store(true, Ordering::Relaxed);
        let hashed_at = t_start.elapsed();
        if input.snapshot == Snapshot::Link {
            for _ in 0..threads {
                s.spawn(|| linker(false));
            }
        }
        handed.map(|n| (n, hashed_at))
    })?;
    // Both stages are in the log (bench/origin.sh reads them).
    let (handed, hashed_at) = handed;
    tracing::debug!(
        files = handed,
        threads,
        walk_and_hash = hashed_at.as_secs_f64(),
        link = (t_start.elapsed() - hashed_at).as_secs_f64(),
        "scan phases (seconds)"
    );
    if let Some(e) = disk_error.into_inner().ok().flatten() {
        return Err(ScanError::Store(e));
    }
    found.take_outcomes(input.previous, &results);
    found.build.take_error()?;
    let Found { mut out, build } = found;
    if !build.all_done() {
        return Err(ScanError::Incomplete(input.content.display().to_string()));
    }
    out.subtrees = build.done;
    out.new_nodes = build.written;
    // A carried-forward leaf must not sit below a path that is now a file.
    out.leaves.retain(|p, _| RelPath::parse(p).is_ok());
    Ok(out)
}

fn ctime_of(md: &fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    let ns = md.ctime().max(0) as u64 * 1_000_000_000 + md.ctime_nsec().max(0) as u64;
    UNIX_EPOCH + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests;
