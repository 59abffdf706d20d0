//! GeoDNS's HTTP redirector, with real clients: curl and wget follow it to
//! the right mirror; a lagging mirror gets only the files that did not
//! change; nothing in a request makes it redirect anywhere but a mirror.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{Demo, Proc, ReadClient, eventually, keygen, mirror, origin, wait_generation};
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);
const FILE: &str = "releases/1.0/tool-1.0.tar.gz";

fn run(c: &mut Command) -> std::process::Output {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The response head of one request, not followed (curl -sI or -si).
fn head(args: &[&str]) -> String {
    let out = run(Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-D", "-"])
        .args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// Waits until the redirector sends this client somewhere (it has loaded
/// the tree and the probes have the mirrors up).
async fn ready(redirector: &str, path: &str) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    eventually("the redirector to redirect", DEADLINE, || async {
        let r = http.get(format!("{redirector}/{path}")).send().await.ok()?;
        (r.status() == 302).then_some(())
    })
    .await;
}

/// curl -L and wget, from clients the demo's GeoIP database places in
/// Britain, Indonesia and the US, each land on their region's mirror and
/// get the right bytes; the redirect names the other mirrors and the
/// blake3; a missing path is 404, a write 405, a bad path 400.
#[tokio::test]
async fn curl_and_wget_follow_the_redirect_to_the_nearest_mirror() {
    let demo = Demo::start(&[]);
    let base = format!("http://{}", demo.addr("redirector"));
    ready(&base, FILE).await;
    let want = meridian_e2e::hash_file(&demo.content().join(FILE));
    let url = format!("{base}/{FILE}");
    let dir = tempfile::tempdir().unwrap();
    for (client, region) in [
        ("127.0.20.2", "eu-west"),
        ("127.0.20.1", "ap-southeast"),
        ("127.0.20.3", "us-east"),
    ] {
        let mirror = demo.mirror(region);
        // curl -L
        let out_file = dir.path().join(format!("curl-{region}"));
        let out = run(Command::new("curl")
            .args(["-sfL", "--interface", client, "-o"])
            .arg(&out_file)
            .args(["-w", "%{url_effective}", &url]));
        let effective = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            effective,
            format!("http://{mirror}/{FILE}"),
            "curl from {client}"
        );
        assert_eq!(meridian_e2e::hash_file(&out_file), want, "curl's bytes");
        // wget
        let wget_dir = dir.path().join(format!("wget-{region}"));
        std::fs::create_dir_all(&wget_dir).unwrap();
        let out = run(Command::new("wget")
            .args(["-S", "--bind-address", client, "-P"])
            .arg(&wget_dir)
            .arg(&url));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains(&format!("Location: http://{mirror}/{FILE}")),
            "wget from {client}:\n{log}"
        );
        assert_eq!(
            meridian_e2e::hash_file(&wget_dir.join("tool-1.0.tar.gz")),
            want,
            "wget's bytes"
        );
        // The other mirrors, and the hash.
        let h = head(&["--interface", client, &url]);
        assert!(h.starts_with("HTTP/1.1 302"), "{h}");
        assert_eq!(header(&h, "x-meridian-blake3"), [want.to_string()], "{h}");
        let links: Vec<&str> = header(&h, "link")
            .into_iter()
            .filter(|l| l.contains("rel=duplicate"))
            .collect();
        assert_eq!(links.len(), 3, "{h}");
        assert!(
            header(&h, "link").contains(
                &"</releases/1.0/tool-1.0.tar.gz.meta4>; rel=describedby; type=\"application/metalink4+xml\""
            ),
            "{h}"
        );
        for (k, l) in links.iter().enumerate() {
            assert!(
                l.contains("rel=duplicate") && l.contains(&format!("pri={}", k + 2)),
                "{l}"
            );
            assert!(!l.contains(&mirror.to_string()), "the target again in {l}");
        }
    }
    assert!(head(&[&format!("{base}/no/such/file")]).starts_with("HTTP/1.1 404"));
    assert!(head(&["-X", "POST", &url]).starts_with("HTTP/1.1 405"));
    assert!(head(&[&format!("{base}/a%00b")]).starts_with("HTTP/1.1 400"));
    // HEAD is answered like GET.
    let h = head(&["-I", "--interface", "127.0.20.2", &url]);
    assert!(
        h.starts_with("HTTP/1.1 302") && h.contains(&demo.mirror("eu-west").to_string()),
        "{h}"
    );
    // A directory goes to the mirror's listing.
    let h = head(&[
        "--interface",
        "127.0.20.2",
        &format!("{base}/releases/1.0/"),
    ]);
    assert_eq!(
        header(&h, "location"),
        [format!("http://{}/releases/1.0/", demo.mirror("eu-west"))],
        "{h}"
    );
}

/// Whatever the path, the request target or the headers, a redirect goes
/// to a configured mirror and nowhere else.
#[tokio::test]
async fn no_request_makes_it_redirect_anywhere_but_a_mirror() {
    let demo = Demo::start(&[]);
    let addr = demo.addr("redirector");
    let base = format!("http://{addr}");
    ready(&base, FILE).await;
    let mirrors: Vec<String> = ["ap-southeast", "eu-west", "us-east", "sa-east"]
        .iter()
        .map(|r| format!("http://{}/", demo.mirror(r)))
        .collect();
    let targets = [
        "//evil.example/x",
        "///evil.example/",
        "/\\evil.example/",
        "/%5cevil.example/",
        "/%2f%2fevil.example/",
        "/http://evil.example/",
        "/https:%2f%2fevil.example",
        "/releases/1.0/tool-1.0.tar.gz%0d%0aLocation:%20http://evil.example/",
        "/releases/1.0/tool-1.0.tar.gz%0d%0a%0d%0a<html>",
        "/releases/../../../evil.example",
        "/releases/1.0/../../releases/1.0/tool-1.0.tar.gz",
        "/%2e%2e/%2e%2e/etc/passwd",
        "http://evil.example/releases/1.0/tool-1.0.tar.gz",
        "@evil.example/releases",
    ];
    let mut redirects = 0;
    for t in targets {
        for extra in [
            vec![],
            vec!["-H", "Host: evil.example"],
            vec!["-H", "X-Forwarded-For: 203.0.113.9, evil.example"],
            vec!["-H", "X-Forwarded-Host: evil.example"],
        ] {
            let mut args = vec!["--path-as-is", "--request-target", t];
            args.extend(extra.iter().copied());
            args.push(&base);
            let h = head(&args);
            let status: u16 = h
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            assert!(status != 0, "{t}: no response: {h}");
            for l in header(&h, "location").into_iter().chain(header(&h, "link")) {
                let l = l.trim_start_matches('<');
                // The Metalink link is relative: this host, this path.
                if l.starts_with('/') && !l.starts_with("//") {
                    assert!(l.contains(".meta4>; rel=describedby"), "{t}: {l}");
                    continue;
                }
                assert!(
                    mirrors.iter().any(|m| l.starts_with(m.as_str())),
                    "{t} {extra:?}: a target that is not a mirror: {l}\n{h}"
                );
                assert!(!l.contains("evil"), "{t}: {l}");
            }
            assert!(
                !h.to_ascii_lowercase().contains("evil"),
                "{t} {extra:?}: the request echoed into the head:\n{h}"
            );
            if status == 302 {
                redirects += 1;
            } else {
                assert!((400..500).contains(&status), "{t}: {h}");
            }
        }
    }
    // The dot-segment path that stays inside the tree is a real file.
    assert!(redirects >= 4, "{redirects} redirects");
}

/// Two mirrors: `near` (placed where the client is) pulls through an
/// upstream that then freezes on an old root, so it stays a generation
/// behind; `far` follows the origin. After a publish that changes x only,
/// x goes to `far` every time and y (unchanged) still to `near`.
#[tokio::test]
async fn a_lagging_mirror_gets_the_unchanged_files_and_never_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("x.txt"), b"x, first version").unwrap();
    std::fs::write(content.join("y.txt"), b"y, never changes").unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = eventually("the first publish", DEADLINE, || async {
        client.root().await.map(|r| r.root.generation)
    })
    .await;
    let (evil, evil_srv) = Evil::start(oaddr, Mode::Honest).await;
    let (_near, near) = mirror(
        "near",
        &[format!("http://{}", evil_srv.local_addr)],
        &key,
        &dir.path().join("near"),
        &["--poll-interval", "1s"],
    );
    let (_far, far) = mirror(
        "far",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("far"),
        &["--poll-interval", "1s"],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, near, g1).await;
    wait_generation(&http, far, g1).await;
    // A publish of our own, after whatever the origin published at start:
    // nothing newer exists once both mirrors hold it.
    std::fs::write(content.join("z.txt"), b"marks the generation near keeps").unwrap();
    // (z, written and closed, may be published before x and y, written
    // before the origin started, have been quiet long enough: wait for
    // the generation that has all three.)
    let held = eventually("the origin to publish x, y and z", DEADLINE, || async {
        let r = client.root().await?;
        let files = client.files(r.root.tree).await;
        ["x.txt", "y.txt", "z.txt"]
            .iter()
            .all(|f| files.contains_key(*f))
            .then_some(r)
    })
    .await;
    let g1 = wait_generation(&http, near, held.root.generation).await;
    wait_generation(&http, far, g1).await;
    // near's upstream now offers that root forever: near stays there.
    *evil.fake_root.lock().unwrap() = held.envelope.clone();
    evil.set_mode(Mode::FakeRoot);

    let mut g = geodns(
        dir.path(),
        &format!(
            r#"
[selection]
band = 1.0
band_km = 0.0
[[overrides]]
network = "127.0.0.0/8"
latitude = 50.0
longitude = 10.0
[redirector]
listen = "127.0.0.1:0"
upstreams = ["http://{oaddr}"]
trust = ["{key}"]
[[mirrors]]
id = "near"
latitude = 50.0
longitude = 10.0
ipv4 = ["127.0.0.1"]
status_url = "http://{near}/.meridian/status"
[[mirrors]]
id = "far"
latitude = -30.0
longitude = 150.0
ipv4 = ["127.0.0.1"]
status_url = "http://{far}/.meridian/status"
"#
        ),
    );
    let raddr = g.listening("geodns redirector");
    let base = format!("http://{raddr}");
    let location = |path: &str| {
        let h = head(&[&format!("{base}/{path}")]);
        let gen_ = header(&h, "x-meridian-generation")
            .first()
            .and_then(|v| v.parse::<u64>().ok());
        (header(&h, "location").first().map(|s| s.to_string()), gen_)
    };
    // Both mirrors current: the client's own (near) gets both files.
    eventually("near to get both files", DEADLINE, || async {
        (location("x.txt").0? == format!("http://{near}/x.txt")
            && location("y.txt").0? == format!("http://{near}/y.txt"))
        .then_some(())
    })
    .await;

    // A publish that changes x only.
    std::fs::write(content.join("x.txt"), b"x, second version").unwrap();
    let g2 = eventually("the second publish", DEADLINE, || async {
        let n = client.root().await?.root.generation;
        (n > g1).then_some(n)
    })
    .await;
    wait_generation(&http, far, g2).await;
    // Until the redirector has the new generation and a probe has seen far
    // serve it, x goes nowhere (503): no mirror is known to have its bytes.
    eventually("x to go to far", DEADLINE, || async {
        let (x, gx) = location("x.txt");
        (gx? == g2 && x? == format!("http://{far}/x.txt")).then_some(())
    })
    .await;
    let st = meridian_e2e::status(&http, near).await.unwrap();
    assert_eq!(st.generation, g1, "near stays behind");
    for _ in 0..20 {
        let (x, gx) = location("x.txt");
        assert_eq!(gx, Some(g2));
        assert_eq!(
            x.as_deref(),
            Some(format!("http://{far}/x.txt").as_str()),
            "x changed: never to the lagging mirror"
        );
        let (y, _) = location("y.txt");
        assert_eq!(
            y.as_deref(),
            Some(format!("http://{near}/y.txt").as_str()),
            "y did not change: still to the nearest mirror, behind or not"
        );
    }
    // And what the client gets from the target is x's new version.
    let got = reqwest::get(format!("{base}/x.txt"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], b"x, second version");
}

fn sha256_of(p: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(p));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

async fn requests(http: &reqwest::Client, m: std::net::SocketAddr) -> f64 {
    let text = meridian_e2e::metrics_text(http, m)
        .await
        .unwrap_or_default();
    meridian_e2e::metric(&text, "meridian_mirror_requests_total")
}

/// aria2c takes the Metalink and downloads from all four demo mirrors at
/// once, checking every piece; the Metalink's SHA-256 is the file's.
#[tokio::test]
async fn aria2c_downloads_the_metalink_from_all_four_mirrors_and_checks_it() {
    let demo = Demo::start(&[]);
    let base = format!("http://{}", demo.addr("redirector"));
    ready(&base, FILE).await;
    let http = reqwest::Client::new();
    let regions = ["ap-southeast", "eu-west", "us-east", "sa-east"];
    let mut before = Vec::new();
    for r in regions {
        before.push(requests(&http, demo.mirror(r)).await);
    }
    let meta = reqwest::get(format!("{base}/{FILE}.meta4")).await.unwrap();
    assert_eq!(meta.headers()["content-type"], "application/metalink4+xml");
    let xml = meta.text().await.unwrap();
    let original = demo.content().join(FILE);
    let sha = sha256_of(&original);
    assert!(
        xml.contains(&format!("<hash type=\"sha-256\">{sha}</hash>")),
        "{xml}"
    );
    assert_eq!(xml.matches("<url ").count(), 4, "{xml}");
    assert_eq!(
        xml.matches("<hash>").count(),
        5,
        "5 MiB in 1 MiB pieces: {xml}"
    );
    // The same through content negotiation.
    let negotiated = http
        .get(format!("{base}/{FILE}"))
        .header("accept", "application/metalink4+xml")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(negotiated.contains(&sha), "{negotiated}");
    // The 302 now carries the digest.
    let h = head(&[&format!("{base}/{FILE}")]);
    assert_eq!(header(&h, "repr-digest").len(), 1, "{h}");

    let dir = tempfile::tempdir().unwrap();
    run(Command::new("aria2c")
        .args([
            "--check-integrity=true",
            "--split=4",
            "--max-connection-per-server=1",
            "--min-split-size=1M",
            "--console-log-level=warn",
            "--summary-interval=0",
            "-d",
        ])
        .arg(dir.path())
        .arg(format!("{base}/{FILE}.meta4")));
    assert_eq!(sha256_of(&dir.path().join("tool-1.0.tar.gz")), sha);
    let mut used = 0;
    for (r, b) in regions.iter().zip(&before) {
        let after = requests(&http, demo.mirror(r)).await;
        if after > *b {
            used += 1;
        }
    }
    assert_eq!(used, 4, "aria2c fetched from {used} of the 4 mirrors");
}

/// The start of each test's GeoDNS config: DNS on any port, probes
/// every 300 ms.
const GEODNS: &str = r#"listen = ["127.0.0.1:0"]
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test."]
[health]
interval = "300ms"
timeout = "1s"
up_after = 1
down_after = 2"#;

/// Starts GeoDNS with [`GEODNS`] and then `rest` as its config.
fn geodns(dir: &std::path::Path, rest: &str) -> Proc {
    let cfg = dir.join("geodns.toml");
    std::fs::write(&cfg, format!("{GEODNS}\n{rest}")).unwrap();
    Proc::spawn(&["geodns", "--config", cfg.to_str().unwrap()], &[])
}

/// An origin publishing `files` and a mirror for each of `names`, all
/// holding the generation with every file.
struct Net {
    dir: tempfile::TempDir,
    oaddr: std::net::SocketAddr,
    key: meridian_core::PublicKey,
    generation: u64,
    _procs: Vec<Proc>,
    mirrors: Vec<std::net::SocketAddr>,
}

async fn net(files: &[(&str, &[u8])], names: &[&str]) -> Net {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    for (name, bytes) in files {
        std::fs::write(content.join(name), bytes).unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let (o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let generation = eventually("the publish", DEADLINE, || async {
        let r = client.root().await?;
        let have = client.files(r.root.tree).await;
        files
            .iter()
            .all(|(n, _)| have.contains_key(*n))
            .then_some(r.root.generation)
    })
    .await;
    let mut procs = vec![o];
    let mut mirrors = Vec::new();
    for name in names {
        let (p, addr) = mirror(
            name,
            &[format!("http://{oaddr}")],
            &key,
            &dir.path().join(name),
            &[],
        );
        procs.push(p);
        mirrors.push(addr);
    }
    let http = reqwest::Client::new();
    for &m in &mirrors {
        wait_generation(&http, m, generation).await;
    }
    Net {
        dir,
        oaddr,
        key,
        generation,
        _procs: procs,
        mirrors,
    }
}

/// One mirror flips a byte in everything it sends; aria2c's piece check
/// catches it, the pieces come from the honest mirror, and the file is
/// right. (Multi-threaded: the lying proxy runs in this test's runtime
/// while aria2c blocks the test's thread.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_mirror_is_caught_by_aria2cs_piece_check() {
    let net = net(
        &[("big.bin", &meridian_e2e::noise(6 << 20, 7))],
        &["honest", "liar"],
    )
    .await;
    let (dir, oaddr, key) = (&net.dir, net.oaddr, net.key);
    let (a, b) = (net.mirrors[0], net.mirrors[1]);
    // On its own loopback address: aria2 keeps its server statistics per
    // host name.
    let (evil, liar_srv) = Evil::start_on("127.0.0.2:0", b, Mode::FlipDownloads).await;
    let liar = liar_srv.local_addr;
    let mut gd = geodns(
        dir.path(),
        &format!(
            r#"
[selection]
band = 1.0
band_km = 0.0
[[overrides]]
network = "127.0.0.0/8"
latitude = 0.0
longitude = 0.0
[redirector]
listen = "127.0.0.1:0"
upstreams = ["http://{oaddr}"]
trust = ["{key}"]
[[mirrors]]
id = "liar"
latitude = 0.0
longitude = 0.0
ipv4 = ["127.0.0.1"]
status_url = "http://{liar}/.meridian/status"
[[mirrors]]
id = "honest"
latitude = 0.0
longitude = 10.0
ipv4 = ["127.0.0.1"]
status_url = "http://{a}/.meridian/status"
"#
        ),
    );
    let base = format!("http://{}", gd.listening("geodns redirector"));
    ready(&base, "big.bin").await;
    eventually("both mirrors in the Metalink", DEADLINE, || async {
        let xml = reqwest::get(format!("{base}/big.bin.meta4"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (xml.matches("<url ").count() == 2).then_some(())
    })
    .await;
    let out_dir = tempfile::tempdir().unwrap();
    let out = run(Command::new("timeout")
        .args([
            "120",
            "aria2c",
            "--check-integrity=true",
            "--split=4",
            "--max-connection-per-server=2",
            "--min-split-size=1M",
            "--uri-selector=inorder",
            "--max-tries=10",
            "--console-log-level=info",
            "--summary-interval=0",
            "-d",
        ])
        .arg(out_dir.path())
        .arg(format!("{base}/big.bin.meta4")));
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        sha256_of(&out_dir.path().join("big.bin")),
        sha256_of(&dir.path().join("content/big.bin")),
        "{log}"
    );
    // aria2c's own piece check caught the liar, and retried elsewhere.
    assert!(
        log.contains("Chunk checksum validation failed")
            && log.contains(&format!(
                "Restarting the download. URI=http://{liar}/big.bin"
            )),
        "no piece caught: {log}"
    );
    assert!(
        evil.objects_served
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the liar was never asked: {log}\n{}",
        reqwest::get(format!("{base}/big.bin.meta4"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    );
}

/// The redirector over HTTPS (rustls) as well as HTTP; behind a trusted
/// proxy it places the client by `X-Forwarded-For`, from anyone else it
/// ignores the header; conditional requests reach the mirror and come
/// back 304; `?mirrorlist` lists every mirror, and the download counts
/// (the JSON summary and the metrics) count one per download: not HEAD,
/// not a later range.
#[tokio::test]
async fn https_trusted_proxies_mirror_list_and_download_counts() {
    let body = meridian_e2e::noise(200_000, 3);
    let net = net(&[("pkg.bin", &body)], &["west", "east"]).await;
    let (dir, oaddr, key, g) = (&net.dir, net.oaddr, net.key, net.generation);
    let (west, east) = (net.mirrors[0], net.mirrors[1]);
    let http = reqwest::Client::new();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let mut gd = geodns(
        dir.path(),
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token = "t0ken"
# Clients in the west, clients in the east, and the proxies (placed
# in the middle of nowhere: they are never the client).
[[overrides]]
network = "127.0.31.0/24"
latitude = 48.0
longitude = 2.0
[[overrides]]
network = "127.0.32.0/24"
latitude = 35.0
longitude = 139.0
[[overrides]]
network = "127.0.0.0/8"
latitude = 0.0
longitude = -30.0
[redirector]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
tls_cert = "{cert}"
tls_key = "{tlskey}"
upstreams = ["http://{oaddr}"]
trust = ["{key}"]
trusted_proxies = ["127.0.33.0/24"]
[[mirrors]]
id = "west"
latitude = 48.0
longitude = 2.0
country = "FR"
ipv4 = ["127.0.0.1"]
status_url = "http://{west}/.meridian/status"
[[mirrors]]
id = "east"
latitude = 35.0
longitude = 139.0
country = "JP"
ipv4 = ["127.0.0.1"]
status_url = "http://{east}/.meridian/status"
"#,
            cert = cert_path.display(),
            tlskey = key_path.display(),
        ),
    );
    let raddr = gd.listening("geodns redirector");
    let https_line = gd.wait_line("geodns redirector listening on https://", DEADLINE);
    let tls_port: u16 = https_line
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {https_line:?}"));
    let admin = gd.listening("geodns admin");
    let base = format!("http://{raddr}");
    let url = format!("{base}/pkg.bin");
    let location = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push(&url);
        let h = head(&a);
        header(&h, "location").first().map(|s| s.to_string())
    };
    let to_west = format!("http://{west}/pkg.bin");
    let to_east = format!("http://{east}/pkg.bin");
    eventually("both mirrors in the redirect", DEADLINE, || async {
        (location(&["--interface", "127.0.31.1"])? == to_west
            && location(&["--interface", "127.0.32.1"])? == to_east)
            .then_some(())
    })
    .await;

    // HTTPS: the same answer, through rustls, verified against the cert.
    let out = run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-", "--cacert"])
        .arg(&cert_path)
        .args(["--interface", "127.0.32.1", "--resolve"])
        .arg(format!("localhost:{tls_port}:127.0.0.1"))
        .arg(format!("https://localhost:{tls_port}/pkg.bin")));
    let h = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(h.starts_with("HTTP/1.1 302"), "{h}");
    assert_eq!(header(&h, "location"), [to_east.as_str()], "{h}");
    // ... and curl -L through it gets the file.
    let got = run(Command::new("curl")
        .args(["-sSfL", "--cacert"])
        .arg(&cert_path)
        .args(["--interface", "127.0.31.1", "--resolve"])
        .arg(format!("localhost:{tls_port}:127.0.0.1"))
        .arg(format!("https://localhost:{tls_port}/pkg.bin")));
    assert!(got.stdout == body, "the bytes through the HTTPS redirect");

    // X-Forwarded-For: believed from a trusted proxy (the right-most
    // address that is not itself a trusted proxy), ignored from anyone
    // else.
    let xff = |from: &str, v: &str| {
        location(&["--interface", from, "-H", &format!("X-Forwarded-For: {v}")])
    };
    assert_eq!(
        xff("127.0.33.1", "127.0.32.7").as_deref(),
        Some(to_east.as_str())
    );
    assert_eq!(
        xff("127.0.33.1", "127.0.31.7").as_deref(),
        Some(to_west.as_str())
    );
    assert_eq!(
        xff("127.0.33.1", "127.0.32.7, 127.0.33.2").as_deref(),
        Some(to_east.as_str()),
        "through two trusted proxies"
    );
    assert_eq!(
        xff("127.0.33.1", "127.0.32.7, 127.0.31.7").as_deref(),
        Some(to_west.as_str()),
        "a client's own claim left of the address the proxy saw is not believed"
    );
    assert_eq!(
        xff("127.0.31.1", "127.0.32.7").as_deref(),
        Some(to_west.as_str()),
        "from an untrusted peer the header is ignored"
    );

    // Conditional requests follow the redirect to the mirror: 304 there.
    let h = head(&["-L", "--interface", "127.0.31.1", &url]);
    let etag = header(&h, "etag")
        .last()
        .map(|s| s.to_string())
        .unwrap_or_else(|| panic!("no ETag from the mirror: {h}"));
    let h = head(&[
        "-L",
        "--interface",
        "127.0.31.1",
        "-H",
        &format!("If-None-Match: {etag}"),
        &url,
    ]);
    assert!(
        h.starts_with("HTTP/1.1 302") && h.contains("HTTP/1.1 304"),
        "If-None-Match: {h}"
    );
    let saved = dir.path().join("saved.bin");
    std::fs::write(&saved, &body).unwrap();
    let out = run(Command::new("curl")
        .args([
            "-s",
            "-L",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--interface",
            "127.0.31.1",
            "-z",
        ])
        .arg(&saved)
        .arg(&url));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "304",
        "If-Modified-Since"
    );

    // The mirror list: both mirrors, nearest first, with their state.
    let list: serde_json::Value = serde_json::from_slice(
        &run(Command::new("curl")
            .args(["-sSf", "--interface", "127.0.32.1"])
            .arg(format!("{url}?mirrorlist=json")))
        .stdout,
    )
    .unwrap();
    assert_eq!(list["path"], "pkg.bin", "{list}");
    assert_eq!(list["generation"], g, "{list}");
    let rows = list["mirrors"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["east", "west"], "nearest first: {list}");
    for r in rows {
        assert_eq!(r["standing"], "in_service", "{list}");
        assert_eq!(r["generation"], g, "{list}");
        assert_eq!(r["has_it"], true, "{list}");
    }
    assert!(rows[0]["distance_km"].as_f64().unwrap() < 100.0, "{list}");
    assert!(rows[1]["distance_km"].as_f64().unwrap() > 5000.0, "{list}");
    let page = String::from_utf8_lossy(
        &run(Command::new("curl")
            .args(["-sSf", "--interface", "127.0.32.1"])
            .arg(format!("{url}?mirrorlist")))
        .stdout,
    )
    .into_owned();
    assert!(
        page.contains("<table") && page.contains("west") && page.contains("east"),
        "{page}"
    );

    // Download counts: 3 downloads to west, 2 to east; a HEAD, a resume
    // and the later ranges of a split download are not downloads.
    let stats = || async {
        let b = reqwest::get(format!("{base}/.meridian/stats"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()
    };
    let before = stats().await;
    let counted = |s: &serde_json::Value, m: &str| s["by_mirror"][m].as_u64().unwrap_or(0);
    for (from, n) in [("127.0.31.1", 3), ("127.0.32.1", 2)] {
        for _ in 0..n {
            run(Command::new("curl").args(["-sSf", "-o", "/dev/null", "--interface", from, &url]));
        }
    }
    for args in [
        vec!["-I"],
        vec!["-H", "Range: bytes=1000-"],
        vec!["-H", "Range: bytes=100000-199999"],
    ] {
        let mut a = args.clone();
        a.extend(["--interface", "127.0.31.1", &url]);
        head(&a);
    }
    let after = stats().await;
    assert_eq!(
        counted(&after, "west") - counted(&before, "west"),
        3,
        "{after}"
    );
    assert_eq!(
        counted(&after, "east") - counted(&before, "east"),
        2,
        "{after}"
    );
    let file_count = |s: &serde_json::Value| {
        s["top_files"]
            .as_array()
            .and_then(|f| f.iter().find(|e| e["path"] == "pkg.bin"))
            .and_then(|e| e["downloads"].as_u64())
            .unwrap_or(0)
    };
    assert_eq!(file_count(&after) - file_count(&before), 5, "{after}");
    let text = meridian_e2e::admin_get(&http, admin, "/metrics", "t0ken")
        .await
        .unwrap();
    let series = |m: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "meridian_redirector_redirects_total{{mirror=\"{m}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        series("west") + series("east"),
        counted(&after, "west") as f64 + counted(&after, "east") as f64,
        "{text}"
    );
}
