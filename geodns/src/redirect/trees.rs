//! The redirector's view of the published trees: a metadata-only sync.
//!
//! It follows the newest signed root of the configured upstreams (the
//! origin or mirrors) by long-poll, checks it like a mirror does (trusted
//! key, signature, expiry, no rollback, the chain), and fetches the
//! directory nodes it names, each checked against its hash: no blob is
//! ever fetched. It also loads the trees of the recent generations the
//! mirrors report serving (signature and key checked), so a mirror one
//! generation behind still gets the files that did not change, and never
//! one that did. Nodes are shared between generations by hash: a new
//! generation costs the nodes on the changed paths.

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use meridian_core::{DirNode, EntryKind, Hash, NodeMap, VerifiedRoot, Verifier, hash_bytes};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Node fetches in flight at once.
const PARALLEL: usize = 32;
/// How long one long-poll waits for a new generation.
const WAIT: Duration = Duration::from_secs(30);

/// One verified generation's tree.
#[derive(Debug)]
pub(crate) struct Tree {
    pub root: VerifiedRoot,
    pub nodes: NodeMap,
}

impl Tree {
    pub(crate) fn generation(&self) -> u64 {
        self.root.root.generation
    }
    pub(crate) fn resolve(&self, path: &str) -> Option<meridian_core::Resolved<'_>> {
        meridian_core::resolve(&self.nodes, &self.root.root.tree, path)
    }
}

/// What the redirector knows: the newest tree and the recent ones by
/// generation (the newest among them).
#[derive(Debug, Default)]
pub(crate) struct Known {
    pub newest: Option<Arc<Tree>>,
    pub by_generation: BTreeMap<u64, Arc<Tree>>,
}

/// The trees, swapped whole when one is added.
#[derive(Debug)]
pub(crate) struct Trees {
    pub known: ArcSwap<Known>,
    upstreams: Vec<String>,
    verifier: std::sync::Mutex<Verifier>,
    keep: usize,
    http: reqwest::Client,
}

impl Trees {
    pub(crate) fn new(
        upstreams: &[String],
        trust: &[meridian_core::PublicKey],
        keep: usize,
    ) -> Self {
        Trees {
            known: ArcSwap::from_pointee(Known::default()),
            upstreams: upstreams
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            verifier: std::sync::Mutex::new(Verifier::new(meridian_core::TrustedKeys::new(
                trust.iter().copied(),
            ))),
            keep: keep.max(1),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(WAIT + Duration::from_secs(15))
                .pool_max_idle_per_host(PARALLEL)
                .user_agent("meridian-redirector")
                .build()
                .unwrap_or_default(),
        }
    }

    fn verifier(&self) -> Verifier {
        self.verifier
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    async fn get(&self, url: &str, cap: u64) -> Result<Option<bytes::Bytes>, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", meridian_serve::describe(&e)))?;
        match r.status().as_u16() {
            200 => {}
            204 | 404 => return Ok(None),
            s => return Err(format!("{url}: HTTP {s}")),
        }
        if r.content_length().is_some_and(|n| n > cap) {
            return Err(format!("{url}: longer than the {cap} bytes it can be"));
        }
        let mut body = Vec::new();
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("{url}: {}", meridian_serve::describe(&e)))?;
            if body.len() as u64 + chunk.len() as u64 > cap {
                return Err(format!("{url}: longer than the {cap} bytes it can be"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body.into()))
    }

    /// Takes up the key statements an upstream holds (rotations), checked
    /// against the trusted keys; true when something new was taken.
    async fn refresh_keys(&self, upstream: &str, at: u64) -> bool {
        let Ok(Some(list)) = self
            .get(&format!("{upstream}/.meridian/v1/keys"), 1 << 20)
            .await
        else {
            return false;
        };
        let Ok(mut v) = self.verifier.lock() else {
            return false;
        };
        let mut ring = v.keyring().clone();
        match ring.add_list_after(&list, at) {
            Ok((new, _refused)) if new > 0 => {
                *v = Verifier::with_keyring(ring);
                true
            }
            _ => false,
        }
    }

    /// Fetches every node of the tree under `top` that no known tree holds,
    /// each checked against its hash.
    async fn fetch_tree(
        &self,
        upstream: &str,
        root: VerifiedRoot,
        known: &Known,
    ) -> Result<Tree, String> {
        let have = |h: &Hash| -> Option<Arc<DirNode>> {
            known
                .newest
                .iter()
                .chain(known.by_generation.values().rev())
                .find_map(|t| t.nodes.get(h).cloned())
        };
        let mut nodes = NodeMap::default();
        let mut level = vec![(root.root.tree, root.root.tree_size)];
        while !level.is_empty() {
            let mut added = Vec::new();
            let mut fetch = Vec::new();
            for (h, size) in level.drain(..) {
                if nodes.contains_key(&h) {
                    continue;
                }
                // A node a known tree holds is taken from it (same hash,
                // same subtree); its children are walked like any other's.
                match have(&h) {
                    Some(n) => {
                        nodes.insert(h, n);
                        added.push(h);
                    }
                    None => fetch.push((h, size)),
                }
            }
            let got: Vec<Result<(Hash, DirNode), String>> =
                futures_util::stream::iter(fetch.into_iter().map(|(h, size)| async move {
                    let url = format!("{upstream}/.meridian/v1/objects/{h}");
                    let cap = size.min(meridian_core::MAX_NODE_BYTES);
                    let bytes = self
                        .get(&url, cap)
                        .await?
                        .ok_or_else(|| format!("{url}: not held"))?;
                    if hash_bytes(&bytes) != h {
                        return Err(format!("{url}: does not match its hash"));
                    }
                    DirNode::decode(&bytes)
                        .map(|n| (h, n))
                        .map_err(|e| format!("{url}: {e}"))
                }))
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
            for g in got {
                let (h, n) = g?;
                nodes.insert(h, Arc::new(n));
                added.push(h);
            }
            for h in added {
                for e in &nodes[&h].entries {
                    if e.kind == EntryKind::Dir && !nodes.contains_key(&e.hash) {
                        level.push((e.hash, e.size));
                    }
                }
            }
            level.sort_unstable();
            level.dedup();
        }
        Ok(Tree { root, nodes })
    }

    fn add(&self, tree: Tree, newest: bool) {
        let tree = Arc::new(tree);
        let old = self.known.load_full();
        let mut by_generation = old.by_generation.clone();
        by_generation.insert(tree.generation(), tree.clone());
        let top = if newest {
            tree.generation()
        } else {
            old.newest.as_ref().map_or(0, |t| t.generation())
        };
        by_generation.retain(|&g, _| g + self.keep as u64 > top);
        self.known.store(Arc::new(Known {
            newest: if newest {
                Some(tree)
            } else {
                old.newest.clone()
            },
            by_generation,
        }));
    }

    /// One long-poll round for the newest generation over the upstreams in
    /// order; Ok(true) when a newer tree was taken.
    pub(crate) async fn follow_once(&self) -> Result<bool, String> {
        let mut errors = Vec::new();
        for u in &self.upstreams {
            let known = self.known.load_full();
            let held = known.newest.as_ref().map(|t| t.root.clone());
            let after = held.as_ref().map_or(0, |r| r.root.generation);
            let url = format!(
                "{u}/.meridian/v1/wait?after={after}&timeout={}",
                WAIT.as_secs()
            );
            let env = match self.get(&url, meridian_core::MAX_ROOT_BYTES).await {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(false),
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            let now = meridian_serve::unix_now();
            let mut checked = self.verifier().verify_latest(&env, now, held.as_ref());
            if matches!(
                checked,
                Err(meridian_core::VerifyError::UnknownKey(_)
                    | meridian_core::VerifyError::NotYetTrusted { .. })
            ) && self.refresh_keys(u, after).await
            {
                checked = self.verifier().verify_latest(&env, now, held.as_ref());
            }
            let root = match checked {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{u}: root refused: {e}"));
                    continue;
                }
            };
            match self.fetch_tree(u, root, &known).await {
                Ok(t) => {
                    tracing::info!(
                        generation = t.generation(),
                        nodes = t.nodes.len(),
                        upstream = %u,
                        "redirector: generation loaded"
                    );
                    self.add(t, true);
                    return Ok(true);
                }
                Err(e) => errors.push(e),
            }
        }
        Err(errors.join("; "))
    }

    /// Loads the trees of `generations` (those mirrors report) that are
    /// recent enough to keep and not held: root from `/generations/{n}`,
    /// key and signature checked.
    pub(crate) async fn load_older(&self, generations: impl IntoIterator<Item = u64>) {
        let known = self.known.load_full();
        let Some(top) = known.newest.as_ref().map(|t| t.generation()) else {
            return;
        };
        let mut want: Vec<u64> = generations
            .into_iter()
            .filter(|&g| {
                g > 0
                    && g < top
                    && g + self.keep as u64 > top
                    && !known.by_generation.contains_key(&g)
            })
            .collect();
        want.sort_unstable();
        want.dedup();
        for g in want {
            for u in &self.upstreams {
                let url = format!("{u}/.meridian/v1/generations/{g}");
                let Ok(Some(env)) = self.get(&url, meridian_core::MAX_ROOT_BYTES).await else {
                    continue;
                };
                let root = match self.verifier().open(&env) {
                    Ok(r) if r.root.generation == g => r,
                    Ok(r) => {
                        tracing::warn!(%url, got = r.root.generation, "redirector: a root of another generation");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "redirector: root refused");
                        continue;
                    }
                };
                match self.fetch_tree(u, root, &self.known.load_full()).await {
                    Ok(t) => {
                        tracing::info!(generation = g, upstream = %u, "redirector: older generation loaded");
                        self.add(t, false);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(generation = g, error = %e, "redirector: tree not loaded")
                    }
                }
            }
        }
    }
}
