//! A tiny canonical binary encoding: fixed-width big-endian integers and
//! length-prefixed byte strings. There is exactly one encoding of every value,
//! so the bytes that are hashed and signed are deterministic, and the reader
//! refuses trailing bytes, over-long lengths and unknown tags.

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("malformed encoding: truncated while reading {0}")]
    Truncated(&'static str),
    #[error("malformed encoding: bad magic, this is not a {0}")]
    BadMagic(&'static str),
    #[error("malformed encoding: unsupported {what} version {version}")]
    Version { what: &'static str, version: u8 },
    #[error("malformed encoding: {0} trailing bytes")]
    Trailing(usize),
    #[error("malformed encoding: {what} is {got} bytes, limit {limit}")]
    TooLarge {
        what: &'static str,
        got: u64,
        limit: u64,
    },
    #[error("malformed encoding: invalid {0}")]
    Invalid(&'static str),
    #[error("malformed encoding: {0}")]
    Path(#[from] crate::path::PathError),
}

/// Appends canonical values to a buffer.
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// A byte string of at most 65535 bytes, with a u16 length.
    pub fn short_bytes(&mut self, v: &[u8]) {
        debug_assert!(v.len() <= u16::MAX as usize);
        self.u16(v.len() as u16);
        self.raw(v);
    }
}

/// Reads canonical values from a slice, never past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    pub fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    pub fn short_bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
    /// Checks a 4-byte magic and a version byte.
    pub fn header(
        &mut self,
        magic: &[u8; 4],
        version: u8,
        what: &'static str,
    ) -> Result<(), DecodeError> {
        if &self.array::<4>(what)? != magic {
            return Err(DecodeError::BadMagic(what));
        }
        let v = self.u8(what)?;
        if v != version {
            return Err(DecodeError::Version { what, version: v });
        }
        Ok(())
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}
