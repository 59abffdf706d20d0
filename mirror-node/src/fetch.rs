//! Fetching what a sync needs, each object verified before it enters the
//! store: directory nodes into memory, tree deltas (nodes rebuilt and
//! hash-checked), blob patches against the local old version, and whole
//! blobs streamed to `partial/<hash>` (resumable, one writer each) through
//! `rawget` or reqwest, each through the store's verified writer.
//! Upstreams are tried in turn by one helper,
//! `Syncer::try_each` (in [`crate::upstreams`]); the blocking parts (partial files, patch and delta
//! application) run on the blocking pool.

use crate::generation::Generation;
use crate::state::MirrorState;
use crate::sync::{SyncError, Syncer, blocking};
use crate::upstreams::{FetchFail, OnMissing, read_capped, transfer_timeout};
use futures_util::StreamExt;
use meridian_core::{DirNode, Hash, hash_bytes};
use meridian_serve::{ObjectWriter, StoreError};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// Smallest blob worth a patch: below this a whole fetch costs about the same.
pub(crate) const PATCH_MIN: u64 = 4096;

/// One blob the plan needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want {
    pub(crate) hash: Hash,
    pub(crate) size: u64,
    /// The blob at the same path in the served generation, held locally: a
    /// patch against it is tried first.
    pub(crate) base: Option<Hash>,
}

/// Takes every blob of the pack whose bytes are now complete (an empty one
/// at once) into `batch` if wanted; returns the bytes added.
fn complete(
    job: &PackJob,
    idx: &mut usize,
    buf: &mut Vec<u8>,
    batch: &mut Vec<(Hash, Vec<u8>)>,
) -> usize {
    let mut added = 0;
    while let Some(&(h, size)) = job.entries.get(*idx) {
        if buf.len() as u64 != size {
            break;
        }
        *idx += 1;
        let b = std::mem::take(buf);
        if job.wanted.binary_search(&h).is_ok() {
            added += b.len();
            batch.push((h, b));
        }
    }
    added
}

/// Fewest wanted blobs of one directory node that are fetched as a pack
/// (one request) rather than one by one.
const PACK_MIN: usize = 8;

/// The small blobs of one directory node, fetched in one request
/// (`pack/{node}`): every blob the pack carries, in order (listed from the
/// node when the pack is fetched, so only packs in flight hold a list),
/// and which of them this sync wants (sorted: 32 bytes a blob).
#[derive(Debug)]
pub(crate) struct PackJob {
    node: Hash,
    entries: Vec<(Hash, u64)>,
    wanted: Vec<Hash>,
}

/// Splits the wanted blobs into packs (a node of the new tree whose small
/// blobs are mostly wanted: a first sync, a restore, a new directory) and
/// the rest, fetched one by one. A blob with a patch base is never packed.
pub(crate) fn packs(nodes: &meridian_core::NodeMap, blobs: Vec<Want>) -> (Vec<PackJob>, Vec<Want>) {
    use meridian_serve::readapi::{PACK_BLOB_MAX, pack_entries};
    let mut small: std::collections::HashSet<Hash> = blobs
        .iter()
        .filter(|w| w.base.is_none() && w.size <= PACK_BLOB_MAX)
        .map(|w| w.hash)
        .collect();
    let packable = |w: &Want| w.base.is_none() && w.size <= PACK_BLOB_MAX;
    let mut jobs = Vec::new();
    for (h, node) in nodes {
        let Some(entries) = pack_entries(node) else {
            continue;
        };
        let mut wanted: Vec<Hash> = entries
            .iter()
            .map(|e| e.0)
            .filter(|e| small.contains(e))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.len() >= PACK_MIN && wanted.len() * 2 >= entries.len() {
            for w in &wanted {
                small.remove(w);
            }
            wanted.shrink_to_fit();
            jobs.push(PackJob {
                node: *h,
                entries: Vec::new(),
                wanted,
            });
        }
    }
    // What a pack took is no longer in `small`.
    let rest = blobs
        .into_iter()
        .filter(|w| !packable(w) || small.contains(&w.hash))
        .collect();
    (jobs, rest)
}

impl Syncer {
    /// Fetches `blobs`: the small blobs of mostly-new directories as packs
    /// first (a few at once), then everything else, and whatever a pack
    /// did not deliver, one by one.
    pub(crate) async fn fetch_packed_and_blobs(
        &self,
        nodes: &meridian_core::NodeMap,
        blobs: Vec<Want>,
    ) -> Result<(), SyncError> {
        let (jobs, mut rest) = packs(nodes, blobs);
        if !jobs.is_empty() {
            let results = futures_util::stream::iter(jobs.into_iter().map(|mut j| {
                j.entries = nodes
                    .get(&j.node)
                    .and_then(|n| meridian_serve::readapi::pack_entries(n))
                    .unwrap_or_default();
                self.fetch_pack(j)
            }))
            // Half as many packs at once as blobs (measured best on
            // a restore of 30,000 small files: BENCHMARKS.md).
            .buffer_unordered((self.state.cfg().parallel_fetches / 2).max(1))
            .collect::<Vec<_>>()
            .await;
            for r in results {
                for (h, size) in r? {
                    rest.push(Want {
                        hash: h,
                        size,
                        base: None,
                    });
                }
            }
        }
        self.fetch_blobs(rest).await
    }

    /// One pack, from the upstreams in turn; returns the wanted blobs it
    /// did not deliver, with their sizes (to be fetched one by one).
    async fn fetch_pack(&self, job: PackJob) -> Result<Vec<(Hash, u64)>, SyncError> {
        let job = &job;
        let got = self
            .try_each(
                &format!("pack/{}", job.node),
                OnMissing::Next,
                |url| async move { self.fetch_pack_from(&url, job).await },
            )
            .await?;
        match got {
            Ok(()) => self.state.metrics.packs_fetched.inc(),
            Err(last) => {
                tracing::debug!(node = %job.node, error = %last, "pack not delivered; its blobs are fetched one by one")
            }
        }
        let store = self.state.store.clone();
        let wanted = job.wanted.clone();
        let sizes: HashMap<Hash, u64> = job.entries.iter().copied().collect();
        blocking(move || {
            wanted
                .into_iter()
                .filter(|h| !store.contains(h))
                .map(|h| (h, sizes.get(&h).copied().unwrap_or(0)))
                .collect()
        })
        .await
    }

    async fn fetch_pack_from(&self, url: &str, job: &PackJob) -> Result<(), FetchFail> {
        let total: u64 = job.entries.iter().map(|e| e.1).sum();
        let mut r = self
            .upstreams()
            .get_ok(url, Some(transfer_timeout(total)))
            .await?;
        let mut idx = 0;
        let mut buf: Vec<u8> = Vec::with_capacity(meridian_serve::readapi::PACK_BLOB_MAX as usize);
        let mut batch: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0usize;
        loop {
            let chunk = match r.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(FetchFail::Transport(meridian_serve::describe(&e))),
            };
            self.state.metrics.bytes_fetched.inc_by(chunk.len() as u64);
            let mut c = &chunk[..];
            while !c.is_empty() {
                let Some(&(_, size)) = job.entries.get(idx) else {
                    return Err(FetchFail::Bad(format!(
                        "{url}: the pack is longer than its node's blobs"
                    )));
                };
                let take = ((size - buf.len() as u64) as usize).min(c.len());
                buf.extend_from_slice(&c[..take]);
                c = &c[take..];
                batch_bytes += complete(job, &mut idx, &mut buf, &mut batch);
            }
            if batch.len() >= 64 || batch_bytes >= 4 << 20 {
                self.commit_packed(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
        }
        // Empty blobs at the end take no bytes.
        complete(job, &mut idx, &mut buf, &mut batch);
        self.commit_packed(batch).await?;
        if idx < job.entries.len() {
            return Err(FetchFail::Transport(format!(
                "{url}: the pack ended after {idx} of {} blobs",
                job.entries.len()
            )));
        }
        Ok(())
    }

    /// Commits blobs from a pack through the verified writer (on the
    /// blocking pool); one whose bytes are not its name's fails the pack as
    /// bad data.
    async fn commit_packed(&self, batch: Vec<(Hash, Vec<u8>)>) -> Result<(), FetchFail> {
        if batch.is_empty() {
            return Ok(());
        }
        let state = self.state.clone();
        let r = tokio::task::spawn_blocking(move || {
            for (h, b) in &batch {
                match state.store.put_bytes(h, b) {
                    Ok(()) => {
                        state.metrics.objects_fetched.inc();
                        state.progress.blob_done(b.len() as u64);
                    }
                    Err(e) if e.is_mismatch() => {
                        return Err(FetchFail::Bad(format!("packed blob {h}: {e}")));
                    }
                    Err(e) => return Err(FetchFail::Local(e)),
                }
            }
            Ok(())
        })
        .await;
        r.unwrap_or_else(|e| {
            Err(FetchFail::Local(StoreError::io(
                self.state.store.path(&Hash::ZERO),
                std::io::Error::other(e),
            )))
        })
    }

    pub(crate) async fn fetch_blobs(&self, blobs: Vec<Want>) -> Result<(), SyncError> {
        let results = futures_util::stream::iter(blobs.into_iter().map(|w| async move {
            let size = w.size;
            let r = self.fetch_blob(w).await;
            if r.is_ok() {
                self.state.progress.blob_done(size);
            }
            r
        }))
        .buffer_unordered(self.state.cfg().parallel_fetches.max(1))
        .collect::<Vec<_>>()
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Fetches a small object (a directory node) into memory, verified.
    pub(crate) async fn fetch_small(&self, h: Hash, size: u64) -> Result<Vec<u8>, SyncError> {
        if size > meridian_core::MAX_NODE_BYTES {
            return Err(SyncError::Object {
                hash: h,
                last: format!("declared node size {size} over the limit"),
            });
        }
        let got = self
            .try_each(&format!("objects/{h}"), OnMissing::Next, |url| async move {
                let r = self.upstreams().get_ok(&url, None).await?;
                let b = read_capped(r, size).await.map_err(FetchFail::Bad)?;
                if b.len() as u64 != size || hash_bytes(&b) != h {
                    return Err(FetchFail::Bad(format!(
                        "node {h} does not match its hash or size"
                    )));
                }
                Ok(b)
            })
            .await?;
        let b = got.map_err(|last| SyncError::Object { hash: h, last })?;
        let m = &self.state.metrics;
        m.bytes_fetched.inc_by(b.len() as u64);
        m.manifest_bytes_fetched.inc_by(b.len() as u64);
        m.objects_fetched.inc();
        Ok(b)
    }

    /// Fetches the delta from the served tree to `to` and rebuilds every
    /// node it describes, each checked against its hash and stored. An
    /// upstream without the delta, or with a bad one, leaves an empty map:
    /// the plan then fetches nodes by hash.
    pub(crate) async fn fetch_delta(
        &self,
        served: Arc<Generation>,
        to: Hash,
    ) -> Result<meridian_core::NodeMap, SyncError> {
        let from = served.root.root.tree;
        let got = self
            .try_each(&format!("delta/{from}/{to}"), OnMissing::Next, |url| {
                let served = served.clone();
                async move {
                    let r = self.upstreams().get_ok(&url, None).await?;
                    let bytes = read_capped(r, meridian_core::delta::MAX_DELTA_BYTES)
                        .await
                        .map_err(FetchFail::Transport)?;
                    self.state.metrics.bytes_fetched.inc_by(bytes.len() as u64);
                    self.state
                        .metrics
                        .manifest_bytes_fetched
                        .inc_by(bytes.len() as u64);
                    let state = self.state.clone();
                    let t0 = Instant::now();
                    let bytes = bytes::Bytes::from(bytes);
                    let b2 = bytes.clone();
                    let nodes =
                        tokio::task::spawn_blocking(move || apply_delta(&state, &served, to, &b2))
                            .await
                            .map_err(|e| FetchFail::Transport(e.to_string()))??;
                    tracing::debug!(
                        seconds = t0.elapsed().as_secs_f64(),
                        nodes = nodes.len(),
                        %url,
                        "tree delta applied"
                    );
                    // Verified (every node it rebuilds matched its hash): pass it on.
                    self.state.deltas.insert(from, to, bytes);
                    Ok(nodes)
                }
            })
            .await?;
        Ok(got.unwrap_or_else(|last| {
            tracing::debug!(error = %last, "no tree delta; fetching nodes by hash");
            meridian_core::NodeMap::default()
        }))
    }

    /// Rebuilds blob `h` from a patch against the local blob `base`, into a
    /// staging file, hashing as it writes; commits only on a hash match.
    pub(crate) async fn fetch_patch_from(
        &self,
        url: &str,
        h: Hash,
        size: u64,
        base: Hash,
    ) -> Result<(), FetchFail> {
        let timeout = transfer_timeout(size);
        let r = self.upstreams().get_ok(url, Some(timeout)).await?;
        // A patch is never longer than its literal bytes plus op headers.
        let cap = size + size / 16 + 4096;
        let patch = read_capped(r, cap).await.map_err(FetchFail::Bad)?;
        self.state.metrics.bytes_fetched.inc_by(patch.len() as u64);
        let store = self.state.clone();
        tokio::task::spawn_blocking(move || rebuild_from_patch(&store, &patch, base, h, size))
            .await
            .map_err(|e| FetchFail::Transport(e.to_string()))?
    }

    /// Fetches one blob into the store, verified: as a patch against the
    /// old version when there is one, else whole, resuming a partial.
    pub(crate) async fn fetch_blob(&self, want: Want) -> Result<(), SyncError> {
        let Want {
            hash: h,
            size,
            base,
        } = want;
        // (The plan wants only blobs the store does not hold.)
        if let Some(base) = base {
            let patched = self
                .try_each(
                    &format!("patch/{base}/{h}"),
                    OnMissing::Stop,
                    |url| async move { self.fetch_patch_from(&url, h, size, base).await },
                )
                .await?;
            if patched.is_ok() {
                self.state.metrics.objects_fetched.inc();
                self.state.metrics.blobs_patched.inc();
                return Ok(());
            }
            // No patch there (too large, base gone): fetch the blob whole.
        }
        self.try_each(&format!("objects/{h}"), OnMissing::Next, |url| async move {
            self.fetch_blob_from(&url, h, size).await
        })
        .await?
        .map_err(|last| SyncError::Object { hash: h, last })?;
        self.state.metrics.objects_fetched.inc();
        Ok(())
    }

    /// Fetches one blob whole (resuming a partial) from a plain-HTTP
    /// upstream on one blocking thread (see [`crate::rawget`]); `None` if
    /// that client does not take the URL or the answer.
    pub(crate) async fn fetch_blob_raw(
        &self,
        url: &str,
        h: Hash,
        size: u64,
    ) -> Option<Result<(), FetchFail>> {
        let pool = self.upstreams().raw.clone()?;
        let target = crate::rawget::Target::parse(url)?;
        let state = self.state.clone();
        let job = tokio::task::spawn_blocking(move || {
            use crate::rawget::Raw;
            let mut w = state
                .store
                .resume(&h, size)
                .map_err(|e| Some(FetchFail::Local(e)))?;
            let local = |w: &ObjectWriter, e: std::io::Error| {
                Some(FetchFail::Local(StoreError::io(w.staged_path(), e)))
            };
            if w.written() < size {
                let deadline = Instant::now() + transfer_timeout(size);
                let have = w.written();
                let mut sink = |piece: Option<&[u8]>| -> std::io::Result<()> {
                    match piece {
                        Some(b) => w.write_all(b),
                        None => w.restart(),
                    }
                };
                let counted = |n: u64| state.metrics.bytes_fetched.inc_by(n);
                let got = pool.get(&target, have, size, deadline, &mut sink, &counted);
                match got {
                    Ok(()) => {}
                    Err(Raw::Unsupported(why)) => {
                        tracing::debug!(%why, "blob answer left to the async client");
                        return Err(None);
                    }
                    Err(Raw::Transport(m)) => return Err(Some(FetchFail::Transport(m))),
                    Err(Raw::Bad(m)) => {
                        let _ = w.restart();
                        return Err(Some(FetchFail::Bad(m)));
                    }
                    Err(Raw::Local(e)) => return Err(local(&w, e)),
                }
            }
            finish_blob(w).map_err(Some)
        });
        match job.await {
            Ok(Ok(())) => Some(Ok(())),
            Ok(Err(Some(e))) => Some(Err(e)),
            Ok(Err(None)) => None,
            Err(e) => Some(Err(FetchFail::Local(StoreError::io(
                self.state.store.path(&h),
                std::io::Error::other(e),
            )))),
        }
    }

    pub(crate) async fn fetch_blob_from(
        &self,
        url: &str,
        h: Hash,
        size: u64,
    ) -> Result<(), FetchFail> {
        if let Some(r) = self.fetch_blob_raw(url, h, size).await {
            return r;
        }
        let store = self.state.store.clone();
        let mut w = tokio::task::spawn_blocking(move || store.resume(&h, size))
            .await
            .map_err(|e| {
                FetchFail::Local(StoreError::io(
                    self.state.store.path(&h),
                    std::io::Error::other(e),
                ))
            })?
            .map_err(FetchFail::Local)?;
        let staged = w.staged_path().to_path_buf();
        let local = |e: std::io::Error| FetchFail::Local(StoreError::io(&staged, e));
        let mut have = w.written();
        if have < size {
            let mut req = self.upstreams().http.get(url);
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            // Bound the whole transfer too: an upstream trickling a byte at a
            // time must not pin the sync forever.
            let deadline = transfer_timeout(size);
            let resp = req
                .timeout(deadline)
                .send()
                .await
                .map_err(|e| FetchFail::Transport(e.to_string()))?;
            match resp.status().as_u16() {
                206 if have > 0 => {
                    let ok = resp
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
                    if !ok {
                        return Err(FetchFail::Bad(
                            "Content-Range does not match the requested resume point".into(),
                        ));
                    }
                }
                200 => {
                    if have > 0 {
                        w.restart().map_err(local)?;
                        have = 0;
                    }
                }
                s => return Err(FetchFail::Transport(format!("HTTP {s}"))),
            }
            let mut stream = resp.bytes_stream();
            // Bytes are gathered into blocks and each block is written (and
            // so hashed) on the blocking pool, off the runtime threads. The
            // prefix written so far always matches `have`, so a transfer cut
            // anywhere can resume.
            const BLOCK: usize = 1 << 20;
            let block_cap = ((size - have) as usize).min(BLOCK);
            let mut block: Vec<u8> = Vec::with_capacity(block_cap);
            let mut slot = Some(w);
            let flush = |slot: &mut Option<ObjectWriter>, block: Vec<u8>| {
                let mut w = slot
                    .take()
                    .ok_or_else(|| local(std::io::Error::other("writer lost")))?;
                Ok::<_, FetchFail>(tokio::task::spawn_blocking(move || {
                    let r = w.write_all(&block);
                    (w, r)
                }))
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    FetchFail::Transport(format!("after {have} of {size} bytes: {e}"))
                });
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        // Keep the verified-length prefix: write what arrived.
                        if !block.is_empty() {
                            let (_, r) = flush(&mut slot, std::mem::take(&mut block))?
                                .await
                                .map_err(|e| local(std::io::Error::other(e)))?;
                            r.map_err(local)?;
                        }
                        return Err(e);
                    }
                };
                if have + block.len() as u64 + chunk.len() as u64 > size {
                    if let Some(mut w) = slot.take() {
                        let _ = w.restart();
                    }
                    return Err(FetchFail::Bad(format!(
                        "upstream sent more than the declared {size} bytes"
                    )));
                }
                block.extend_from_slice(&chunk);
                self.state.metrics.bytes_fetched.inc_by(chunk.len() as u64);
                if block.len() >= BLOCK {
                    let n = block.len() as u64;
                    let (w, r) = flush(
                        &mut slot,
                        std::mem::replace(&mut block, Vec::with_capacity(block_cap)),
                    )?
                    .await
                    .map_err(|e| local(std::io::Error::other(e)))?;
                    r.map_err(local)?;
                    slot = Some(w);
                    have += n;
                }
            }
            if !block.is_empty() {
                let n = block.len() as u64;
                let (w, r) = flush(&mut slot, block)?
                    .await
                    .map_err(|e| local(std::io::Error::other(e)))?;
                r.map_err(local)?;
                slot = Some(w);
                have += n;
            }
            w = slot.ok_or_else(|| local(std::io::Error::other("writer lost")))?;
            if have < size {
                return Err(FetchFail::Transport(format!(
                    "truncated: {have} of {size} bytes; will resume"
                )));
            }
        }
        tokio::task::spawn_blocking(move || finish_blob(w))
            .await
            .map_err(|e| local(std::io::Error::other(e)))?
    }
}

/// Commits a complete download through its writer: a mismatch (the bytes
/// do not hash to the blob's name) discards it and counts against the
/// upstream that sent it.
pub(crate) fn finish_blob(w: ObjectWriter) -> Result<(), FetchFail> {
    match w.commit() {
        Ok(_) => Ok(()),
        Err(StoreError::HashMismatch { expected, actual }) => Err(FetchFail::Bad(format!(
            "blob {expected} hashed to {actual}"
        ))),
        Err(e @ StoreError::SizeMismatch { .. }) => Err(FetchFail::Bad(e.to_string())),
        Err(e) => Err(FetchFail::Local(e)),
    }
}

/// Decodes a tree delta and rebuilds its nodes (blocking: hashing).
pub(crate) fn apply_delta(
    state: &MirrorState,
    served: &Generation,
    to: Hash,
    bytes: &[u8],
) -> Result<meridian_core::NodeMap, FetchFail> {
    let bad = |m: String| FetchFail::Bad(format!("tree delta: {m}"));
    let d = meridian_core::TreeDelta::decode(bytes).map_err(|e| bad(e.to_string()))?;
    if d.from != served.root.root.tree || d.to != to {
        return Err(bad("it connects other trees than asked".into()));
    }
    let mut out =
        meridian_core::NodeMap::with_capacity_and_hasher(d.nodes.len(), Default::default());
    // Edits of nodes the mirror holds are independent: rebuilt (merge,
    // encode, hash, store) on a few threads at once. An edit whose base is
    // another rebuilt node (rare) waits for the sequential pass below.
    let apply_one = |edit: &meridian_core::delta::NodeEdit, base: Option<&DirNode>| {
        let (node, enc) = edit.apply(base).map_err(|e| bad(e.to_string()))?;
        state
            .store
            .put_bytes(&edit.hash, &enc)
            .map_err(FetchFail::Local)?;
        Ok::<_, FetchFail>((edit.hash, Arc::new(node)))
    };
    let (independent, dependent): (Vec<_>, Vec<_>) = d
        .nodes
        .iter()
        .partition(|e| e.base.as_ref().is_none_or(|b| served.nodes.contains_key(b)));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(independent.len().div_ceil(16).max(1));
    let chunk = independent.len().div_ceil(threads).max(1);
    type Rebuilt = Result<Vec<(Hash, Arc<DirNode>)>, FetchFail>;
    let results: Vec<Rebuilt> = std::thread::scope(|s| {
        let workers: Vec<_> = independent
            .chunks(chunk)
            .map(|edits| {
                s.spawn(move || {
                    edits
                        .iter()
                        .map(|e| {
                            let base = e.base.as_ref().and_then(|b| served.nodes.get(b));
                            apply_one(e, base.map(|b| &**b))
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for r in results {
        out.extend(r?);
    }
    for edit in dependent {
        let base = match &edit.base {
            Some(b) => Some(
                out.get(b)
                    .or_else(|| served.nodes.get(b))
                    .cloned()
                    .ok_or_else(|| bad(format!("base node {b} is not held here")))?,
            ),
            None => None,
        };
        let (h, node) = apply_one(edit, base.as_deref())?;
        out.insert(h, node);
    }
    if !out.contains_key(&to) {
        return Err(bad("it does not rebuild the top node".into()));
    }
    Ok(out)
}

/// Applies a blob patch against a local base into a staging file (blocking).
pub(crate) fn rebuild_from_patch(
    state: &MirrorState,
    patch: &[u8],
    base: Hash,
    h: Hash,
    size: u64,
) -> Result<(), FetchFail> {
    use meridian_core::patch::{PatchOp, PatchReader};
    use std::os::unix::fs::FileExt;
    let bad = |m: String| FetchFail::Bad(format!("patch for {h}: {m}"));
    let base_file = state.store.open_object(&base).map_err(FetchFail::Local)?;
    let base_len = base_file
        .metadata()
        .map_err(|e| FetchFail::Local(meridian_serve::StoreError::io(state.store.path(&base), e)))?
        .len();
    let mut r = PatchReader::new(patch, base_len).map_err(|e| bad(e.to_string()))?;
    let hdr = r.header();
    if hdr.base != base || hdr.target != h || hdr.target_size != size {
        return Err(bad("its header names other blobs or another size".into()));
    }
    let w = state.store.writer(&h, size).map_err(FetchFail::Local)?;
    let staged = w.staged_path().to_path_buf();
    let local = |e: std::io::Error| FetchFail::Local(StoreError::io(&staged, e));
    let mut out = std::io::BufWriter::with_capacity(1 << 16, w);
    let mut buf = vec![0u8; 1 << 16];
    let too_long = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            bad("it rebuilds more bytes than the blob has".into())
        } else {
            local(e)
        }
    };
    while let Some(op) = r.next_op().map_err(|e| bad(e.to_string()))? {
        match op {
            PatchOp::Data(d) => out.write_all(d).map_err(too_long)?,
            PatchOp::Copy { mut offset, len } => {
                let mut left = len as usize;
                while left > 0 {
                    let n = left.min(buf.len());
                    base_file
                        .read_exact_at(&mut buf[..n], offset)
                        .map_err(local)?;
                    out.write_all(&buf[..n]).map_err(too_long)?;
                    offset += n as u64;
                    left -= n;
                }
            }
        }
    }
    let w = out.into_inner().map_err(|e| too_long(e.into_error()))?;
    match w.commit() {
        Ok(_) => Ok(()),
        Err(e) if e.is_mismatch() => Err(bad(format!("rebuilt bytes do not match: {e}"))),
        Err(e) => Err(FetchFail::Local(e)),
    }
}
