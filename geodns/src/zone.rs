//! Zone data built from config: SOA and NS at the apex, static records,
//! and the dynamic (mirror) names.

use crate::config::Zone;
use hickory_proto::rr::rdata::{self, SOA};
use hickory_proto::rr::{Name, RData, Record};
use std::collections::{HashMap, HashSet};

/// One zone, ready to answer from.
#[derive(Debug, Clone)]
pub struct ZoneData {
    /// Apex, lower case, fully qualified.
    pub apex: Name,
    pub soa: Record,
    /// Negative-answer TTL (SOA minimum).
    pub negative_ttl: u32,
    /// Dynamic names (lower case, fully qualified).
    pub dynamic: HashSet<Name>,
    /// Static records by owner (lower case, fully qualified), NS at the apex included.
    pub records: HashMap<Name, Vec<Record>>,
    /// Names that exist only as ancestors of others (empty non-terminals).
    pub ents: HashSet<Name>,
}

fn fqdn(rel: &str, apex: &Name) -> Result<Name, String> {
    if rel == "@" || rel.is_empty() {
        return Ok(apex.clone());
    }
    let n = Name::from_ascii(rel).map_err(|e| format!("bad name {rel:?}: {e}"))?;
    if n.is_fqdn() {
        return Ok(n.to_lowercase());
    }
    n.append_domain(apex)
        .map(|n| n.to_lowercase())
        .map_err(|e| e.to_string())
}

impl ZoneData {
    pub fn build(z: &Zone) -> Result<Self, String> {
        let mut apex = Name::from_ascii(&z.name)
            .map_err(|e| e.to_string())?
            .to_lowercase();
        apex.set_fqdn(true);
        let first_ns = fqdn(z.ns.first().ok_or("zone needs ns")?, &apex)?;
        let rname = fqdn(&z.soa.rname, &apex)?;
        let soa = Record::from_rdata(
            apex.clone(),
            z.soa.minimum,
            RData::SOA(SOA::new(
                first_ns,
                rname,
                z.soa.serial,
                z.soa.refresh,
                z.soa.retry,
                z.soa.expire,
                z.soa.minimum,
            )),
        );
        let mut records: HashMap<Name, Vec<Record>> = HashMap::new();
        for ns in &z.ns {
            records
                .entry(apex.clone())
                .or_default()
                .push(Record::from_rdata(
                    apex.clone(),
                    86_400,
                    RData::NS(rdata::NS(fqdn(ns, &apex)?)),
                ));
        }
        for r in &z.records {
            let owner = fqdn(&r.name, &apex)?;
            if !apex.zone_of(&owner) {
                return Err(format!("record {} is outside zone {}", r.name, apex));
            }
            let (_, rd) = r.parse()?;
            records
                .entry(owner.clone())
                .or_default()
                .push(Record::from_rdata(owner, r.ttl, rd));
        }
        let mut dynamic = HashSet::new();
        for d in &z.dynamic {
            dynamic.insert(fqdn(d, &apex)?);
        }
        let mut ents = HashSet::new();
        for n in records.keys().chain(dynamic.iter()) {
            let mut p = n.base_name();
            while p.num_labels() > apex.num_labels() {
                ents.insert(p.clone());
                p = p.base_name();
            }
        }
        Ok(ZoneData {
            negative_ttl: z.soa.minimum,
            apex,
            soa,
            dynamic,
            records,
            ents,
        })
    }
}
