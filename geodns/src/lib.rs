//! Meridian GeoDNS.
#![forbid(unsafe_code)]

pub mod geoip;
pub mod mmdb;
