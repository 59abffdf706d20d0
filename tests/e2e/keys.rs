//! Key rotation and revocation across a running network.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{
    ReadClient, download_loop, eventually, http, keygen, origin, status, wait_generation,
};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// Waits until the origin serves a generation newer than `after` whose
/// tree holds `f` with `want`; returns it.
async fn published_f(client: &ReadClient, after: u64, want: &[u8]) -> u64 {
    let h = meridian_core::hash_bytes(want);
    eventually("the origin to publish the change", DEADLINE, || async {
        let r = client.root().await?;
        let files = client.files(r.root.tree).await;
        (r.root.generation > after && files.get("f").map(|x| x.0) == Some(h))
            .then_some(r.root.generation)
    })
    .await
}

/// The key that signed the root a node serves now.
async fn signer(http: &reqwest::Client, addr: std::net::SocketAddr) -> meridian_core::PublicKey {
    let env = http
        .get(format!("http://{addr}/.meridian/v1/root"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    meridian_core::SignedRoot::decode(&env).unwrap().key
}

fn secret(p: &Path) -> meridian_core::SecretKey {
    meridian_core::SecretKey::from_file_text(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Origin → tier-1 mirror → tier-2 mirror, each mirror behind a proxy that
/// can lie, with downloads from both tiers all along. The origin's key is
/// rotated by replacing its key file and reloading it: both tiers follow
/// the signed statement by themselves (same processes, configs untouched),
/// serve the next generation signed by the new key, and lose no download.
/// A root signed by the retired key afterwards is refused on both tiers
/// with its own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_followed_by_every_tier_without_a_restart_or_a_lost_download() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let big: Arc<Vec<u8>> = Arc::new((0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect());
    std::fs::write(content.join("big"), &*big).unwrap();
    let old = keygen(&dir.path().join("key"));
    let old_secret = secret(&dir.path().join("key"));
    let new = keygen(&dir.path().join("new-key"));
    let (mut o, oaddr) = origin(dir.path(), "200ms");
    let mut client = ReadClient::new(oaddr, old);
    let g1 = published_f(&client, 0, b"one").await;

    let (evil1, e1) = Evil::start(oaddr, Mode::Honest).await;
    let poll = ["--poll-interval", "1s"];
    let (mut m1, a1) = meridian_e2e::mirror(
        "m1",
        &[format!("http://{}", e1.local_addr)],
        &old,
        &dir.path().join("m1"),
        &poll,
    );
    let (evil2, e2) = Evil::start(a1, Mode::Honest).await;
    let (mut m2, a2) = meridian_e2e::mirror(
        "m2",
        &[format!("http://{}", e2.local_addr)],
        &old,
        &dir.path().join("m2"),
        &poll,
    );
    let http = http();
    wait_generation(&http, a1, g1).await;
    wait_generation(&http, a2, g1).await;
    let pids = (m1.child.id(), m2.child.id());

    let stop = Arc::new(AtomicBool::new(false));
    let loaders = [a1, a2].map(|a| {
        download_loop(
            http.clone(),
            format!("http://{a}/big"),
            big.clone(),
            stop.clone(),
        )
    });

    // Rotate: the key file now holds the new key; reload the origin.
    std::fs::copy(dir.path().join("new-key"), dir.path().join("key")).unwrap();
    meridian_e2e::signal(o.child.id() as i32, "HUP");
    let line = o.wait_line("key rotated", DEADLINE);
    assert!(line.contains(&new.to_string()), "{line}");
    client.follow_keys().await;
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = published_f(&client, g1, b"two").await;
    assert_eq!(signer(&http, oaddr).await, new);

    for a in [a1, a2] {
        wait_generation(&http, a, g2).await;
        assert_eq!(
            signer(&http, a).await,
            new,
            "mirror {a} serves the new key's root"
        );
        let s = status(&http, a).await.unwrap();
        assert!(s.refused.is_none(), "{:?}", s.refused);
    }
    assert_eq!((m1.child.id(), m2.child.id()), pids);
    assert!(m1.child.try_wait().unwrap().is_none() && m2.child.try_wait().unwrap().is_none());
    // Each tier stored the statement it follows.
    for m in ["m1", "m2"] {
        let out = std::process::Command::new(meridian_e2e::meridian_bin())
            .args(["key", "list", "--state"])
            .arg(dir.path().join(m))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "rotation from {old} to {new} at generation {}",
                g1 + 1
            )),
            "{m}: {text}"
        );
    }

    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        let (ok, failed) = l.await.unwrap();
        assert!(ok > 0, "no download completed");
        assert!(
            failed.is_empty(),
            "{} downloads failed: {failed:?}",
            failed.len()
        );
    }

    // A root signed by the retired key, correctly chained, offered to both
    // tiers: refused with its own reason, and the new key's stays served.
    let served = client.root().await.unwrap();
    let now = meridian_e2e::now();
    let forged = meridian_core::SignedRoot::sign(
        &meridian_core::Root {
            generation: served.root.generation + 1,
            previous: served.hash,
            created: now,
            expires: now + 3600,
            ..served.root.clone()
        },
        &old_secret,
    )
    .encode();
    for e in [&evil1, &evil2] {
        *e.fake_root.lock().unwrap() = forged.clone();
        e.set_mode(Mode::FakeRoot);
    }
    for a in [a1, a2] {
        let r = eventually("the retired key's root to be refused", DEADLINE, || async {
            status(&http, a)
                .await?
                .refused
                .filter(|r| r.reason == "retired_key")
        })
        .await;
        assert_eq!(
            (r.offered, r.served),
            (served.root.generation + 1, g2),
            "{r:?}"
        );
        assert!(r.error.contains("retired"), "{}", r.error);
    }
    let _ = (&mut m1, &mut m2);
}
