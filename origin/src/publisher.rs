//! Turning a scan into a signed, durable generation; retention and GC.
//!
//! State directory layout (`--state DIR`):
//!
//! ```text
//! objects/…                 blobs and directory nodes (see meridian_serve::store)
//! roots/00000000000000000042.root   signed root of generation 42
//! hashcache                 the stat cache
//! ```
//!
//! Durability order of a publish: objects are written (renamed into place),
//! then `syncfs`, then the root file is written atomically. A generation
//! exists exactly when its root file does, so a crash at any point leaves
//! the previous generation as the newest complete one, and the next publish
//! carries on from it.

use crate::cache::HashCache;
use crate::config::OriginConfig;
use crate::linked::LinkedStore;
use crate::metrics::OriginMetrics;
use crate::scan::{Previous, ScanInput, ScanOutput, Snapshot, scan, scan_paths};
use arc_swap::{ArcSwap, ArcSwapOption};
use meridian_core::{
    DirNode, Entry, EntryKind, Hash, RelPath, Root, SecretKey, SignedRoot, TreeBuilder,
    VerifiedRoot, Verifier,
};
use meridian_serve::store::write_atomic;
use meridian_serve::{StoreError, unix_now};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// Why a publish failed. The previous generation stays the newest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error(transparent)]
    Scan(#[from] crate::scan::ScanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the manifest tree: {0}")]
    Tree(#[from] meridian_core::DecodeError),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "stored generation {path} does not verify with this origin's key {key}: {source}. If the origin's key was changed, rotate it instead: stop the origin, put the old key back, run `meridian key rotate --state STATE --old OLD_KEY_FILE --new NEW_KEY_FILE`, then start it with the new key (or point a running origin's key_file at the new key and reload it)"
    )]
    BadStoredRoot {
        path: PathBuf,
        key: meridian_core::PublicKey,
        source: Box<meridian_core::VerifyError>,
    },
    #[error(
        "this origin's key may not sign generation {generation}: {source}. Start the origin with the key that replaced it"
    )]
    KeyRetired {
        generation: u64,
        source: Box<meridian_core::VerifyError>,
    },
    #[error(transparent)]
    Locked(Box<crate::keys::KeyOpError>),
    #[error("stored directory node {0} is missing or damaged; the state directory is corrupt")]
    BadNode(Hash),
    #[error("origin configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    Published {
        generation: u64,
        files_hashed: u64,
        bytes_hashed: u64,
    },
    Unchanged,
}

/// State the HTTP service reads while the publisher writes.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<LinkedStore>,
    pub roots_dir: PathBuf,
    pub latest: ArcSwapOption<VerifiedRoot>,
    pub notify: watch::Sender<u64>,
    pub metrics: OriginMetrics,
    /// Objects published since the background copier last looked: with
    /// link snapshots these may still need a private copy. Only what a
    /// publish added is queued, so that work is O(changed), not O(tree).
    pub to_promote: std::sync::Mutex<Vec<Hash>>,
    /// The delta from the previous tree to each new one, computed while
    /// publishing (the new nodes are still in memory), so mirrors syncing
    /// the new generation get it without waiting for it.
    pub deltas: meridian_serve::readapi::DeltaCache,
    /// The key statements this origin publishes.
    pub keys: ArcSwap<meridian_serve::keys::KeysDoc>,
    /// When an object was last served (milliseconds since `started`): the
    /// background copier slows down while mirrors are fetching.
    pub last_served_ms: std::sync::atomic::AtomicU64,
    pub started: Instant,
}

impl Shared {
    /// Path of a generation's root file.
    pub fn root_path(&self, generation: u64) -> PathBuf {
        self.roots_dir.join(format!("{generation:020}.root"))
    }
}

/// The publishing side of the origin (runs on a blocking thread).
pub struct Publisher {
    cfg: OriginConfig,
    key: SecretKey,
    /// Which key signs which generations ([`crate::keys`]).
    keyring: meridian_core::Keyring,
    /// Held while the publisher lives: one origin per state directory.
    _lock: crate::keys::StateLock,
    shared: Arc<Shared>,
    cache: HashCache,
    unreferenced_since: HashMap<Hash, Instant>,
    /// When garbage collection next has something to do (an unreferenced
    /// object's grace ends, or a generation kept for its age ages out).
    gc_next: Option<Instant>,
    /// Paths skipped by the previous scan, so each problem is logged once.
    reported: HashSet<(String, &'static str)>,
    /// Set after the last scan if some files were still settling.
    pub needs_retry: bool,
    /// The snapshot mode in effect (`link` needs content and state on one
    /// file system).
    snapshot: Snapshot,
    /// What the watcher saw finished ([`crate::watcher::Closes`]).
    closes: Option<Arc<crate::watcher::Closes>>,
    /// The paths the watcher saw change ([`crate::watcher::Changed`]);
    /// without it every scan is a full one.
    changed: Option<Arc<crate::watcher::Changed>>,
    /// The content directory as the watcher names paths (absolute).
    content_abs: PathBuf,
    /// When the last full scan began: the next comes `rescan` later.
    last_full: Option<Instant>,
    /// The next scan must be a full one: a scan failed after taking the
    /// watcher's changes, so they are known no more.
    force_full: bool,
    /// Paths a scan left to settle, looked at again by the next.
    pending: Vec<String>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("key", &self.key).finish()
    }
}

fn state_err(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::State {
        path: path.to_path_buf(),
        source,
    }
}

/// Every (path, leaf entry) of a stored tree; also records node hashes.
pub(crate) fn walk_tree(
    store: &LinkedStore,
    tree: Hash,
    mut on_node: impl FnMut(Hash) -> bool,
    mut on_leaf: impl FnMut(&str, &Entry),
) -> Result<(), PublishError> {
    let mut stack = vec![(tree, String::new())];
    while let Some((h, prefix)) = stack.pop() {
        if !on_node(h) {
            continue; // already visited
        }
        let node = read_node(store, &h)?;
        for e in node.entries {
            let path = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            if e.kind == EntryKind::Dir {
                stack.push((e.hash, path));
            } else {
                on_leaf(&path, &e);
            }
        }
    }
    Ok(())
}

/// A stored directory node, checked against its hash.
pub(crate) fn read_node(store: &LinkedStore, h: &Hash) -> Result<DirNode, PublishError> {
    let bytes = store.read(h).map_err(|_| PublishError::BadNode(*h))?;
    if meridian_core::hash_bytes(&bytes) != *h {
        return Err(PublishError::BadNode(*h));
    }
    DirNode::decode(&bytes).map_err(|_| PublishError::BadNode(*h))
}

/// The tree of a full scan: its one subtree, the top, encoded and in
/// the store already.
fn build_whole(out: &ScanOutput) -> Result<meridian_core::tree::BuiltTree, PublishError> {
    let top = out
        .subtrees
        .iter()
        .find(|t| t.rel.is_empty())
        .ok_or_else(|| crate::scan::ScanError::Incomplete("the content directory".into()))?;
    Ok(meridian_core::tree::BuiltTree {
        nodes: Vec::new(),
        tree: top.entry.hash,
        tree_size: top.entry.size,
        files: top.files,
        bytes: top.bytes,
    })
}

/// The published tree as a scan's [`Previous`]: read from the store on
/// demand, along the paths asked about only (a few, for files that cannot
/// be read right now), never held whole.
struct StoredTree<'a> {
    store: &'a LinkedStore,
    top: Option<Hash>,
}

impl<'a> StoredTree<'a> {
    fn new(store: &'a LinkedStore, top: Option<Hash>) -> Self {
        StoredTree { store, top }
    }

    /// The entry at `rel` ("" is never an entry).
    fn entry(&self, rel: &str) -> Option<Entry> {
        let mut node = read_node(self.store, self.top.as_ref()?).ok()?;
        let mut comps = rel.split('/').peekable();
        while let Some(c) = comps.next() {
            let e = node.get(c)?.clone();
            if comps.peek().is_none() {
                return Some(e);
            }
            if e.kind != EntryKind::Dir {
                return None;
            }
            node = read_node(self.store, &e.hash).ok()?;
        }
        None
    }
}

impl Previous for StoredTree<'_> {
    fn leaf(&self, rel: &str) -> Option<Entry> {
        self.entry(rel).filter(|e| e.kind != EntryKind::Dir)
    }

    fn dir(&self, rel: &str) -> Option<(Entry, u64, u64)> {
        let d = self.entry(rel).filter(|e| e.kind == EntryKind::Dir)?;
        let (mut files, mut bytes) = (0, 0);
        walk_tree(
            self.store,
            d.hash,
            |_| true,
            |_, e| {
                if e.kind == EntryKind::File {
                    files += 1;
                    bytes += e.size;
                }
            },
        )
        .ok()?;
        Some((d, files, bytes))
    }
}

fn same_file_system(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

impl Publisher {
    /// Takes up reloaded publishing settings; the content and state
    /// directories and the snapshot mode stay as opened (the key is taken
    /// up by [`Publisher::take_key`]).
    pub(crate) fn reconfigure(&mut self, cfg: OriginConfig) {
        let OriginConfig {
            content,
            state,
            snapshot,
            ..
        } = self.cfg.clone();
        self.cfg = OriginConfig {
            content,
            state,
            snapshot,
            ..cfg
        };
    }

    /// Signs with `key` from the next generation on. A key other than the
    /// one in use is a rotation: the statement, signed by both, is stored
    /// and published first. Also takes up statements stored meanwhile by
    /// `meridian key revoke`.
    pub(crate) fn take_key(
        &mut self,
        key: SecretKey,
    ) -> Result<Option<meridian_core::SignedStatement>, crate::keys::KeyOpError> {
        let state = self.cfg.state.clone();
        // The stored statements, read again (a revocation written since),
        // on top of those in memory.
        let mut ring = crate::keys::load(&state, self.key.public());
        if let Ok((new, _)) = ring.add_list(&self.keyring.encode())
            && new > 0
        {
            tracing::warn!(
                new,
                "key statements held in memory were missing from the stored keyring; kept"
            );
        }
        let next = self
            .shared
            .latest
            .load()
            .as_ref()
            .map_or(1, |l| l.root.generation + 1);
        let mut statement = None;
        if key.public() != self.key.public() {
            if ring.check(&key.public(), next).is_ok() {
                // Already trusted for the next generation (a backup key
                // that signed a revocation, say): no statement is needed.
                tracing::info!(key = %key.public(), "signing with another key already in force from generation {next}");
            } else {
                let s = crate::keys::rotation(&mut ring, &self.key, &key, next)?;
                // Durable before anything is signed with the new key.
                meridian_serve::keys::save(&state, &ring)?;
                statement = Some(s);
            }
        }
        if ring.id() != self.keyring.id() {
            self.shared
                .keys
                .store(meridian_serve::keys::KeysDoc::of(&ring));
        }
        self.keyring = ring;
        self.key = key;
        Ok(statement)
    }

    /// Opens the state directory and recovers the newest complete generation.
    pub fn open(cfg: OriginConfig, key: SecretKey) -> Result<Self, PublishError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.state).map_err(state_err(&cfg.state))?;
        let lock =
            crate::keys::lock_state(&cfg.state).map_err(|e| PublishError::Locked(Box::new(e)))?;
        let store = Arc::new(LinkedStore::open(&cfg.state)?);
        let roots_dir = cfg.state.join("roots");
        std::fs::create_dir_all(&roots_dir).map_err(state_err(&roots_dir))?;
        let keyring = crate::keys::load(&cfg.state, key.public());
        let verifier = Verifier::with_keyring(keyring.clone());
        let mut gens = list_generations(&roots_dir)?;
        gens.sort_unstable();
        let mut latest: Option<VerifiedRoot> = None;
        let mut latest_mtime = SystemTime::UNIX_EPOCH;
        if let Some(&g) = gens.last() {
            let path = roots_dir.join(format!("{g:020}.root"));
            let bytes = std::fs::read(&path).map_err(state_err(&path))?;
            let v = verifier
                .open(&bytes)
                .map_err(|source| PublishError::BadStoredRoot {
                    path: path.clone(),
                    key: key.public(),
                    source: Box::new(source),
                })?;
            latest_mtime = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(latest_mtime);
            latest = Some(v);
        }
        let next = latest.as_ref().map_or(1, |l| l.root.generation + 1);
        keyring
            .check(&key.public(), next)
            .map_err(|source| PublishError::KeyRetired {
                generation: next,
                source: Box::new(source),
            })?;
        let (notify, _) = watch::channel(latest.as_ref().map(|l| l.root.generation).unwrap_or(0));
        let metrics = OriginMetrics::new();
        metrics.latest_generation.set(
            latest
                .as_ref()
                .map(|l| l.root.generation as i64)
                .unwrap_or(0),
        );
        metrics
            .latest_expiry
            .set(latest.as_ref().map(|l| l.root.expires).unwrap_or(0));
        let shared = Arc::new(Shared {
            store,
            roots_dir,
            latest: ArcSwapOption::from(latest.clone().map(Arc::new)),
            notify,
            metrics,
            to_promote: std::sync::Mutex::new(Vec::new()),
            deltas: Default::default(),
            keys: ArcSwap::new(meridian_serve::keys::KeysDoc::of(&keyring)),
            last_served_ms: std::sync::atomic::AtomicU64::new(0),
            started: Instant::now(),
        });
        if let Some(l) = &latest {
            // The newest tree is read lazily from here on; its top node
            // must be there now.
            read_node(&shared.store, &l.root.tree)?;
        }
        let cache = HashCache::load(&cfg.state.join("hashcache"));
        let snapshot = match cfg.snapshot {
            Snapshot::Link if !same_file_system(&cfg.content, &cfg.state) => {
                tracing::info!(
                    "content and state are on different file systems: snapshots are copies"
                );
                Snapshot::Copy
            }
            m => m,
        };
        let cfg_content = cfg.content.clone();
        let mut p = Publisher {
            cfg,
            key,
            keyring,
            _lock: lock,
            shared,
            cache,
            unreferenced_since: HashMap::new(),
            gc_next: None,
            reported: HashSet::new(),
            needs_retry: false,
            snapshot,
            closes: None,
            changed: None,
            content_abs: std::path::absolute(&cfg_content).unwrap_or(cfg_content),
            last_full: None,
            force_full: false,
            pending: Vec::new(),
        };
        p.remove_crash_leftovers(latest_mtime)?;
        Ok(p)
    }

    /// Lets scans publish files the watcher saw finished without waiting
    /// out the quiet period, and look only at the paths it saw change.
    pub(crate) fn watch(
        &mut self,
        closes: Arc<crate::watcher::Closes>,
        changed: Arc<crate::watcher::Changed>,
    ) {
        self.closes = Some(closes);
        self.changed = Some(changed);
    }

    /// What the next scan looks at: `None` for everything (no watcher, no
    /// generation yet, a full rescan due, a lost event, a failed scan),
    /// else the paths that changed, relative to the content directory,
    /// and those left to settle.
    fn changed_paths(&mut self, have_tree: bool) -> Option<Vec<String>> {
        // Taken in any case: a full scan covers them too.
        let taken = self.changed.as_ref()?.take();
        let full_due = self
            .last_full
            .is_none_or(|t| t.elapsed() >= self.cfg.rescan);
        if self.force_full || !have_tree || full_due {
            return None;
        }
        let crate::watcher::Changes::Paths(paths) = taken else {
            tracing::info!("the watcher lost events; scanning everything");
            return None;
        };
        let mut rels = Vec::with_capacity(paths.len() + self.pending.len());
        for p in paths {
            let Ok(rel) = p.strip_prefix(&self.content_abs) else {
                // Not a path below the content directory as we name it:
                // take no chances.
                tracing::info!(path = %p.display(), "the watcher named a path outside the content directory; scanning everything");
                return None;
            };
            if rel.as_os_str().is_empty() {
                return None;
            }
            match rel.to_str() {
                Some(r) => rels.push(r.to_owned()),
                None => tracing::debug!(path = %p.display(), "file name is not valid UTF-8"),
            }
        }
        rels.append(&mut self.pending);
        Some(rels)
    }

    /// The state shared with the HTTP service.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Objects written by a publish that never committed its root (newer than
    /// the newest root, referenced by no root) may be torn by the crash;
    /// they are removed so no later publish can reuse them.
    fn remove_crash_leftovers(
        &mut self,
        latest_root_mtime: SystemTime,
    ) -> Result<(), PublishError> {
        let reachable = self.reachable(&list_generations(&self.shared.roots_dir)?)?;
        let mut removed = 0;
        for h in self.shared.store.list()? {
            if reachable.contains(&h) {
                continue;
            }
            let newer = std::fs::metadata(self.shared.store.path(&h))
                .and_then(|m| m.modified())
                .map(|t| t >= latest_root_mtime)
                .unwrap_or(true);
            if newer {
                self.shared.store.remove(&h)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed objects left by an interrupted publish");
        }
        Ok(())
    }

    fn reachable(&self, gens: &[u64]) -> Result<HashSet<Hash>, PublishError> {
        let verifier = Verifier::with_keyring(self.keyring.clone());
        let mut seen: HashSet<Hash> = HashSet::new();
        for &g in gens {
            let path = self.shared.root_path(g);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(v) = verifier.open(&bytes) else {
                continue;
            };
            let mut leaves = Vec::new();
            walk_tree(
                &self.shared.store,
                v.root.tree,
                |h| seen.insert(h),
                |_, e| {
                    if e.kind == EntryKind::File {
                        leaves.push(e.hash);
                    }
                },
            )?;
            seen.extend(leaves);
        }
        Ok(seen)
    }

    /// Scans and, if anything changed (or the newest generation is close to
    /// expiry), publishes a new generation.
    pub fn publish(&mut self) -> Result<PublishOutcome, PublishError> {
        let t0 = Instant::now();
        let res = self.publish_inner();
        let m = &self.shared.metrics;
        m.publish_seconds.observe(t0.elapsed().as_secs_f64());
        if res.is_err() {
            m.publish_errors.inc();
        }
        res
    }

    fn publish_inner(&mut self) -> Result<PublishOutcome, PublishError> {
        let latest = self.shared.latest.load_full();
        let paths = self.changed_paths(latest.is_some());
        // Changes taken from the watcher are known only to this publish
        // (a full scan's too: it took them): should it fail, the next one
        // scans everything.
        self.force_full = true;
        let full = paths.is_none();
        let outcome = self.publish_scan(&latest, paths)?;
        self.force_full = false;
        if full {
            // A full scan's working set (every path, twice, and the tree)
            // is freed by now; glibc keeps it in its arenas unless asked
            // to give it back.
            let before = meridian_serve::memory::resident_kb();
            meridian_serve::memory::release_free_heap();
            tracing::debug!(
                rss_kb_before = before,
                rss_kb_after = meridian_serve::memory::resident_kb(),
                "returned the full scan's freed heap to the kernel"
            );
        }
        Ok(outcome)
    }

    /// Scans (everything, or `paths`), builds the tree and publishes it if
    /// it changed (or the newest generation is close to expiry).
    fn publish_scan(
        &mut self,
        latest: &Option<Arc<VerifiedRoot>>,
        paths: Option<Vec<String>>,
    ) -> Result<PublishOutcome, PublishError> {
        let t0 = Instant::now();
        let full = paths.is_none();
        if full {
            self.last_full = Some(t0);
        }
        let previous = StoredTree::new(&self.shared.store, latest.as_ref().map(|l| l.root.tree));
        let input = ScanInput {
            content: &self.cfg.content,
            store: &self.shared.store,
            cache: &self.cache,
            previous: &previous,
            quiet: self.cfg.quiet,
            closes: self.closes.as_deref(),
            threads: self.cfg.threads(),
            snapshot: self.snapshot,
        };
        let mut out = match &paths {
            None => scan(&input)?,
            Some(p) => scan_paths(&input, p)?,
        };
        // Finished files older than the quiet period are settled by age.
        if let Some(c) = &self.closes {
            c.forget_before(std::time::SystemTime::now() - self.cfg.quiet);
        }
        let m = &self.shared.metrics;
        m.scans
            .with_label_values(&[if full { "full" } else { "changed" }])
            .inc();
        m.files_hashed.inc_by(out.files_hashed);
        m.bytes_hashed.inc_by(out.bytes_hashed);
        m.hash_seconds.inc_by(out.hash_seconds);
        if full {
            m.watched_directories.set(out.dir_count as i64);
        }
        let mut reported = HashSet::new();
        for (path, r) in &out.skipped {
            m.skipped_files.with_label_values(&[r.label()]).inc();
            let key = (path.clone(), r.label());
            if !r.retry() && !self.reported.contains(&key) {
                tracing::warn!(path = %path.escape_debug(), "{}", r.explain());
            }
            reported.insert(key);
        }
        if full {
            self.reported = reported;
        } else {
            self.reported.extend(reported);
        }
        self.needs_retry = out.needs_retry();
        self.pending = out
            .skipped
            .iter()
            .filter(|(_, r)| r.retry())
            .map(|(p, _)| p.clone())
            .collect();

        let t_scan = t0.elapsed();
        let built = match (latest, full) {
            (Some(l), false) => match self.build_over(&l.root, &out)? {
                Some(b) => b,
                None => {
                    // The changes do not fit the tree (an event lost
                    // without an overflow?): look at everything instead.
                    tracing::info!("changes do not fit the published tree; scanning everything");
                    return self.publish_scan(latest, None);
                }
            },
            _ => build_whole(&out)?,
        };
        let t_tree = t0.elapsed();
        let mut new_nodes = std::mem::take(&mut out.new_nodes);
        for (h, bytes) in &built.nodes {
            if !self.shared.store.contains(h) {
                self.shared.store.objects.put_bytes(h, bytes)?;
                new_nodes.push(*h);
            }
        }

        let now = unix_now();
        if let Some(l) = latest {
            let expiring = l.root.expires - now < self.cfg.resign_before.as_secs() as i64;
            if l.root.tree == built.tree && !expiring {
                self.take_cache(out, full)?;
                return Ok(PublishOutcome::Unchanged);
            }
        }
        let root = Root {
            generation: latest.as_ref().map(|l| l.root.generation + 1).unwrap_or(1),
            created: now,
            expires: now + self.cfg.expiry.as_secs().max(1) as i64,
            previous: latest.as_ref().map(|l| l.hash).unwrap_or(Hash::ZERO),
            tree: built.tree,
            tree_size: built.tree_size,
            files: built.files,
            bytes: built.bytes,
        };
        self.keyring
            .check(&self.key.public(), root.generation)
            .map_err(|source| PublishError::KeyRetired {
                generation: root.generation,
                source: Box::new(source),
            })?;
        let envelope = SignedRoot::sign(&root, &self.key).encode();
        if let Some(l) = &latest {
            self.precompute_delta(l.root.tree, &built);
        }
        let t_nodes = t0.elapsed();
        self.shared
            .store
            .sync_objects(&[&out.new_objects, &new_nodes])?;
        let t_sync = t0.elapsed();
        if std::env::var_os("MERIDIAN_FAILPOINT").is_some_and(|v| v == "origin-before-root-commit")
        {
            tracing::error!("failpoint origin-before-root-commit: aborting");
            std::process::abort();
        }
        write_atomic(&self.shared.root_path(root.generation), &envelope)?;
        let generation = root.generation;
        let expires = root.expires;
        let verified = VerifiedRoot {
            hash: root.hash(),
            root,
            envelope,
        };
        self.shared.latest.store(Some(Arc::new(verified)));
        if self.snapshot == Snapshot::Link
            && let Ok(mut q) = self.shared.to_promote.lock()
        {
            if q.is_empty() {
                // Moved, not copied: a first publish adds a million.
                *q = std::mem::take(&mut out.new_objects);
            } else {
                q.extend(&out.new_objects);
            }
        }
        self.shared.notify.send_replace(generation);
        m.generations_published.inc();
        m.latest_generation.set(generation as i64);
        m.latest_expiry.set(expires);
        let (files_hashed, bytes_hashed) = (out.files_hashed, out.bytes_hashed);
        self.take_cache(out, full)?;
        tracing::debug!(
            full,
            scan = t_scan.as_secs_f64(),
            tree = (t_tree - t_scan).as_secs_f64(),
            nodes = (t_nodes - t_tree).as_secs_f64(),
            sync = (t_sync - t_nodes).as_secs_f64(),
            commit = (t0.elapsed() - t_sync).as_secs_f64(),
            "publish phases (seconds)"
        );
        tracing::info!(
            generation,
            files = built.files,
            bytes = built.bytes,
            hashed_files = files_hashed,
            hashed_bytes = bytes_hashed,
            "published generation"
        );
        Ok(PublishOutcome::Published {
            generation,
            files_hashed,
            bytes_hashed,
        })
    }

    /// Applies a scan of changed paths to the published tree, reading and
    /// re-encoding only the directories on the changed paths. `None` when
    /// the changes do not fit the tree (a file below a path that is a file).
    fn build_over(
        &self,
        root: &Root,
        out: &ScanOutput,
    ) -> Result<Option<meridian_core::tree::BuiltTree>, PublishError> {
        if out.subtrees.iter().any(|t| t.rel.is_empty()) {
            // The content directory itself was walked whole.
            return build_whole(out).map(Some);
        }
        let mut tb = TreeBuilder::over(root.tree);
        let mut fits = true;
        // In the order ScanOutput documents.
        for r in &out.removed {
            fits &= RelPath::parse(r).and_then(|p| tb.remove(&p)).is_ok();
        }
        for t in &out.subtrees {
            fits &= RelPath::parse(&t.rel)
                .and_then(|p| tb.graft(&p, t.entry.clone(), t.files, t.bytes))
                .is_ok();
        }
        for (p, e) in &out.leaves {
            fits &= RelPath::parse(p)
                .and_then(|rp| tb.insert(&rp, e.clone()))
                .is_ok();
        }
        if !fits {
            return Ok(None);
        }
        let store = &self.shared.store;
        let built = tb.finish_over(root.files, root.bytes, |h| read_node(store, h))?;
        Ok(Some(built))
    }

    /// Keeps what a scan learnt of the stat cache ([`HashCache::apply`]).
    /// A full scan's cache is saved; a scan of changed paths only adds in
    /// memory: saving the whole cache is O(tree), and an entry missing
    /// from the saved cache costs at most one hash after a restart.
    fn take_cache(&mut self, out: ScanOutput, full: bool) -> Result<(), PublishError> {
        self.cache.apply(out.cache, full);
        if full {
            self.cache.save(&self.cfg.state.join("hashcache"))?;
        }
        Ok(())
    }

    /// Applies retention: drops root files outside it, then removes objects
    /// that no retained generation references and that have been
    /// unreferenced for the grace period. Returns the objects removed.
    pub fn gc(&mut self) -> Result<usize, PublishError> {
        let mut gens = list_generations(&self.shared.roots_dir)?;
        gens.sort_unstable_by(|a, b| b.cmp(a));
        let now = SystemTime::now();
        let t = Instant::now();
        let mut next: Option<Instant> = None;
        let mut keep = Vec::new();
        for (i, g) in gens.iter().enumerate() {
            let path = self.shared.root_path(*g);
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            let young = age.is_some_and(|age| age < self.cfg.retain_age);
            if i < self.cfg.retain_generations.max(1) || young {
                if i >= self.cfg.retain_generations.max(1)
                    && let Some(age) = age
                {
                    // Kept only for its age: collectable once it ages out.
                    let out = t + (self.cfg.retain_age - age);
                    next = Some(next.map_or(out, |n| n.min(out)));
                }
                keep.push(*g);
            } else {
                std::fs::remove_file(&path).map_err(state_err(&path))?;
            }
        }
        let reachable = self.reachable(&keep)?;
        let grace = self.cfg.gc_grace;
        let mut removed = 0;
        let mut still: HashMap<Hash, Instant> = HashMap::new();
        for h in self.shared.store.list()? {
            if reachable.contains(&h) {
                continue;
            }
            let since = self.unreferenced_since.get(&h).copied().unwrap_or(t);
            if t.duration_since(since) >= grace {
                self.shared.store.remove(&h)?;
                removed += 1;
            } else {
                still.insert(h, since);
                let due = since + grace;
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        self.unreferenced_since = still;
        self.gc_next = next;
        self.shared
            .metrics
            .gc_objects_removed
            .inc_by(removed as u64);
        Ok(removed)
    }

    /// Fills the delta cache with `from` → the tree just built. New nodes
    /// come from memory; old ones from the store, checked against their hash.
    fn precompute_delta(&self, from: Hash, built: &meridian_core::tree::BuiltTree) {
        let mem: HashMap<Hash, &Vec<u8>> = built.nodes.iter().map(|(h, b)| (*h, b)).collect();
        let store = &self.shared.store;
        let delta = meridian_core::delta::encode_between(from, built.tree, |h| match mem.get(h) {
            Some(b) => Some((*b).clone()),
            None => store
                .read(h)
                .ok()
                .filter(|b| meridian_core::hash_bytes(b) == *h),
        });
        match delta {
            Ok(d) if d.len() as u64 <= meridian_core::delta::MAX_DELTA_BYTES => {
                self.shared.deltas.insert(from, built.tree, d.into());
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "no tree delta precomputed"),
        }
    }

    /// When [`Publisher::gc`] next has work that needs no new publish: an
    /// unreferenced object's grace ending, or a generation kept only for its
    /// age aging out. `None` until a publish changes things.
    pub fn gc_next(&self) -> Option<Instant> {
        self.gc_next
    }

    /// Seconds until the newest generation should be re-signed.
    pub fn resign_in(&self) -> Duration {
        match self.shared.latest.load_full() {
            Some(l) => {
                let due = l.root.expires - self.cfg.resign_before.as_secs() as i64;
                Duration::from_secs((due - unix_now()).max(1) as u64)
            }
            None => Duration::from_secs(1),
        }
    }
}

/// Generation numbers with a root file, unordered. Removes leftover temp files.
pub(crate) fn list_generations(dir: &Path) -> Result<Vec<u64>, PublishError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(state_err(dir))? {
        let e = e.map_err(state_err(dir))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_suffix(".root")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        } else if name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(out)
}
