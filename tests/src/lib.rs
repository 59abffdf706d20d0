//! Helpers for Meridian's end-to-end tests.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod browser;
pub mod evil;

use meridian_core::{DirNode, EntryKind, Hash, TrustedKeys, VerifiedRoot, Verifier};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Waits until `cond` returns `Some`, polling, or panics after `deadline`
/// with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `meridian` binary built by `cargo build` next to this test binary.
pub fn meridian_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MERIDIAN_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("meridian");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bins` first (the README's test command does)",
        bin.display()
    );
    bin
}

/// A running `meridian` process, killed on drop. Its stderr is collected;
/// `listening on ADDR` lines tell the bound addresses.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Self::spawn_inner(Command::new(meridian_bin()), args, envs)
    }

    /// Spawns another program (e.g. `setpriv ... meridian ...`) the same way.
    pub fn spawn_cmd(program: &str, args: &[&str]) -> Proc {
        Self::spawn_inner(Command::new(program), args, &[])
    }

    fn spawn_inner(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("MERIDIAN_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            log: Vec::new(),
        }
    }

    /// Reads log lines until one contains `needle`, returning it.
    pub fn wait_line(&mut self, needle: &str, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) => self.log.push(strip_ansi(&l)),
                Err(_) => panic!(
                    "no log line containing {needle:?} within {deadline:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The address from the first `listening on ADDR` line containing `what`.
    pub fn listening(&mut self, what: &str) -> std::net::SocketAddr {
        let line = self.wait_line(&format!("{what} listening on "), Duration::from_secs(30));
        let after = line.split(" listening on ").nth(1).unwrap();
        let addr = after
            .split_whitespace()
            .next()
            .unwrap()
            .trim_start_matches("https://");
        addr.parse().unwrap()
    }

    /// Drains pending log lines.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(strip_ansi(&l));
        }
    }

    /// Waits for the process to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `n` pseudo-random bytes (xorshift), different for every `seed`.
pub fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Starts `meridian origin` as [`origin_args`] says, listening on `addr`
/// (a restarted origin where the old one was).
pub fn origin_at(dir: &Path, state: &str, quiet: &str, addr: std::net::SocketAddr) -> Proc {
    let args: Vec<String> = origin_args(dir, state, quiet)
        .into_iter()
        .map(|a| {
            if a == "127.0.0.1:0" {
                addr.to_string()
            } else {
                a
            }
        })
        .collect();
    let mut p = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    p.listening("origin");
    p
}

/// Runs `meridian ARGS` to completion: (success, stdout then stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(meridian_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("meridian {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The body of a GET of `url`, whatever the status (panics on a transport
/// error: the test's server must answer).
pub async fn get_bytes(http: &reqwest::Client, url: &str) -> bytes::Bytes {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"))
}

/// An HTTP client for tests: 30 s per request.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Downloads `url` over and over until `stop` (at most 20,000 times and
/// 150 s), checking each body against `want`; returns the downloads that
/// completed and every failure.
pub fn download_loop(
    http: reqwest::Client,
    url: String,
    want: std::sync::Arc<Vec<u8>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        let t0 = std::time::Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && ok < 20_000
            && t0.elapsed() < Duration::from_secs(150)
        {
            match http.get(&url).send().await {
                Ok(r) if r.status() == 200 => match r.bytes().await {
                    Ok(b) if b[..] == want[..] => ok += 1,
                    Ok(b) => failed.push(format!("{} bytes, not the file", b.len())),
                    Err(e) => failed.push(e.to_string()),
                },
                Ok(r) => failed.push(format!("HTTP {}", r.status())),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed)
    })
}

/// Generates a key file with `meridian keygen` and returns its public key.
pub fn keygen(path: &Path) -> meridian_core::PublicKey {
    let out = Command::new(meridian_bin())
        .args(["keygen", "--out", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find(|l| l.starts_with("ed25519:"))
        .unwrap()
        .parse()
        .unwrap()
}

/// A client of the read API that verifies what it reads.
pub struct ReadClient {
    pub base: String,
    pub http: reqwest::Client,
    pub verifier: Verifier,
}

impl ReadClient {
    pub fn new(addr: std::net::SocketAddr, key: meridian_core::PublicKey) -> Self {
        ReadClient {
            base: format!("http://{addr}/.meridian/v1"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            verifier: Verifier::new(TrustedKeys::new([key])),
        }
    }

    /// Takes up the key statements the node serves (rotations, revocations),
    /// each checked against the keys this client trusts.
    pub async fn follow_keys(&mut self) {
        let list = get_bytes(&self.http, &format!("{}/keys", self.base)).await;
        let mut ring = self.verifier.keyring().clone();
        let (_, refused) = ring.add_list(&list).expect("the statement list decodes");
        assert!(refused.is_empty(), "statements refused: {refused:?}");
        self.verifier = Verifier::with_keyring(ring);
    }

    /// The newest root, verified (signature and expiry).
    pub async fn root(&self) -> Option<VerifiedRoot> {
        let r = self
            .http
            .get(format!("{}/root", self.base))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let bytes = r.bytes().await.ok()?;
        Some(
            self.verifier
                .verify_latest(&bytes, now(), None)
                .expect("root verifies"),
        )
    }

    pub async fn object(&self, h: &Hash) -> Vec<u8> {
        let r = self
            .http
            .get(format!("{}/objects/{h}", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "object {h}: {}", r.status());
        let b = r.bytes().await.unwrap().to_vec();
        assert_eq!(
            meridian_core::hash_bytes(&b),
            *h,
            "object bytes match their hash"
        );
        b
    }

    /// Every file of a tree as path → (hash, size), nodes and hashes checked.
    pub async fn files(&self, tree: Hash) -> BTreeMap<String, (Hash, u64)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(tree, String::new())];
        while let Some((h, prefix)) = stack.pop() {
            let node = DirNode::decode(&self.object(&h).await).expect("node decodes");
            for e in node.entries {
                let p = if prefix.is_empty() {
                    e.name.clone()
                } else {
                    format!("{prefix}/{}", e.name)
                };
                match e.kind {
                    EntryKind::Dir => stack.push((e.hash, p)),
                    EntryKind::File => {
                        out.insert(p, (e.hash, e.size));
                    }
                    EntryKind::Symlink => {}
                }
            }
        }
        out
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    meridian_serve::unix_now()
}

/// blake3 of a file on disk.
pub fn hash_file(p: &Path) -> Hash {
    meridian_core::hash_bytes(&std::fs::read(p).unwrap())
}

/// Starts `meridian origin` on a port chosen by the OS, content in
/// `dir/content`, key in `dir/key`, state in `dir/origin-state`.
pub fn origin(dir: &Path, quiet: &str) -> (Proc, std::net::SocketAddr) {
    let args = origin_args(dir, "origin-state", quiet);
    let mut p = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let a = p.listening("origin");
    (p, a)
}

/// Starts `meridian mirror` with its state in `state`.
pub fn mirror(
    id: &str,
    upstreams: &[String],
    key: &meridian_core::PublicKey,
    state: &Path,
    extra: &[&str],
) -> (Proc, std::net::SocketAddr) {
    let key = key.to_string();
    let mut args: Vec<&str> = vec![
        "mirror",
        "--id",
        id,
        "--trust",
        &key,
        "--state",
        state.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    if !extra.contains(&"--poll-interval") {
        args.extend(["--poll-interval", "5s"]);
    }
    for u in upstreams {
        args.push("--upstream");
        args.push(u);
    }
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(&args, &[]);
    let a = p.listening("mirror");
    (p, a)
}

/// The body of a GET of `url`, whatever its status; `None` if the request
/// fails.
pub async fn try_get_bytes(http: &reqwest::Client, url: &str) -> Option<bytes::Bytes> {
    http.get(url).send().await.ok()?.bytes().await.ok()
}

/// The status document of a mirror.
pub async fn status(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
) -> Option<meridian_serve::status::MirrorStatus> {
    serde_json::from_slice(&try_get_bytes(http, &format!("http://{addr}/.meridian/status")).await?)
        .ok()
}

/// Waits until the mirror serves generation `g` or newer.
pub async fn wait_generation(http: &reqwest::Client, addr: std::net::SocketAddr, g: u64) -> u64 {
    eventually(
        &format!("mirror {addr} to serve generation {g}"),
        Duration::from_secs(60),
        || async {
            let s = status(http, addr).await?;
            let n = s.generation;
            (n >= g).then_some(n)
        },
    )
    .await
}

/// A metric's value from a Prometheus text page (sum over label sets).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Asks `server` for A records of `name` over UDP, optionally with a Client
/// Subnet and from a given local address; returns the addresses in order.
pub async fn dns_a(
    server: std::net::SocketAddr,
    name: &str,
    ecs: Option<(&str, u8)>,
    src: Option<&str>,
) -> Option<Vec<std::net::IpAddr>> {
    Some(dns_a_ttl(server, name, ecs, src).await?.0)
}

/// [`dns_a`], with the answer's TTL (the smallest of its records; 0 for
/// an empty answer): what a client that honours TTLs caches it for.
pub async fn dns_a_ttl(
    server: std::net::SocketAddr,
    name: &str,
    ecs: Option<(&str, u8)>,
    src: Option<&str>,
) -> Option<(Vec<std::net::IpAddr>, u32)> {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::new(0x4d52, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    if let Some((net, len)) = ecs {
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            net.parse().ok()?,
            len,
            0,
        )));
    }
    m.set_edns(e);
    let s = tokio::net::UdpSocket::bind(format!("{}:0", src.unwrap_or("127.0.0.1")))
        .await
        .ok()?;
    s.send_to(&m.to_vec().ok()?, server).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let r = Message::from_vec(&buf[..n]).ok()?;
    let ttl = r.answers.iter().map(|x| x.ttl).min().unwrap_or(0);
    Some((
        r.answers
            .iter()
            .filter_map(|x| match &x.data {
                RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                _ => None,
            })
            .collect(),
        ttl,
    ))
}

/// `meridian demo` on free ports, stopped with SIGTERM (so it stops its
/// children) when dropped.
pub struct Demo {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub net: serde_json::Value,
}

impl Demo {
    pub fn start(extra: &[&str]) -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let mut args = vec![
            "demo",
            "--dir",
            &d,
            "--origin-port",
            "0",
            "--mirror-port",
            "0",
            "--dns-port",
            "0",
            "--admin-port",
            "0",
            "--status-port",
            "0",
            "--redirect-port",
            "0",
            "--big-file-mib",
            "0",
        ];
        // The tests kill and restart parts themselves, unless they ask
        // the demo to.
        if !extra.contains(&"--restart-after") {
            args.extend(["--restart-after", "0s"]);
        }
        args.extend_from_slice(extra);
        let mut proc = Proc::spawn(&args, &[]);
        let path = dir.path().join("network.json");
        let start = Instant::now();
        while !path.exists() {
            if let Ok(Some(s)) = proc.child.try_wait() {
                proc.drain();
                panic!(
                    "demo exited ({s}) before it was up:\n{}",
                    proc.log.join("\n")
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "demo did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let net = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        Demo { proc, dir, net }
    }
    pub fn addr(&self, key: &str) -> std::net::SocketAddr {
        self.net[key].as_str().unwrap().parse().unwrap()
    }
    pub fn mirror(&self, region: &str) -> std::net::SocketAddr {
        self.net["mirrors"][region]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
    pub fn pid(&self, name: &str) -> i32 {
        self.net["pids"][name].as_u64().unwrap() as i32
    }
    pub fn content(&self) -> PathBuf {
        self.net["content"].as_str().unwrap().into()
    }
    pub fn config(&self, file: &str) -> PathBuf {
        PathBuf::from(self.net["config_dir"].as_str().unwrap()).join(file)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        signal(self.proc.child.id() as i32, "TERM");
        if self.proc.wait_exit(Duration::from_secs(20)).is_none() {
            eprintln!("demo did not stop on SIGTERM");
        }
    }
}

/// Sends a signal with kill(1).
pub fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A small tmpfs mounted on a directory (to fill a disk on purpose),
/// unmounted on drop. Needs root, as the tests run in CI.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a {size} tmpfs on {} needs root",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A node's Prometheus text (`/.meridian/metrics`).
pub async fn metrics_text(http: &reqwest::Client, addr: std::net::SocketAddr) -> Option<String> {
    http.get(format!("http://{addr}/.meridian/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// GET `path` on a GeoDNS admin listener with its bearer token: the body
/// of a 2xx answer.
pub async fn admin_get(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
) -> Option<String> {
    let r = http
        .get(format!("http://{addr}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

/// Arguments of `meridian origin` for a test directory: content in
/// `dir/content`, key in `dir/key`, state in `dir/{state}`, any free port.
pub fn origin_args(dir: &Path, state: &str, quiet: &str) -> Vec<String> {
    let p = |x: &str| dir.join(x).to_str().unwrap().to_owned();
    [
        "origin",
        "--content",
        &p("content"),
        "--state",
        &p(state),
        "--key",
        &p("key"),
        "--listen",
        "127.0.0.1:0",
        "--quiet",
        quiet,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
