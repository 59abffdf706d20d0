//! End-to-end tests: the real `meridian` binary on loopback.
#![allow(clippy::unwrap_used)]

mod deploy;
mod geodns;
mod get;
mod keys;
mod migrate;
mod mirror;
mod network;
mod operate;
mod origin;
mod redirector;
mod restore;
mod serving;
mod status_page;
