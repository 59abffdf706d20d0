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
        st.store.sync_all()?;
        let written = write_content(&st, &g, &content)?;
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
    // Files in parallel: each is an in-kernel copy of a verified object.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let failed: std::sync::Mutex<Option<RestoreError>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((rel, h, exec, mtime)) = files.get(i) else {
                        return;
                    };
                    if let Err(e) = write_file(state, &staging.join(rel), h, *exec, *mtime) {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    // Directory mtimes last, deepest first (writing into one changes it).
    // The origin publishes the mtime of empty directories only; 0 is "not
    // published", and such a directory keeps the time it was made.
    dirs.retain(|(_, mtime)| *mtime != 0);
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (rel, mtime) in &dirs {
        set_mtime(&staging.join(rel), *mtime, true)?;
    }
    let d = std::fs::File::open(&staging).map_err(io(&staging))?;
    rustix::fs::syncfs(&d).map_err(|e| io(&staging)(e.into()))?;
    if content.exists() {
        std::fs::remove_dir(content).map_err(io(content))?;
    }
    std::fs::rename(&staging, content).map_err(io(content))?;
    if let Some(parent) = content.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(io(parent))?;
    }
    Ok(files.into_iter().map(|(rel, h, _, _)| (rel, h)).collect())
}

fn write_file(
    state: &MirrorState,
    path: &Path,
    h: &Hash,
    executable: bool,
    mtime: i64,
) -> Result<(), RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let src = state.store.path(h);
    std::fs::copy(&src, path).map_err(io(path))?;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))?;
    set_mtime(path, mtime, true)
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
