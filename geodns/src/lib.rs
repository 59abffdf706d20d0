//! Meridian GeoDNS.
#![forbid(unsafe_code)]

pub mod geoip;
pub mod mmdb;
pub mod config;
pub mod select;
pub mod wire;
pub mod zone;
