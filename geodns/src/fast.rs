//! The UDP front end: one socket, read by one thread per core, each with
//! its own loop with no task per packet and no allocation for the hot
//! query (A or AAAA for a mirror name): that answer is written straight
//! into a reused buffer. Every other query goes to the same hickory
//! [`RequestHandler`](hickory_server::server::RequestHandler) the TCP
//! listener uses, through [`hickory_server::server::Request::from_bytes`].
//!
//! The hot path only parses and encodes: what an answer says (mirrors,
//! TTL, ECS scope) is [`crate::answer::plan`]'s, the same call the general
//! handler makes, and EDNS/ECS are read by the same `wire::read`. Anything
//! unusual (EDNS version > 0, a fallback or empty answer, an answer that
//! would not fit) goes to the general handler.

use crate::answer::{self, Kind, Question, Runtime};
use crate::dns::{Collected, GeoHandler, MAX_UDP_PAYLOAD};
use crate::health::Views;
use crate::select::Family;
use crate::wire;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Opens the UDP socket for `addr` (port 0 picks a free port). It is
/// blocking, with a short read timeout so the serving loops notice shutdown.
pub(crate) fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use rustix::net::{AddressFamily, SocketType, bind, socket, sockopt};
    let fam = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = socket(fam, SocketType::DGRAM, None)?;
    // Path MTU: ignore ICMP "fragmentation needed" updates and never set DF
    // (IP_PMTUDISC_OMIT, as RFC 9715 advises DNS responders on Linux): a
    // spoofed ICMP cannot shrink our answers into fragments, and the kernel
    // skips path-MTU bookkeeping per packet. DONT where OMIT is unknown.
    if addr.is_ipv6() {
        sockopt::set_ipv6_v6only(&fd, true)?;
        use sockopt::Ipv6PathMtuDiscovery as D;
        sockopt::set_ipv6_mtu_discover(&fd, D::OMIT)
            .or_else(|_| sockopt::set_ipv6_mtu_discover(&fd, D::DONT))?;
    } else {
        use sockopt::Ipv4PathMtuDiscovery as D;
        sockopt::set_ip_mtu_discover(&fd, D::OMIT)
            .or_else(|_| sockopt::set_ip_mtu_discover(&fd, D::DONT))?;
    }
    // Siblings (one socket per serving thread) join the same port; see
    // `steer_by_cpu`.
    sockopt::set_socket_reuseport(&fd, true)?;
    bind(&fd, &addr)?;
    let sock = std::net::UdpSocket::from(fd);
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    Ok(sock)
}

/// Attaches a classic BPF program to `sock`'s `SO_REUSEPORT` group that
/// hands each datagram to socket `cpu % sockets`, the CPU being the one the
/// datagram arrived on. With one socket and one thread per CPU, each thread
/// reads its own queue (no lock or wake-up shared with another thread) and
/// the load follows the CPUs, however few client flows there are (the
/// default flow hash can put them all on one socket).
pub(crate) fn steer_by_cpu(sock: &std::net::UdpSocket, sockets: usize) -> std::io::Result<()> {
    use nix::libc;
    let ins = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut prog = [
        // A = the current CPU
        ins(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_CPU) as u32,
        ),
        // A %= sockets
        ins(
            libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K,
            sockets.max(1) as u32,
        ),
        // return A (the socket's index in the group, in bind order)
        ins(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::AttachReusePortCbpf, &fprog)
        .map_err(std::io::Error::from)
}

/// Serves one socket on the calling (dedicated) thread until `stop` is set.
/// Datagrams are received in batches with `recvmmsg` (waiting for at least
/// one) and hot answers go back in one `sendmmsg`: one system call each way
/// for up to [`BATCH`] queries. Everything else runs through the async
/// handler on the runtime (`rt`), one query at a time.
pub(crate) fn serve(
    sock: Arc<std::net::UdpSocket>,
    handler: Arc<GeoHandler>,
    rt: tokio::runtime::Handle,
    stop: meridian_serve::shutdown::Stopping,
) {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut bufs: Vec<[u8; 4096]> = vec![[0u8; 4096]; BATCH];
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut rhdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut shdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut replies: Vec<(usize, SockaddrStorage)> = Vec::with_capacity(BATCH);
    let mut addrs: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut hot = Hot {
        picks: Vec::with_capacity(8),
        rng: handler.random(),
        tally: Tally::new(&handler.metrics),
    };
    while !stop.is_set() {
        got.clear();
        {
            // On the stack: no allocation per batch.
            let mut it = bufs.iter_mut();
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                [IoSliceMut::new(
                    it.next().map_or(&mut [][..], |b| &mut b[..]),
                )]
            });
            match recvmmsg(
                fd,
                &mut rhdrs,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    for r in results {
                        got.push((r.bytes, r.address.and_then(|a| to_socket_addr(&a))));
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                    // Idle (the read timed out): hand in what is tallied.
                    hot.tally.flush(&handler.metrics);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "udp recvmmsg");
                    continue;
                }
            }
        }
        replies.clear();
        // One snapshot of config and mirror states per batch.
        let conf = handler.runtime.load();
        let views = handler.tracker.views.load();
        let now = std::time::Instant::now();
        hot.tally.begin(&handler.metrics, &views);
        let snap = Snapshot {
            handler: &handler,
            rt: &conf,
            views: &views,
            now,
        };
        for (i, &(n, src)) in got.iter().enumerate() {
            let Some(src) = src else { continue };
            let pkt = &bufs[i][..n];
            if n < 12 || pkt[2] & 0x80 != 0 {
                continue; // too short for a header, or a response: drop
            }
            let out = &mut outs[i];
            out.clear();
            if hot_answer(&snap, &mut hot, pkt, src, out) {
                replies.push((i, SockaddrStorage::from(src)));
                continue;
            }
            general(&sock, &handler, &rt, pkt, src);
        }
        hot.tally.maybe_flush(&handler.metrics, now);
        if replies.is_empty() {
            continue;
        }
        let slices: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|k| {
            [IoSlice::new(
                replies.get(k).map_or(&[][..], |(i, _)| &outs[*i][..]),
            )]
        });
        addrs.clear();
        addrs.extend(replies.iter().map(|(_, a)| Some(*a)));
        let slices = &slices[..replies.len()];
        match sendmmsg(fd, &mut shdrs, slices.iter(), &addrs, [], MsgFlags::empty()) {
            Ok(_) => {
                // Each answer waited for the whole batch: one time for all.
                let took = now.elapsed().as_secs_f64();
                for _ in 0..replies.len() {
                    hot.tally.latency.observe(took);
                }
            }
            Err(e) => tracing::debug!(error = %e, "udp sendmmsg"),
        }
    }
}

/// Queries per `recvmmsg`/`sendmmsg` call.
pub(crate) const BATCH: usize = 32;

fn to_socket_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// The general path for one datagram: hickory's decoder and our handler.
fn general(
    sock: &Arc<std::net::UdpSocket>,
    handler: &Arc<GeoHandler>,
    rt: &tokio::runtime::Handle,
    pkt: &[u8],
    src: SocketAddr,
) {
    let t0 = std::time::Instant::now();
    match Request::from_bytes(pkt.to_vec(), src, Protocol::Udp) {
        Ok(req) => {
            if req.metadata.message_type == hickory_server::proto::op::MessageType::Response {
                return;
            }
            let out = Collected::udp();
            let _ = rt.block_on(handler.handle_request::<_, TokioTime>(&req, out.clone()));
            if let Some(b) = out.take() {
                let _ = sock.send_to(&b, src);
                handler.metrics.answered("udp", t0.elapsed());
            }
        }
        Err(_) => {
            handler.metrics.rcode("FORMERR");
            let _ = sock.send_to(&wire::formerr_reply(pkt), src);
        }
    }
}

/// What one serving loop keeps between queries: the picks buffer, its own
/// random stream (no shared counter to bounce between cores), the metrics
/// tally of the current batch.
struct Hot {
    picks: Vec<usize>,
    rng: u64,
    tally: Tally,
}

impl Hot {
    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::answer::splitmix(self.rng)
    }
}

/// Counts kept by one serving loop and added to the shared Prometheus
/// counters every [`FLUSH_EVERY`] or [`FLUSH_AFTER`] queries, and when the
/// socket goes idle (shared atomics bounced between cores on every query).
struct Tally {
    noerror: u64,
    /// The mirror views `answers` and each country's `by_mirror` are
    /// indexed by.
    views: Option<Arc<crate::health::Views>>,
    /// Addresses handed out, by index into `views`.
    answers: Vec<u64>,
    last_flush: Option<std::time::Instant>,
    /// Country label -> index into `countries`.
    country_index: rustc_hash::FxHashMap<Box<str>, usize>,
    countries: Vec<CountryTally>,
    dirty: Vec<usize>,
    /// Answer times (`meridian_geodns_answer_seconds{transport="udp"}`).
    latency: prometheus::local::LocalHistogram,
}

/// One client country's counts in a [`Tally`].
struct CountryTally {
    label: Box<str>,
    queries: prometheus::IntCounter,
    n: u64,
    /// Queries from this country answered with a mirror first, by its
    /// index into the views, with the steering counter once resolved.
    by_mirror: Vec<(Option<prometheus::IntCounter>, u64)>,
}

/// Longest a count waits in a loop's tally under load.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Most queries a tally holds.
const FLUSH_AFTER: u64 = 1024;
/// Most distinct countries a loop tallies itself (labels gone wild are
/// counted through the shared path instead).
const MAX_COUNTRIES: usize = 4096;

impl Tally {
    fn new(m: &crate::metrics::DnsMetrics) -> Self {
        Tally {
            noerror: 0,
            views: None,
            answers: Vec::new(),
            last_flush: None,
            country_index: rustc_hash::FxHashMap::default(),
            countries: Vec::new(),
            dirty: Vec::new(),
            latency: m.local_udp_latency(),
        }
    }
    /// Before a batch: the tally follows the batch's mirror views (a new
    /// snapshot, at most once a probe round, first flushes the old one's).
    fn begin(&mut self, m: &crate::metrics::DnsMetrics, views: &Arc<crate::health::Views>) {
        if self.views.as_ref().is_some_and(|v| Arc::ptr_eq(v, views)) {
            return;
        }
        self.flush(m);
        self.views = Some(views.clone());
        self.answers.clear();
        self.answers.resize(views.len(), 0);
        for c in &mut self.countries {
            // Indexes now name other mirrors: resolve the counters again.
            c.by_mirror.clear();
            c.by_mirror.resize(views.len(), (None, 0));
        }
    }
    fn maybe_flush(&mut self, m: &crate::metrics::DnsMetrics, now: std::time::Instant) {
        let due = self
            .last_flush
            .is_none_or(|t| now.saturating_duration_since(t) >= FLUSH_EVERY);
        if due || self.noerror >= FLUSH_AFTER {
            self.flush(m);
            self.last_flush = Some(now);
        }
    }
    /// Counts one query from country `c` that got `picks` (indexes into the
    /// views).
    fn answered(&mut self, m: &crate::metrics::DnsMetrics, c: &str, picks: &[usize]) {
        self.noerror += 1;
        let i = match self.country_index.get(c) {
            Some(&i) => i,
            None if self.countries.len() >= MAX_COUNTRIES => {
                // Labels gone wild: no local tally.
                m.country(c);
                if let Some(views) = &self.views {
                    for &p in picks {
                        m.answer(&views[p].id);
                    }
                    if let Some(&first) = picks.first() {
                        m.steered(c, &views[first].id);
                    }
                }
                return;
            }
            None => {
                self.countries.push(CountryTally {
                    label: c.into(),
                    queries: m.country_counter(c),
                    n: 0,
                    by_mirror: vec![(None, 0); self.answers.len()],
                });
                self.country_index
                    .insert(c.into(), self.countries.len() - 1);
                self.countries.len() - 1
            }
        };
        let country = &mut self.countries[i];
        if country.n == 0 {
            self.dirty.push(i);
        }
        country.n += 1;
        for &p in picks {
            if let Some(a) = self.answers.get_mut(p) {
                *a += 1;
            }
        }
        // Steering counts where the client was sent: the first address.
        if let Some(b) = picks.first().and_then(|&p| country.by_mirror.get_mut(p)) {
            b.1 += 1;
        }
    }
    fn flush(&mut self, m: &crate::metrics::DnsMetrics) {
        m.noerror_by(std::mem::take(&mut self.noerror));
        if let Some(views) = &self.views {
            for (v, n) in views.iter().zip(&mut self.answers) {
                if *n > 0 {
                    m.answer_by(&v.id, std::mem::take(n));
                }
            }
            for i in self.dirty.drain(..) {
                let c = &mut self.countries[i];
                c.queries.inc_by(std::mem::take(&mut c.n));
                for (v, (counter, n)) in views.iter().zip(&mut c.by_mirror) {
                    if *n > 0 {
                        counter
                            .get_or_insert_with(|| m.steering_counter(&c.label, &v.id))
                            .inc_by(std::mem::take(n));
                    }
                }
            }
        }
        self.dirty.clear();
        self.latency.flush();
    }
}

/// What one batch of datagrams is answered from: the handler, and one
/// snapshot of the config, the mirror states and the clock.
struct Snapshot<'a> {
    handler: &'a GeoHandler,
    rt: &'a Runtime,
    views: &'a Views,
    now: std::time::Instant,
}

/// A question the hot path takes: a standard query with one question, A or
/// AAAA in class IN, for a mirror name.
struct HotQuestion {
    /// Where the question's name ends in the packet.
    qname_end: usize,
    qtype: u16,
    family: Family,
}

/// Reads the question of `pkt` if the hot path takes it.
fn hot_question(pkt: &[u8], hot_names: &[Vec<u8>]) -> Option<HotQuestion> {
    // Header: standard query, one question, no answers/authority.
    let flags = u16::from_be_bytes([pkt[2], pkt[3]]);
    if flags & 0x7800 != 0 || pkt[4..8] != [0, 1, 0, 0] || pkt[8..10] != [0, 0] {
        return None;
    }
    // Question name, lower-cased into a stack buffer.
    let mut lower = [0u8; 255];
    let mut i = 12;
    let mut l = 0;
    loop {
        let len = *pkt.get(i)?;
        if len & 0xC0 != 0 || l + 1 + usize::from(len) > lower.len() {
            return None;
        }
        lower[l] = len;
        let label = pkt.get(i + 1..i + 1 + usize::from(len))?;
        for (k, b) in label.iter().enumerate() {
            lower[l + 1 + k] = b.to_ascii_lowercase();
        }
        l += 1 + usize::from(len);
        i += 1 + usize::from(len);
        if len == 0 {
            break;
        }
    }
    let q = pkt.get(i..i + 4)?;
    let qtype = u16::from_be_bytes([q[0], q[1]]);
    let family = match (qtype, u16::from_be_bytes([q[2], q[3]])) {
        (1, 1) => Family::V4,
        (28, 1) => Family::V6,
        _ => return None,
    };
    hot_names
        .iter()
        .any(|n| n.as_slice() == &lower[..l])
        .then_some(HotQuestion {
            qname_end: i,
            qtype,
            family,
        })
}

/// Writes the answer to a hot query into `out`; false means "not hot, use
/// the general path" (and `out` is then meaningless). What the answer says
/// is [`answer::plan`]'s; this only encodes it.
fn hot_answer(
    snap: &Snapshot<'_>,
    hot: &mut Hot,
    pkt: &[u8],
    src: SocketAddr,
    out: &mut Vec<u8>,
) -> bool {
    let Some(HotQuestion {
        qname_end,
        qtype,
        family,
    }) = hot_question(pkt, &snap.rt.hot_names)
    else {
        return false;
    };
    let Ok(parsed) = wire::read(pkt) else {
        return false;
    };
    if parsed.edns.as_ref().is_some_and(|e| e.version > 0) {
        return false;
    }
    let ecs = parsed.edns.as_ref().and_then(|e| e.ecs);
    let q = Question {
        family,
        ecs,
        src: src.ip(),
    };
    let random = hot.random();
    let plan = answer::plan(
        snap.rt,
        &snap.handler.geo,
        snap.views,
        q,
        snap.now,
        random,
        &mut hot.picks,
    );
    // Fallback and empty answers are rare: the general path encodes them.
    if !matches!(plan.kind, Kind::Mirrors { .. }) || hot.picks.is_empty() {
        return false;
    }
    let picks = &hot.picks;
    let views = snap.views;

    // Header.
    out.extend_from_slice(&pkt[..2]);
    out.push(0x84 | (pkt[2] & 0x01)); // QR, AA, RD copied
    out.push(0x00);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(picks.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&[0, u8::from(parsed.edns.is_some())]);
    // Question, exactly as asked (case echoed).
    out.extend_from_slice(&pkt[12..qname_end + 4]);
    // Answers: a pointer to the question name.
    for &p in picks {
        let Some(ip) = views[p].addr(family) else {
            return false;
        };
        out.extend_from_slice(&[0xC0, 12]);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&plan.ttl.to_be_bytes());
        match ip {
            IpAddr::V4(a) => {
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.extend_from_slice(&[0, 16]);
                out.extend_from_slice(&a.octets());
            }
        }
    }
    // OPT, echoing ECS with the plan's scope.
    if let Some(e) = &parsed.edns {
        let payload = e.payload.clamp(512, MAX_UDP_PAYLOAD);
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        match ecs {
            Some(c) => {
                let mut bytes = [0u8; 16];
                let fam: u16 = match c.addr {
                    IpAddr::V4(a) => {
                        bytes[..4].copy_from_slice(&a.octets());
                        1
                    }
                    IpAddr::V6(a) => {
                        bytes.copy_from_slice(&a.octets());
                        2
                    }
                };
                let alen = usize::from(c.source).div_ceil(8);
                let olen = 4 + alen;
                out.extend_from_slice(&((4 + olen) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 8]);
                out.extend_from_slice(&(olen as u16).to_be_bytes());
                out.extend_from_slice(&fam.to_be_bytes());
                out.push(c.source);
                out.push(plan.scope);
                out.extend_from_slice(&bytes[..alen]);
            }
            None => out.extend_from_slice(&[0, 0]),
        }
    }
    let limit = parsed
        .edns
        .as_ref()
        .map(|e| usize::from(e.payload.clamp(512, MAX_UDP_PAYLOAD)))
        .unwrap_or(512);
    if out.len() > limit {
        return false; // let the general path truncate properly
    }
    hot.tally
        .answered(&snap.handler.metrics, plan.client.country(), picks);
    true
}

#[cfg(test)]
mod agree;

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop's tally reaches the shared counters at a flush: queries by
    /// country, addresses by mirror, queries by country → first mirror, and
    /// answer times; a new views snapshot (other indexes) keeps the counts
    /// apart.
    #[test]
    fn the_tally_flushes_steering_by_country_and_mirror() {
        let m = crate::metrics::DnsMetrics::new();
        let (mut cfg, tracker) = crate::config::tests::two_mirrors();
        let views = tracker.views.load_full();
        let mut t = Tally::new(&m);
        t.begin(&m, &views);
        t.answered(&m, "GB", &[0]);
        t.answered(&m, "GB", &[0, 1]);
        t.answered(&m, "US", &[1]);
        t.latency.observe(0.00002);
        assert_eq!(
            m.steering_counter("GB", "eu-west").get(),
            0,
            "not before a flush"
        );
        t.flush(&m);
        assert_eq!(m.steering_counter("GB", "eu-west").get(), 2);
        assert_eq!(m.steering_counter("GB", "us-east").get(), 0, "second");
        assert_eq!(m.steering_counter("US", "us-east").get(), 1);
        assert_eq!(m.steering_counter("US", "eu-west").get(), 0);
        assert_eq!(m.country_counter("GB").get(), 2);
        // The mirrors swap places in a new snapshot.
        cfg.mirrors.swap(0, 1);
        tracker.refresh_views(&cfg);
        t.begin(&m, &tracker.views.load_full());
        t.answered(&m, "GB", &[0]);
        t.flush(&m);
        assert_eq!(m.steering_counter("GB", "us-east").get(), 1);
        assert_eq!(m.steering_counter("GB", "eu-west").get(), 2);
        let text = m.render();
        assert!(
            text.contains(r#"meridian_geodns_answer_seconds_count{transport="udp"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_geodns_answers_total{mirror="eu-west"} 2"#),
            "{text}"
        );
    }

    /// Datagrams sent from a thread pinned to CPU c arrive at socket c of
    /// the group (c < sockets), and none is lost.
    #[test]
    fn datagrams_go_to_the_socket_of_the_cpu_they_arrive_on() {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(4);
        let first = bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("addr");
        steer_by_cpu(&first, cpus).expect("attach the steering program");
        let mut socks = vec![first];
        for _ in 1..cpus {
            socks.push(bind_udp(addr).expect("bind a sibling"));
        }
        for s in &socks {
            s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .expect("timeout");
        }
        for cpu in 0..cpus {
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    let mut set = rustix::thread::CpuSet::new();
                    set.set(cpu);
                    rustix::thread::sched_setaffinity(None, &set).expect("pin");
                    let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
                    for i in 0..20u8 {
                        tx.send_to(&[cpu as u8, i], addr).expect("send");
                    }
                });
            });
            let mut buf = [0u8; 16];
            for (k, s) in socks.iter().enumerate() {
                let mut got = 0;
                while let Ok(n) = s.recv(&mut buf) {
                    assert_eq!(n, 2);
                    assert_eq!(usize::from(buf[0]), cpu, "a datagram from an earlier round");
                    got += 1;
                }
                let want = if k == cpu { 20 } else { 0 };
                assert_eq!(got, want, "socket {k}, datagrams sent from CPU {cpu}");
            }
        }
    }
}
