//! Blob patches: a new version of a file, written as copies from an old
//! version plus the bytes that are new.
//!
//! rsync's trick, run the easy way round. rsync's receiver hashes its old
//! file and sends the block sums, because the sender lacks the old file. A
//! Meridian upstream holds both versions (they are objects in its store), so
//! it finds the shared runs itself and sends only the patch. The receiver
//! rebuilds the new blob from its own copy of the old one and checks the
//! blake3 hash the signed manifest names, so a patch needs no trust of its
//! own: a lying patch yields bytes that fail the hash and are thrown away.
//!
//! Encoding (`MPAT` version 1), integers big-endian:
//!
//! ```text
//! "MPAT" u8:1  base:[32]  target:[32]  target_size:u64
//!   op: u8:1 offset:u64 len:u32     copy len bytes of the base from offset
//!       u8:2 len:u32 bytes          these bytes (len <= MAX_DATA)
//!       u8:0                        end (last)
//! ```

use crate::encoding::{DecodeError, Reader, Writer};
use crate::hash::Hash;
use std::collections::HashMap;

const MAGIC: &[u8; 4] = b"MPAT";
const VERSION: u8 = 1;
/// Header length: magic, version, two hashes, target size.
pub const HEADER_LEN: usize = 4 + 1 + 32 + 32 + 8;
/// Longest literal op; a reader never buffers more than this per op.
pub const MAX_DATA: usize = 1 << 20;
const OP_END: u8 = 0;
const OP_COPY: u8 = 1;
const OP_DATA: u8 = 2;

/// One step of rebuilding the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOp<'a> {
    Copy { offset: u64, len: u32 },
    Data(&'a [u8]),
}

/// The patch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchHeader {
    pub base: Hash,
    pub target: Hash,
    pub target_size: u64,
}

/// Block size for matching: about the square root of the base, as rsync
/// picks, within [512, 64 KiB].
fn block_size(base_len: usize) -> usize {
    (base_len as f64).sqrt().clamp(512.0, 65536.0) as usize & !7
}

/// rsync's rolling checksum over a window.
#[derive(Clone, Copy)]
struct Rolling {
    a: u32,
    b: u32,
    len: u32,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let (mut a, mut b) = (0u32, 0u32);
        let n = window.len() as u32;
        for (i, &x) in window.iter().enumerate() {
            a = a.wrapping_add(u32::from(x));
            b = b.wrapping_add((n - i as u32).wrapping_mul(u32::from(x)));
        }
        Rolling { a, b, len: n }
    }
    fn roll(&mut self, out: u8, inn: u8) {
        self.a = self
            .a
            .wrapping_sub(u32::from(out))
            .wrapping_add(u32::from(inn));
        self.b = self
            .b
            .wrapping_sub(self.len.wrapping_mul(u32::from(out)))
            .wrapping_add(self.a);
    }
    fn value(&self) -> u32 {
        (self.b << 16) | (self.a & 0xffff)
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

struct Out(Writer);

impl Out {
    fn data(&mut self, mut d: &[u8]) {
        while !d.is_empty() {
            let n = d.len().min(MAX_DATA);
            self.0.u8(OP_DATA);
            self.0.u32(n as u32);
            self.0.raw(&d[..n]);
            d = &d[n..];
        }
    }
    fn copy(&mut self, mut offset: u64, mut len: u64) {
        while len > 0 {
            let n = len.min(u64::from(u32::MAX));
            self.0.u8(OP_COPY);
            self.0.u64(offset);
            self.0.u32(n as u32);
            offset += n;
            len -= n;
        }
    }
}

/// Writes a patch that rebuilds `target` from `base`. Runs of at least one
/// block that both share are copied, wherever they sit in either file; the
/// rest is sent literally. Time is linear in the two sizes.
pub fn make_patch(base: &[u8], base_hash: Hash, target: &[u8], target_hash: Hash) -> Vec<u8> {
    let mut out = Out(Writer::with_capacity(HEADER_LEN + 64 + target.len() / 16));
    out.0.raw(MAGIC);
    out.0.u8(VERSION);
    out.0.raw(base_hash.as_bytes());
    out.0.raw(target_hash.as_bytes());
    out.0.u64(target.len() as u64);

    let bs = block_size(base.len());
    let mut index: HashMap<u32, u32> = HashMap::new();
    if base.len() >= bs {
        // First block wins for equal sums; a collision is settled by a
        // byte compare below, so a wrong candidate only costs a miss.
        for k in (0..base.len() / bs).rev() {
            index.insert(Rolling::new(&base[k * bs..(k + 1) * bs]).value(), k as u32);
        }
    }
    let mut lit = 0usize; // start of bytes not yet emitted
    let mut pos = 0usize;
    let mut roll = (target.len() >= bs && !index.is_empty()).then(|| Rolling::new(&target[..bs]));
    while let Some(r) = roll {
        let hit = index.get(&r.value()).and_then(|&k| {
            let o = k as usize * bs;
            (base[o..o + bs] == target[pos..pos + bs]).then_some(o)
        });
        if let Some(o) = hit {
            // Grow the match backwards into pending literal bytes, then forwards.
            let mut s = pos;
            let mut bo = o;
            while s > lit && bo > 0 && target[s - 1] == base[bo - 1] {
                s -= 1;
                bo -= 1;
            }
            let end = pos + bs + common_prefix(&base[o + bs..], &target[pos + bs..]);
            out.data(&target[lit..s]);
            out.copy(bo as u64, (end - s) as u64);
            lit = end;
            pos = end;
            roll = (pos + bs <= target.len()).then(|| Rolling::new(&target[pos..pos + bs]));
        } else if pos + bs < target.len() {
            let mut r = r;
            r.roll(target[pos], target[pos + bs]);
            pos += 1;
            roll = Some(r);
        } else {
            roll = None;
        }
    }
    out.data(&target[lit..]);
    out.0.u8(OP_END);
    out.0.buf
}

/// Reads a patch op by op, checking every op against the base length and the
/// declared target size, so a hostile patch cannot read outside the base or
/// write past the target.
pub struct PatchReader<'a> {
    r: Reader<'a>,
    header: PatchHeader,
    base_len: u64,
    written: u64,
    ended: bool,
}

impl<'a> PatchReader<'a> {
    /// Parses the header; `base_len` is the length of the caller's base.
    pub fn new(buf: &'a [u8], base_len: u64) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        r.header(MAGIC, VERSION, "blob patch")?;
        let header = PatchHeader {
            base: Hash(r.array("patch base")?),
            target: Hash(r.array("patch target")?),
            target_size: r.u64("patch target size")?,
        };
        Ok(PatchReader {
            r,
            header,
            base_len,
            written: 0,
            ended: false,
        })
    }

    pub fn header(&self) -> PatchHeader {
        self.header
    }

    /// The next op, or `None` after the end op. Errors on anything out of
    /// bounds, on a target longer or shorter than declared, and on bytes
    /// after the end.
    pub fn next_op(&mut self) -> Result<Option<PatchOp<'a>>, DecodeError> {
        if self.ended {
            return Ok(None);
        }
        let op = match self.r.u8("patch op")? {
            OP_END => {
                self.ended = true;
                if self.written != self.header.target_size {
                    return Err(DecodeError::Invalid("patch ends before the target size"));
                }
                if self.r.remaining() != 0 {
                    return Err(DecodeError::Trailing(self.r.remaining()));
                }
                return Ok(None);
            }
            OP_COPY => {
                let offset = self.r.u64("copy offset")?;
                let len = self.r.u32("copy length")?;
                if len == 0
                    || offset
                        .checked_add(u64::from(len))
                        .is_none_or(|e| e > self.base_len)
                {
                    return Err(DecodeError::Invalid("patch copies outside the base"));
                }
                PatchOp::Copy { offset, len }
            }
            OP_DATA => {
                let len = self.r.u32("data length")? as usize;
                if len == 0 || len > MAX_DATA {
                    return Err(DecodeError::Invalid("patch data length"));
                }
                PatchOp::Data(self.r.take(len, "patch data")?)
            }
            _ => return Err(DecodeError::Invalid("patch op tag")),
        };
        let n = match op {
            PatchOp::Copy { len, .. } => u64::from(len),
            PatchOp::Data(d) => d.len() as u64,
        };
        self.written += n;
        if self.written > self.header.target_size {
            return Err(DecodeError::Invalid("patch writes past the target size"));
        }
        Ok(Some(op))
    }
}

/// Rebuilds a target in memory (tests and small blobs).
pub fn apply_in_memory(patch: &[u8], base: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut r = PatchReader::new(patch, base.len() as u64)?;
    let mut out = Vec::with_capacity(r.header().target_size.min(1 << 30) as usize);
    while let Some(op) = r.next_op()? {
        match op {
            PatchOp::Copy { offset, len } => {
                let o = offset as usize;
                out.extend_from_slice(&base[o..o + len as usize]);
            }
            PatchOp::Data(d) => out.extend_from_slice(d),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::hash_bytes;
    use proptest::prelude::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn roundtrip(base: &[u8], target: &[u8]) -> usize {
        let p = make_patch(base, hash_bytes(base), target, hash_bytes(target));
        let got = apply_in_memory(&p, base).expect("applies");
        assert_eq!(got, target);
        p.len()
    }

    #[test]
    fn append_costs_the_appended_bytes() {
        let base = noise(40_000, 1);
        let mut target = base.clone();
        target.extend_from_slice(b"changed 4200");
        assert!(roundtrip(&base, &target) < HEADER_LEN + 48);
    }

    #[test]
    fn insert_and_delete_in_the_middle_are_found() {
        let base = noise(200_000, 2);
        let mut target = base[..50_000].to_vec();
        target.extend_from_slice(b"a new paragraph in the middle");
        target.extend_from_slice(&base[50_000..120_000]);
        target.extend_from_slice(&base[130_000..]);
        assert!(roundtrip(&base, &target) < 200);
        // Moved blocks are found too.
        let mut moved = base[100_000..].to_vec();
        moved.extend_from_slice(&base[..100_000]);
        assert!(roundtrip(&base, &moved) < 200);
    }

    #[test]
    fn unrelated_or_tiny_inputs_still_roundtrip() {
        roundtrip(&noise(10_000, 3), &noise(10_000, 4));
        roundtrip(b"", b"");
        roundtrip(b"", b"x");
        roundtrip(b"x", b"");
        roundtrip(&noise(100, 5), &noise(3_000_000, 6));
    }

    #[test]
    fn hostile_patches_are_refused() {
        let base = noise(5_000, 7);
        let target = noise(5_000, 8);
        let p = make_patch(&base, hash_bytes(&base), &target, hash_bytes(&target));
        for cut in 0..p.len() {
            assert!(apply_in_memory(&p[..cut], &base).is_err(), "cut at {cut}");
        }
        let mut trailing = p.clone();
        trailing.push(0);
        assert!(apply_in_memory(&trailing, &base).is_err());
        // A copy outside the base.
        let mut h = p[..HEADER_LEN].to_vec();
        h[69..77].copy_from_slice(&10u64.to_be_bytes());
        let mut evil = h.clone();
        evil.push(OP_COPY);
        evil.extend_from_slice(&(u64::MAX - 2).to_be_bytes());
        evil.extend_from_slice(&10u32.to_be_bytes());
        evil.push(OP_END);
        let err = apply_in_memory(&evil, &base).expect_err("refused");
        assert!(err.to_string().contains("outside the base"), "{err}");
        // Writing past the declared size.
        let mut long = h;
        long.push(OP_DATA);
        long.extend_from_slice(&11u32.to_be_bytes());
        long.extend_from_slice(&[0; 11]);
        long.push(OP_END);
        assert!(apply_in_memory(&long, &base).is_err());
    }

    proptest! {
        #[test]
        fn any_edit_roundtrips(
            seed in any::<u64>(),
            len in 0usize..20_000,
            edits in proptest::collection::vec((0usize..20_000, 0usize..300, any::<u8>()), 0..6),
        ) {
            let base = noise(len, seed);
            let mut target = base.clone();
            for (at, del, byte) in edits {
                let at = at.min(target.len());
                let del = del.min(target.len() - at);
                target.splice(at..at + del, std::iter::repeat_n(byte, del / 2 + 1));
            }
            roundtrip(&base, &target);
        }
    }
}
