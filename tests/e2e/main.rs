//! End-to-end tests: the real `meridian` binary on loopback.
#![allow(clippy::unwrap_used)]

mod mirror;
mod origin;
mod serving;
