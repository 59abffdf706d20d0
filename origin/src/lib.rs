//! The Meridian origin.
//!
//! It watches a content directory, snapshots every file into a
//! content-addressed store (so a published generation is immutable even if
//! the live directory changes a second later), builds the Merkle tree of
//! directory nodes, signs a new [`meridian_core::Root`] and serves it all over
//! the read API (`/.meridian/v1/...`).
//!
//! Publication rule for files being written: a file is published once it is
//! finished (closed after writing, or renamed into place, and not changed
//! since: [`watcher::Closes`]) or has been quiet (no change to size, mtime
//! or ctime) for the debounce interval.
//! A file still settling, changed while being hashed, or unreadable keeps the
//! entry it had in the previous generation (or stays unpublished if it is
//! new), and a new scan is scheduled.
#![forbid(unsafe_code)]

mod cache;
pub mod config;
pub mod keys;
mod linked;
mod metrics;
mod publisher;
pub mod scan;
pub mod service;
pub mod watcher;

pub use cache::seed as seed_hash_cache;
pub use config::OriginConfig;
pub use publisher::{PublishError, PublishOutcome, Publisher};
pub use service::{Origin, OriginHandle};
