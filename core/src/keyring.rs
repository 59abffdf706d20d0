//! Key statements and the keyring they build: which key may sign the root
//! of which generation.
//!
//! A reader starts from the keys it is configured to trust, each good for
//! every generation. Two signed statements change that, TUF-style:
//!
//! - **Rotate** `old → new` from generation `N`: roots from `N` on are
//!   signed by `new`, and `old` is retired (it still verifies the roots
//!   before `N`). It must be signed by `old`, which must be in force at `N`,
//!   and by `new` (proof that its holder has it): a statement naming a key
//!   nobody holds, or a key that one party was tricked into naming, is
//!   refused.
//! - **Revoke** `key` from generation `N`: roots from `N` on signed by `key`
//!   are refused. It must be signed by another key in force at `N`. This
//!   is the answer to a key believed stolen.
//!
//! The threshold is one key (a statement needs one authorising signature);
//! what a thief holding one key can and cannot do follows from that and is
//! set out in ARCHITECTURE.md.
//!
//! The keyring is a pure function of the configured keys and the set of
//! statements: statements are applied in the order of their generation
//! (revocations first within one, then by hash), each checked against the keyring the earlier ones
//! built, and one that is not authorised at that point is left out. A
//! revocation also voids what the revoked key authorised from its
//! generation on (a thief's rotation to a key of their own, say), and the
//! voided statement is dropped, so every reader ends with the same keyring
//! whatever order the statements arrived in.

use crate::encoding::{DecodeError, Reader, Writer};
use crate::hash::{Hash, hash_bytes};
use crate::keys::{PublicKey, SecretKey};
use crate::verify::{TrustedKeys, VerifyError};

const BODY_MAGIC: &[u8; 4] = b"MKEY";
const ENVELOPE_MAGIC: &[u8; 4] = b"MKSG";
const LIST_MAGIC: &[u8; 4] = b"MKLS";
const VERSION: u8 = 1;
/// Domain separation from root signatures made with the same keys.
pub const KEY_SIGNING_CONTEXT: &[u8] = b"meridian key statement v1\0";
/// Most signatures on one statement.
const MAX_SIGNATURES: usize = 16;
/// Most statements a keyring holds (a list bigger than this is refused).
pub const MAX_STATEMENTS: usize = 1024;
/// Largest encoded statement envelope.
pub const MAX_STATEMENT_BYTES: usize = 4096;

/// What a statement changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// From the statement's generation, roots are signed by `new`; `old`
    /// is retired.
    Rotate { old: PublicKey, new: PublicKey },
    /// From the statement's generation, `key` signs nothing.
    Revoke { key: PublicKey },
}

/// A change of keys, effective from a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statement {
    /// The first generation the change applies to (at least 1).
    pub from_generation: u64,
    /// When it was made (seconds since the Unix epoch; informational).
    pub created: i64,
    pub change: Change,
}

impl Statement {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(96);
        w.raw(BODY_MAGIC);
        w.u8(VERSION);
        w.u64(self.from_generation);
        w.i64(self.created);
        match self.change {
            Change::Rotate { old, new } => {
                w.u8(0);
                w.raw(old.as_bytes());
                w.raw(new.as_bytes());
            }
            Change::Revoke { key } => {
                w.u8(1);
                w.raw(key.as_bytes());
            }
        }
        w.buf
    }

    fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        r.header(BODY_MAGIC, VERSION, "key statement")?;
        let from_generation = r.u64("from generation")?;
        let created = r.i64("created")?;
        let key = |r: &mut Reader<'_>| {
            PublicKey::from_bytes(&r.array("public key")?)
                .map_err(|_| DecodeError::Invalid("public key"))
        };
        let change = match r.u8("change")? {
            0 => Change::Rotate {
                old: key(&mut r)?,
                new: key(&mut r)?,
            },
            1 => Change::Revoke { key: key(&mut r)? },
            _ => return Err(DecodeError::Invalid("key statement change")),
        };
        r.finish()?;
        if from_generation == 0 {
            return Err(DecodeError::Invalid("key statement from generation 0"));
        }
        Ok(Statement {
            from_generation,
            created,
            change,
        })
    }
}

impl std::fmt::Display for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.change {
            Change::Rotate { old, new } => write!(
                f,
                "rotation from {old} to {new} at generation {}",
                self.from_generation
            ),
            Change::Revoke { key } => write!(
                f,
                "revocation of {key} from generation {}",
                self.from_generation
            ),
        }
    }
}

/// A statement with its signatures, as it travels and is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatement {
    pub statement: Statement,
    body: Vec<u8>,
    signatures: Vec<(PublicKey, [u8; 64])>,
}

fn key_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(KEY_SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(KEY_SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

impl SignedStatement {
    /// Signs a statement with each of `keys`.
    pub fn sign(statement: Statement, keys: &[&SecretKey]) -> Self {
        let body = statement.encode();
        let msg = key_message(&body);
        SignedStatement {
            statement,
            signatures: keys.iter().map(|k| (k.public(), k.sign(&msg))).collect(),
            body,
        }
    }

    /// The statement's identity: the hash of its signed body.
    pub fn hash(&self) -> Hash {
        hash_bytes(&self.body)
    }

    /// Whether `key` signed this statement, with a signature that verifies.
    pub fn signed_by(&self, key: &PublicKey) -> bool {
        let msg = key_message(&self.body);
        self.signatures
            .iter()
            .any(|(k, s)| k == key && k.verify(&msg, s))
    }

    /// The keys whose signatures verify.
    pub fn signers(&self) -> impl Iterator<Item = PublicKey> + '_ {
        let msg = key_message(&self.body);
        self.signatures
            .iter()
            .filter(move |(k, s)| k.verify(&msg, s))
            .map(|(k, _)| *k)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(self.body.len() + 8 + 96 * self.signatures.len());
        w.raw(ENVELOPE_MAGIC);
        w.u8(VERSION);
        w.short_bytes(&self.body);
        w.u8(self.signatures.len() as u8);
        for (k, s) in &self.signatures {
            w.raw(k.as_bytes());
            w.raw(s);
        }
        w.buf
    }

    /// Parses an envelope (shape only; [`Keyring::add`] checks signatures
    /// and authority).
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() > MAX_STATEMENT_BYTES {
            return Err(DecodeError::TooLarge {
                what: "key statement",
                got: b.len() as u64,
                limit: MAX_STATEMENT_BYTES as u64,
            });
        }
        let mut r = Reader::new(b);
        r.header(ENVELOPE_MAGIC, VERSION, "signed key statement")?;
        let body = r.short_bytes("key statement body")?.to_vec();
        let statement = Statement::decode(&body)?;
        let n = r.u8("signature count")? as usize;
        if n == 0 || n > MAX_SIGNATURES {
            return Err(DecodeError::Invalid("signature count"));
        }
        let mut signatures = Vec::with_capacity(n);
        for _ in 0..n {
            let k = PublicKey::from_bytes(&r.array("public key")?)
                .map_err(|_| DecodeError::Invalid("public key"))?;
            signatures.push((k, r.array("signature")?));
        }
        r.finish()?;
        Ok(SignedStatement {
            statement,
            body,
            signatures,
        })
    }
}

/// Why a statement was not taken up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatementError {
    #[error("key statement is malformed: {0}")]
    Malformed(#[from] DecodeError),
    #[error("{statement} is not authorised: {why}")]
    Unauthorised { statement: String, why: String },
    #[error(
        "{statement} is refused: it would change who signs generations this reader already holds (up to {held}); a rotation or revocation takes effect only after the newest generation published"
    )]
    Backdated { statement: String, held: u64 },
    #[error("key statement list holds more than {MAX_STATEMENTS} statements")]
    TooMany,
}

/// When one key may sign roots: generations `from..until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    key: PublicKey,
    from: u64,
    until: Option<u64>,
}

impl Window {
    fn covers(&self, generation: u64) -> bool {
        generation >= self.from && self.until.is_none_or(|u| generation < u)
    }
}

/// The keys in force for every generation: the configured keys, changed by
/// the statements that are authorised.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    configured: Vec<PublicKey>,
    /// The statements in force, sorted by (generation, hash).
    held: Vec<SignedStatement>,
    windows: Vec<Window>,
}

impl Keyring {
    /// The keyring of the configured keys and no statement.
    pub fn new(trusted: &TrustedKeys) -> Self {
        let mut k = Keyring {
            configured: trusted.iter().copied().collect(),
            held: Vec::new(),
            windows: Vec::new(),
        };
        k.rebuild();
        k
    }

    /// Rebuilds the windows from the configured keys and the statements,
    /// in order; returns the statements that were left out and why.
    fn rebuild(&mut self) -> Vec<(Hash, StatementError)> {
        self.windows = self
            .configured
            .iter()
            .map(|&key| Window {
                key,
                from: 0,
                until: None,
            })
            .collect();
        let mut left_out = Vec::new();
        for s in &self.held {
            match authorise(&self.windows, s) {
                Ok(()) => apply(&mut self.windows, &s.statement),
                Err(e) => left_out.push((s.hash(), e)),
            }
        }
        left_out
    }

    /// Takes up a statement. `Ok(true)` if it is new and in force, `Ok(false)`
    /// if it was already held; an error (and no change) if it is malformed
    /// or not authorised by the keys in force at its generation.
    pub fn add(&mut self, envelope: &[u8]) -> Result<bool, StatementError> {
        self.add_after(envelope, 0)
    }

    /// [`Keyring::add`] for a reader that already holds generation `held`:
    /// a new statement that takes effect at or before it is refused, since
    /// it would change who signed what this reader already accepted (a
    /// thief's backdated rotation, say).
    pub fn add_after(&mut self, envelope: &[u8], held: u64) -> Result<bool, StatementError> {
        let s = SignedStatement::decode(envelope)?;
        let h = s.hash();
        if self.held.iter().any(|x| x.hash() == h) {
            return Ok(false);
        }
        if s.statement.from_generation <= held {
            return Err(StatementError::Backdated {
                statement: s.statement.to_string(),
                held,
            });
        }
        if self.held.len() >= MAX_STATEMENTS {
            return Err(StatementError::TooMany);
        }
        let before = (self.held.clone(), self.windows.clone());
        let at = self.held.partition_point(|x| order(x) < order(&s));
        self.held.insert(at, s);
        let left_out = self.rebuild();
        if let Some((_, e)) = left_out.iter().find(|(x, _)| *x == h) {
            (self.held, self.windows) = before;
            return Err(e.clone());
        }
        // What the new statement voids (a revoked key's later statements)
        // is dropped, so every reader ends with the same set.
        self.held
            .retain(|x| !left_out.iter().any(|(v, _)| *v == x.hash()));
        Ok(true)
    }

    /// Takes up every statement of an encoded list ([`Keyring::encode`]);
    /// returns how many were new, and the errors of those refused.
    /// Passes are repeated while they take something up, so a statement
    /// signed by a key that a later one in the list introduces still counts.
    pub fn add_list(
        &mut self,
        list: &[u8],
    ) -> Result<(usize, Vec<StatementError>), StatementError> {
        self.add_list_after(list, 0)
    }

    /// [`Keyring::add_list`] for a reader that holds generation `held`
    /// ([`Keyring::add_after`]).
    pub fn add_list_after(
        &mut self,
        list: &[u8],
        held: u64,
    ) -> Result<(usize, Vec<StatementError>), StatementError> {
        let mut pending = decode_list(list)?;
        let mut new = 0;
        loop {
            let mut refused = Vec::new();
            let mut progress = false;
            pending.retain(|env| match self.add_after(env, held) {
                Ok(true) => {
                    new += 1;
                    progress = true;
                    false
                }
                Ok(false) => false,
                Err(e) => {
                    refused.push(e);
                    true
                }
            });
            if !progress || pending.is_empty() {
                return Ok((new, refused));
            }
        }
    }

    /// Whether `key` may sign the root of `generation`.
    pub fn check(&self, key: &PublicKey, generation: u64) -> Result<(), VerifyError> {
        let mut known = self.windows.iter().filter(|w| w.key == *key).peekable();
        if known.peek().is_none() {
            return Err(VerifyError::UnknownKey(*key));
        }
        let mut nearest: Option<Window> = None;
        for w in known {
            if w.covers(generation) {
                return Ok(());
            }
            nearest = Some(*w);
        }
        let w = nearest.expect("at least one window");
        match w.until {
            Some(until) if generation >= until => Err(VerifyError::RetiredKey {
                key: *key,
                generation,
                since: until,
            }),
            _ => Err(VerifyError::NotYetTrusted {
                key: *key,
                generation,
                from: w.from,
            }),
        }
    }

    /// Whether `key` is known at all (for any generation).
    pub fn knows(&self, key: &PublicKey) -> bool {
        self.windows.iter().any(|w| w.key == *key)
    }

    /// Every key known, for any generation (configured or brought in by a
    /// statement), each once, in order of first appearance.
    pub fn keys(&self) -> Vec<PublicKey> {
        let mut out: Vec<PublicKey> = Vec::new();
        for w in &self.windows {
            if !out.contains(&w.key) {
                out.push(w.key);
            }
        }
        out
    }

    /// The keys that may sign the root of `generation`.
    pub fn keys_for(&self, generation: u64) -> impl Iterator<Item = PublicKey> + '_ {
        self.windows
            .iter()
            .filter(move |w| w.covers(generation))
            .map(|w| w.key)
    }

    /// The statements held, in order.
    pub fn statements(&self) -> &[SignedStatement] {
        &self.held
    }

    /// Identifies the set of statements held (the zero hash for none): two
    /// nodes with the same id hold the same statements.
    pub fn id(&self) -> Hash {
        if self.held.is_empty() {
            return Hash::ZERO;
        }
        let mut h = blake3::Hasher::new();
        for s in &self.held {
            h.update(s.hash().as_bytes());
        }
        Hash::from(h.finalize())
    }

    /// The held statements as one list, as served and stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + self.held.len() * 256);
        w.raw(LIST_MAGIC);
        w.u8(VERSION);
        w.u32(self.held.len() as u32);
        for s in &self.held {
            w.short_bytes(&s.encode());
        }
        w.buf
    }
}

/// Splits an encoded statement list into its envelopes.
pub fn decode_list(b: &[u8]) -> Result<Vec<&[u8]>, StatementError> {
    let mut r = Reader::new(b);
    r.header(LIST_MAGIC, VERSION, "key statement list")?;
    let n = r.u32("statement count")? as usize;
    if n > MAX_STATEMENTS {
        return Err(StatementError::TooMany);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.short_bytes("key statement")?);
    }
    r.finish()?;
    Ok(out)
}

/// The order statements apply in: by generation; in one generation
/// revocations first (a key revoked at N authorises nothing at N), then by
/// hash.
fn order(s: &SignedStatement) -> (u64, u8, Hash) {
    let kind = match s.statement.change {
        Change::Revoke { .. } => 0,
        Change::Rotate { .. } => 1,
    };
    (s.statement.from_generation, kind, s.hash())
}

fn in_force(windows: &[Window], key: &PublicKey, generation: u64) -> bool {
    windows
        .iter()
        .any(|w| w.key == *key && w.covers(generation))
}

fn authorise(windows: &[Window], s: &SignedStatement) -> Result<(), StatementError> {
    let n = s.statement.from_generation;
    let refuse = |why: String| StatementError::Unauthorised {
        statement: s.statement.to_string(),
        why,
    };
    match s.statement.change {
        Change::Rotate { old, new } => {
            if old == new {
                return Err(refuse("the old and the new key are the same".into()));
            }
            if !in_force(windows, &old, n) {
                return Err(refuse(format!(
                    "{old} is not a key in force at generation {n} here (not trusted, retired or revoked)"
                )));
            }
            if windows.iter().any(|w| w.key == new && w.until.is_some()) {
                return Err(refuse(format!("{new} was retired or revoked before")));
            }
            if !s.signed_by(&old) {
                return Err(refuse(format!("it is not signed by the old key {old}")));
            }
            if !s.signed_by(&new) {
                return Err(refuse(format!(
                    "it is not signed by the new key {new} (proof that its holder has it)"
                )));
            }
        }
        Change::Revoke { key } => {
            let by_other = s.signers().any(|k| k != key && in_force(windows, &k, n));
            if !by_other {
                return Err(refuse(format!(
                    "it is signed by no key other than {key} that is in force at generation {n}"
                )));
            }
        }
    }
    Ok(())
}

fn apply(windows: &mut Vec<Window>, s: &Statement) {
    let n = s.from_generation;
    let retire = |windows: &mut Vec<Window>, key: PublicKey| {
        for w in windows.iter_mut().filter(|w| w.key == key) {
            w.until = Some(w.until.map_or(n, |u| u.min(n)));
        }
    };
    match s.change {
        Change::Rotate { old, new } => {
            retire(windows, old);
            if !windows.iter().any(|w| w.key == new) {
                windows.push(Window {
                    key: new,
                    from: n,
                    until: None,
                });
            }
        }
        Change::Revoke { key } => retire(windows, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn rotate(old: &SecretKey, new: &SecretKey, at: u64) -> Vec<u8> {
        SignedStatement::sign(
            Statement {
                from_generation: at,
                created: 0,
                change: Change::Rotate {
                    old: old.public(),
                    new: new.public(),
                },
            },
            &[old, new],
        )
        .encode()
    }

    fn revoke(k: &SecretKey, by: &SecretKey, at: u64) -> Vec<u8> {
        SignedStatement::sign(
            Statement {
                from_generation: at,
                created: 0,
                change: Change::Revoke { key: k.public() },
            },
            &[by],
        )
        .encode()
    }

    #[test]
    fn a_rotation_moves_signing_to_the_new_key_from_its_generation() {
        let (old, new) = (key(1), key(2));
        let mut ring = Keyring::new(&TrustedKeys::new([old.public()]));
        assert!(matches!(
            ring.check(&new.public(), 5),
            Err(VerifyError::UnknownKey(_))
        ));
        assert_eq!(ring.add(&rotate(&old, &new, 5)), Ok(true));
        assert_eq!(ring.add(&rotate(&old, &new, 5)), Ok(false));
        assert_eq!(ring.check(&old.public(), 4), Ok(()));
        assert_eq!(
            ring.check(&old.public(), 5),
            Err(VerifyError::RetiredKey {
                key: old.public(),
                generation: 5,
                since: 5
            })
        );
        assert_eq!(ring.check(&new.public(), 5), Ok(()));
        assert!(matches!(
            ring.check(&new.public(), 4),
            Err(VerifyError::NotYetTrusted { .. })
        ));
        // The list round-trips into another reader's keyring.
        let mut other = Keyring::new(&TrustedKeys::new([old.public()]));
        assert_eq!(other.add_list(&ring.encode()).map(|r| r.0), Ok(1));
        assert_eq!(other.id(), ring.id());
        assert_ne!(ring.id(), Hash::ZERO);
    }

    #[test]
    fn a_rotation_needs_both_signatures_and_a_key_in_force() {
        let (old, new, stranger) = (key(1), key(2), key(3));
        let mut ring = Keyring::new(&TrustedKeys::new([old.public()]));
        let st = Statement {
            from_generation: 5,
            created: 0,
            change: Change::Rotate {
                old: old.public(),
                new: new.public(),
            },
        };
        let only_old = SignedStatement::sign(st, &[&old]).encode();
        let only_new = SignedStatement::sign(st, &[&new]).encode();
        assert!(matches!(
            ring.add(&only_old),
            Err(StatementError::Unauthorised { .. })
        ));
        assert!(matches!(
            ring.add(&only_new),
            Err(StatementError::Unauthorised { .. })
        ));
        // A stranger cannot rotate a key it does not hold.
        assert!(ring.add(&rotate(&stranger, &new, 5)).is_err());
        // A forged signature: flip a byte of the last signature.
        let mut forged = rotate(&old, &new, 5);
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(ring.add(&forged).is_err());
        assert!(matches!(
            ring.add(b"MKSG\x01junk"),
            Err(StatementError::Malformed(_))
        ));
        assert!(ring.statements().is_empty());
        assert_eq!(ring.id(), Hash::ZERO);
    }

    #[test]
    fn a_revocation_voids_what_the_revoked_key_authorised_after_it() {
        let (stolen, backup, thief) = (key(1), key(2), key(9));
        let trusted = TrustedKeys::new([stolen.public(), backup.public()]);
        let mut ring = Keyring::new(&trusted);
        // The thief rotates the stolen key to their own at 10.
        assert_eq!(ring.add(&rotate(&stolen, &thief, 10)), Ok(true));
        assert_eq!(ring.check(&thief.public(), 12), Ok(()));
        // The key cannot revoke itself into uselessness of the others.
        assert!(ring.add(&revoke(&stolen, &stolen, 8)).is_err());
        // The backup key revokes the stolen one from 8: the thief's rotation
        // at 10 no longer counts, on every reader, whatever the order.
        assert_eq!(ring.add(&revoke(&stolen, &backup, 8)), Ok(true));
        assert!(ring.check(&thief.public(), 12).is_err());
        assert!(matches!(
            ring.check(&stolen.public(), 8),
            Err(VerifyError::RetiredKey { since: 8, .. })
        ));
        assert_eq!(ring.check(&stolen.public(), 7), Ok(()));
        let mut reversed = Keyring::new(&trusted);
        assert_eq!(reversed.add(&revoke(&stolen, &backup, 8)), Ok(true));
        assert!(reversed.add(&rotate(&stolen, &thief, 10)).is_err());
        assert!(reversed.check(&thief.public(), 12).is_err());
        // A revocation at the thief's own generation voids that rotation too.
        let mut same = Keyring::new(&trusted);
        same.add(&rotate(&stolen, &thief, 10)).expect("authorised");
        same.add(&revoke(&stolen, &backup, 10)).expect("authorised");
        assert!(same.check(&thief.public(), 12).is_err());
        // A reader that holds generation 10 refuses a statement backdated
        // to it.
        let mut holding = Keyring::new(&trusted);
        assert!(matches!(
            holding.add_after(&rotate(&stolen, &thief, 10), 10),
            Err(StatementError::Backdated { held: 10, .. })
        ));
        assert_eq!(
            holding.add_after(&rotate(&stolen, &thief, 11), 10),
            Ok(true)
        );
        // Both readers end with the same statements.
        assert_eq!(ring.id(), reversed.id());
        assert_eq!(ring.statements().len(), 1);
    }
}
