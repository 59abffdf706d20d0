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
    let held = eventually("the origin to publish z", DEADLINE, || async {
        let r = client.root().await?;
        client
            .files(r.root.tree)
            .await
            .contains_key("z.txt")
            .then_some(r)
    })
    .await;
    let g1 = wait_generation(&http, near, held.root.generation).await;
    wait_generation(&http, far, g1).await;
    // near's upstream now offers that root forever: near stays there.
    *evil.fake_root.lock().unwrap() = held.envelope.clone();
    evil.set_mode(Mode::FakeRoot);

    let cfg = dir.path().join("geodns.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen = ["127.0.0.1:0"]
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test."]
[health]
interval = "300ms"
timeout = "1s"
up_after = 1
down_after = 2
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
    )
    .unwrap();
    let mut g = Proc::spawn(&["geodns", "--config", cfg.to_str().unwrap()], &[]);
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

/// One mirror flips a byte in everything it sends; aria2c's piece check
/// catches it, the pieces come from the honest mirror, and the file is
/// right. (Multi-threaded: the lying proxy runs in this test's runtime
/// while aria2c blocks the test's thread.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_mirror_is_caught_by_aria2cs_piece_check() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("big.bin"), meridian_e2e::noise(6 << 20, 7)).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = eventually("the publish", DEADLINE, || async {
        let r = client.root().await?;
        client
            .files(r.root.tree)
            .await
            .contains_key("big.bin")
            .then_some(r.root.generation)
    })
    .await;
    let (_a, a) = mirror(
        "honest",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("a"),
        &[],
    );
    let (_b, b) = mirror(
        "liar",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("b"),
        &[],
    );
    let http = reqwest::Client::new();
    wait_generation(&http, a, g).await;
    wait_generation(&http, b, g).await;
    // On its own loopback address: aria2 keeps its server statistics per
    // host name.
    let (evil, liar_srv) = Evil::start_on("127.0.0.2:0", b, Mode::FlipDownloads).await;
    let liar = liar_srv.local_addr;
    let cfg = dir.path().join("geodns.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
listen = ["127.0.0.1:0"]
[[zones]]
name = "meridian.test"
ns = ["ns1.meridian.test."]
[health]
interval = "300ms"
up_after = 1
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
    )
    .unwrap();
    let mut gd = Proc::spawn(&["geodns", "--config", cfg.to_str().unwrap()], &[]);
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
        sha256_of(&content.join("big.bin")),
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
