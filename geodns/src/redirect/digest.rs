//! SHA-256 of published files, for `Repr-Digest` (RFC 9530) and Metalink,
//! computed only from bytes verified against the signed blake3 hash.
//!
//! Where: on demand, in the redirector, cached by blake3. The first
//! Metalink request for a file streams the blob once from an upstream
//! (`/.meridian/v1/objects/{blake3}`), hashing blake3, SHA-256 and the
//! SHA-256 of each piece in one pass on a blocking thread; the digest is
//! kept only if the blake3 matches, and concurrent requests for the same
//! file wait for that one pass. Publishing costs nothing: the origin never
//! computes a SHA-256.

use futures_util::StreamExt;
use meridian_core::Hash;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Digests kept (the oldest go first).
const CACHED: usize = 16_384;
/// Most pieces a Metalink lists; the piece length doubles from 1 MiB to
/// stay under it.
const MAX_PIECES: u64 = 1024;
const MIN_PIECE: u64 = 1 << 20;

/// What a file's bytes hash to.
#[derive(Debug)]
pub(crate) struct FileDigest {
    pub size: u64,
    pub sha256: [u8; 32],
    pub piece_len: u64,
    pub pieces: Vec<[u8; 32]>,
}

/// The piece length for a file of `size` bytes.
pub(crate) fn piece_len(size: u64) -> u64 {
    let mut p = MIN_PIECE;
    while size.div_ceil(p) > MAX_PIECES {
        p *= 2;
    }
    p
}

type Cell = Arc<tokio::sync::OnceCell<Arc<FileDigest>>>;

/// The cache and the upstreams the bytes come from.
#[derive(Debug)]
pub(crate) struct Digests {
    upstreams: Vec<String>,
    http: reqwest::Client,
    cells: Mutex<(rustc_hash::FxHashMap<Hash, Cell>, VecDeque<Hash>)>,
}

impl Digests {
    pub(crate) fn new(upstreams: &[String]) -> Self {
        Digests {
            upstreams: upstreams
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(30))
                .user_agent("meridian-redirector")
                .build()
                .unwrap_or_default(),
            cells: Mutex::new((rustc_hash::FxHashMap::default(), VecDeque::new())),
        }
    }

    fn cell(&self, h: &Hash) -> Cell {
        let Ok(mut c) = self.cells.lock() else {
            return Arc::default();
        };
        let (map, order) = &mut *c;
        if let Some(cell) = map.get(h) {
            return cell.clone();
        }
        while map.len() >= CACHED {
            match order.pop_front() {
                Some(old) => {
                    map.remove(&old);
                }
                None => break,
            }
        }
        let cell: Cell = Arc::default();
        map.insert(*h, cell.clone());
        order.push_back(*h);
        cell
    }

    /// The digest if it is already known (no I/O).
    pub(crate) fn known(&self, h: &Hash) -> Option<Arc<FileDigest>> {
        let c = self.cells.lock().ok()?;
        c.0.get(h)?.get().cloned()
    }

    /// The digest of the file with blake3 `h` and `size` bytes, computed
    /// once from verified bytes.
    pub(crate) async fn get(&self, h: Hash, size: u64) -> Result<Arc<FileDigest>, String> {
        let cell = self.cell(&h);
        cell.get_or_try_init(|| async {
            let mut errors = Vec::new();
            for u in &self.upstreams {
                match self.compute(u, h, size).await {
                    Ok(d) => return Ok(Arc::new(d)),
                    Err(e) => errors.push(e),
                }
            }
            Err(errors.join("; "))
        })
        .await
        .cloned()
    }

    async fn compute(&self, upstream: &str, h: Hash, size: u64) -> Result<FileDigest, String> {
        let url = format!("{upstream}/.meridian/v1/objects/{h}");
        let r = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", meridian_serve::describe(&e)))?;
        if !r.status().is_success() {
            return Err(format!("{url}: HTTP {}", r.status()));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let plen = piece_len(size);
        // The hashing runs off the async threads.
        let hasher = tokio::task::spawn_blocking(move || {
            let mut b3 = blake3::Hasher::new();
            let mut whole = Sha256::new();
            let mut piece = Sha256::new();
            let (mut in_piece, mut total) = (0u64, 0u64);
            let mut pieces = Vec::new();
            while let Some(mut chunk) = rx.blocking_recv() {
                total += chunk.len() as u64;
                if total > size {
                    return Err(format!("longer than the {size} bytes its entry says"));
                }
                b3.update(&chunk);
                whole.update(&chunk);
                while !chunk.is_empty() {
                    let take = ((plen - in_piece) as usize).min(chunk.len());
                    piece.update(&chunk[..take]);
                    in_piece += take as u64;
                    chunk = chunk.slice(take..);
                    if in_piece == plen {
                        pieces.push(piece.finalize_reset().into());
                        in_piece = 0;
                    }
                }
            }
            if in_piece > 0 {
                pieces.push(piece.finalize().into());
            }
            Ok((
                Hash(*b3.finalize().as_bytes()),
                whole.finalize().into(),
                pieces,
                total,
            ))
        });
        let mut body = r.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("{url}: {}", meridian_serve::describe(&e)))?;
            if tx.send(chunk).await.is_err() {
                break; // the hasher stopped: it says why
            }
        }
        drop(tx);
        let (b3, sha256, pieces, total) = hasher
            .await
            .map_err(|e| format!("{url}: hashing: {e}"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if b3 != h || total != size {
            return Err(format!(
                "{url}: the bytes do not match the signed blake3 (got {b3}, {total} bytes)"
            ));
        }
        Ok(FileDigest {
            size,
            sha256,
            piece_len: plen,
            pieces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_stay_under_the_cap() {
        assert_eq!(piece_len(0), MIN_PIECE);
        assert_eq!(piece_len(5 << 20), MIN_PIECE);
        assert_eq!(piece_len(1 << 30), MIN_PIECE);
        assert_eq!(piece_len((1 << 30) + 1), 2 * MIN_PIECE);
        for size in [1u64 << 33, 7_777_777_777, 1 << 40] {
            let p = piece_len(size);
            assert!(size.div_ceil(p) <= MAX_PIECES && size.div_ceil(p / 2) > MAX_PIECES);
        }
    }
}
