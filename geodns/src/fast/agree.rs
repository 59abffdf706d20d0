//! The property test that the UDP hot path and the hickory handler give the
//! same answer to the same question.

use super::*;
use crate::geoip::{GeoDb, GeoHandle, GeoSet};
use crate::health::Tracker;
use crate::metrics::DnsMetrics;
use crate::mmdb::{Writer, geoip2_city};
use crate::select::{Health, MirrorView};
use hickory_proto::op::Message;
use hickory_proto::rr::rdata::opt::EdnsOption;
use std::time::{Duration, Instant};

/// A deterministic stream of test choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        answer::splitmix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

fn geo(dir: &std::path::Path) -> Arc<GeoSet> {
    let mut w = Writer::new("GeoLite2-City");
    for (net, len, lat, lon, cc, cont) in [
        ("81.2.69.0", 24, 51.5, -0.1, "GB", "EU"),
        ("93.184.0.0", 16, 48.8, 2.3, "FR", "EU"),
        ("36.68.0.0", 16, -6.2, 106.8, "ID", "AS"),
        ("2001:db8::", 32, 39.0, -77.5, "US", "NA"),
    ] {
        w.insert(
            net.parse().expect("net"),
            len,
            &geoip2_city(lat, lon, cc, cont, "city"),
        );
    }
    let p = dir.join("geo.mmdb");
    std::fs::write(&p, w.build()).expect("write mmdb");
    Arc::new(GeoSet {
        main: GeoHandle::new(Some(GeoDb::open(&p).expect("open mmdb"))),
        v6: GeoHandle::new(None),
    })
}

fn runtime(fallback: bool, default_location: bool) -> Runtime {
    let text = format!(
        r#"
listen = ["127.0.0.1:0"]
[selection]
answers = 2
ttl = "30s"
ttl_changing = "5s"
fallback = {fallback}
{default}
[[zones]]
name = "example.org"
dynamic = ["dl"]
ns = ["ns1.example.org."]
soa = {{ rname = "hostmaster", serial = 1, refresh = 3600, retry = 600, expire = 604800, minimum = 60 }}
[[mirrors]]
id = "eu"
region = "eu-west"
latitude = 51.5
longitude = -0.1
ipv4 = ["192.0.2.10"]
status_url = "http://192.0.2.10/"
[[overrides]]
network = "203.0.113.0/24"
region = "eu-west"
[[overrides]]
network = "2001:db8:ff::/48"
latitude = -6.2
longitude = 106.8
"#,
        fallback = if fallback {
            r#"["198.51.100.99", "2001:db8:99::1"]"#
        } else {
            "[]"
        },
        default = if default_location {
            "default_location = [50.1, 8.7]"
        } else {
            ""
        },
    );
    let cfg: crate::config::GeoDnsConfig = toml::from_str(&text).expect("config");
    cfg.validate().expect("valid");
    crate::build_runtime(&cfg).expect("runtime")
}

fn views(rng: &mut Rng, now: Instant) -> Views {
    let mirrors = [
        ("eu", 51.5, -0.1, true, true, ""),
        ("eu2", 48.8, 2.3, true, false, ""),
        ("ap", -6.2, 106.8, true, true, ""),
        ("us", 39.0, -77.5, false, true, "US"),
        ("us2", 40.7, -74.0, true, true, ""),
    ];
    let mut out = Vec::new();
    for (k, (id, lat, lon, v4, v6, only)) in mirrors.into_iter().enumerate() {
        let k = k as u8;
        let changed_at = match rng.below(3) {
            0 => None,
            1 => now.checked_sub(Duration::from_secs(1)),
            _ => now.checked_sub(Duration::from_secs(600)),
        };
        out.push(MirrorView {
            id: id.into(),
            region: id.into(),
            lat,
            lon,
            v4: if v4 {
                vec![std::net::Ipv4Addr::new(192, 0, 2, 10 + k)]
            } else {
                Vec::new()
            },
            v6: if v6 {
                vec![std::net::Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0x10 + u16::from(k),
                )]
            } else {
                Vec::new()
            },
            weight: [0.5, 1.0, 2.0][rng.below(3) as usize],
            countries: if only.is_empty() || rng.chance(50) {
                Vec::new()
            } else {
                vec![only.into()]
            },
            continents: Vec::new(),
            health: Health {
                up: rng.chance(80),
                answering: rng.chance(85),
                current: rng.chance(85),
                draining: rng.chance(10),
                forced_down: rng.chance(5),
                load: rng.below(120) as f64 / 100.0,
                changed_at,
            },
            generation: 1,
        });
    }
    Views::new(out)
}

/// A query as a stub resolver or a recursive resolver sends it.
fn query(rng: &mut Rng, qtype: u16, ecs: Option<(IpAddr, u8)>, edns: Option<u16>) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(rng.next() as u16).to_be_bytes());
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
    for label in ["dl", "example", "org"] {
        p.push(label.len() as u8);
        for b in label.bytes() {
            p.push(if rng.chance(30) {
                b.to_ascii_uppercase()
            } else {
                b
            });
        }
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if let Some(payload) = edns {
        p.extend_from_slice(&[0, 0, 41]);
        p.extend_from_slice(&payload.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0]);
        match ecs {
            Some((addr, source)) => {
                let (fam, bytes): (u16, Vec<u8>) = match addr {
                    IpAddr::V4(a) => (1, a.octets().to_vec()),
                    IpAddr::V6(a) => (2, a.octets().to_vec()),
                };
                let alen = usize::from(source).div_ceil(8);
                // Bits past the source prefix must be zero (RFC 7871 §6).
                let mut addr = bytes[..alen].to_vec();
                if source % 8 != 0
                    && let Some(last) = addr.last_mut()
                {
                    *last &= 0xFFu8 << (8 - source % 8);
                }
                let olen = 4 + alen;
                p.extend_from_slice(&((4 + olen) as u16).to_be_bytes());
                p.extend_from_slice(&[0, 8]);
                p.extend_from_slice(&(olen as u16).to_be_bytes());
                p.extend_from_slice(&fam.to_be_bytes());
                p.push(source);
                p.push(0);
                p.extend_from_slice(&addr);
            }
            None => p.extend_from_slice(&[0, 0]),
        }
    }
    p
}

/// What a client sees of a response: header bits, the answers in order
/// (owner as sent, type, TTL, address), and the OPT record's payload size
/// and options (the ECS scope among them).
fn seen(bytes: &[u8]) -> String {
    let m = Message::from_vec(bytes).expect("a response that parses");
    let answers: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {} {} {}", r.name, r.record_type(), r.ttl, r.data))
        .collect();
    let edns = m.edns.as_ref().map(|e| {
        let opts: Vec<String> = e
            .options()
            .as_ref()
            .iter()
            .map(|(_, o)| match o {
                EdnsOption::Subnet(s) => format!("{s:?}"),
                o => format!("{o:?}"),
            })
            .collect();
        format!("payload {} {opts:?}", e.max_payload())
    });
    format!(
        "id {} rcode {:?} aa {} tc {} rd {} answers {answers:?} authority {} edns {edns:?}",
        m.metadata.id,
        m.metadata.response_code,
        m.metadata.authoritative,
        m.metadata.truncation,
        m.metadata.recursion_desired,
        m.authorities.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn both_paths_give_the_same_answer_to_every_question() {
    let dir = tempfile::tempdir().expect("tempdir");
    let geo = geo(dir.path());
    let runtimes: Vec<Arc<Runtime>> = [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .map(|(f, d)| Arc::new(runtime(f, d)))
        .collect();
    let tracker = Arc::new(Tracker::new());
    let handler = Arc::new(GeoHandler::new(
        Arc::new(arc_swap::ArcSwap::new(runtimes[0].clone())),
        geo,
        tracker.clone(),
        DnsMetrics::new(),
    ));
    let sources: Vec<IpAddr> = [
        "81.2.69.142",
        "93.184.216.34",
        "36.68.1.1",
        "203.0.113.7",
        "8.8.8.8",
        "2001:db8::1",
        "2001:db8:ff::5",
        "2606:4700::1111",
    ]
    .iter()
    .map(|s| s.parse().expect("ip"))
    .collect();
    let mut rng = Rng(0x5EED);
    let (mut hot_taken, mut cases) = (0u32, 0u32);
    let mut scopes = std::collections::BTreeSet::new();
    let mut ttls = std::collections::BTreeSet::new();
    for _ in 0..3000 {
        let rt = rng.pick(&runtimes).clone();
        handler.runtime.store(rt.clone());
        let now = Instant::now();
        tracker.views.store(Arc::new(views(&mut rng, now)));
        let src = SocketAddr::new(*rng.pick(&sources), 5353);
        let edns = [None, Some(512), Some(1232), Some(4096)][rng.below(4) as usize];
        let ecs = match rng.below(5) {
            _ if edns.is_none() => None,
            0 => None,
            1 => Some((*rng.pick(&sources), 0)),
            2 => Some(("81.2.69.0".parse().expect("ip"), 24)),
            3 => {
                let a = *rng.pick(&sources);
                Some((a, if a.is_ipv4() { 32 } else { 56 }))
            }
            _ => {
                let a = *rng.pick(&sources);
                Some((a, if a.is_ipv4() { 20 } else { 40 }))
            }
        };
        let qtype = if rng.chance(50) { 1 } else { 28 };
        let pkt = query(&mut rng, qtype, ecs, edns);
        let seed = rng.next();
        cases += 1;

        let views = tracker.views.load_full();
        let snap = Snapshot {
            handler: &handler,
            rt: &rt,
            views: &views,
            now,
        };
        let mut hot = Hot {
            picks: Vec::new(),
            rng: seed,
            tally: Tally::new(&handler.metrics),
        };
        let mut out = Vec::new();
        let taken = hot_answer(&snap, &mut hot, &pkt, src, &mut out);

        handler.set_seed(seed.wrapping_add(0x9E37_79B9_7F4A_7C15));
        let req = Request::from_bytes(pkt.clone(), src, Protocol::Udp).expect("request");
        let collected = Collected::udp();
        handler
            .handle_request::<_, TokioTime>(&req, collected.clone())
            .await;
        let general = collected.take().expect("the general path answers");
        if taken {
            hot_taken += 1;
            let m = Message::from_vec(&general).expect("parses");
            if let Some(s) = m.edns.as_ref().and_then(|e| {
                e.options().as_ref().iter().find_map(|(_, o)| match o {
                    EdnsOption::Subnet(s) => Some(format!("{s:?}")),
                    _ => None,
                })
            }) {
                scopes.insert(s.rsplit_once("scope_prefix").map(|(_, r)| r.to_owned()));
            }
            ttls.extend(m.answers.iter().map(|r| r.ttl));
            assert_eq!(
                seen(&out),
                seen(&general),
                "the two paths differ for a query from {src} with ECS {ecs:?}, EDNS {edns:?}, \
                 type {qtype}, seed {seed}"
            );
        }
    }
    // The comparison is not vacuous: most questions took the hot path, and
    // the answers compared covered both TTLs and several ECS scopes.
    assert!(
        hot_taken * 2 > cases,
        "only {hot_taken} of {cases} questions took the hot path"
    );
    assert!(
        ttls.contains(&30) && ttls.contains(&5),
        "TTLs seen: {ttls:?}"
    );
    assert!(scopes.len() >= 3, "ECS scopes seen: {scopes:?}");
}
