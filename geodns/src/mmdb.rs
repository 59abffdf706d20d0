//! A MaxMind DB (`.mmdb`) writer, following the MaxMind DB File Format
//! Specification 2.0: a binary search tree over IPv6 address bits (IPv4
//! networks live under `::/96`, where readers look them up), a 16-byte
//! separator, the data section, and the metadata map after
//! `\xAB\xCD\xEFMaxMind.com`.
//!
//! The demo uses it to build its own small City database, and the tests
//! build databases in both supported layouts, so nothing depends on
//! downloaded data.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A value in the data section.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Double(f64),
    U16(u16),
    U32(u32),
    U64(u64),
    Map(BTreeMap<String, Value>),
    Array(Vec<Value>),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Double(v)
    }
}

/// Builds a map value from pairs.
pub fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rec {
    Empty,
    Node(usize),
    Data(usize),
}

/// Collects networks, then writes the database.
#[derive(Debug)]
pub struct Writer {
    nodes: Vec<[Rec; 2]>,
    data: Vec<u8>,
    database_type: String,
}

fn control(out: &mut Vec<u8>, typ: u8, size: usize) {
    let (first, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65536 {
        let s = size - 285;
        (30, vec![(s >> 8) as u8, s as u8])
    } else {
        let s = size - 65821;
        (31, vec![(s >> 16) as u8, (s >> 8) as u8, s as u8])
    };
    if typ <= 7 {
        out.push((typ << 5) | first);
    } else {
        out.push(first);
        out.push(typ - 7);
    }
    out.extend_from_slice(&extra);
}

fn encode(v: &Value, out: &mut Vec<u8>) {
    fn uint(out: &mut Vec<u8>, typ: u8, v: u64) {
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        control(out, typ, 8 - skip);
        out.extend_from_slice(&bytes[skip..]);
    }
    match v {
        Value::String(s) => {
            control(out, 2, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Double(d) => {
            control(out, 3, 8);
            out.extend_from_slice(&d.to_be_bytes());
        }
        Value::U16(n) => uint(out, 5, u64::from(*n)),
        Value::U32(n) => uint(out, 6, u64::from(*n)),
        Value::U64(n) => uint(out, 9, *n),
        Value::Map(m) => {
            control(out, 7, m.len());
            for (k, v) in m {
                encode(&Value::String(k.clone()), out);
                encode(v, out);
            }
        }
        Value::Array(a) => {
            control(out, 11, a.len());
            for v in a {
                encode(v, out);
            }
        }
        Value::Bool(b) => control(out, 14, usize::from(*b)),
    }
}

impl Writer {
    /// A writer for a database of the given type (e.g. `GeoLite2-City`).
    pub fn new(database_type: &str) -> Self {
        Writer {
            nodes: vec![[Rec::Empty, Rec::Empty]],
            data: Vec::new(),
            database_type: database_type.to_owned(),
        }
    }

    /// Adds a network. Insert broader networks before more specific ones
    /// inside them; a more specific network overrides its part of a broader one.
    pub fn insert(&mut self, addr: IpAddr, prefix: u8, value: &Value) {
        let (bits, len): (u128, u8) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 96 + prefix.min(32)),
            IpAddr::V6(a) => (u128::from(a), prefix.min(128)),
        };
        let offset = self.data.len();
        encode(value, &mut self.data);
        let mut node = 0usize;
        for depth in 0..len {
            let bit = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == len {
                self.nodes[node][bit] = Rec::Data(offset);
                return;
            }
            node = match self.nodes[node][bit] {
                Rec::Node(n) => n,
                other => {
                    // Split: a new node whose both halves inherit what was here.
                    let n = self.nodes.len();
                    self.nodes.push([other, other]);
                    self.nodes[node][bit] = Rec::Node(n);
                    n
                }
            };
        }
    }

    /// The database bytes (32-bit records).
    pub fn build(&self) -> Vec<u8> {
        let count = self.nodes.len();
        let mut out = Vec::with_capacity(count * 8 + self.data.len() + 256);
        let rec = |r: Rec| -> u32 {
            match r {
                Rec::Empty => count as u32,
                Rec::Node(n) => n as u32,
                Rec::Data(off) => (count + 16 + off) as u32,
            }
        };
        for [l, r] in &self.nodes {
            out.extend_from_slice(&rec(*l).to_be_bytes());
            out.extend_from_slice(&rec(*r).to_be_bytes());
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        let meta = map([
            ("binary_format_major_version", Value::U16(2)),
            ("binary_format_minor_version", Value::U16(0)),
            (
                "build_epoch",
                Value::U64(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                ),
            ),
            ("database_type", Value::from(self.database_type.as_str())),
            (
                "description",
                map([("en", Value::from("Written by meridian-geodns"))]),
            ),
            ("ip_version", Value::U16(6)),
            ("languages", Value::Array(vec![Value::from("en")])),
            ("node_count", Value::U32(count as u32)),
            ("record_size", Value::U16(32)),
        ]);
        encode(&meta, &mut out);
        out
    }
}

/// A GeoIP2/GeoLite2 City record.
pub fn geoip2_city(lat: f64, lon: f64, country: &str, continent: &str, city: &str) -> Value {
    map([
        ("city", map([("names", map([("en", Value::from(city))]))])),
        ("continent", map([("code", Value::from(continent))])),
        ("country", map([("iso_code", Value::from(country))])),
        (
            "location",
            map([
                ("latitude", Value::from(lat)),
                ("longitude", Value::from(lon)),
            ]),
        ),
    ])
}

/// A DB-IP lite City record in the flat ip-location-db layout.
pub fn dbip_city(lat: f64, lon: f64, country: &str, city: &str) -> Value {
    map([
        ("city", Value::from(city)),
        ("country_code", Value::from(country)),
        ("latitude", Value::from(lat)),
        ("longitude", Value::from(lon)),
    ])
}
