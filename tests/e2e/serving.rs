//! The mirror's download server under hostile or unusual clients.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{Proc, ReadClient, eventually, keygen, mirror, origin, status, wait_generation};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

struct Net {
    dir: tempfile::TempDir,
    _origin: Proc,
    origin: SocketAddr,
    key: meridian_core::PublicKey,
    client: ReadClient,
}

async fn net(files: &[(&str, &[u8])]) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    for (p, d) in files {
        let path = content.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, d).unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let (o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let n = files.len();
    eventually("the origin to publish", DEADLINE, || async {
        let r = client.root().await?;
        (r.root.files as usize == n).then_some(())
    })
    .await;
    Net {
        dir,
        _origin: o,
        origin: oaddr,
        key,
        client,
    }
}

impl Net {
    async fn generation(&self) -> u64 {
        self.client.root().await.unwrap().root.generation
    }
    fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }
    /// Mirror "m" of the origin (state in `m/`), once it serves the newest generation.
    async fn synced_mirror(&self, extra: &[&str]) -> (meridian_e2e::Proc, SocketAddr) {
        let (p, addr) = mirror(
            "m",
            &[format!("http://{}", self.origin)],
            &self.key,
            &self.path("m"),
            extra,
        );
        wait_generation(&reqwest::Client::new(), addr, self.generation().await).await;
        (p, addr)
    }
}

fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn traversal_attempts_never_escape_the_tree() {
    let net = net(&[("pub/a.txt", b"public")]).await;
    let (_m, maddr) = net.synced_mirror(&[]).await;
    // The mirror's own state (keys, roots) sits next to the served tree: try
    // to reach it and /etc/passwd every way a path can be spelled.
    for path in [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/pub/..%2f..%2f..%2fetc%2fpasswd",
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "//etc/passwd",
        "/pub/%00/../../etc/passwd",
        "/pub/a.txt%00.html",
        "/..%5c..%5cetc%5cpasswd",
        "/current",
        "/objects/",
        "/roots/",
    ] {
        let resp = raw(
            maddr,
            &format!("GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"),
        );
        let code: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(code == 400 || code == 404, "{path}: {code}\n{resp}");
        assert!(!resp.contains("root:x:0:0"), "{path} leaked /etc/passwd");
    }
    // Dot segments that stay inside resolve normally.
    let resp = raw(
        maddr,
        "GET /pub/../pub/./a.txt HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("public"),
        "{resp}"
    );
}

#[tokio::test]
async fn ranges_conditionals_and_listings() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
    let net = net(&[
        ("d/file.bin", &data),
        ("d/readme.txt", b"hi"),
        ("d/sub/x", b"x"),
    ])
    .await;
    let (_m, m) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &[],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, m, net.generation().await).await;
    let url = format!("http://{m}/d/file.bin");
    let get = |range: Option<String>| {
        let mut r = http.get(&url);
        if let Some(v) = range {
            r = r.header("Range", v);
        }
        r.send()
    };
    // Full, with validators and digest.
    let r = get(None).await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let h = meridian_core::hash_bytes(&data).to_hex();
    assert_eq!(etag, format!("\"{h}\""));
    assert_eq!(r.headers()["x-meridian-blake3"], h.as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let lm = r.headers()["last-modified"].to_str().unwrap().to_owned();
    // Suffix range, open range, overlapping ranges coalesced.
    let r = get(Some("bytes=-100".into())).await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[9900..]);
    let r = get(Some("bytes=9990-".into())).await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[9990..]);
    let r = get(Some("bytes=0-99,50-149".into())).await.unwrap();
    assert_eq!(r.headers()["content-range"], "bytes 0-149/10000");
    // Multi-range.
    let r = get(Some("bytes=0-1,100-101".into())).await.unwrap();
    assert_eq!(r.status(), 206);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("multipart/byteranges; boundary=")
    );
    let body = r.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("Content-Range: bytes 0-1/10000")
            && text.contains("Content-Range: bytes 100-101/10000")
    );
    // Malformed: ignored (full 200). Unsatisfiable: 416. Thousands: full 200.
    assert_eq!(get(Some("bytes=zz-1".into())).await.unwrap().status(), 200);
    let r = get(Some("bytes=20000-".into())).await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    let many: Vec<String> = (0..1000).map(|i| format!("{}-{}", i * 3, i * 3)).collect();
    let r = get(Some(format!("bytes={}", many.join(","))))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "too many ranges: the whole file instead");
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
    // A request head over the cap is refused outright.
    let huge: Vec<String> = (0..5000).map(|i| format!("{i}-{i}")).collect();
    let r = get(Some(format!("bytes={}", huge.join(","))))
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    // Conditionals.
    let r = http
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // A 304 has no body, and must not claim a length of 0 for the file.
    assert!(
        r.headers().get("content-length").is_none_or(|v| v != "0"),
        "{:?}",
        r.headers()
    );
    let r = http
        .get(&url)
        .header("If-Modified-Since", &lm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = http
        .get(&url)
        .header("Range", "bytes=0-9")
        .header("If-Range", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "If-Range mismatch sends the whole file");
    let r = http
        .get(&url)
        .header("Range", "bytes=0-9")
        .header("If-Range", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    // If-Match (strong): a non-matching tag, or a weak one, is 412 with no
    // body; the right tag or `*` is served.
    for (tag, want) in [
        ("\"stale\"", 412),
        (&*format!("W/{etag}"), 412),
        (&*etag, 200),
        ("*", 200),
        (&*format!("\"x\", {etag}"), 200),
    ] {
        let r = http.get(&url).header("If-Match", tag).send().await.unwrap();
        assert_eq!(r.status(), want, "If-Match: {tag}");
        if want == 412 {
            assert!(r.bytes().await.unwrap().is_empty());
        }
    }
    let r = http
        .get(&url)
        .header("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412, "modified since then");
    // Up to 100 header lines are fine, as in common servers.
    let mut req = http.get(&url);
    for i in 0..90 {
        req = req.header(format!("x-extra-{i}"), "1");
    }
    assert_eq!(req.send().await.unwrap().status(), 200);
    // HEAD.
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], "10000");
    // Listings: redirect, HTML, JSON, 404.
    let nofollow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = nofollow.get(format!("http://{m}/d")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"], "/d/");
    let html = http
        .get(format!("http://{m}/d/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("file.bin") && html.contains("sub/") && html.contains(&h),
        "{html}"
    );
    assert!(
        html.find("file.bin").unwrap() < html.find("readme.txt").unwrap(),
        "sorted"
    );
    let json: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("http://{m}/d/"))
            .header("Accept", "application/json")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["entries"][0]["name"], "file.bin");
    assert_eq!(json["entries"][0]["size"], 10000);
    assert_eq!(
        http.get(format!("http://{m}/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn ten_thousand_idle_connections_and_a_slowloris_do_not_starve_it() {
    let net = net(&[("f", b"hello")]).await;
    let (m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &["--header-timeout", "2s"],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, maddr, net.generation().await).await;
    let pid = m.child.id();
    let rss = || rss_kb(pid);
    let before = rss();
    // From 50 addresses (200 each, under the per-client cap).
    let mut idle = Vec::with_capacity(10_000);
    for i in 0..10_000u32 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(std::net::SocketAddr::from((
            [127, 2, 0, (i / 200 + 1) as u8],
            0,
        )))
        .unwrap();
        idle.push(s.connect(maddr).await.unwrap());
    }
    // A slowloris: a request head trickled a byte at a time never completes.
    let mut slow = tokio::net::TcpStream::connect(maddr).await.unwrap();
    // Real clients are still served.
    let r = http.get(format!("http://{maddr}/f")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"hello");
    eventually("the mirror to count its connections", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        (s.active_connections >= 10_000).then_some(())
    })
    .await;
    let after = rss();
    eprintln!("RSS with 10,000 idle connections: {before} kB -> {after} kB");
    // Under 8 KiB each (a connection's task was once 19 KiB).
    assert!(
        after - before < 80 * 1024,
        "10,000 idle connections cost {} kB",
        after - before
    );
    drop(idle);
    // The slowloris is cut off by the header timeout (2 s here): it sends a
    // byte every 500 ms, for at most 100 s, until it is closed.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut closed = false;
    for b in b"GET /f HTTP/1.1\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'))
        .take(200)
    {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), slow.read(&mut buf)).await
            && (n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"))
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a slowloris was still connected after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_disk_filling_up_mid_sync_stops_the_sync_and_keeps_serving() {
    let net = net(&[("small", b"v1")]).await;
    let state = net.path("m");
    std::fs::create_dir_all(&state).unwrap();
    let _disk = meridian_e2e::SmallDisk::mount(&state, "40m");
    let (_evil, slow) = Evil::start(net.origin, Mode::Slow).await;
    let (mut m, maddr) = mirror(
        "m",
        &[format!("http://{}", slow.local_addr)],
        &net.key,
        &state,
        &["--poll-interval", "1s", "--reserve-free", "1000000"],
    );
    let http = reqwest::Client::new();
    let g1 = wait_generation(&http, maddr, net.generation().await).await;

    // A 20 MB file starts syncing slowly; then something else eats the disk.
    std::fs::write(net.path("content/big.iso"), vec![3u8; 20_000_000]).unwrap();
    let partial = state.join("partial");
    eventually("the big blob to start downloading", DEADLINE, || async {
        let n: u64 = std::fs::read_dir(&partial)
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        (n > 0).then_some(())
    })
    .await;
    let hog = state.join("hog");
    let mut f = std::fs::File::create(&hog).unwrap();
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let s = eventually("the sync to fail with a disk error", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        (s.sync_state == meridian_serve::status::SyncState::Error).then_some(s)
    })
    .await;
    let err = s.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("No space") || err.contains("not enough disk"),
        "{err}"
    );
    assert_eq!(s.generation, g1, "still serving the last good generation");
    assert_eq!(
        http.get(format!("http://{maddr}/small"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"v1"
    );
    assert_eq!(
        http.get(format!("http://{maddr}/big.iso"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Free the space: the sync completes.
    std::fs::remove_file(&hog).unwrap();
    let g2 = net.generation().await;
    wait_generation(&http, maddr, g2).await;
    let body = meridian_e2e::get_bytes(&http, &format!("http://{maddr}/big.iso")).await;
    assert!(body.len() == 20_000_000 && body.iter().all(|&b| b == 3));
    m.drain();
}

#[tokio::test]
async fn a_sync_that_cannot_fit_is_refused_up_front() {
    let net = net(&[("small", b"v1")]).await;
    let state = net.path("m");
    std::fs::create_dir_all(&state).unwrap();
    let _disk = meridian_e2e::SmallDisk::mount(&state, "8m");
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &state,
        &["--poll-interval", "1s", "--reserve-free", "1000000"],
    );
    let http = reqwest::Client::new();
    let g1 = wait_generation(&http, maddr, net.generation().await).await;
    std::fs::write(net.path("content/huge.iso"), vec![1u8; 30_000_000]).unwrap();
    let s = eventually("the sync to be refused for space", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("not enough disk"))
            .then_some(s)
    })
    .await;
    assert_eq!(s.generation, g1);
    let partial: u64 = std::fs::read_dir(state.join("partial"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(
        partial, 0,
        "nothing was downloaded for a sync that cannot fit"
    );
}

#[tokio::test]
async fn drain_needs_the_token_and_shows_in_status() {
    let net = net(&[("f", b"x")]).await;
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &["--admin-token", "s3cret"],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, maddr, net.generation().await).await;
    let url = format!("http://{maddr}/.meridian/admin/drain");
    assert_eq!(http.post(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.post(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(!status(&http, maddr).await.unwrap().draining);
    assert_eq!(
        http.post(&url)
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(status(&http, maddr).await.unwrap().draining);
    // Still serving while draining.
    assert_eq!(
        http.get(format!("http://{maddr}/f"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let r = http
        .post(format!("http://{maddr}/.meridian/admin/undrain"))
        .header("authorization", "bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!status(&http, maddr).await.unwrap().draining);

    // An empty token is refused at start, naming the setting and the fix.
    let mut m = meridian_e2e::Proc::spawn(
        &[
            "mirror",
            "--id",
            "m2",
            "--upstream",
            &format!("http://{}", net.origin),
            "--trust",
            &net.key.to_string(),
            "--state",
            net.path("m2").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("MERIDIAN_ADMIN_TOKEN", "")],
    );
    let status = m.wait_exit(DEADLINE).expect("mirror exits");
    assert!(!status.success());
    m.drain();
    m.wait_line("admin token is empty", Duration::from_secs(5));
}

#[tokio::test]
async fn sigterm_drains_in_flight_downloads_then_exits() {
    let net = net(&[("big", &vec![7u8; 30_000_000])]).await;
    let (mut m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &[],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, maddr, net.generation().await).await;
    let mut s = TcpStream::connect(maddr).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &m.child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let total = n + rest.len();
    let head_len = first[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    assert_eq!(
        total - head_len,
        30_000_000,
        "the in-flight download completed"
    );
    let status = m.wait_exit(DEADLINE).expect("exits after draining");
    assert!(status.success());
    assert!(TcpStream::connect(maddr).is_err(), "no longer accepting");
}

#[tokio::test]
async fn https_with_rustls() {
    let net = net(&[("f", b"secure bytes")]).await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = net.path("cert.pem");
    let key_path = net.path("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let (mut m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &[
            "--listen-tls",
            "127.0.0.1:0",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let https: SocketAddr = {
        let line = m.wait_line("listening on https://", Duration::from_secs(10));
        line.rsplit("https://")
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let http = reqwest::Client::new();
    wait_generation(&http, maddr, net.generation().await).await;
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            cert_path.to_str().unwrap(),
            "--resolve",
            &format!("localhost:{}:127.0.0.1", https.port()),
        ])
        .arg(format!("https://localhost:{}/f", https.port()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"secure bytes");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_send_timeout() {
    let net = net(&[("big", &vec![9u8; 40_000_000])]).await;
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{}", net.origin)],
        &net.key,
        &net.path("m"),
        &["--send-timeout", "2s"],
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_generation(&http, maddr, net.generation().await).await;
    // Start a download, read its first bytes, then stop reading (but keep the socket).
    let mut stalled = TcpStream::connect(maddr).unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nHost: m\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 4096];
    assert!(stalled.read(&mut first).unwrap() > 0);
    // The count is live, and leaves out the status request's own
    // connection; the stalled body is a download in flight.
    eventually("the stalled connection to be counted", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        (s.active_connections >= 1 && s.downloads_in_flight == 1).then_some(())
    })
    .await;
    // The server gives up on it.
    eventually(
        "the stalled connection to be closed by the server",
        DEADLINE,
        || async {
            let s = status(&http, maddr).await?;
            (s.active_connections == 0 && s.downloads_in_flight == 0).then_some(())
        },
    )
    .await;
    drop(stalled);
}

/// The plain-HTTP loop: pipelined requests answered in order, HEAD without a
/// body, HTTP/1.0 closing, a request with a body handed to hyper mid-
/// connection, ranges of a large file sent with sendfile, and bad heads.
#[tokio::test]
async fn plain_http_pipelining_http10_hand_off_ranges_and_bad_heads() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let net = net(&[("a.txt", b"hello"), ("big.bin", &big)]).await;
    let (_m, maddr) = net.synced_mirror(&[]).await;
    let split = |resp: &str| -> Vec<(String, String)> {
        // (head, body) pairs; bodies by content-length.
        let mut out = Vec::new();
        let mut rest = resp;
        while let Some(end) = rest.find("\r\n\r\n") {
            let head = rest[..end].to_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let body_len = len;
            let body_start = end + 4;
            let body = rest[body_start..(body_start + body_len).min(rest.len())].to_owned();
            out.push((head, body));
            rest = &rest[(body_start + body_len).min(rest.len())..];
        }
        out
    };

    // Pipelined: GET, HEAD, GET-and-close in one write.
    let resp = raw(
        maddr,
        "GET /a.txt HTTP/1.1\r\nHost: m\r\n\r\nGET /big.bin HTTP/1.1\r\nHost: m\r\nRange: bytes=100000-100009\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    let parts = split(&resp);
    assert_eq!(parts.len(), 3, "{resp}");
    assert!(parts[0].0.starts_with("HTTP/1.1 200 OK"), "{}", parts[0].0);
    assert_eq!(parts[0].1, "hello");
    assert!(parts[1].0.starts_with("HTTP/1.1 206"), "{}", parts[1].0);
    assert!(
        parts[1]
            .0
            .contains("content-range: bytes 100000-100009/300000")
    );
    assert_eq!(parts[1].1.as_bytes(), &big[100_000..100_010]);
    assert_eq!(parts[2].1, "hello");
    assert!(parts[2].0.contains("connection: close"));

    // HEAD: the length, no body; then the connection carries on.
    let resp = raw(
        maddr,
        "HEAD /big.bin HTTP/1.1\r\nHost: m\r\n\r\nGET /a.txt HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    let (head, rest) = resp.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("content-length: 300000"),
        "{head}"
    );
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.ends_with("\r\n\r\nhello"),
        "{rest}"
    );

    // HTTP/1.0 without keep-alive: answered, then closed (raw reads to EOF).
    let resp = raw(maddr, "GET /a.txt HTTP/1.0\r\n\r\n");
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("hello"),
        "{resp}"
    );

    // A whole large file: every byte, sent with sendfile.
    let resp = {
        let mut s = TcpStream::connect(maddr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        out
    };
    let at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(&resp[at..], &big[..]);

    // A request with a body goes to hyper, with the rest of the connection.
    let resp = raw(
        maddr,
        "POST /a.txt HTTP/1.1\r\nHost: m\r\nContent-Length: 3\r\n\r\nabcGET /a.txt HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nhello"), "{resp}");

    // Bad heads: garbage is 400, a huge head 431; the connection closes.
    assert!(raw(maddr, "NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!(
        "GET /a.txt HTTP/1.1\r\nHost: m\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    assert!(raw(maddr, &huge).starts_with("HTTP/1.1 431"));

    // Host (RFC 9112 section 3.2): an HTTP/1.1 request without one, or any
    // request with two, is 400 and nothing is served, on the lean loop and
    // on hyper's (a request with a body) alike; HTTP/1.0 may omit it.
    for req in [
        "GET /a.txt HTTP/1.1\r\n\r\n",
        "GET /a.txt HTTP/1.1\r\nHost: m\r\nHost: n\r\n\r\n",
        "GET /a.txt HTTP/1.0\r\nHost: m\r\nHost: n\r\n\r\n",
        "POST /a.txt HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    ] {
        let resp = raw(maddr, req);
        assert!(resp.starts_with("HTTP/1.1 400"), "{req:?}: {resp}");
        assert!(!resp.contains("hello"), "{req:?}: {resp}");
    }
    assert!(raw(maddr, "GET /a.txt HTTP/1.0\r\n\r\n").ends_with("hello"));
}

#[tokio::test]
async fn clients_that_never_read_a_large_download_cannot_crowd_out_real_ones() {
    let big: Vec<u8> = (0..24_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let net = net(&[("big.iso", &big)]).await;
    let (_m, maddr) = net
        .synced_mirror(&["--max-connections-per-client", "32"])
        .await;
    let http = reqwest::Client::new();
    // 2,000 connections from one host, each asking for the large file and
    // never reading a byte of it.
    let mut hogs = Vec::new();
    for _ in 0..2000 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.6.1:0".parse().unwrap()).unwrap();
        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), s.connect(maddr)).await
        else {
            continue;
        };
        use tokio::io::AsyncWriteExt;
        let _ = c
            .write_all(b"GET /big.iso HTTP/1.1\r\nHost: m\r\n\r\n")
            .await;
        hogs.push(c);
    }
    // The mirror holds at most the cap of them open.
    let s = status(&http, maddr).await.unwrap();
    let open = s.active_connections;
    eventually("the hogs beyond the cap to be closed", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        (s.active_connections <= 34).then_some(())
    })
    .await;
    // A real download with Connection: close completes, byte for byte.
    let out = net.path("big.out");
    let curl = std::process::Command::new("curl")
        .args(["-sS", "-H", "Connection: close", "--max-time", "60", "-o"])
        .arg(&out)
        .arg(format!("http://{maddr}/big.iso"))
        .output()
        .unwrap();
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert!(std::fs::read(&out).unwrap() == big, "download differs");
    eprintln!("open connections after 2,000 hogs: {open}");
    drop(hogs);
}

#[tokio::test]
async fn memory_taken_by_a_flood_of_downloads_is_given_back_after_it() {
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let net = net(&[("medium.bin", &data)]).await;
    let (m, maddr) = net.synced_mirror(&[]).await;
    let pid = m.child.id();
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("http://{maddr}/medium.bin"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = rss();
    // 4,000 downloads at once from 20 hosts, each read a little, held for
    // a moment, then dropped.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut flood = Vec::new();
    for i in 0..4000u32 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from(([127, 3, 1, (i / 200 + 1) as u8], 0)))
            .unwrap();
        let mut c = s.connect(maddr).await.unwrap();
        c.write_all(b"GET /medium.bin HTTP/1.1\r\nHost: m\r\n\r\n")
            .await
            .unwrap();
        flood.push(c);
    }
    for c in flood.iter_mut() {
        let mut b = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await;
    }
    let during = rss();
    drop(flood);
    eprintln!("mirror RSS: {before} kB before, {during} kB during the flood");
    assert!(
        during > before + 10_000,
        "the flood took no memory ({before} -> {during} kB): not a test"
    );
    let after = eventually(
        "the flood's memory to be given back",
        Duration::from_secs(20),
        || async {
            let now = rss();
            (now < before + (during - before) / 2).then_some(now)
        },
    )
    .await;
    eprintln!("mirror RSS after the flood: {after} kB");
}

/// A client still sending a request head over the cap when the server
/// answers 431 gets that answer: the server shuts its side and drains the
/// rest for a moment before it closes. (Closing with unread bytes resets the
/// connection: an HTTP client still writing its request then fails on the
/// write, or loses the answer.) The head goes in two parts, the second
/// after the server has answered the first.
#[tokio::test]
async fn an_oversized_head_gets_its_431_even_while_the_client_is_still_sending() {
    let net = net(&[("a.txt", b"hello")]).await;
    let (_m, maddr) = net.synced_mirror(&[]).await;
    let first = format!(
        "GET /a.txt HTTP/1.1\r\nHost: m\r\nX-Pad: {}",
        "p".repeat(40_000)
    );
    let mut s = TcpStream::connect(maddr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(first.as_bytes()).unwrap();
    // The answer is there (peeked, not read) before the rest is sent.
    let mut peek = [0u8; 12];
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.peek(&mut peek).unwrap_or(0) < peek.len() {
        assert!(Instant::now() < deadline, "no answer to an oversized head");
        std::thread::sleep(Duration::from_millis(10));
    }
    // (A pause only so that a server that closes at once has closed: the
    // passing case does not depend on it.)
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&[b'p'; 20_000])
        .and_then(|()| s.write_all(b"\r\n\r\n"))
        .expect("the rest of the head is taken, not reset");
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("the answer is read whole, not reset");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
}

/// A download waiting on a client that reads slowly holds a few kilobytes
/// of the mirror's memory, not a buffer or a task's worth of stack: 5,000
/// downloads of a 16 MiB file, each stuck once the socket's buffers are
/// full, cost under 8 KiB each in all (the connection's task, its socket's
/// registration, the open file). A 16 KiB array in the connection loop's
/// state, as there once was, alone makes this fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stuck_on_a_slow_client_holds_a_few_kilobytes() {
    const N: u32 = 5_000;
    // Larger than the kernel's socket buffers on both sides, so that no
    // download can finish into them.
    let body = meridian_e2e::noise(16 << 20, 7);
    let net = net(&[("medium.bin", &body)]).await;
    let (m, maddr) = net
        .synced_mirror(&["--max-connections-per-client", "0"])
        .await;
    let http = reqwest::Client::new();
    let pid = m.child.id();
    let rss = || rss_kb(pid);
    // One download first, so that what every download shares exists.
    let got = meridian_e2e::get_bytes(&http, &format!("http://{maddr}/medium.bin")).await;
    assert_eq!(got.len(), 16 << 20);
    let before = rss();
    let mut stuck = Vec::with_capacity(N as usize);
    for i in 0..N {
        use tokio::io::AsyncWriteExt;
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        // Small receive buffers: the mirror's send blocks at once.
        s.set_recv_buffer_size(4096).unwrap();
        s.bind(SocketAddr::from((
            [127, 3, (i / 250) as u8, (i % 250 + 1) as u8],
            0,
        )))
        .unwrap();
        let mut c = s.connect(maddr).await.unwrap();
        c.write_all(b"GET /medium.bin HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        stuck.push(c);
    }
    eventually("every download to be in flight", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        (s.downloads_in_flight >= u64::from(N)).then_some(())
    })
    .await;
    let after = rss();
    let each = (after.saturating_sub(before)) as f64 / f64::from(N);
    eprintln!("RSS {before} kB -> {after} kB with {N} stuck downloads: {each:.1} kB each");
    assert!(each < 8.0, "a stuck download costs {each:.1} kB");
    drop(stuck);
}

/// A process's resident set, in kB.
fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
