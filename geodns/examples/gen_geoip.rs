//! Writes a synthetic GeoLite2-City-layout database for benchmarks: N random
//! IPv4 networks (/16 to /24) at random coordinates, deterministic for a
//! seed. Also writes the networks as text (one `network/len` per line) so a
//! benchmark can draw client addresses that the database actually locates.
//!
//! usage: cargo run --release -p meridian-geodns --example gen_geoip -- OUT.mmdb NETS.txt N SEED
#![allow(clippy::unwrap_used)]

use meridian_geodns::mmdb::{Writer, geoip2_city};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (out, nets, n, mut x): (&str, &str, usize, u64) = (
        &args[1],
        &args[2],
        args[3].parse().unwrap(),
        args[4].parse().unwrap(),
    );
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Disjoint networks: one per distinct /16, with a random length.
    let mut used = std::collections::HashSet::new();
    let mut w = Writer::new("GeoLite2-City");
    let mut list = std::io::BufWriter::new(std::fs::File::create(nets).unwrap());
    while used.len() < n {
        let a = (next() % 223 + 1) as u8;
        if a == 127 || a == 10 {
            continue;
        }
        let b = (next() % 256) as u8;
        if !used.insert((a, b)) {
            continue;
        }
        let len = 16 + (next() % 9) as u8;
        let c = if len > 16 { (next() % 256) as u8 } else { 0 };
        let mask = u32::MAX << (32 - u32::from(len));
        let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(a, b, c, 0)) & mask);
        let lat = (next() % 140) as f64 - 60.0 + (next() % 1000) as f64 / 1000.0;
        let lon = (next() % 360) as f64 - 180.0 + (next() % 1000) as f64 / 1000.0;
        w.insert(
            IpAddr::V4(net),
            len,
            &geoip2_city(lat, lon, "XX", "XX", "synthetic"),
        );
        writeln!(list, "{net}/{len}").unwrap();
    }
    std::fs::write(out, w.build()).unwrap();
    eprintln!("wrote {n} networks to {out}");
}
