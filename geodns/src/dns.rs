//! The DNS request handler (on hickory-server).
//!
//! Authoritative answers for the configured zones: SOA and NS at the apex,
//! static records, and the dynamic mirror names, answered per client by
//! [`crate::select`]. NXDOMAIN carries the SOA in the authority section,
//! NODATA too; names outside our zones get REFUSED; AA is set; the query
//! name's case is echoed; ANY gets one RRset (RFC 8482); EDNS versions
//! above 0 get BADVERS; Client Subnet is validated strictly (see
//! [`crate::wire`]) and answered with an honest scope. UDP answers that do
//! not fit the client's buffer are truncated with TC set (hickory's
//! encoder), and TCP carries the full answer. What a mirror name is answered
//! with is [`crate::answer::plan`]'s; this module only adapts it to hickory.
//! [`Collected`] takes an encoded response for the UDP general path and TCP.

use crate::answer::{self, Kind, Question, Runtime};
use crate::geoip::GeoSet;
use crate::health::Tracker;
use crate::metrics::DnsMetrics;
use crate::select::Family;
use crate::wire::{self, EdnsInfo};
use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Our UDP payload ceiling (RFC 9715 / DNS flag day 2020).
pub(crate) const MAX_UDP_PAYLOAD: u16 = 1232;

/// The handler hickory-server calls.
#[derive(Debug, Clone)]
pub(crate) struct GeoHandler {
    pub runtime: Arc<arc_swap::ArcSwap<Runtime>>,
    pub geo: Arc<GeoSet>,
    pub tracker: Arc<Tracker>,
    pub metrics: DnsMetrics,
    seed: Arc<AtomicU64>,
}

impl GeoHandler {
    pub(crate) fn new(
        runtime: Arc<arc_swap::ArcSwap<Runtime>>,
        geo: Arc<GeoSet>,
        tracker: Arc<Tracker>,
        metrics: DnsMetrics,
    ) -> Self {
        GeoHandler {
            runtime,
            geo,
            tracker,
            metrics,
            seed: Arc::new(AtomicU64::new(0x853c_49e6_748f_ea9b)),
        }
    }

    pub(crate) fn random(&self) -> u64 {
        // splitmix64 over a shared counter: cheap, lock-free, well spread.
        crate::answer::splitmix(
            self.seed
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed),
        )
    }

    /// Sets the random stream (tests: the same draws as another path).
    #[cfg(test)]
    pub(crate) fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }
}

/// Reads the question name from the raw packet with its original case.
fn original_qname(raw: &[u8]) -> Option<Name> {
    let mut i = 12;
    let mut labels: Vec<&[u8]> = Vec::new();
    loop {
        let len = *raw.get(i)? as usize;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        labels.push(raw.get(i + 1..i + 1 + len)?);
        i += 1 + len;
    }
    let mut n = Name::from_labels(labels).ok()?;
    n.set_fqdn(true);
    Some(n)
}

fn response_edns(req: &EdnsInfo, ecs: Option<ClientSubnet>) -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(req.payload.clamp(512, MAX_UDP_PAYLOAD));
    e.set_version(0);
    if let Some(s) = ecs {
        e.options_mut().insert(EdnsOption::Subnet(s));
    }
    e
}

#[async_trait::async_trait]
impl RequestHandler for GeoHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let rt = self.runtime.load_full();
        let raw = request.as_slice();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.message_type = MessageType::Response;
        let builder = MessageResponseBuilder::from_message_request(request);

        // Strict pass over the raw bytes: FORMERR for what hickory let through.
        let parsed = match wire::read(raw) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(src = %request.src(), error = %e, "FORMERR");
                self.metrics.rcode("FORMERR");
                return send(
                    &mut response_handle,
                    builder.error_msg(&request.metadata, ResponseCode::FormErr),
                )
                .await;
            }
        };
        if request.metadata.op_code != OpCode::Query {
            self.metrics.rcode("NOTIMP");
            return send(
                &mut response_handle,
                builder.error_msg(&request.metadata, ResponseCode::NotImp),
            )
            .await;
        }
        if parsed.qdcount != 1 {
            self.metrics.rcode("FORMERR");
            return send(
                &mut response_handle,
                builder.error_msg(&request.metadata, ResponseCode::FormErr),
            )
            .await;
        }
        if let Some(edns) = &parsed.edns
            && edns.version > 0
        {
            // RFC 6891 §6.1.3: BADVERS with our highest version (0).
            self.metrics.rcode("BADVERS");
            let e = response_edns(edns, None);
            let mut b = builder;
            b.edns(&e);
            let mut m = meta;
            m.response_code = ResponseCode::BADVERS;
            return send(&mut response_handle, b.build_no_records(m)).await;
        }
        let Some(query) = request.queries.queries().first() else {
            self.metrics.rcode("FORMERR");
            return send(
                &mut response_handle,
                builder.error_msg(&request.metadata, ResponseCode::FormErr),
            )
            .await;
        };
        let qname_lower: &LowerName = query.name();
        let qname_lower = Name::from(qname_lower.clone());
        let owner = original_qname(raw).unwrap_or_else(|| qname_lower.clone());
        let qtype = query.query_type();

        // Only class IN is served (RFC 1035 §3.2.4): CH, NONE and ANY are
        // refused like a name outside our zones, with the question, class
        // included, echoed. The fast path only ever takes IN.
        let zone = (query.query_class() == DNSClass::IN)
            .then(|| {
                rt.zones
                    .iter()
                    .filter(|z| z.apex.zone_of(&qname_lower))
                    .max_by_key(|z| z.apex.num_labels())
            })
            .flatten();
        let Some(zone) = zone else {
            self.metrics.rcode("REFUSED");
            let mut m = meta;
            m.response_code = ResponseCode::Refused;
            let e = parsed.edns.as_ref().map(|x| response_edns(x, None));
            let mut b = builder;
            if let Some(e) = &e {
                b.edns(e);
            }
            return send(&mut response_handle, b.build_no_records(m)).await;
        };
        meta.authoritative = true;

        let ecs = parsed.edns.as_ref().and_then(|e| e.ecs);
        let mut answers: Vec<Record> = Vec::new();
        let mut authority: Vec<Record> = Vec::new();
        let mut scope = 0u8;
        let mut rcode = ResponseCode::NoError;
        let is_dynamic = zone.dynamic.contains(&qname_lower);
        let statics = zone.records.get(&qname_lower);
        if is_dynamic {
            let family = match qtype {
                RecordType::A | RecordType::ANY => Some(Family::V4),
                RecordType::AAAA => Some(Family::V6),
                _ => None,
            };
            if let Some(family) = family {
                let views = self.tracker.views.load();
                let q = Question {
                    family,
                    ecs,
                    src: request.src().ip(),
                };
                let mut picks = Vec::new();
                let plan = answer::plan(
                    &rt,
                    &self.geo,
                    &views,
                    q,
                    std::time::Instant::now(),
                    self.random(),
                    &mut picks,
                );
                let country = plan.client.country();
                self.metrics.country(country);
                scope = plan.scope;
                match plan.kind {
                    Kind::Mirrors { .. } => {
                        if let Some(&first) = picks.first() {
                            self.metrics.steered(country, &views[first].id);
                        }
                        for &i in &picks {
                            if let Some(ip) = views[i].addr(family) {
                                self.metrics.answer(&views[i].id);
                                answers.push(addr_record(&owner, plan.ttl, ip));
                            }
                        }
                    }
                    Kind::Fallback => {
                        self.metrics.answer("fallback");
                        self.metrics.steered(country, "fallback");
                        for ip in answer::fallback(&rt, family) {
                            answers.push(addr_record(&owner, plan.ttl, ip));
                        }
                    }
                    Kind::Nothing => {}
                }
            }
        } else if let Some(recs) = statics {
            if let Some(cname) = recs.iter().find(|r| r.record_type() == RecordType::CNAME) {
                answers.push(with_owner(cname, &owner));
            } else if qtype == RecordType::ANY {
                // RFC 8482: one RRset is enough.
                if let Some(first) = recs.first() {
                    let t = first.record_type();
                    answers.extend(
                        recs.iter()
                            .filter(|r| r.record_type() == t)
                            .map(|r| with_owner(r, &owner)),
                    );
                }
            } else if qtype == RecordType::SOA && qname_lower == zone.apex {
                answers.push(with_owner(&zone.soa, &owner));
            } else {
                answers.extend(
                    recs.iter()
                        .filter(|r| r.record_type() == qtype)
                        .map(|r| with_owner(r, &owner)),
                );
            }
        } else if qname_lower == zone.apex {
            if qtype == RecordType::SOA || qtype == RecordType::ANY {
                answers.push(with_owner(&zone.soa, &owner));
            }
        } else if !zone.ents.contains(&qname_lower) {
            rcode = ResponseCode::NXDomain;
        }
        if qname_lower == zone.apex && qtype == RecordType::SOA && answers.is_empty() {
            answers.push(with_owner(&zone.soa, &owner));
        }
        if answers.is_empty() {
            authority.push(zone.soa.clone());
        }
        meta.response_code = rcode;
        self.metrics.rcode(if rcode == ResponseCode::NXDomain {
            "NXDOMAIN"
        } else {
            "NOERROR"
        });

        let ecs_back = ecs.map(|e| ClientSubnet::new(e.addr, e.source, scope));
        let edns = parsed.edns.as_ref().map(|x| response_edns(x, ecs_back));
        let mut b = builder;
        if let Some(e) = &edns {
            b.edns(e);
        }
        let resp = b.build(
            meta,
            answers.iter(),
            std::iter::empty(),
            authority.iter(),
            std::iter::empty(),
        );
        send(&mut response_handle, resp).await
    }
}

fn addr_record(owner: &Name, ttl: u32, ip: IpAddr) -> Record {
    let rd = match ip {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    };
    Record::from_rdata(owner.clone(), ttl, rd)
}

fn with_owner(r: &Record, owner: &Name) -> Record {
    let mut r = r.clone();
    r.name = owner.clone();
    r
}

async fn send<'a, R: ResponseHandler>(
    h: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    match h.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "could not send response");
            let mut m = Metadata::new(0, MessageType::Response, OpCode::Query);
            m.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata: m,
                counts: Default::default(),
            }
            .into()
        }
    }
}

/// Takes a hickory-built response, encoded: for UDP within the client's
/// EDNS payload size (512 bytes at least; hickory truncates past it), for
/// TCP within a 64 KiB message. The caller sends it.
#[derive(Clone)]
pub(crate) struct Collected {
    /// Most bytes, or 0 for the client's UDP payload size.
    max: u16,
    out: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Collected {
    pub(crate) fn udp() -> Self {
        Self::new(0)
    }
    pub(crate) fn new(max: u16) -> Self {
        Collected {
            max,
            out: Arc::default(),
        }
    }
    /// The encoded response, if one was sent.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        self.out.lock().ok()?.take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Collected {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let max = match self.max {
            0 => response
                .edns()
                .map(|e| e.max_payload())
                .unwrap_or(512)
                .max(512),
            m => m,
        };
        let mut buf = Vec::with_capacity(512);
        let mut enc = hickory_proto::serialize::binary::BinEncoder::new(&mut buf);
        enc.set_max_size(max);
        let info = response
            .destructive_emit(&mut enc)
            .map_err(hickory_server::net::NetError::from)?;
        if let Ok(mut o) = self.out.lock() {
            *o = Some(buf);
        }
        Ok(info)
    }
}
