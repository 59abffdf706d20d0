//! Verified ranges of a blob: the chaining values of its blake3 tree at
//! the level of [`BLOCK_LEN`]-byte blocks (an *outboard*, as Bao calls the
//! interior hashes kept apart from the data).
//!
//! blake3 hashes a blob as a left-balanced binary tree of 1 KiB chunks.
//! Every block of [`BLOCK_LEN`] bytes that starts at a multiple of
//! [`BLOCK_LEN`] is a whole subtree of it, and so is the last, shorter
//! block. So a client that holds the blob's signed hash can:
//!
//! 1. take the outboard from anyone, and check it by merging the block
//!    values up the tree to the root ([`Outboard::check`]): one merge per
//!    block, no data;
//! 2. check each block as it arrives, from any source, by hashing it as
//!    the subtree at its offset ([`Outboard::verify_block`]).
//!
//! A blob of one block or less has no outboard: its hash checks it whole.
//! The encoding is `MOB1`, the block size as a power of two (one byte),
//! then 32 bytes per block.

use crate::Hash;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

/// log2 of the block size.
pub const BLOCK_LOG: u8 = 18;
/// Bytes per block: 256 KiB (256 blake3 chunks).
pub const BLOCK_LEN: u64 = 1 << BLOCK_LOG;
const MAGIC: &[u8; 4] = b"MOB1";

/// How many blocks a blob of `size` bytes has (at least one).
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK_LEN).max(1)
}

/// The byte range of block `index` of a blob of `size` bytes.
pub fn block_range(index: u64, size: u64) -> std::ops::Range<u64> {
    let start = index * BLOCK_LEN;
    start..(start + BLOCK_LEN).min(size)
}

/// The chaining value of a block at `offset` of a blob with more than
/// one block.
fn block_cv(offset: u64, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(data)
        .finalize_non_root()
}

/// Builds a blob's outboard from its bytes, fed in order in pieces of any
/// size.
#[derive(Debug)]
pub struct OutboardBuilder {
    size: u64,
    cvs: Vec<ChainingValue>,
    block: Vec<u8>,
    offset: u64,
}

impl OutboardBuilder {
    /// A builder for a blob of `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = if size > BLOCK_LEN { blocks(size) } else { 0 };
        OutboardBuilder {
            size,
            cvs: Vec::with_capacity(n as usize),
            block: Vec::new(),
            offset: 0,
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        if self.size <= BLOCK_LEN {
            return;
        }
        while !data.is_empty() {
            let room = BLOCK_LEN as usize - self.block.len();
            let take = room.min(data.len());
            if self.block.is_empty() && take == BLOCK_LEN as usize {
                // A whole block at once: no copy.
                self.cvs.push(block_cv(self.offset, &data[..take]));
                self.offset += BLOCK_LEN;
            } else {
                self.block.extend_from_slice(&data[..take]);
                if self.block.len() == BLOCK_LEN as usize {
                    self.cvs.push(block_cv(self.offset, &self.block));
                    self.offset += BLOCK_LEN;
                    self.block.clear();
                }
            }
            data = &data[take..];
        }
    }

    /// The outboard, checked against `hash`: `None` if the bytes fed are
    /// not the blob `hash` names (or not `size` of them).
    pub fn finish(mut self, hash: &Hash) -> Option<Outboard> {
        if self.size <= BLOCK_LEN {
            return None;
        }
        if !self.block.is_empty() {
            let offset = self.offset;
            self.offset += self.block.len() as u64;
            self.cvs.push(block_cv(offset, &self.block));
        }
        if self.offset != self.size {
            return None;
        }
        let o = Outboard {
            size: self.size,
            cvs: self.cvs,
        };
        (o.root() == *hash).then_some(o)
    }
}

/// The block chaining values of a blob of more than one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    size: u64,
    cvs: Vec<ChainingValue>,
}

/// Why an outboard or a block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboardError {
    /// Not the `MOB1` encoding, or the wrong length for the blob.
    #[error("not an outboard of a {size}-byte blob ({why})")]
    Malformed { size: u64, why: &'static str },
    /// The values do not merge to the blob's hash.
    #[error("the outboard does not match the blob's hash")]
    Mismatch,
}

impl Outboard {
    /// Decodes an outboard of a `size`-byte blob and checks it against the
    /// blob's `hash`.
    pub fn check(bytes: &[u8], size: u64, hash: &Hash) -> Result<Outboard, OutboardError> {
        let bad = |why| OutboardError::Malformed { size, why };
        if size <= BLOCK_LEN {
            return Err(bad("a blob of one block has none"));
        }
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(bad("no MOB1 magic"))?;
        let (&log, body) = body.split_first().ok_or(bad("truncated"))?;
        if log != BLOCK_LOG {
            return Err(bad("another block size"));
        }
        if body.len() as u64 != blocks(size) * 32 {
            return Err(bad("wrong length"));
        }
        let cvs = body
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        let o = Outboard { size, cvs };
        if o.root() != *hash {
            return Err(OutboardError::Mismatch);
        }
        Ok(o)
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 32 * self.cvs.len());
        out.extend_from_slice(MAGIC);
        out.push(BLOCK_LOG);
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Whether `data` is block `index` of the blob.
    pub fn verify_block(&self, index: u64, data: &[u8]) -> bool {
        let r = block_range(index, self.size);
        self.cvs.get(index as usize).is_some_and(|cv| {
            data.len() as u64 == r.end - r.start && block_cv(r.start, data) == *cv
        })
    }

    /// The hash the values merge to.
    fn root(&self) -> Hash {
        Hash(*merge_root(&self.cvs, self.size).as_bytes())
    }
}

/// The root of the blake3 tree over `len` (> BLOCK_LEN) bytes whose block
/// values are `cvs`.
fn merge_root(cvs: &[ChainingValue], len: u64) -> blake3::Hash {
    let l = blake3::hazmat::left_subtree_len(len);
    let left = merge(cvs, 0, l);
    let right = merge(cvs, l, len - l);
    merge_subtrees_root(&left, &right, Mode::Hash)
}

/// The chaining value of the subtree of `len` bytes at `offset`.
fn merge(cvs: &[ChainingValue], offset: u64, len: u64) -> ChainingValue {
    if len <= BLOCK_LEN {
        return cvs
            .get((offset / BLOCK_LEN) as usize)
            .copied()
            .unwrap_or_default();
    }
    let l = blake3::hazmat::left_subtree_len(len);
    merge_subtrees_non_root(
        &merge(cvs, offset, l),
        &merge(cvs, offset + l, len - l),
        Mode::Hash,
    )
}

/// Whether `data` is the whole of a blob of one block that `hash` names.
pub fn verify_whole(data: &[u8], hash: &Hash) -> bool {
    crate::hash_bytes(data) == *hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn outboards_merge_to_blake3_and_check_every_block() {
        let b = BLOCK_LEN as usize;
        for len in [
            b + 1,
            2 * b,
            2 * b + 1000,
            3 * b,
            5 * b - 1,
            8 * b,
            9 * b + 7,
        ] {
            let data = blob(len);
            let h = crate::hash_bytes(&data);
            // Fed in odd pieces and in whole blocks alike.
            let mut odd = OutboardBuilder::new(len as u64);
            for piece in data.chunks(100_003) {
                odd.update(piece);
            }
            let odd = odd.finish(&h).expect("merges to the hash");
            let mut whole = OutboardBuilder::new(len as u64);
            whole.update(&data);
            assert_eq!(whole.finish(&h).as_ref(), Some(&odd), "{len}");
            let enc = odd.encode();
            let o = Outboard::check(&enc, len as u64, &h).expect("checks");
            for i in 0..blocks(len as u64) {
                let r = block_range(i, len as u64);
                let mut blk = data[r.start as usize..r.end as usize].to_vec();
                assert!(o.verify_block(i, &blk), "{len} block {i}");
                blk[0] ^= 1;
                assert!(!o.verify_block(i, &blk), "{len} flipped block {i}");
                assert!(!o.verify_block(i, &blk[1..]), "{len} short block {i}");
                // Another block's bytes at this index do not pass.
                if i > 0 {
                    let p = block_range(i - 1, len as u64);
                    assert!(!o.verify_block(i, &data[p.start as usize..p.end as usize]));
                }
            }
        }
    }

    #[test]
    fn a_wrong_outboard_or_blob_is_refused() {
        let len = 3 * BLOCK_LEN as usize + 5;
        let data = blob(len);
        let h = crate::hash_bytes(&data);
        let mut b = OutboardBuilder::new(len as u64);
        b.update(&data);
        let enc = b.finish(&h).expect("merges").encode();
        let mut flipped = enc.clone();
        flipped[40] ^= 1;
        assert_eq!(
            Outboard::check(&flipped, len as u64, &h),
            Err(OutboardError::Mismatch)
        );
        assert!(Outboard::check(&enc[..enc.len() - 1], len as u64, &h).is_err());
        assert!(Outboard::check(&enc, len as u64 + BLOCK_LEN, &h).is_err());
        // A size off by less than a chunk has the same tree: the values
        // check, but the last block, whose value binds its length, cannot.
        let o = Outboard::check(&enc, len as u64 + 1, &h).expect("same tree");
        let last = blocks(len as u64) - 1;
        let r = block_range(last, len as u64);
        let mut longer = data[r.start as usize..].to_vec();
        longer.push(0);
        assert!(!o.verify_block(last, &longer));
        assert!(Outboard::check(&enc, len as u64, &crate::hash_bytes(b"x")).is_err());
        let mut short = OutboardBuilder::new(len as u64);
        short.update(&data[..len - 1]);
        assert!(short.finish(&h).is_none(), "fewer bytes than the size");
        let mut other = OutboardBuilder::new(len as u64);
        let mut d2 = data.clone();
        d2[len - 1] ^= 1;
        other.update(&d2);
        assert!(other.finish(&h).is_none(), "other bytes");
        assert!(OutboardBuilder::new(BLOCK_LEN).finish(&h).is_none());
    }
}
