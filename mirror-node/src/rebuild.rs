//! `meridian restore`: rebuilding a lost origin from any mirror.
//!
//! The restore is a mirror's first sync, run once into the new origin's
//! state directory: the newest root that verifies with the trusted keys
//! (rotations and revocations followed as a mirror follows them), then
//! every node and blob, each checked against the tree as it arrives and
//! committed by the verified writer. An interrupted restore resumes: what
//! is in the store stays, a partial download goes on from its verified
//! prefix. Then it writes the content directory exactly as published
//! (bytes, directories, symlinks, executable bits, file and symlink
//! mtimes; the origin publishes no directory mtimes) into a sibling
//! staging directory, renamed into place once it is complete and durable,
//! and leaves an origin state: `objects/`, the newest root in `roots/` and
//! the key statements in `keyring`; the mirror's own files (`current`,
//! `highest`, `unflushed`, `quarantine/`, `partial/`) are removed. The
//! origin started on it with its key continues at the next generation, and
//! every mirror follows it, since the chain is unbroken.
//!
//! A mirror whose newest root is older than `at_least` is refused, so a
//! stale mirror cannot roll the origin back unnoticed.

use crate::state::MirrorState;
use crate::sync::{SyncError, Syncer};
use crate::upstreams::Waited;
use meridian_core::{EntryKind, Hash, PublicKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What to restore from and where to.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Mirrors (or an origin) to restore from, tried in order.
    pub upstreams: Vec<String>,
    /// The keys the lost origin's roots verify with (as a mirror's `trust`).
    pub trust: Vec<PublicKey>,
    /// The new origin's state directory.
    pub state: PathBuf,
    /// The new origin's content directory; must not exist, or be empty.
    pub content: PathBuf,
    /// Refuse an upstream whose newest generation is below this.
    pub at_least: u64,
    /// Blobs fetched at once.
    pub parallel_fetches: usize,
}

/// What a restore wrote.
#[derive(Debug)]
pub struct Restored {
    pub generation: u64,
    pub upstream: String,
    pub files: u64,
    pub bytes: u64,
    /// Every regular file written, by its path in the tree, with its hash.
    pub written: Vec<(String, Hash)>,
}

/// Why a restore stopped. Everything verified so far stays in the state
/// directory, and a rerun goes on from there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    #[error("restore needs at least one mirror to restore from (--from URL)")]
    NoUpstream,
    #[error("restore needs the lost origin's public key (--trust ed25519:...)")]
    NoTrust,
    #[error(
        "content directory {0} exists and is not empty; restore writes a new one (move it aside, or name another with --content)"
    )]
    ContentNotEmpty(PathBuf),
    #[error(
        "{upstream} serves generation {offered}, older than --at-least {at_least}: refusing to roll the origin back to a stale mirror (restore from a current one, or lower --at-least if {offered} really is the newest)"
    )]
    Stale {
        upstream: String,
        offered: u64,
        at_least: u64,
    },
    #[error("no mirror could be restored from: {0}")]
    Nothing(String),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] meridian_serve::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How far a restore has got, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct RestoreProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_sec: f64,
    pub eta: Option<Duration>,
}

fn is_empty_or_missing(dir: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(dir) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Restores a lost origin; `show` is called about twice a second while
/// blobs are fetched.
pub async fn restore_origin(
    cfg: RestoreConfig,
    show: impl Fn(RestoreProgress) + Send,
) -> Result<Restored, RestoreError> {
    if cfg.upstreams.is_empty() {
        return Err(RestoreError::NoUpstream);
    }
    if cfg.trust.is_empty() {
        return Err(RestoreError::NoTrust);
    }
    if !is_empty_or_missing(&cfg.content)? {
        return Err(RestoreError::ContentNotEmpty(cfg.content.clone()));
    }
    std::fs::create_dir_all(&cfg.state).map_err(io(&cfg.state))?;
    let mut mcfg = crate::MirrorConfig::new(
        "restore",
        crate::upstreams::Upstreams::normalise(&cfg.upstreams),
        cfg.trust.clone(),
        cfg.state.clone(),
    );
    // Objects from an interrupted restore are in the store with no record
    // of a generation: the floor is `--at-least`, checked below.
    mcfg.accept_lower_generation = true;
    mcfg.parallel_fetches = cfg.parallel_fetches.max(1);
    let state = Arc::new(MirrorState::open(mcfg)?);
    let st = state.clone();
    let taken = tokio::task::spawn_blocking(move || take_back_linked(&st))
        .await
        .map_err(|e| io(&cfg.state)(std::io::Error::other(e)))??;
    if taken > 0 {
        tracing::info!(
            objects = taken,
            "resuming: objects an interrupted restore had placed are back in the store"
        );
    }
    let syncer = Syncer::new(state.clone());

    let mut refused = Vec::new();
    let mut chosen = None;
    for i in syncer.upstreams().order() {
        let url = syncer.upstreams().url(i).to_owned();
        let polled = match syncer.upstreams().wait(i, 0, Duration::from_secs(5)).await {
            Ok(p) => p,
            Err(e) => {
                refused.push(e);
                continue;
            }
        };
        syncer.learn_keys(i, polled.keys).await;
        let Waited::Root(env) = polled.waited else {
            refused.push(format!("{url} serves no generation yet"));
            continue;
        };
        let vr = match syncer.accept_root(i, &env).await {
            Ok(vr) => vr,
            Err(e) => {
                refused.push(e.to_string());
                continue;
            }
        };
        if vr.root.generation < cfg.at_least {
            let e = RestoreError::Stale {
                upstream: url,
                offered: vr.root.generation,
                at_least: cfg.at_least,
            };
            if syncer.upstreams().urls.len() == 1 {
                return Err(e);
            }
            refused.push(e.to_string());
            continue;
        }
        chosen = Some((i, url, vr));
        break;
    }
    let Some((i, url, vr)) = chosen else {
        return Err(RestoreError::Nothing(refused.join("; ")));
    };
    tracing::info!(generation = vr.root.generation, upstream = %url, files = vr.root.files, bytes = vr.root.bytes, "restoring");
    {
        // Written blobs are pushed to the disk while the fetch goes on, so
        // the final flush has little left to do (one `syncfs` a second on
        // its own thread; the fetch never waits for it).
        let flushing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flusher = {
            let (on, dir) = (flushing.clone(), cfg.state.clone());
            std::thread::spawn(move || {
                while on.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    if let Ok(d) = std::fs::File::open(&dir) {
                        let _ = rustix::fs::syncfs(&d);
                    }
                }
            })
        };
        struct Stop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(flushing);
        let _ = flusher;
        let sync = syncer.sync_to(vr, i);
        tokio::pin!(sync);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                r = &mut sync => break r?,
                _ = tick.tick() => {
                    if let Some((p, rate, eta)) = state.progress.rate() {
                        show(RestoreProgress {
                            files_done: p.files_done,
                            files_total: p.files_total,
                            bytes_done: p.bytes_done,
                            bytes_total: p.bytes_total,
                            bytes_per_sec: rate,
                            eta,
                        });
                    }
                }
            }
        }
    }
    let g = state
        .served
        .load_full()
        .ok_or_else(|| RestoreError::Nothing("the sync ended with no generation".into()))?;
    let content = cfg.content.clone();
    let st = state.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<_, RestoreError> {
        let t0 = std::time::Instant::now();
        let written = write_content(&st, &g, &content)?;
        tracing::info!(
            seconds = t0.elapsed().as_secs_f64(),
            "content written and made durable"
        );
        origin_state_only(&st.cfg().state)?;
        Ok((g.number(), g.root.root.files, g.root.root.bytes, written))
    })
    .await
    .map_err(|e| io(&cfg.state)(std::io::Error::other(e)))??;
    Ok(Restored {
        generation: written.0,
        upstream: url,
        files: written.1,
        bytes: written.2,
        written: written.3,
    })
}

/// Writes generation `g`'s tree as `content`: into a sibling staging
/// directory, made durable, then renamed into place.
fn write_content(
    state: &MirrorState,
    g: &crate::generation::Generation,
    content: &Path,
) -> Result<Vec<(String, Hash)>, RestoreError> {
    let name = content
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "content".into());
    let staging = content.with_file_name(format!(".{name}.restoring"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut stack = vec![(g.root.root.tree, String::new())];
    while let Some((h, rel)) = stack.pop() {
        let node = g
            .nodes
            .get(&h)
            .ok_or(crate::generation::LoadError::MissingNode(h))
            .map_err(SyncError::from)?;
        for e in &node.entries {
            let child = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            let path = staging.join(&child);
            match e.kind {
                EntryKind::Dir => {
                    std::fs::create_dir(&path).map_err(io(&path))?;
                    dirs.push((child.clone(), e.mtime));
                    stack.push((e.hash, child));
                }
                EntryKind::File => files.push((child, e.hash, e.executable, e.mtime)),
                EntryKind::Symlink => {
                    let target = e.target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(target, &path).map_err(io(&path))?;
                    set_mtime(&path, e.mtime, false)?;
                }
            }
        }
    }
    // Files in parallel. Which file takes each object is decided first.
    let mut seen = std::collections::HashSet::new();
    let files: Vec<_> = files
        .into_iter()
        .map(|(rel, h, x, m)| {
            let first = seen.insert(h);
            (rel, h, first, x, m)
        })
        .collect();
    // First the files that take their object, then the copies of them.
    let linked = state.cfg().state.join("linked");
    for shard in 0..=255u8 {
        let d = linked.join(format!("{shard:02x}"));
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let (firsts, copies): (Vec<_>, Vec<_>) = files.iter().partition(|f| f.2);
    for batch in [firsts, copies] {
        in_parallel(&batch, |(rel, h, first, exec, mtime)| {
            write_file(state, &linked, &staging.join(rel), h, *first, *exec, *mtime)
        })?;
    }
    // Directory mtimes last, deepest first (writing into one changes it).
    // The origin publishes the mtime of empty directories only; 0 is "not
    // published", and such a directory keeps the time it was made.
    dirs.retain(|(_, mtime)| *mtime != 0);
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (rel, mtime) in &dirs {
        set_mtime(&staging.join(rel), *mtime, true)?;
    }
    // Durable before it is put in place: the content's file system, and the
    // state's (the same one, usually, and then this costs nothing more).
    let d = std::fs::File::open(&staging).map_err(io(&staging))?;
    rustix::fs::syncfs(&d).map_err(|e| io(&staging)(e.into()))?;
    state.store.sync_all()?;
    if content.exists() {
        std::fs::remove_dir(content).map_err(io(content))?;
    }
    std::fs::rename(&staging, content).map_err(io(content))?;
    if let Some(parent) = content.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io(parent))?;
    }
    Ok(files.into_iter().map(|(rel, h, ..)| (rel, h)).collect())
}

/// Writes one content file. The first file with a hash takes the
/// verified object itself (a rename, no copy) and leaves a hard link to it
/// in the origin's `linked/`, exactly as an origin's own link snapshot does
/// (the origin makes its private copy in the background, as after any
/// first publish); a second file with the same bytes is a copy, so that no
/// two content files share an inode. Across file systems, every file is a
/// copy and the object stays.
/// Runs `f` on every item with a few threads; the first error stops it.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> Result<(), RestoreError> + Sync,
) -> Result<(), RestoreError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    // Metadata work (renames, links, mode and time changes) mostly waits
    // on the file system, so more threads than cores help.
    let threads = std::thread::available_parallelism().map_or(8, |n| (n.get() * 4).clamp(8, 32));
    let failed: std::sync::Mutex<Option<RestoreError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = f(item) {
                        if let Ok(mut slot) = failed.lock() {
                            slot.get_or_insert(e);
                        }
                        next.store(usize::MAX / 2, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Objects an interrupted restore had already moved into its staging
/// content (and so into `linked/`) go back into the store, each checked
/// against its name again, so a rerun does not fetch them twice.
fn take_back_linked(state: &MirrorState) -> Result<usize, RestoreError> {
    let linked = state.cfg().state.join("linked");
    let Ok(hashes) = meridian_serve::store::list_sharded(&linked) else {
        return Ok(0);
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut taken = 0;
    for h in hashes {
        let p = meridian_serve::store::sharded(&linked, &h);
        let ok = std::fs::File::open(&p)
            .map(|f| crate::verified::hashes_to(&f, &h, &mut buf))
            .unwrap_or(false);
        if ok && !state.store.contains(&h) {
            let dst = state.store.path(&h);
            if let Some(d) = dst.parent() {
                std::fs::create_dir_all(d).map_err(io(d))?;
            }
            std::fs::rename(&p, &dst).map_err(io(&p))?;
            taken += 1;
        } else {
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(taken)
}

fn write_file(
    state: &MirrorState,
    linked_dir: &Path,
    path: &Path,
    h: &Hash,
    first: bool,
    executable: bool,
    mtime: i64,
) -> Result<(), RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let src = state.store.path(h);
    let linked = meridian_serve::store::sharded(linked_dir, h);
    let moved = first && std::fs::rename(&src, path).is_ok();
    if !moved {
        // A later file with these bytes: from the first one's link.
        let from = if linked.exists() { &linked } else { &src };
        std::fs::copy(from, path).map_err(io(path))?;
    }
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))?;
    set_mtime(path, mtime, true)?;
    if moved {
        match std::fs::hard_link(path, &linked) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&linked)(e)),
        }
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: i64, follow: bool) -> Result<(), RestoreError> {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let flags = if follow {
        AtFlags::empty()
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        flags,
    )
    .map_err(|e| io(path)(e.into()))
}

/// Removes what only a mirror keeps, leaving an origin's state.
fn origin_state_only(state: &Path) -> Result<(), RestoreError> {
    for f in ["current", "highest", "unflushed"] {
        let p = state.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    for d in ["quarantine", "partial"] {
        let p = state.join(d);
        match std::fs::remove_dir_all(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    Ok(())
}
