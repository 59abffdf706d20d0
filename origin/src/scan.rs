//! Walks the content directory and snapshots changed files into the store.
//!
//! Each regular file is hashed at most once per change: the stat cache
//! recognises unchanged files. A changed file is snapshotted into the object
//! store (a reflink where the file system supports it, else a copy), and the
//! hash is computed over the bytes of the snapshot itself, so the stored
//! object always matches its name even if the source is edited meanwhile. A
//! source that changed during the copy is detected by comparing its stat key
//! before and after, and is retried on a later scan.

use crate::cache::{HashCache, StatKey};
use crate::linked::LinkedStore;
use meridian_core::{Entry, EntryKind, Hash, RelPath, resolve_symlink, validate_name};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Inputs of a scan.
pub struct ScanInput<'a> {
    pub content: &'a Path,
    pub store: &'a LinkedStore,
    pub cache: &'a HashCache,
    /// Leaf entries (files and symlinks) of the previous generation by path,
    /// carried forward for files that cannot be read right now.
    pub previous: &'a HashMap<String, Entry>,
    pub quiet: Duration,
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

/// What a scan found.
#[derive(Debug, Default)]
pub struct ScanOutput {
    /// Every file and symlink to publish, by path.
    pub leaves: HashMap<String, Entry>,
    /// Every directory (including empty ones).
    pub dirs: Vec<String>,
    pub cache: HashCache,
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

/// Walks the content directory: fills in `out` and hands every file that
/// needs hashing to `sink`. Returns how many it handed over.
fn walk(
    input: &ScanInput<'_>,
    out: &mut ScanOutput,
    now: SystemTime,
    mut sink: impl FnMut(Work),
) -> Result<usize, ScanError> {
    let mut handed = 0usize;
    let mut stack: Vec<(PathBuf, String)> = vec![(input.content.to_path_buf(), String::new())];
    let mut first = true;
    while let Some((abs, rel)) = stack.pop() {
        let rd = match fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(source) if first => {
                return Err(ScanError::ContentDir { path: abs, source });
            }
            Err(e) => {
                tracing::warn!(dir = %abs.display(), error = %e, "cannot read directory; keeping its previous content");
                carry_prefix(input.previous, &rel, &mut out.leaves);
                out.skipped.push((rel.clone(), SkipReason::Unreadable));
                continue;
            }
        };
        first = false;
        out.dir_count += 1;
        if !rel.is_empty() {
            out.dirs.push(rel.clone());
        }
        for dent in rd {
            let Ok(dent) = dent else { continue };
            let os_name = dent.file_name();
            let child_abs = dent.path();
            let Some(name) = os_name.to_str() else {
                tracing::debug!(path = %child_abs.display(), "file name is not valid UTF-8");
                out.skipped
                    .push((child_abs.display().to_string(), SkipReason::NotUtf8));
                continue;
            };
            let child_rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && name == ".meridian" {
                out.skipped.push((child_rel, SkipReason::Reserved));
                continue;
            }
            if let Err(e) = validate_name(name) {
                tracing::debug!(path = %child_rel.escape_debug(), error = %e, "name not allowed");
                out.skipped.push((child_rel, SkipReason::BadName));
                continue;
            }
            let md = match fs::symlink_metadata(&child_abs) {
                Ok(md) => md,
                Err(_) => continue, // vanished between readdir and stat
            };
            let ft = md.file_type();
            let mtime = md.modified().map(secs).unwrap_or(0);
            if ft.is_dir() {
                stack.push((child_abs, child_rel));
            } else if ft.is_symlink() {
                let target = fs::read_link(&child_abs).ok();
                let target = target.as_deref().and_then(Path::to_str).map(str::to_owned);
                match target {
                    Some(t)
                        if resolve_symlink(&rel, &t).is_some()
                            && !t.contains('\\')
                            && t.len() <= 4096 =>
                    {
                        out.leaves
                            .insert(child_rel, Entry::symlink(name, &t, mtime));
                    }
                    _ => {
                        out.skipped.push((child_rel, SkipReason::SymlinkEscapes));
                    }
                }
            } else if ft.is_file() {
                let key = StatKey::of(&md);
                let executable = md.permissions().mode() & 0o111 != 0;
                if let Some((k, h)) = input.cache.map.get(&child_rel)
                    && *k == key
                    && input.store.contains(h)
                {
                    out.cache.map.insert(child_rel.clone(), (key, *h));
                    out.leaves.insert(
                        child_rel,
                        Entry::file(name, key.size, *h, executable, mtime),
                    );
                    continue;
                }
                let changed_at = md.modified().ok().max(Some(ctime_of(&md)));
                let settled = changed_at
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= input.quiet);
                if !settled {
                    carry(input.previous, &child_rel, &mut out.leaves);
                    out.skipped.push((child_rel, SkipReason::Settling));
                    continue;
                }
                handed += 1;
                sink(Work {
                    rel: child_rel,
                    abs: child_abs,
                    key,
                    executable,
                    mtime,
                });
            } else {
                out.skipped.push((child_rel, SkipReason::Special));
            }
        }
    }
    Ok(handed)
}

/// A file hashed in place, waiting to be linked into the store.
struct Hashed {
    work: Work,
    /// The very inode that was read, while the descriptor budget lasts.
    file: Option<File>,
    hash: Hash,
    seconds: f64,
}

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

/// [`scan`] with at most `budget` hashed files waiting to be linked with
/// their descriptors open.
fn scan_with_budget(input: &ScanInput<'_>, budget: usize) -> Result<ScanOutput, ScanError> {
    let mut out = ScanOutput::default();
    let now = SystemTime::now();
    let t_start = Instant::now();
    type Outcome = (Work, Result<(Hash, bool, StatKey), SkipReason>, f64);
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
            link_one(item, &mut buf);
        }
    };
    let handed = std::thread::scope(|s| {
        let hashers: Vec<_> = (0..threads)
            .map(|_| {
                let link_tx = link_tx.clone();
                let (rx, finish, held) = (&rx, &finish, &held);
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
                                    if let Err(back) = link_tx.send(item) {
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
        let handed = walk(input, &mut out, now, |w| {
            let _ = tx.send(w);
        });
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
    for (w, r, dt) in results.into_inner().unwrap_or_default() {
        let w = &w;
        out.hash_seconds += dt;
        match r {
            Ok((h, was_new, key)) => {
                out.files_hashed += 1;
                out.bytes_hashed += w.key.size;
                if was_new {
                    out.new_objects.push(h);
                }
                let name = w.rel.rsplit('/').next().unwrap_or(&w.rel);
                out.cache.map.insert(w.rel.clone(), (key, h));
                out.leaves.insert(
                    w.rel.clone(),
                    Entry::file(name, w.key.size, h, w.executable, w.mtime),
                );
            }
            Err(reason) => {
                carry(input.previous, &w.rel, &mut out.leaves);
                out.skipped.push((w.rel.clone(), reason));
            }
        }
    }
    // A carried-forward leaf must not sit below a path that is now a file.
    out.leaves.retain(|p, _| RelPath::parse(p).is_ok());
    Ok(out)
}

fn ctime_of(md: &fs::Metadata) -> SystemTime {
    use std::os::unix::fs::MetadataExt;
    let ns = md.ctime().max(0) as u64 * 1_000_000_000 + md.ctime_nsec().max(0) as u64;
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn carry(prev: &HashMap<String, Entry>, rel: &str, leaves: &mut HashMap<String, Entry>) {
    if let Some(e) = prev.get(rel) {
        leaves.insert(rel.to_owned(), e.clone());
    }
}

fn carry_prefix(prev: &HashMap<String, Entry>, dir: &str, leaves: &mut HashMap<String, Entry>) {
    let prefix = format!("{dir}/");
    for (p, e) in prev {
        if p.starts_with(&prefix) && e.kind != EntryKind::Dir {
            leaves.insert(p.clone(), e.clone());
        }
    }
}

enum IngestError {
    Skip(SkipReason),
    Store(meridian_serve::StoreError),
    /// No hard link possible here (another file system, or refused): copy.
    CannotLink,
}

/// Opens a file that must still have the stat key the walk saw.
fn open_unchanged(abs: &Path, before: StatKey) -> Result<File, IngestError> {
    let src = File::open(abs).map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
    let md = src
        .metadata()
        .map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
    if StatKey::of(&md) != before {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    Ok(src)
}

/// Hashes one file where it is (the first half of a link snapshot): reads
/// exactly the size the walk saw and returns the open file, so that the
/// inode that was read can be linked later even if a rename replaces its
/// path meanwhile.
fn hash_in_place(abs: &Path, before: StatKey, buf: &mut [u8]) -> Result<(File, Hash), IngestError> {
    let mut src = open_unchanged(abs, before)?;
    let mut hasher = blake3::Hasher::new();
    let mut read = 0u64;
    // Read exactly the size the stat gave; growth shows up in the mtime.
    while read < before.size {
        let want = buf.len().min((before.size - read) as usize);
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(IngestError::Skip(SkipReason::Unreadable)),
        };
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != before.size {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    Ok((src, hasher.finalize().into()))
}

/// The second half of a link snapshot: hard-links the inode that hashed to
/// `h` into the store's `linked/` area. `held` is that inode's open file; a
/// file closed after hashing (more were waiting than the descriptor budget
/// allows) is opened again and must still have the walk's stat key, which
/// no write can leave unchanged. Returns the hash, whether the object was
/// new, and the file's stat key after linking (a link bumps the ctime;
/// caching the new key lets the next scan recognise the file). The file
/// must keep its inode, size and mtime from before the read to after the
/// link; whatever slips past that is caught when the link is copied, which
/// hashes again.
fn link_hashed(
    store: &LinkedStore,
    abs: &Path,
    before: StatKey,
    held: Option<File>,
    h: Hash,
) -> Result<(Hash, bool, StatKey), IngestError> {
    let was_held = held.is_some();
    let src = match held {
        Some(f) => f,
        None => open_unchanged(abs, before)?,
    };
    let new = match store.link_in(&src, &h) {
        Ok(new) => new,
        // Renamed over or deleted since it was hashed: the inode has no name
        // left to link, but its bytes are still here; they are copied, and
        // kept only if they still hash to `h`.
        Err(_) if was_held && src.metadata().is_ok_and(|m| m.nlink() == 0) => {
            if store.contains(&h) {
                return Ok((h, false, before));
            }
            let mut src = src;
            src.seek(std::io::SeekFrom::Start(0))
                .map_err(|_| IngestError::Skip(SkipReason::Unreadable))?;
            return match store.objects.copy_verified(&mut src, &h, before.size) {
                Ok(true) => Ok((h, true, before)),
                Ok(false) => Err(IngestError::Skip(SkipReason::ChangedWhileHashing)),
                Err(e) => Err(IngestError::Store(e)),
            };
        }
        Err(_) => return Err(IngestError::CannotLink),
    };
    let after = src.metadata().map(|m| StatKey::of(&m)).ok();
    match after {
        Some(k)
            if k.dev == before.dev
                && k.ino == before.ino
                && k.size == before.size
                && k.mtime_ns == before.mtime_ns
                && (new || k.ctime_ns == before.ctime_ns) =>
        {
            Ok((h, new, k))
        }
        _ => Err(IngestError::Skip(SkipReason::ChangedWhileHashing)),
    }
}

/// Snapshots one file into the store and returns its hash and whether the
/// object was new. The hash is of the snapshot's bytes.
fn ingest(
    store: &LinkedStore,
    abs: &Path,
    before: StatKey,
    buf: &mut [u8],
) -> Result<(Hash, bool, StatKey), IngestError> {
    let mut src = open_unchanged(abs, before)?;
    let store_err = |e| IngestError::Store(e);
    let mut w = store
        .objects
        .unnamed_writer(before.size)
        .map_err(store_err)?;
    // Snapshot first (a reflink where the file system can, else an
    // in-kernel copy), then hash the snapshot itself: the hash is of the
    // bytes that will be served, whatever the source does next.
    match w.snapshot_from(&mut src, before.size + 1, buf) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(28) => {
            return Err(store_err(meridian_serve::StoreError::io(
                w.staged_path(),
                e,
            )));
        }
        Err(_) => return Err(IngestError::Skip(SkipReason::Unreadable)),
    }
    let after = fs::symlink_metadata(abs).map(|m| StatKey::of(&m)).ok();
    if after != Some(before) || w.written() != before.size {
        return Err(IngestError::Skip(SkipReason::ChangedWhileHashing));
    }
    let h = w.digest();
    if store.contains(&h) {
        return Ok((h, false, before));
    }
    let h = w.commit().map_err(store_err)?;
    Ok((h, true, before))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linked::Promoted;

    fn scan_dir(
        content: &Path,
        store: &LinkedStore,
        prev: &HashMap<String, Entry>,
        quiet: Duration,
    ) -> ScanOutput {
        scan_mode(content, store, prev, quiet, Snapshot::Copy)
    }

    fn scan_mode(
        content: &Path,
        store: &LinkedStore,
        prev: &HashMap<String, Entry>,
        quiet: Duration,
        snapshot: Snapshot,
    ) -> ScanOutput {
        let cache = HashCache::default();
        scan(&ScanInput {
            content,
            store,
            cache: &cache,
            previous: prev,
            quiet,
            threads: 2,
            snapshot,
        })
        .expect("scan")
    }

    #[test]
    fn recent_files_wait_for_quiet_and_keep_their_previous_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = dir.path().join("c");
        fs::create_dir_all(&content).expect("mkdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        let f = content.join("f");
        fs::write(&f, b"new bytes").expect("write");
        let old = Entry::file("f", 3, Hash([1; 32]), false, 0);
        let prev: HashMap<String, Entry> = [("f".to_owned(), old.clone())].into();

        // Just written: not yet published; the previous version is kept.
        let out = scan_dir(&content, &store, &prev, Duration::from_secs(3600));
        assert_eq!(out.leaves.get("f"), Some(&old));
        assert!(out.needs_retry());
        // Without a previous version it is simply not published yet.
        let out = scan_dir(&content, &store, &HashMap::new(), Duration::from_secs(3600));
        assert!(out.leaves.is_empty());

        // Quiet long enough: published with the hash of its bytes.
        let out = scan_dir(&content, &store, &prev, Duration::ZERO);
        let e = out.leaves.get("f").expect("published");
        assert_eq!(e.hash, meridian_core::hash_bytes(b"new bytes"));
        assert_eq!(store.read(&e.hash).expect("snapshot"), b"new bytes");
        assert!(!out.needs_retry());
    }

    #[test]
    fn a_file_that_changes_between_stat_and_copy_is_not_snapshotted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        let f = dir.path().join("f");
        fs::write(&f, b"before").expect("write");
        let before = StatKey::of(&fs::symlink_metadata(&f).expect("stat"));
        // The file changes after the scan's stat and before the snapshot.
        fs::write(&f, b"after, and longer").expect("rewrite");
        let mut buf = vec![0u8; 4096];
        let r = ingest(&store, &f, before, &mut buf);
        assert!(matches!(
            r,
            Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
        ));
        assert!(store.list().expect("list").is_empty(), "nothing was stored");
        assert_eq!(
            fs::read_dir(dir.path().join("s/tmp")).expect("tmp").count(),
            0,
            "no staging file left behind"
        );
        // Unchanged since the stat: snapshotted, with the hash of its bytes.
        let now = StatKey::of(&fs::symlink_metadata(&f).expect("stat"));
        let Ok((h, true, _)) = ingest(&store, &f, now, &mut buf) else {
            panic!("ingest failed")
        };
        assert_eq!(h, meridian_core::hash_bytes(b"after, and longer"));
    }

    #[test]
    fn snapshot_is_immune_to_later_edits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = dir.path().join("c");
        fs::create_dir_all(&content).expect("mkdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        fs::write(content.join("f"), b"version one").expect("write");
        let out = scan_dir(&content, &store, &HashMap::new(), Duration::ZERO);
        let h = out.leaves["f"].hash;
        fs::write(content.join("f"), b"version two!").expect("rewrite");
        assert_eq!(store.read(&h).expect("object"), b"version one");
    }

    #[test]
    fn a_hashed_file_is_linked_as_it_was_read_even_if_renamed_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        let mut buf = vec![0u8; 4096];
        let replace = |path: &Path, bytes: &[u8]| {
            let tmp = path.with_extension("new");
            fs::write(&tmp, bytes).expect("write");
            fs::rename(&tmp, path).expect("rename over");
        };
        let hashed = |path: &Path, bytes: &[u8], buf: &mut [u8]| {
            fs::write(path, bytes).expect("write");
            let key = StatKey::of(&fs::symlink_metadata(path).expect("stat"));
            let Ok((file, h)) = hash_in_place(path, key, buf) else {
                panic!("hash failed")
            };
            assert_eq!(h, meridian_core::hash_bytes(bytes));
            (key, file, h)
        };

        // Held open from hashing to linking: a rename over the path in
        // between cannot swap the inode; the bytes that were hashed are kept.
        let a = dir.path().join("a");
        let (key, file, h) = hashed(&a, b"as published", &mut buf);
        replace(&a, b"the next version");
        let Ok((got, true, _)) = link_hashed(&store, &a, key, Some(file), h) else {
            panic!("link failed")
        };
        assert_eq!(got, h);
        assert!(!store.is_linked_only(&h), "kept as a private copy");
        assert_eq!(store.read(&h).expect("object"), b"as published");
        // The same, but edited in place before the rename: the bytes no
        // longer match what was hashed, so nothing is kept.
        let (key, file, h) = hashed(&a, b"published, then edited", &mut buf);
        fs::OpenOptions::new()
            .write(true)
            .open(&a)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"P"))
            .expect("edit in place");
        replace(&a, b"the next version");
        assert!(matches!(
            link_hashed(&store, &a, key, Some(file), h),
            Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
        ));
        assert!(!store.contains(&h));

        // Closed after hashing (the descriptor budget was spent) and renamed
        // over before the link: caught by the stat key, nothing is linked,
        // and the file is retried by a later scan.
        let b = dir.path().join("b");
        let (key, file, h) = hashed(&b, b"b as hashed", &mut buf);
        drop(file);
        replace(&b, b"b replaced");
        assert!(matches!(
            link_hashed(&store, &b, key, None, h),
            Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
        ));
        assert!(!store.contains(&h));

        // Closed and untouched: reopened and linked.
        let c = dir.path().join("c");
        let (key, file, h) = hashed(&c, b"c stays", &mut buf);
        drop(file);
        assert!(matches!(
            link_hashed(&store, &c, key, None, h),
            Ok((_, true, _))
        ));
        assert_eq!(
            store.read_verified(&h).expect("read"),
            Some(b"c stays".to_vec())
        );
    }

    #[test]
    fn files_past_the_descriptor_budget_are_reopened_and_linked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = dir.path().join("c");
        fs::create_dir_all(content.join("sub")).expect("mkdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        let names: Vec<String> = (0..50).map(|i| format!("sub/f{i}")).collect();
        for n in &names {
            fs::write(content.join(n), n.repeat(100)).expect("write");
        }
        let cache = HashCache::default();
        let previous = HashMap::new();
        let out = scan_with_budget(
            &ScanInput {
                content: &content,
                store: &store,
                cache: &cache,
                previous: &previous,
                quiet: Duration::ZERO,
                threads: 2,
                snapshot: Snapshot::Link,
            },
            0,
        )
        .expect("scan");
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(out.files_hashed, 50);
        assert_eq!(store.list_linked().expect("list").len(), 50);
        for n in &names {
            let h = out.leaves[n].hash;
            assert_eq!(h, meridian_core::hash_bytes(n.repeat(100).as_bytes()));
            assert_eq!(
                store.read_verified(&h).expect("read"),
                Some(n.repeat(100).into_bytes())
            );
        }
    }

    #[test]
    fn linked_files_are_copied_only_when_they_still_hash_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = dir.path().join("c");
        fs::create_dir_all(&content).expect("mkdir");
        let store = LinkedStore::open(&dir.path().join("s")).expect("store");
        fs::write(content.join("kept"), b"stays as published").expect("write");
        fs::write(content.join("edited"), b"first version").expect("write");
        let out = scan_mode(
            &content,
            &store,
            &HashMap::new(),
            Duration::ZERO,
            Snapshot::Link,
        );
        let (kept, edited) = (out.leaves["kept"].hash, out.leaves["edited"].hash);
        assert_eq!(kept, meridian_core::hash_bytes(b"stays as published"));
        // Hashed in place and linked: present, but not yet a private copy.
        assert!(store.contains(&kept) && store.contains(&edited));
        assert!(!store.path(&kept).exists(), "no copy made while publishing");
        assert_eq!(store.list_linked().expect("list").len(), 2);
        // Linking bumped each file's ctime; the cache holds the new key, so
        // a rescan hashes nothing again.
        let again = scan(&ScanInput {
            content: &content,
            store: &store,
            cache: &out.cache,
            previous: &out.leaves,
            quiet: Duration::from_secs(3600),
            threads: 2,
            snapshot: Snapshot::Link,
        })
        .expect("rescan");
        assert_eq!(again.files_hashed, 0, "{:?}", again.skipped);
        assert_eq!(again.leaves["kept"].hash, kept);

        // An in-place edit before the copy: the object is withdrawn, and its
        // changed bytes are never stored under the old name.
        fs::write(content.join("edited"), b"second version").expect("rewrite");
        assert_eq!(
            store.promote(&edited).expect("promote"),
            Promoted::Withdrawn
        );
        assert!(!store.contains(&edited));
        // An untouched one becomes a private copy, immune to later edits.
        assert_eq!(store.promote(&kept).expect("promote"), Promoted::Copied);
        fs::write(content.join("kept"), b"edited after the copy").expect("rewrite");
        assert_eq!(store.read(&kept).expect("copy"), b"stays as published");
        assert_eq!(store.promote(&kept).expect("again"), Promoted::Present);
        assert!(store.list_linked().expect("list").is_empty());
    }
}
