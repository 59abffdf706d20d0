//! Mirrors as real processes: tiered sync, verification, resume, serving.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{
    ReadClient, eventually, http, keygen, metric, mirror, noise, origin, status, wait_generation,
};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

async fn origin_generation(client: &ReadClient) -> u64 {
    client.root().await.map(|r| r.root.generation).unwrap_or(0)
}

/// Waits for the origin to publish what is on disk now, returns its generation.
async fn published(client: &ReadClient, content: &Path, after: u64) -> u64 {
    let want = files_on_disk(content);
    eventually("origin to publish the content", DEADLINE, || async {
        let r = client.root().await?;
        if r.root.generation <= after {
            return None;
        }
        let got: Vec<String> = client.files(r.root.tree).await.into_keys().collect();
        (got == want).then_some(r.root.generation)
    })
    .await
}

fn files_on_disk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(
                    e.path()
                        .strip_prefix(root)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

async fn get(http: &reqwest::Client, addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let r = http
        .get(format!("http://{addr}/{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// Every file on disk is served byte for byte by `addr`.
async fn serves_exactly(http: &reqwest::Client, addr: std::net::SocketAddr, content: &Path) {
    for f in files_on_disk(content) {
        let (code, body) = get(http, addr, &f).await;
        assert_eq!(code, 200, "{f} from {addr}");
        assert!(
            body == std::fs::read(content.join(&f)).unwrap(),
            "{f} from {addr} differs"
        );
    }
}

#[tokio::test]
async fn two_tiers_converge_through_publish_change_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("pool")).unwrap();
    std::fs::write(content.join("index.txt"), b"v1").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(content.join("pool/big.bin"), &big).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let (_a, a) = mirror(
        "a",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("a"),
        &[],
    );
    let (_b, b) = mirror(
        "b",
        &[format!("http://{a}")],
        &key,
        &dir.path().join("b"),
        &[],
    );
    let http = http();

    let mut g = published(&client, &content, 0).await;
    for step in 0..3 {
        wait_generation(&http, a, g).await;
        wait_generation(&http, b, g).await;
        serves_exactly(&http, a, &content).await;
        serves_exactly(&http, b, &content).await;
        match step {
            0 => std::fs::write(content.join("pool/new.deb"), vec![1u8; 100_000]).unwrap(),
            1 => {
                std::fs::write(content.join("index.txt"), b"v2").unwrap();
                std::fs::remove_file(content.join("pool/big.bin")).unwrap();
            }
            _ => break,
        }
        g = published(&client, &content, g).await;
    }
    assert_eq!(
        get(&http, b, "pool/big.bin").await.0,
        404,
        "a deleted file is gone"
    );

    // Ranges through the second tier.
    let r = http
        .get(format!("http://{b}/pool/new.deb"))
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &[1u8; 10]);
    // Status reflects the sync.
    let s = status(&http, b).await.unwrap();
    assert_eq!(s.generation, origin_generation(&client).await);
    assert_eq!(s.sync_state, meridian_serve::status::SyncState::Idle);
}

#[tokio::test]
async fn bad_blobs_from_an_upstream_are_rejected_and_fetched_elsewhere() {
    let o = NoiseOrigin::start(0, 0, |_| String::new());
    let (content, client) = (o.content.as_path(), &o.client);
    let (evil, evil_srv) = Evil::start(o.oaddr, Mode::FlipByte).await;
    let (mut m, maddr) = o.mirror_behind(evil_srv.local_addr);
    let http = http();
    let mut g = published(client, content, 0).await;
    for (i, mode) in [Mode::FlipByte, Mode::Truncate, Mode::Extra]
        .into_iter()
        .enumerate()
    {
        evil.set_mode(mode);
        let before = evil
            .objects_served
            .load(std::sync::atomic::Ordering::Relaxed);
        let data: Vec<u8> = (0..200_000u32)
            .map(|x| (x as u8).wrapping_mul(i as u8 + 3))
            .collect();
        std::fs::write(content.join(format!("file{i}.bin")), &data).unwrap();
        g = published(client, content, g).await;
        wait_generation(&http, maddr, g).await;
        assert!(
            evil.objects_served
                .load(std::sync::atomic::Ordering::Relaxed)
                > before,
            "{mode:?}: the evil upstream was asked first"
        );
        serves_exactly(&http, maddr, content).await;
    }
    let metrics = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    assert!(
        metric(&metrics, "meridian_mirror_verify_failures_total") >= 2.0,
        "{metrics}"
    );
    m.drain();
    m.wait_line("upstream sent bad data", Duration::from_secs(5));
}

#[tokio::test]
async fn forged_replayed_and_expired_roots_are_refused() {
    use meridian_core::{Hash, Root, SecretKey, SignedRoot};
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"real").unwrap();
    let key = keygen(&dir.path().join("key"));
    let secret =
        SecretKey::from_file_text(&std::fs::read_to_string(dir.path().join("key")).unwrap())
            .unwrap();
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = published(&client, &content, 0).await;
    let real = client.root().await.unwrap();

    let (evil, evil_srv) = Evil::start(oaddr, Mode::FakeRoot).await;
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{}", evil_srv.local_addr)],
        &key,
        &dir.path().join("m"),
        &[],
    );
    let http = http();
    let now = meridian_e2e::now();
    let fake_tree = |r: &Root| Root {
        tree: Hash([9; 32]),
        ..r.clone()
    };
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown key",
            SignedRoot::sign(
                &Root {
                    generation: g + 1,
                    previous: real.hash,
                    ..fake_tree(&real.root)
                },
                &SecretKey::from_seed([42; 32]),
            )
            .encode(),
        ),
        (
            "expired",
            SignedRoot::sign(
                &Root {
                    generation: g + 1,
                    previous: real.hash,
                    created: now - 100,
                    expires: now - 10,
                    ..fake_tree(&real.root)
                },
                &secret,
            )
            .encode(),
        ),
        (
            "broken chain",
            SignedRoot::sign(
                &Root {
                    generation: g + 1,
                    previous: Hash([1; 32]),
                    ..fake_tree(&real.root)
                },
                &secret,
            )
            .encode(),
        ),
        ("garbage", b"MSIG\x01 this is not a root".to_vec()),
    ];
    // First let the mirror sync the real generation through the honest path.
    evil.set_mode(Mode::Honest);
    wait_generation(&http, maddr, g).await;
    let mut failures = 0.0;
    for (what, bytes) in attacks {
        *evil.fake_root.lock().unwrap() = bytes;
        evil.set_mode(Mode::FakeRoot);
        let n = eventually(
            &format!("the mirror to refuse the {what} root"),
            DEADLINE,
            || async {
                let m = meridian_e2e::metrics_text(&http, maddr).await?;
                let f = metric(&m, "meridian_mirror_verify_failures_total");
                (f > failures).then_some(f)
            },
        )
        .await;
        failures = n;
        let s = status(&http, maddr).await.unwrap();
        assert_eq!(
            s.generation, g,
            "{what}: the mirror still serves the real generation"
        );
        assert_eq!(get(&http, maddr, "f").await.1, b"real");
    }
    // Replay: offering the generation the mirror already holds.
    *evil.fake_root.lock().unwrap() = real.envelope.clone();
    let before = failures;
    eventually("the mirror to refuse a replayed root", DEADLINE, || async {
        let m = meridian_e2e::metrics_text(&http, maddr).await?;
        (metric(&m, "meridian_mirror_verify_failures_total") > before).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_kill_mid_sync_resumes_from_the_partial_download() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 249) as u8).collect();
    std::fs::write(content.join("large.img"), &data).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = published(&client, &content, 0).await;
    let (_evil, slow) = Evil::start(oaddr, Mode::Slow).await;
    let state = dir.path().join("m");
    let partial = state.join("partial");
    {
        let (mut m, _) = mirror(
            "m",
            &[format!("http://{}", slow.local_addr)],
            &key,
            &state,
            &[],
        );
        // Wait until a good part of the blob is on disk, then kill -9.
        eventually("a partial download to grow", DEADLINE, || async {
            let len: u64 = std::fs::read_dir(&partial)
                .ok()?
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            (len > 1_000_000).then_some(())
        })
        .await;
        m.child.kill().unwrap();
        m.child.wait().unwrap();
    }
    let kept: u64 = std::fs::read_dir(&partial)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(kept > 1_000_000, "the partial download survives the kill");
    // Nothing half-synced is visible: no current generation yet.
    assert!(!state.join("current").exists());

    let (_m, maddr) = mirror("m", &[format!("http://{oaddr}")], &key, &state, &[]);
    let http = http();
    wait_generation(&http, maddr, g).await;
    assert!(get(&http, maddr, "large.img").await.1 == data);
    let metrics = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    let fetched = metric(&metrics, "meridian_mirror_bytes_fetched_total");
    assert!(
        fetched <= (data.len() as u64 - kept) as f64 + 100_000.0,
        "resumed: fetched {fetched} bytes after keeping {kept} of {}",
        data.len()
    );
}

/// Waits until the mirror's `current` file and status both name generation
/// `g` as durable.
async fn wait_durable(http: &reqwest::Client, addr: std::net::SocketAddr, state: &Path, g: u64) {
    eventually(
        "the generation to be flushed and named in `current`",
        DEADLINE,
        || async {
            let s = status(http, addr).await?;
            let cur: u64 = std::fs::read_to_string(state.join("current"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (s.durable_generation == g && cur == g).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn after_a_power_loss_the_mirror_restarts_on_the_flushed_generation_and_rechecks_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("a.bin"), noise(300_000, 1)).unwrap();
    std::fs::write(content.join("keep.txt"), b"unchanged").unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = published(&client, &content, 0).await;
    let state = dir.path().join("m");
    let http = http();
    let up = [format!("http://{oaddr}")];

    let (mut m, maddr) = mirror("m", &up, &key, &state, &[]);
    wait_generation(&http, maddr, g1).await;
    wait_durable(&http, maddr, &state, g1).await;
    // Everything written from here on counts as not yet on disk.
    let flushed_from_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let b = noise(300_000, 2);
    std::fs::write(content.join("a.bin"), &b).unwrap();
    let g2 = published(&client, &content, g1).await;
    wait_generation(&http, maddr, g2).await;
    assert_eq!(get(&http, maddr, "a.bin").await.1, b);
    wait_durable(&http, maddr, &state, g2).await;
    let marker = std::fs::read_to_string(state.join("unflushed")).unwrap();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(
        marker.contains(boot.trim()),
        "a running mirror marks its boot: {marker}"
    );
    m.child.kill().unwrap();
    m.child.wait().unwrap();

    // The machine lost power before the last flush: `current` still names
    // the first generation, and the new blob's pages never reached the disk
    // (same size, wrong bytes).
    std::fs::write(state.join("current"), g1.to_string()).unwrap();
    let hb = meridian_core::hash_bytes(&b);
    let torn = object_path(&state, &hb);
    let mut garbage = b.clone();
    garbage[150_000..160_000].fill(0);
    std::fs::write(&torn, &garbage).unwrap();
    std::fs::write(
        state.join("unflushed"),
        format!("boot another-boot\nflushed-from-ns {flushed_from_ns}\n"),
    )
    .unwrap();

    let (mut m, maddr) = mirror("m", &up, &key, &state, &[]);
    // The torn blob was caught before serving and fetched again: the
    // mirror serves the new generation with the right bytes, never the
    // garbage.
    wait_generation(&http, maddr, g2).await;
    assert_eq!(get(&http, maddr, "a.bin").await.1, b);
    assert_eq!(get(&http, maddr, "keep.txt").await.1, b"unchanged");
    assert!(
        state.join("quarantine").join(hb.to_hex()).exists(),
        "the torn blob was quarantined"
    );
    let marker = std::fs::read_to_string(state.join("unflushed")).unwrap();
    assert!(marker.contains(boot.trim()), "this run's marker: {marker}");
    wait_durable(&http, maddr, &state, g2).await;

    // A clean stop flushes and removes the marker.
    meridian_e2e::signal(m.child.id() as i32, "TERM");
    assert!(m.wait_exit(DEADLINE).is_some_and(|s| s.success()));
    assert!(!state.join("unflushed").exists());
    assert_eq!(
        std::fs::read_to_string(state.join("current"))
            .unwrap()
            .trim(),
        g2.to_string()
    );

    // A marker that is not even text (a torn write, say) is a power loss
    // too: the mirror rechecks and serves, it does not refuse to start.
    std::fs::write(state.join("unflushed"), b"\xff\xfe\x00boot").unwrap();
    let (mut m, maddr) = mirror("m", &up, &key, &state, &[]);
    m.wait_line("unflushed marker is damaged", DEADLINE);
    wait_generation(&http, maddr, g2).await;
    assert_eq!(get(&http, maddr, "a.bin").await.1, b);
}

#[tokio::test]
async fn a_download_across_a_generation_switch_gets_one_consistent_file() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let v1 = vec![1u8; 20_000_000];
    std::fs::write(content.join("image.iso"), &v1).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = published(&client, &content, 0).await;
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("m"),
        &["--gc-grace", "0s"],
    );
    let http = http();
    wait_generation(&http, maddr, g1).await;

    // Start a download and read only its beginning.
    let mut s = std::net::TcpStream::connect(maddr).unwrap();
    s.write_all(b"GET /image.iso HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut head = vec![0u8; 64 * 1024];
    let n = s.read(&mut head).unwrap();
    assert!(n > 0);

    // Replace the file; wait for the mirror to switch (and GC with no grace).
    std::fs::write(content.join("image.iso"), vec![2u8; 20_000_000]).unwrap();
    let g2 = published(&client, &content, g1).await;
    wait_generation(&http, maddr, g2).await;
    assert_eq!(
        get(&http, maddr, "image.iso").await.1[0],
        2,
        "new requests see the new file"
    );
    // One more generation, so the old blob is in neither the served nor the
    // previous generation, and wait until GC has really unlinked it.
    std::fs::write(content.join("other"), b"x").unwrap();
    let g3 = published(&client, &content, g2).await;
    wait_generation(&http, maddr, g3).await;
    let old_hash = meridian_core::hash_bytes(&v1).to_hex();
    let old_obj = dir
        .path()
        .join("m/objects")
        .join(&old_hash[..2])
        .join(&old_hash);
    eventually("the old blob to be garbage-collected", DEADLINE, || async {
        (!old_obj.exists()).then_some(())
    })
    .await;

    // The old download finishes on the old bytes.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let mut all = head[..n].to_vec();
    all.extend_from_slice(&rest);
    let body_at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &all[body_at..];
    assert_eq!(body.len(), v1.len());
    assert!(
        body.iter().all(|&b| b == 1),
        "the in-flight download mixed two generations"
    );
}

/// An origin publishing `n` files of pseudo-random bytes.
struct NoiseOrigin {
    dir: tempfile::TempDir,
    content: std::path::PathBuf,
    key: meridian_core::PublicKey,
    _origin: meridian_e2e::Proc,
    oaddr: std::net::SocketAddr,
    client: ReadClient,
}

impl NoiseOrigin {
    fn start(n: u32, size: usize, name: impl Fn(u32) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir_all(&content).unwrap();
        for i in 0..n {
            let p = content.join(name(i));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, noise(size, i)).unwrap();
        }
        let key = keygen(&dir.path().join("key"));
        let (origin, oaddr) = origin(dir.path(), "200ms");
        let client = ReadClient::new(oaddr, key);
        NoiseOrigin {
            dir,
            content,
            key,
            _origin: origin,
            oaddr,
            client,
        }
    }

    /// A mirror that asks `first` before the origin.
    fn mirror_behind(
        &self,
        first: std::net::SocketAddr,
    ) -> (meridian_e2e::Proc, std::net::SocketAddr) {
        mirror(
            "m",
            &[format!("http://{first}"), format!("http://{}", self.oaddr)],
            &self.key,
            &self.dir.path().join("m"),
            &[],
        )
    }
}

/// The small files of a new directory travel as one pack per directory
/// node (`pack/{node}`), each blob checked as it lands: from an honest
/// upstream every file arrives in packs; from one that damages a pack, the
/// pack is refused (a verify failure, a strike) and the blobs come from the
/// next upstream, one pack or one blob at a time.
#[tokio::test]
async fn small_files_travel_in_packs_and_a_damaged_pack_is_refused() {
    let o = NoiseOrigin::start(60, 3_000, |i| format!("dir{}/f{i:03}", i % 2));
    let (content, client) = (o.content.as_path(), &o.client);
    let g = published(client, content, 0).await;
    let http = http();

    // Honest: two directories, two packs, no blob fetched alone.
    let (mut m1, a1) = mirror(
        "m1",
        &[format!("http://{}", o.oaddr)],
        &o.key,
        &o.dir.path().join("m1"),
        &[],
    );
    wait_generation(&http, a1, g).await;
    serves_exactly(&http, a1, content).await;
    let text = meridian_e2e::metrics_text(&http, a1).await.unwrap();
    assert_eq!(
        metric(&text, "meridian_mirror_packs_fetched_total"),
        2.0,
        "{text}"
    );
    m1.drain();

    // Damaged: the lying upstream is asked first, flips a byte of each pack.
    let (evil, evil_srv) = Evil::start(o.oaddr, Mode::FlipByte).await;
    let (_m2, a2) = o.mirror_behind(evil_srv.local_addr);
    wait_generation(&http, a2, g).await;
    serves_exactly(&http, a2, content).await;
    let packs = evil.packs_served.load(std::sync::atomic::Ordering::Relaxed);
    let damaged = evil
        .objects_served
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(packs >= 1, "the lying upstream was asked for a pack first");
    // Its damaged packs were refused whole and taken from the origin: no
    // blob was asked of it one by one.
    assert_eq!(
        damaged, packs,
        "{damaged} damaged answers for {packs} packs"
    );
    let text = meridian_e2e::metrics_text(&http, a2).await.unwrap();
    assert!(
        metric(&text, "meridian_mirror_verify_failures_total") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "meridian_mirror_packs_fetched_total"),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_small_change_moves_a_delta_and_a_patch_not_the_directory_and_the_file() {
    let NoiseOrigin {
        dir,
        content,
        key,
        _origin,
        oaddr,
        client,
    } = NoiseOrigin::start(1500, 8192, |i| format!("pool/pkg{i:05}.deb"));
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("m"),
        &[],
    );
    let http = http();
    let g = published(&client, &content, 0).await;
    wait_generation(&http, maddr, g).await;
    let before = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    let full_manifest = metric(&before, "meridian_mirror_manifest_bytes_fetched_total");
    let fetched_before = metric(&before, "meridian_mirror_bytes_fetched_total");

    // Append to one file in the 1500-entry directory.
    let target = content.join("pool/pkg00777.deb");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&target)
        .unwrap()
        .write_all(b"changed")
        .unwrap();
    let g2 = published(&client, &content, g).await;
    let want = std::fs::read(&target).unwrap();
    let g2 = eventually("the mirror to serve the change", DEADLINE, || async {
        let (code, body) = get(&http, maddr, "pool/pkg00777.deb").await;
        (code == 200 && body == want).then_some(g2)
    })
    .await;
    wait_generation(&http, maddr, g2).await;
    let after = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    let inc_manifest =
        metric(&after, "meridian_mirror_manifest_bytes_fetched_total") - full_manifest;
    let inc_fetched = metric(&after, "meridian_mirror_bytes_fetched_total") - fetched_before;
    assert!(
        metric(&after, "meridian_mirror_blobs_patched_total") >= 1.0,
        "the changed file was patched:\n{after}"
    );
    // The full manifest has 1500 entries (about 100 KB); the change is one
    // entry in each of two nodes plus a root, per generation published.
    assert!(
        inc_manifest * 20.0 < full_manifest,
        "manifest bytes for one change: {inc_manifest} of {full_manifest}"
    );
    // The file is 8 KiB; the patch carries the 7 new bytes and a few copies.
    assert!(
        inc_fetched < inc_manifest + 1024.0,
        "bytes fetched for one appended file: {inc_fetched} (manifest {inc_manifest})"
    );
    serves_exactly(&http, maddr, &content).await;
}

#[tokio::test]
async fn corrupt_deltas_and_patches_are_refused_and_the_sync_still_lands() {
    let o = NoiseOrigin::start(200, 16_384, |i| format!("d/f{i:03}"));
    let (content, client) = (o.content.as_path(), &o.client);
    let (evil, evil_srv) = Evil::start(o.oaddr, Mode::CorruptDiffs).await;
    let (_m, maddr) = o.mirror_behind(evil_srv.local_addr);
    let http = http();
    let mut g = published(client, content, 0).await;
    wait_generation(&http, maddr, g).await;
    for round in 0..2u32 {
        for i in [3u32, 50, 199] {
            let mut data = std::fs::read(content.join(format!("d/f{i:03}"))).unwrap();
            data[4000..4100].copy_from_slice(&noise(100, 1000 + i + round));
            std::fs::write(content.join(format!("d/f{i:03}")), &data).unwrap();
        }
        g = published(client, content, g).await;
        wait_generation(&http, maddr, g).await;
        serves_exactly(&http, maddr, content).await;
    }
    assert!(
        evil.diffs_served.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the lying upstream was asked for deltas and patches first"
    );
    let m = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    assert!(
        metric(&m, "meridian_mirror_verify_failures_total") >= 2.0,
        "corrupt deltas and patches count as verification failures:\n{m}"
    );
}

/// A change spread over many directories (so mirrors rebuild the changed
/// nodes on several threads) travels as one delta down a chain, origin →
/// A → B (B gets the delta A synced by), and both serve exactly the tree.
#[tokio::test]
async fn a_change_across_many_directories_travels_as_a_delta_down_a_chain() {
    let o = NoiseOrigin::start(400, 2048, |i| format!("d{:02}/f{i:04}", i % 40));
    let (content, client) = (o.content.as_path(), &o.client);
    let (_a, aaddr) = mirror(
        "a",
        &[format!("http://{}", o.oaddr)],
        &o.key,
        &o.dir.path().join("a"),
        &[],
    );
    let (_b, baddr) = mirror(
        "b",
        &[format!("http://{aaddr}")],
        &o.key,
        &o.dir.path().join("b"),
        &[],
    );
    let http = http();
    let g = published(client, content, 0).await;
    wait_generation(&http, aaddr, g).await;
    wait_generation(&http, baddr, g).await;
    let mut before = [0.0f64; 2];
    for (i, addr) in [aaddr, baddr].iter().enumerate() {
        let t = meridian_e2e::metrics_text(&http, *addr).await.unwrap();
        before[i] = metric(&t, "meridian_mirror_manifest_bytes_fetched_total");
    }
    // One file in each of the 40 directories.
    for d in 0..40u32 {
        let p = content.join(format!("d{d:02}/f{d:04}"));
        std::fs::write(&p, noise(2048, 10_000 + d)).unwrap();
    }
    let g2 = published(client, content, g).await;
    wait_generation(&http, aaddr, g2).await;
    wait_generation(&http, baddr, g2).await;
    for (i, addr) in [aaddr, baddr].iter().enumerate() {
        serves_exactly(&http, *addr, content).await;
        let t = meridian_e2e::metrics_text(&http, *addr).await.unwrap();
        let inc = metric(&t, "meridian_mirror_manifest_bytes_fetched_total") - before[i];
        // The whole manifest was `before` (400 entries in 41 nodes); the
        // delta carries 40 entries and the top node's edits.
        assert!(
            inc * 3.0 < before[i],
            "mirror {addr}: {inc} manifest bytes for 40 changed entries of {}",
            before[i]
        );
    }
}

/// Total root refusals a mirror has counted.
async fn verify_failures(http: &reqwest::Client, addr: std::net::SocketAddr) -> Option<f64> {
    let m = meridian_e2e::metrics_text(http, addr).await?;
    Some(metric(&m, "meridian_mirror_verify_failures_total"))
}

#[tokio::test]
async fn damaged_local_state_never_lowers_the_generation_a_mirror_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = published(&client, &content, 0).await;
    let old = client.root().await.unwrap();
    assert_eq!(old.root.generation, g1);
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = published(&client, &content, g1).await;
    std::fs::write(content.join("f"), b"three").unwrap();
    let g3 = published(&client, &content, g2).await;

    // The mirror reaches the newest generation through a proxy that will
    // later replay the oldest root.
    let (evil, evil_srv) = Evil::start(oaddr, Mode::Honest).await;
    let up = [format!("http://{}", evil_srv.local_addr)];
    let state = dir.path().join("m");
    let http = http();
    let (mut m, maddr) = mirror("m", &up, &key, &state, &[]);
    wait_generation(&http, maddr, g3).await;
    wait_durable(&http, maddr, &state, g3).await;
    *evil.fake_root.lock().unwrap() = old.envelope.clone();

    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 5] = [
        ("current is garbage", |s| {
            std::fs::write(s.join("current"), "garbage").unwrap()
        }),
        ("current is 999", |s| {
            std::fs::write(s.join("current"), "999").unwrap()
        }),
        ("current is empty", |s| {
            std::fs::write(s.join("current"), "").unwrap()
        }),
        ("current is deleted", |s| {
            std::fs::remove_file(s.join("current")).unwrap()
        }),
        ("roots/ is removed", |s| {
            std::fs::write(s.join("current"), "garbage").unwrap();
            std::fs::remove_dir_all(s.join("roots")).unwrap();
        }),
    ];
    for (what, damage) in damages {
        m.child.kill().unwrap();
        m.child.wait().unwrap();
        damage(&state);
        evil.set_mode(Mode::FakeRoot);
        let (m2, maddr) = mirror("m", &up, &key, &state, &[]);
        m = m2;
        eventually(
            &format!("{what}: the mirror to refuse the replayed generation {g1}"),
            DEADLINE,
            || async { (verify_failures(&http, maddr).await? > 0.0).then_some(()) },
        )
        .await;
        let s = status(&http, maddr).await.unwrap();
        assert_ne!(s.generation, g1, "{what}: {s:?}");
        let (code, body) = get(&http, maddr, "f").await;
        assert_ne!(body, b"one", "{what}: the replayed tree is served");
        if what.starts_with("roots") {
            // Nothing to restore: nothing is served until the upstream
            // offers the recorded generation again.
            assert_eq!(code, 503, "{what}");
        } else {
            assert_eq!((code, body.as_slice()), (200, &b"three"[..]), "{what}");
        }
        evil.set_mode(Mode::Honest);
        wait_generation(&http, maddr, g3).await;
        assert_eq!(get(&http, maddr, "f").await.1, b"three", "{what}");
        wait_durable(&http, maddr, &state, g3).await;
    }

    // Every record of the floor gone, objects still there: the mirror says
    // so and accepts nothing, not even the real newest root, until an
    // operator passes --accept-lower-generation.
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    for f in ["current", "highest"] {
        std::fs::remove_file(state.join(f)).unwrap();
    }
    std::fs::remove_dir_all(state.join("roots")).unwrap();
    let (mut m, maddr) = mirror("m", &up, &key, &state, &[]);
    m.wait_line("--accept-lower-generation", DEADLINE);
    eventually("the mirror to refuse every root", DEADLINE, || async {
        (verify_failures(&http, maddr).await? > 0.0).then_some(())
    })
    .await;
    let s = status(&http, maddr).await.unwrap();
    assert_eq!(s.generation, 0, "{s:?}");
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("--accept-lower-generation")),
        "{s:?}"
    );
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let (_m, maddr) = mirror("m", &up, &key, &state, &["--accept-lower-generation"]);
    wait_generation(&http, maddr, g3).await;
    assert_eq!(get(&http, maddr, "f").await.1, b"three");
}

/// Overwrites a mirror's stored object for `data` (the mirror keeps its
/// objects read-only; the test runs as root, like an intruder or a bad
/// disk would).
fn damage_object(state: &Path, data: &[u8], with: &[u8]) {
    let p = object_path(state, &meridian_core::hash_bytes(data));
    std::fs::write(&p, with).unwrap();
}

/// Where a mirror keeps object `h` (without opening its store, which would
/// clear a running mirror's staging area).
fn object_path(state: &Path, h: &meridian_core::Hash) -> std::path::PathBuf {
    meridian_serve::store::sharded(&state.join("objects"), h)
}

#[tokio::test]
async fn damaged_objects_are_never_served_and_are_repaired_on_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let small = noise(10_000, 11);
    // Past the size from which whole downloads are checked as they stream.
    let big = noise(70 << 20, 12);
    let cut = noise(200_000, 13);
    let ranged = noise(1_000_000, 14);
    let mid = noise(3_000_000, 15);
    let files = [
        ("small.txt", &small),
        ("big.bin", &big),
        ("cut.bin", &cut),
        ("ranged.bin", &ranged),
        ("mid.bin", &mid),
    ];
    for (f, d) in files {
        std::fs::write(content.join(f), d).unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = published(&client, &content, 0).await;
    let state = dir.path().join("m");
    let http = http();
    // No scrubber: the download path alone must catch the damage.
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{oaddr}")],
        &key,
        &state,
        &["--scrub-interval", "0s"],
    );
    wait_generation(&http, maddr, g).await;
    // Served once (and so remembered as checked) before the damage. Every
    // object is read-only on disk.
    for (f, d) in files {
        let (code, body) = get(&http, maddr, f).await;
        assert!(code == 200 && body == *d, "{f}: {code}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(object_path(&state, &meridian_core::hash_bytes(d)))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444, "{f}: object mode {mode:o}");
    }

    // Same size, other bytes; and a truncation.
    let flip = |d: &[u8]| {
        let mut b = d.to_vec();
        let i = b.len() / 2;
        b[i] ^= 0xFF;
        b
    };
    damage_object(&state, &small, &flip(&small));
    damage_object(&state, &big, &flip(&big));
    damage_object(&state, &ranged, &flip(&ranged));
    damage_object(&state, &mid, &flip(&mid));
    damage_object(&state, &cut, &cut[..100_000]);

    // A small object is checked in memory: refused before a byte is sent.
    assert_eq!(get(&http, maddr, "small.txt").await.0, 503);
    // So is a truncated one.
    assert_eq!(get(&http, maddr, "cut.bin").await.0, 503);
    // A range of a damaged large object: refused too.
    let r = http
        .get(format!("http://{maddr}/ranged.bin"))
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // A whole object of a few MB is checked before its first byte: 503.
    assert_eq!(get(&http, maddr, "mid.bin").await.0, 503);
    // The whole large object, with curl: the body is cut short of its
    // length (curl: exit 18, partial file), never completed wrong.
    let out_file = dir.path().join("big.out");
    let curl = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            out_file.to_str().unwrap(),
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{maddr}/big.bin"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");
    assert_eq!(
        curl.status.code(),
        Some(18),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let got = std::fs::read(&out_file).unwrap_or_default();
    assert!(got.len() < big.len(), "a complete body was sent");

    // Every one is repaired within seconds, no scrub needed, and every
    // answer on the way is a refusal or the right bytes.
    for (f, d) in files {
        eventually(
            &format!("{f} to be served right again"),
            DEADLINE,
            || async {
                let r = http.get(format!("http://{maddr}/{f}")).send().await.ok()?;
                let code = r.status().as_u16();
                let body = r.bytes().await.ok();
                if code == 200 {
                    if let Some(b) = &body {
                        assert_eq!(b.len(), d.len(), "{f}: a wrong body completed");
                        assert!(b.as_ref() == d.as_slice(), "{f}: wrong bytes served");
                    }
                } else {
                    assert_eq!(code, 503, "{f}");
                }
                (body.as_deref() == Some(d.as_slice())).then_some(())
            },
        )
        .await;
    }
    let m = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    assert!(
        metric(&m, "meridian_mirror_scrub_failures_total") >= 5.0,
        "{m}"
    );
}

#[tokio::test]
async fn the_scrubber_starts_at_boot() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let data = noise(500_000, 21);
    std::fs::write(content.join("d.bin"), &data).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = published(&client, &content, 0).await;
    let state = dir.path().join("m");
    let http = http();
    let up = [format!("http://{oaddr}")];
    let (mut m, maddr) = mirror("m", &up, &key, &state, &["--scrub-interval", "1h"]);
    wait_generation(&http, maddr, g).await;
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let mut bad = data.clone();
    bad[1] ^= 1;
    damage_object(&state, &data, &bad);
    // Nobody downloads it: the scrub's first pass, at boot, finds it.
    let (_m, maddr) = mirror("m", &up, &key, &state, &["--scrub-interval", "1h"]);
    let hex = meridian_core::hash_bytes(&data).to_hex();
    eventually(
        "the boot scrub to quarantine the damage",
        DEADLINE,
        || async { state.join("quarantine").join(&hex).exists().then_some(()) },
    )
    .await;
    assert_eq!(get(&http, maddr, "d.bin").await.1, data);
}

#[tokio::test]
async fn a_long_first_sync_shows_its_progress_in_the_log_the_status_and_the_503() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    for i in 0..3 {
        std::fs::write(
            content.join(format!("small{i}.bin")),
            noise(1_000_000, 40 + i),
        )
        .unwrap();
    }
    std::fs::write(content.join("big.bin"), noise(8_000_000, 50)).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = published(&client, &content, 0).await;
    // Through an upstream that sends 64 KiB every 50 ms per download.
    let (_evil, evil_srv) = Evil::start(oaddr, Mode::Slow).await;
    let http = http();
    let (mut m, maddr) = mirror(
        "m",
        &[format!("http://{}", evil_srv.local_addr)],
        &key,
        &dir.path().join("m"),
        &[],
    );
    let p = eventually("the small files to be in", DEADLINE, || async {
        let s = status(&http, maddr).await?;
        let p = s.sync_progress?;
        (p.files_done >= 3).then_some(p)
    })
    .await;
    assert_eq!(p.generation, g);
    assert_eq!(p.files_total, 4);
    assert_eq!(p.bytes_total, 11_000_000);
    assert!(p.bytes_done >= 3_000_000, "{p:?}");
    let (code, body) = get(&http, maddr, "small0.bin").await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 503);
    assert!(
        body.contains("first sync is under way") && body.contains("3 of 4 files"),
        "{body}"
    );
    let line = m.wait_line("of 4 files, ", DEADLINE);
    assert!(
        line.contains("MB/s") && line.contains("left") && line.contains("eta_seconds"),
        "{line}"
    );
    wait_generation(&http, maddr, g).await;
    let s = status(&http, maddr).await.unwrap();
    assert!(s.sync_progress.is_none(), "{s:?}");
}

/// An origin restarted with an empty state starts a new chain at
/// generation 1. A mirror never follows it: it keeps serving its
/// generation and says why, once in its log and for as long as it lasts in
/// its status and metrics, with both generations: first that the upstream
/// is behind it, then, once the new chain passes it, that the chain is
/// broken. Restored from the mirror (`meridian restore`), the origin's next
/// generation is followed again.
#[tokio::test]
async fn a_mirror_never_follows_an_origin_that_lost_its_state_and_says_why_until_it_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let key = keygen(&dir.path().join("key"));
    let (mut o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = published(&client, &content, 0).await;
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = published(&client, &content, g1).await;
    let http = http();
    let state = dir.path().join("m");
    let (mut m, maddr) = mirror(
        "m",
        &[format!("http://{oaddr}")],
        &key,
        &state,
        &["--poll-interval", "1s"],
    );
    wait_generation(&http, maddr, g2).await;
    let s = status(&http, maddr).await.unwrap();
    assert!(s.refused.is_none(), "{s:?}");

    // The origin loses its state and is started again, empty, where it was.
    o.child.kill().unwrap();
    o.child.wait().unwrap();
    std::fs::remove_dir_all(dir.path().join("origin-state")).unwrap();
    let _o2 = meridian_e2e::origin_at(dir.path(), "origin-state", "200ms", oaddr);

    let refused = |reason: &'static str| {
        let http = http.clone();
        async move {
            eventually(
                &format!("the mirror to report {reason}"),
                DEADLINE,
                || async {
                    let s = status(&http, maddr).await?;
                    let r = s.refused.filter(|r| r.reason == reason)?;
                    Some((r, s.generation))
                },
            )
            .await
        }
    };
    let (r, serving) = refused("upstream_behind").await;
    // The restarted origin offers a generation below g2 (1, or 2 once the
    // content it lost is published again).
    assert!(r.offered < g2 && (r.served, serving) == (g2, g2), "{r:?}");
    assert!(r.error.contains("lost its state"), "{}", r.error);
    assert_eq!(get(&http, maddr, "f").await.1, b"two");
    let text = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    assert!(
        text.contains("meridian_mirror_refused_roots_total{reason=\"upstream_behind\"}"),
        "{text}"
    );
    // The generation refused, as the status said it: below the served one.
    let refused_g = metric(&text, "meridian_mirror_refused_generation");
    assert!(
        refused_g >= 1.0 && refused_g < g2 as f64,
        "refused generation {refused_g}, served {g2}"
    );

    // The new chain passes the mirror's generation: its roots name other
    // predecessors. Still refused, still serving the old tree.
    let client2 = ReadClient::new(oaddr, key);
    let mut g = 1;
    for n in 0..10 {
        if g > g2 {
            break;
        }
        std::fs::write(content.join("f"), format!("new chain {n}")).unwrap();
        g = published(&client2, &content, g).await;
    }
    assert!(g > g2, "the new chain reached only generation {g}");
    let (r, serving) = refused("broken_chain").await;
    assert_eq!((r.offered, r.served, serving), (g, g2, g2), "{r:?}");
    assert_eq!(get(&http, maddr, "f").await.1, b"two");
    let text = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    assert!(metric(&text, "meridian_mirror_refused_roots_total") >= 2.0);
    assert_eq!(
        metric(&text, "meridian_mirror_refused_generation"),
        g as f64
    );
    // Said once per new refusal, not once per offer: wait until the root
    // was refused three more times (each is counted), then read the log.
    let broken = |t: &str| {
        t.lines()
            .filter(|l| {
                l.starts_with("meridian_mirror_refused_roots_total{reason=\"broken_chain\"}")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = broken(&text);
    eventually(
        "the root to be refused three more times",
        DEADLINE,
        || async {
            let t = meridian_e2e::metrics_text(&http, maddr).await?;
            (broken(&t) >= before + 3.0).then_some(())
        },
    )
    .await;
    m.drain();
    let said = m
        .log
        .iter()
        .filter(|l| l.contains("still serving generation") && l.contains("broken_chain"))
        .count();
    assert_eq!(said, 1, "{}", m.log.join("\n"));

    // The way out: the origin is restored from the mirror and started where
    // it was; its next generation continues the chain the mirror holds.
    drop(_o2);
    std::fs::remove_dir_all(dir.path().join("origin-state")).unwrap();
    std::fs::remove_dir_all(&content).unwrap();
    let out = std::process::Command::new(meridian_e2e::meridian_bin())
        .args(["restore", "--from", &format!("http://{maddr}"), "--trust"])
        .arg(key.to_string())
        .arg("--content")
        .arg(&content)
        .arg("--state")
        .arg(dir.path().join("origin-state"))
        .args(["--at-least", &g2.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(content.join("f")).unwrap(), b"two");
    let _o3 = meridian_e2e::origin_at(dir.path(), "origin-state", "200ms", oaddr);
    std::fs::write(content.join("f"), b"three").unwrap();
    assert_eq!(published(&client, &content, g2).await, g2 + 1);
    wait_generation(&http, maddr, g2 + 1).await;
    assert_eq!(get(&http, maddr, "f").await.1, b"three");
    assert!(status(&http, maddr).await.unwrap().refused.is_none());
}

/// SIGHUP makes a mirror read its config file again and put it in force,
/// with no restart and no download lost: a trust list without the origin's
/// key makes the next root refused (`unknown_key`), the key put back makes
/// it accepted; a config that does not parse is refused and the running
/// one stays. Downloads run all the while.
#[tokio::test]
async fn sighup_reloads_a_mirrors_trust_without_losing_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let big = noise(2_000_000, 21);
    std::fs::write(content.join("big"), &big).unwrap();
    let key = keygen(&dir.path().join("key"));
    let other = keygen(&dir.path().join("other-key"));
    let (_o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g1 = published(&client, &content, 0).await;
    let cfg_path = dir.path().join("mirror.toml");
    let write_cfg = |trust: &[&meridian_core::PublicKey], per_client: i64| {
        let mut t = toml::Table::new();
        t.insert("max_connections_per_client".into(), per_client.into());
        t.insert("id".into(), "m".into());
        t.insert("upstreams".into(), vec![format!("http://{oaddr}")].into());
        t.insert(
            "trust".into(),
            trust
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .into(),
        );
        t.insert(
            "state".into(),
            dir.path().join("m").display().to_string().into(),
        );
        t.insert("listen".into(), "127.0.0.1:0".into());
        t.insert("poll_interval".into(), "1s".into());
        std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
    };
    write_cfg(&[&key], 64);
    let mut m = meridian_e2e::Proc::spawn(&["mirror", "--config", cfg_path.to_str().unwrap()], &[]);
    let maddr = m.listening("mirror");
    let http = http();
    wait_generation(&http, maddr, g1).await;
    let pid = m.child.id() as i32;

    // Downloads all the while, bounded in count and time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = meridian_e2e::download_loop(
        http.clone(),
        format!("http://{maddr}/big"),
        std::sync::Arc::new(big.clone()),
        stop.clone(),
    );

    // The origin's key leaves the trust list: the next root is refused.
    write_cfg(&[&other], 64);
    meridian_e2e::signal(pid, "HUP");
    m.wait_line("configuration reloaded", DEADLINE);
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = published(&client, &content, g1).await;
    let r = eventually("the new root to be refused", DEADLINE, || async {
        status(&http, maddr)
            .await?
            .refused
            .filter(|r| r.reason == "unknown_key" && r.offered == g2)
    })
    .await;
    assert_eq!(r.served, g1, "{r:?}");
    assert_eq!(get(&http, maddr, "f").await.1, b"one");

    // A config that does not parse changes nothing.
    std::fs::write(&cfg_path, b"trust = [").unwrap();
    meridian_e2e::signal(pid, "HUP");
    m.wait_line("configuration NOT reloaded", DEADLINE);

    // The key back: the root is taken, no restart.
    write_cfg(&[&key, &other], 64);
    meridian_e2e::signal(pid, "HUP");
    wait_generation(&http, maddr, g2).await;
    assert_eq!(get(&http, maddr, "f").await.1, b"two");
    assert!(status(&http, maddr).await.unwrap().refused.is_none());
    assert_eq!(m.child.id() as i32, pid);
    assert!(
        m.child.try_wait().unwrap().is_none(),
        "the mirror is still running"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = loader.await.unwrap();
    assert!(ok > 0, "no download completed");
    assert!(
        failed.is_empty(),
        "{} downloads failed: {failed:?}",
        failed.len()
    );

    // Connection caps reload too, from the next connection on: with two
    // per client, a third connection from one address is closed at once;
    // with eight, it is served. (From 127.0.0.7, so this test's own HTTP
    // client does not count.)
    let reloads = |m: &mut meridian_e2e::Proc| {
        m.drain();
        m.log
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count()
    };
    let reload_to = |m: &mut meridian_e2e::Proc, per_client: i64| {
        let before = reloads(m);
        write_cfg(&[&key], per_client);
        meridian_e2e::signal(pid, "HUP");
        let t0 = std::time::Instant::now();
        while reloads(m) == before {
            assert!(t0.elapsed() < DEADLINE, "no reload");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let connect = || async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.7:0".parse().unwrap()).unwrap();
        s.connect(maddr).await.unwrap()
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = |mut c: tokio::net::TcpStream| async move {
        c.write_all(b"GET /f HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, c.read_to_end(&mut got))
            .await
            .ok()?
            .ok()?;
        got.starts_with(b"HTTP/1.1 200").then_some(())
    };
    reload_to(&mut m, 2);
    // Accepted in the order they connected: both hold a place before the
    // third comes.
    let held = [connect().await, connect().await];
    assert!(
        served(connect().await).await.is_none(),
        "a third connection from one client was served under a cap of two"
    );
    reload_to(&mut m, 8);
    assert!(
        served(connect().await).await.is_some(),
        "a connection under the reloaded cap was not served"
    );
    drop(held);
}

/// `GET /.meridian/ready` (a load balancer's or Kubernetes' readiness
/// probe): 200 while the mirror serves a generation and keeps up; 503 with
/// the reason once it has lagged behind its upstream for longer than
/// `ready_max_lag`, and while it drains; 200 again once it catches up.
/// `/.meridian/health` (liveness) stays 200 throughout.
#[tokio::test]
async fn readiness_follows_lag_and_drain_and_liveness_does_not() {
    let o = NoiseOrigin::start(3, 10_000, |i| format!("f{i}"));
    let (content, client) = (o.content.as_path(), &o.client);
    let (evil, evil_srv) = Evil::start(o.oaddr, Mode::Honest).await;
    let cfg = o.dir.path().join("mirror.toml");
    std::fs::write(&cfg, "ready_max_lag = \"1s\"\n").unwrap();
    // The lying upstream alone: nothing to fall back on.
    let (_m, maddr) = mirror(
        "m",
        &[format!("http://{}", evil_srv.local_addr)],
        &o.key,
        &o.dir.path().join("m"),
        &["--config", cfg.to_str().unwrap(), "--admin-token", "t0ken"],
    );
    let http = http();
    let probe = |path: &'static str| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://{maddr}/.meridian/{path}"))
                .send()
                .await
                .ok()?;
            Some((r.status().as_u16(), r.text().await.ok()?))
        }
    };
    let g = published(client, content, 0).await;
    wait_generation(&http, maddr, g).await;
    let (code, why) = probe("ready").await.expect("ready answers");
    assert_eq!(code, 200, "{why}");
    assert!(why.contains(&format!("serving generation {g}")), "{why}");

    // A new generation whose blobs arrive damaged: the mirror stays on g,
    // behind, and is taken out of rotation once that lasts past 1 s.
    evil.set_mode(Mode::FlipByte);
    std::fs::write(content.join("new.bin"), noise(50_000, 99)).unwrap();
    let g2 = published(client, content, g).await;
    let why = eventually("ready to say behind", Duration::from_secs(30), || async {
        let (code, why) = probe("ready").await?;
        (code == 503).then_some(why)
    })
    .await;
    assert!(
        why.contains(&format!("generation {g} is behind the upstreams' {g2}")),
        "{why}"
    );
    let (code, _) = probe("health").await.expect("health answers");
    assert_eq!(code, 200, "liveness is not readiness");

    // The upstream heals: the mirror catches up and is ready again.
    evil.set_mode(Mode::Honest);
    wait_generation(&http, maddr, g2).await;
    eventually("ready again", Duration::from_secs(30), || async {
        let (code, _) = probe("ready").await?;
        (code == 200).then_some(())
    })
    .await;

    // Draining: not ready, with the reason; undrained: ready.
    let admin = |what: &'static str| {
        http.post(format!("http://{maddr}/.meridian/admin/{what}"))
            .bearer_auth("t0ken")
            .send()
    };
    assert_eq!(admin("drain").await.unwrap().status(), 200);
    let (code, why) = probe("ready").await.expect("ready answers");
    assert_eq!((code, why.contains("draining")), (503, true), "{why}");
    assert_eq!(admin("undrain").await.unwrap().status(), 200);
    let (code, why) = probe("ready").await.expect("ready answers");
    assert_eq!(code, 200, "{why}");
}

/// Metrics a dashboard and alerts rely on exist from the start: every
/// labelled error series at 0 (so "any increase" sees the first error),
/// `meridian_build_info`, the process metrics, the served generation's
/// expiry, and the time-to-first-byte histogram.
#[tokio::test]
async fn every_error_series_exists_at_zero_with_build_info_expiry_and_latency() {
    let o = NoiseOrigin::start(2, 1000, |i| format!("f{i}"));
    let (_m, maddr) = o.mirror_behind(o.oaddr);
    let http = http();
    let g = published(&o.client, &o.content, 0).await;
    wait_generation(&http, maddr, g).await;
    let (code, _) = get(&http, maddr, "/f0").await;
    assert_eq!(code, 200);
    let text = meridian_e2e::metrics_text(&http, maddr).await.unwrap();
    let line = |series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    for result in [
        "unreachable",
        "refused",
        "verify",
        "object",
        "no_space",
        "io",
        "load",
    ] {
        assert_eq!(
            line(&format!(
                "meridian_mirror_syncs_total{{result=\"{result}\"}}"
            )),
            Some(0.0),
            "{result}:\n{text}"
        );
    }
    assert_eq!(
        line(&format!(
            "meridian_mirror_verify_failures_total{{upstream=\"http://{}\"}}",
            o.oaddr
        )),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        line(&format!(
            "meridian_build_info{{component=\"mirror\",version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0),
        "{text}"
    );
    assert!(
        line("process_resident_memory_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    let expires = status(&http, maddr).await.unwrap().expires.unwrap();
    assert_eq!(
        line("meridian_mirror_served_expiry_timestamp_seconds"),
        Some(expires as f64)
    );
    assert!(line("meridian_mirror_first_byte_seconds_count").unwrap_or(0.0) >= 1.0);

    let otext = meridian_e2e::metrics_text(&http, o.oaddr).await.unwrap();
    for reason in ["not_utf8", "bad_name", "symlink_escapes", "unreadable"] {
        assert!(
            otext.contains(&format!(
                "meridian_origin_skipped_files_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}:\n{otext}"
        );
    }
    assert!(
        otext.contains("meridian_build_info{component=\"origin\""),
        "{otext}"
    );

    // The operator guide lists every metric family both export.
    let guide = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/OPERATORS.md"),
    )
    .unwrap();
    for family in text
        .lines()
        .chain(otext.lines())
        .filter_map(|l| l.strip_prefix("# TYPE meridian_"))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            guide.contains(&format!("`meridian_{family}`")),
            "deploy/OPERATORS.md does not list meridian_{family}"
        );
    }
}

/// A browser asking for a mirror's status gets a readable page (dates and
/// ages, no script, nothing from elsewhere); curl and machines get JSON.
#[tokio::test]
async fn a_browser_gets_the_status_as_a_page_and_curl_gets_json() {
    let o = NoiseOrigin::start(1, 100, |i| format!("f{i}"));
    let (_m, maddr) = o.mirror_behind(o.oaddr);
    let http = http();
    let g = published(&o.client, &o.content, 0).await;
    wait_generation(&http, maddr, g).await;
    let url = format!("http://{maddr}/.meridian/status");
    let curl = |accept: Option<&str>| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "-D", "-", &url]);
        if let Some(a) = accept {
            c.args(["-H", &format!("Accept: {a}")]);
        }
        String::from_utf8(c.output().unwrap().stdout).unwrap()
    };
    let page = curl(Some(
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ));
    assert!(
        page.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{page}"
    );
    for want in [
        "<title>Mirror m</title>",
        &format!("<th scope=\"row\">Serving generation</th><td>{g}</td>"),
        "0: current",
        " ago)",
        "Z (in ", // the expiry as a UTC date and the time left
    ] {
        assert!(page.contains(want), "{want:?} not in:\n{page}");
    }
    assert!(!page.contains("<script"), "{page}");
    // And a real browser (headless Chromium) renders it as a table.
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("timeout")
        .args([
            "60",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium (Debian's chromium package; .ci/run installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(&format!(
            "<th scope=\"row\">Serving generation</th><td>{g}</td>"
        )) && dom.contains("<h1>Mirror m</h1>"),
        "Chromium's DOM: {dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = curl(None);
    assert!(
        json.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{json}"
    );
    let body = json.split("\r\n\r\n").nth(1).unwrap();
    let s: meridian_serve::status::MirrorStatus = serde_json::from_str(body).unwrap();
    assert_eq!(s.generation, g);
}
