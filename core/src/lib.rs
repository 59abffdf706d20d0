//! Meridian's core: the data model every other crate agrees on.
//!
//! A *generation* is a signed [`Root`] that names the blake3 hash of a tree of
//! [`DirNode`]s, git-style: each directory is one canonical, content-addressed
//! node, so a change to ten files changes only the nodes on the ten paths to
//! the root. The root is wrapped in a [`SignedRoot`] envelope signed with
//! ed25519 by a key the envelope names.
//!
//! This crate does no I/O: no files, no sockets, no clocks (callers pass the
//! time in). That keeps it pure, fast and fuzzable.
#![forbid(unsafe_code)]

pub mod delta;
pub mod encoding;
pub mod hash;
pub mod keyring;
pub mod keys;
pub mod manifest;
pub mod nodes;
pub mod outboard;
pub mod patch;
pub mod path;
pub mod tree;
pub mod verify;

pub use delta::{EditOp, NodeEdit, TreeDelta};
pub use encoding::DecodeError;
pub use hash::{Hash, hash_bytes};
pub use keyring::{Change, Keyring, SignedStatement, Statement, StatementError};
pub use keys::{KeyError, PublicKey, SecretKey};
pub use manifest::{
    DirNode, Entry, EntryKind, MAX_DIR_ENTRIES, MAX_NODE_BYTES, MAX_ROOT_BYTES, Root, SignedRoot,
};
pub use nodes::{NodeMap, Resolved, resolve};
pub use path::{PathError, RelPath, resolve_symlink, validate_name};
pub use tree::{BuiltTree, TreeBuilder};
pub use verify::{TrustedKeys, VerifiedRoot, Verifier, VerifyError, check_fresh, check_link};
