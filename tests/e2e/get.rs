//! `meridian get`, run as a user runs it: through the demo's redirector
//! from several mirrors; past a mirror that flips a byte; against mirrors
//! that all lie; killed halfway and run again.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{
    Demo, Proc, ReadClient, eventually, keygen, meridian_bin, metric, metrics_text, mirror, noise,
    origin, signal,
};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);
const BLOCK: u64 = 256 << 10;

/// `meridian get ARGS`: (exit code, stderr).
fn get(args: &[&str]) -> (i32, String) {
    // Bounded: a client that never gives up fails the test, not hangs it.
    let out = Command::new("timeout")
        .arg("120")
        .arg(meridian_bin())
        .arg("get")
        .args(args)
        .env("MERIDIAN_LOG", "info")
        .output()
        .expect("meridian get runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `meridian get` of big.bin from `mirrors` into `dest`, with `extra`
/// flags.
fn get_big(key: &str, mirrors: &[&str], dest: &Path, extra: &[&str]) -> (i32, String) {
    let mut args: Vec<&str> = vec!["--trust", key];
    args.extend_from_slice(extra);
    for m in mirrors {
        args.extend(["--mirror", m]);
    }
    args.extend(["-o", dest.to_str().unwrap(), "big.bin"]);
    get(&args)
}

/// Body bytes a mirror has sent for downloads (every status class).
async fn sent(http: &reqwest::Client, m: SocketAddr) -> f64 {
    let t = metrics_text(http, m).await.expect("metrics");
    let n = metric(&t, "meridian_mirror_response_bytes_total");
    assert!(
        t.contains("meridian_mirror_response_bytes_total{"),
        "no byte counter in the metrics: {t}"
    );
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_through_the_redirector_fetches_from_several_mirrors_and_whole_directories() {
    let demo = Demo::start(&[]);
    let http = meridian_e2e::http();
    let key = demo.net["public_key"].as_str().unwrap().to_owned();
    let redirector = format!("http://{}", demo.addr("redirector"));
    let regions = ["ap-southeast", "eu-west", "us-east", "sa-east"];
    // Until the redirector names all four (probes have passed).
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    eventually("the redirector to name 4 mirrors", DEADLINE, || async {
        let r = no_follow
            .head(format!("{redirector}/releases/1.0/tool-1.0.tar.gz"))
            .send()
            .await
            .ok()?;
        let dups = r
            .headers()
            .get_all("link")
            .iter()
            .filter(|v| v.to_str().is_ok_and(|v| v.contains("rel=duplicate")))
            .count();
        (r.status() == 302 && dups == 3).then_some(())
    })
    .await;
    let mut before = Vec::new();
    for r in regions {
        before.push(sent(&http, demo.mirror(r)).await);
    }
    let out = tempfile::tempdir().unwrap();
    let file = "releases/1.0/tool-1.0.tar.gz";
    let dest = out.path().join("tool.tar.gz");
    let (code, log) = get(&[
        "--trust",
        &key,
        "-v",
        "-o",
        dest.to_str().unwrap(),
        &format!("{redirector}/{file}"),
    ]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(demo.content().join(file)).unwrap()
    );
    // Ranges went to more than one mirror: their own counters say so.
    let mut used = 0;
    for (r, b) in regions.iter().zip(&before) {
        let d = sent(&http, demo.mirror(r)).await - b;
        if d >= BLOCK as f64 {
            used += 1;
        }
    }
    assert!(used >= 2, "one mirror sent it all: {log}");
    assert!(
        !out.path().join(".tool.tar.gz.meridian-part").exists(),
        "the partial file was renamed into place"
    );

    // A directory, whole, into the current directory under its name.
    let (code, log) = {
        let o = Command::new(meridian_bin())
            .current_dir(out.path())
            .args(["get", "--trust", &key, &format!("{redirector}/releases/")])
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, 0, "{log}");
    let mut n = 0;
    for e in walkdir(&demo.content().join("releases")) {
        let rel = e.strip_prefix(demo.content().join("releases")).unwrap();
        assert_eq!(
            std::fs::read(out.path().join("releases").join(rel)).unwrap(),
            std::fs::read(&e).unwrap(),
            "{}",
            rel.display()
        );
        n += 1;
    }
    assert!(n >= 2, "the demo's releases/ has files");
    assert!(log.is_empty(), "quiet when not on a terminal: {log}");

    // Not found, and no mirror reachable: their own exit codes.
    let (code, log) = get(&["--trust", &key, &format!("{redirector}/no/such/file")]);
    assert_eq!(code, 3, "{log}");
    let (code, log) = get(&[
        "--trust",
        &key,
        "--mirror",
        "http://127.0.0.1:1",
        "README.txt",
    ]);
    assert_eq!(code, 4, "{log}");
    assert!(log.contains("no mirror answered"), "{log}");
}

fn walkdir(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An origin with `big.bin` and two honest mirrors.
async fn small_net(
    size: usize,
) -> (
    tempfile::TempDir,
    meridian_core::PublicKey,
    Vec<Proc>,
    Vec<SocketAddr>,
) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    std::fs::write(dir.path().join("content/big.bin"), noise(size, 11)).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    eventually("the publish", DEADLINE, || async {
        let r = client.root().await?;
        client
            .files(r.root.tree)
            .await
            .contains_key("big.bin")
            .then_some(())
    })
    .await;
    let mut procs = vec![o];
    let mut addrs = Vec::new();
    for id in ["a", "b"] {
        let (p, a) = mirror(
            id,
            &[format!("http://{oaddr}")],
            &key,
            &dir.path().join(id),
            &[],
        );
        meridian_e2e::wait_generation(&meridian_e2e::http(), a, 1).await;
        procs.push(p);
        addrs.push(a);
    }
    (dir, key, procs, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_flips_a_byte_is_dropped_at_its_range_and_liars_everywhere_leave_no_file() {
    let size = 6 << 20;
    let (dir, key, _procs, m) = small_net(size).await;
    let want = std::fs::read(dir.path().join("content/big.bin")).unwrap();
    let key = key.to_string();
    let (evil, liar) = Evil::start_on("127.0.0.2:0", m[1], Mode::FlipDownloads).await;
    let liar = format!("http://{}", liar.local_addr);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("big.bin");
    let honest = format!("http://{}", m[0]);
    let (code, log) = get_big(&key, &[&liar, &honest], &dest, &["-v"]);
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&dest).unwrap() == want, "wrong bytes: {log}");
    assert!(
        log.contains(&format!("{liar}: blocks")) && log.contains("do not verify: mirror dropped"),
        "the liar was not caught at a range: {log}"
    );
    assert!(
        evil.objects_served
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Every mirror lies: its own exit code, and no file at all.
    let (_evil2, liar2) = Evil::start_on("127.0.0.3:0", m[0], Mode::FlipDownloads).await;
    let dest = out.path().join("lies.bin");
    let liar2 = format!("http://{}", liar2.local_addr);
    let (code, log) = get_big(&key, &[&liar, &liar2], &dest, &[]);
    assert_eq!(code, 5, "{log}");
    assert!(
        log.contains("every mirror sent bytes that do not verify"),
        "{log}"
    );
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("lies"))
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");

    // A root signed by another key is refused, whatever the bytes.
    let other = keygen(&out.path().join("other.key")).to_string();
    let (code, log) = get_big(&other, &[&honest], &dest, &[]);
    assert_eq!(code, 5, "{log}");
    assert!(!dest.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_halfway_it_resumes_with_the_unverified_remainder_plus_one_range_at_most() {
    let size = 16 << 20;
    let (dir, key, _procs, m) = small_net(size).await;
    let want = std::fs::read(dir.path().join("content/big.bin")).unwrap();
    let key = key.to_string();
    let http = meridian_e2e::http();
    // A slow mirror (64 KiB every 50 ms), so the kill comes mid-download.
    let (evil, slow) = Evil::start_on("127.0.0.2:0", m[0], Mode::SlowDownloads).await;
    let slow = format!("http://{}", slow.local_addr);
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("big.bin");
    let part = out.path().join(".big.bin.meridian-part");
    let args = [
        "get",
        "--trust",
        &key,
        "-v",
        "--mirror",
        &slow,
        "-o",
        dest.to_str().unwrap(),
        "big.bin",
    ];
    let mut p = Proc::spawn(&args, &[("MERIDIAN_LOG", "info")]);
    // Until some blocks (not all) are written, then kill -9.
    let written = || {
        let b = std::fs::read(&part).unwrap_or_default();
        b.chunks(BLOCK as usize)
            .zip(want.chunks(BLOCK as usize))
            .filter(|(a, w)| a == w)
            .count() as u64
    };
    eventually("half the blocks written", DEADLINE, || async {
        (written() >= 32).then_some(())
    })
    .await;
    signal(p.child.id() as i32, "KILL");
    p.wait_exit(DEADLINE);
    let kept = written();
    let blocks = (size as u64).div_ceil(BLOCK);
    assert!(kept < blocks, "killed too late: {kept} of {blocks}");
    assert!(!dest.exists(), "no file before it is whole");

    // Again, from an honest mirror: only what is missing, plus at most one
    // range (4 MiB) that was in flight.
    evil.set_mode(Mode::Honest);
    let b0 = sent(&http, m[0]).await;
    let (code, log) = get_big(&key, &[&format!("http://{}", m[0])], &dest, &["-v"]);
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&dest).unwrap() == want);
    assert!(log.contains("resuming:"), "{log}");
    let fetched = sent(&http, m[0]).await - b0;
    let bound = (blocks - kept) * BLOCK + 16 * BLOCK;
    assert!(
        fetched <= bound as f64,
        "fetched {fetched} bytes, more than the {} unverified plus one range: {log}",
        (blocks - kept) * BLOCK
    );
    assert!(!part.exists());
    eprintln!("resume: {kept} of {blocks} blocks kept, {fetched} bytes fetched (bound {bound})");
}

/// Loops verified downloads of `url` until `stop`, at most 60 s and 200
/// downloads, adding the body bytes it receives to `received`; returns
/// (downloads, failures).
fn load_loop(
    url: String,
    want: meridian_core::Hash,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let http = meridian_e2e::http();
        let t0 = std::time::Instant::now();
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && t0.elapsed() < Duration::from_secs(60)
            && ok as usize + failed.len() < 200
        {
            let mut h = blake3::Hasher::new();
            let got = async {
                let mut r = http.get(&url).send().await.map_err(|e| e.to_string())?;
                while let Some(c) = r.chunk().await.map_err(|e| e.to_string())? {
                    h.update(&c);
                    received.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<_, String>(())
            }
            .await;
            match got {
                Ok(()) if meridian_core::Hash(*h.finalize().as_bytes()) == want => ok += 1,
                Ok(()) => failed.push("wrong bytes".to_owned()),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_cap_holds_the_rate_and_geodns_spills_london_when_the_mirror_is_full() {
    let demo = Demo::start(&[]);
    let http = meridian_e2e::http();
    let eu = demo.mirror("eu-west");
    let dns = demo.addr("dns");
    let london = Some(("81.2.69.0", 24));
    let first = || async {
        meridian_e2e::dns_a(dns, "dl.meridian.test", london, None)
            .await
            .and_then(|a| a.first().copied())
    };
    eventually("London to get eu-west", DEADLINE, || async {
        (first().await? == eu.ip()).then_some(())
    })
    .await;
    // A 3 MB/s cap, put in force by SIGHUP.
    let cap = 3_000_000u64;
    let cfg = demo.config("mirror-eu-west.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("egress_cap_bytes_per_sec = {cap}\n"));
    std::fs::write(&cfg, text).unwrap();
    signal(demo.pid("mirror-eu-west"), "HUP");
    eventually(
        "the cap to be reported as the capacity",
        DEADLINE,
        || async {
            (meridian_e2e::status(&http, eu)
                .await?
                .capacity_bytes_per_sec
                == cap)
                .then_some(())
        },
    )
    .await;

    // Four clients download from eu-west without pause.
    let file = "releases/1.0/tool-1.0.tar.gz";
    let want = meridian_e2e::hash_file(&demo.content().join(file));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let loads: Vec<_> = (0..4)
        .map(|_| {
            load_loop(
                format!("http://{eu}/{file}"),
                want,
                stop.clone(),
                received.clone(),
            )
        })
        .collect();
    // The rate the clients receive over 4 s, once the load runs.
    let got = || received.load(std::sync::atomic::Ordering::Relaxed) as f64;
    eventually("the load to start", DEADLINE, || async {
        (got() > 1_000_000.0).then_some(())
    })
    .await;
    let (t0, s0) = (std::time::Instant::now(), got());
    // GeoDNS sees it full (egress at its capacity) and sends London on.
    let spilled = eventually("London spilled to another region", DEADLINE, || async {
        let a = first().await?;
        (a != eu.ip()).then_some(a)
    })
    .await;
    while t0.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = (got() - s0) / t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for l in loads {
        let (ok, failed) = l.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    eprintln!(
        "egress cap {cap} B/s: measured {rate:.0} B/s ({:+.2}%), London spilled to {spilled}, {total} verified downloads",
        (rate - cap as f64) / cap as f64 * 100.0
    );
    assert!(
        (rate - cap as f64).abs() / (cap as f64) < 0.05,
        "rate {rate:.0} B/s is not within 5% of the {cap} B/s cap"
    );
    // Load gone: London comes back.
    eventually("London back on eu-west", DEADLINE, || async {
        (first().await? == eu.ip()).then_some(())
    })
    .await;
}
