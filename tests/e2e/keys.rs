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
    published(client, after, &[("f", want)]).await
}

/// Waits until the origin serves a generation newer than `after` whose
/// tree holds every `(path, bytes)` of `want`; returns it. (A file still
/// inside the origin's quiet period is left out of a generation, so one
/// file's presence says nothing about another's.)
async fn published(client: &ReadClient, after: u64, want: &[(&str, &[u8])]) -> u64 {
    let want: Vec<_> = want
        .iter()
        .map(|(p, b)| (*p, meridian_core::hash_bytes(b)))
        .collect();
    eventually("the origin to publish the change", DEADLINE, || async {
        let r = client.root().await?;
        let files = client.files(r.root.tree).await;
        (r.root.generation > after
            && want
                .iter()
                .all(|(p, h)| files.get(*p).map(|x| x.0) == Some(*h)))
        .then_some(r.root.generation)
    })
    .await
}

/// The key that signed the root a node serves now.
async fn signer(http: &reqwest::Client, addr: std::net::SocketAddr) -> meridian_core::PublicKey {
    let env = meridian_e2e::get_bytes(http, &format!("http://{addr}/.meridian/v1/root")).await;
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
    let g1 = published(&client, 0, &[("f", b"one"), ("big", &big)]).await;

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

/// Runs `meridian key …`; returns (success, stdout + stderr).
fn key_cmd(args: &[&str]) -> (bool, String) {
    let mut all = vec!["key"];
    all.extend_from_slice(args);
    meridian_e2e::cli(&all)
}

/// The operator guide's two procedures, as written: a stopped origin is
/// rotated with `meridian key rotate` (refused while it runs, safe to
/// rerun), and a key believed stolen is revoked with a backup key that the
/// mirrors trust. After the revocation a root the thief signs with the
/// stolen key is refused, and the origin goes on with the backup key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_rotation_and_a_revocation_by_a_backup_key() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let p = |x: &str| dir.path().join(x).to_str().unwrap().to_owned();
    let a = keygen(&dir.path().join("key"));
    std::fs::copy(p("key"), p("a-key")).unwrap();
    let b = keygen(&dir.path().join("backup-key"));
    let c = keygen(&dir.path().join("c-key"));
    let state = p("origin-state");
    let (mut o, oaddr) = origin(dir.path(), "200ms");
    let mut client = ReadClient::new(oaddr, a);
    // The client trusts what the mirror does.
    client.verifier = meridian_core::Verifier::new(meridian_core::TrustedKeys::new([a, b]));
    let g1 = published_f(&client, 0, b"one").await;

    // The mirror trusts the signing key and the offline backup key.
    let (evil, e) = Evil::start(oaddr, Mode::Honest).await;
    let (a_s, b_s) = (a.to_string(), b.to_string());
    let mstate = dir.path().join("m");
    let mut m = meridian_e2e::Proc::spawn(
        &[
            "mirror",
            "--id",
            "m",
            "--trust",
            &a_s,
            "--trust",
            &b_s,
            "--state",
            mstate.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--poll-interval",
            "1s",
            "--upstream",
            &format!("http://{}", e.local_addr),
        ],
        &[],
    );
    let maddr = m.listening("mirror");
    let http = http();
    wait_generation(&http, maddr, g1).await;

    // Offline rotation: refused while the origin runs.
    let rotate = [
        "rotate",
        "--state",
        &state,
        "--old",
        &p("a-key"),
        "--new",
        &p("c-key"),
    ];
    let (ok, text) = key_cmd(&rotate);
    assert!(!ok && text.contains("in use by a running origin"), "{text}");
    meridian_e2e::signal(o.child.id() as i32, "TERM");
    assert!(o.wait_exit(DEADLINE).is_some(), "origin stopped");
    let (ok, text) = key_cmd(&rotate);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "rotation from {a} to {c} at generation {}",
            g1 + 1
        )),
        "{text}"
    );
    let (ok, text) = key_cmd(&rotate);
    assert!(ok && text.contains("already done"), "rerun: {text}");
    // Started with the new key on the same state and address.
    std::fs::copy(p("c-key"), p("key")).unwrap();
    let args = meridian_e2e::origin_args(dir.path(), "origin-state", "200ms");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let listen = oaddr.to_string();
    let at = args.iter().position(|x| *x == "127.0.0.1:0").unwrap();
    args[at] = &listen;
    let mut o = meridian_e2e::Proc::spawn(&args, &[]);
    o.listening("origin");
    client.follow_keys().await;
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = published_f(&client, g1, b"two").await;
    wait_generation(&http, maddr, g2).await;
    assert_eq!(signer(&http, maddr).await, c);

    // C is stolen. Revoked from the next generation with the backup key;
    // the origin goes on with the backup key (already trusted: no
    // statement needed) after a reload.
    let (ok, text) = key_cmd(&[
        "revoke",
        "--state",
        &state,
        "--key",
        &c.to_string(),
        "--signer",
        &p("backup-key"),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("revocation of {c} from generation {}", g2 + 1)),
        "{text}"
    );
    std::fs::copy(p("backup-key"), p("key")).unwrap();
    meridian_e2e::signal(o.child.id() as i32, "HUP");
    o.wait_line("signing with another key already in force", DEADLINE);
    eventually("the mirror to take up the revocation", DEADLINE, || async {
        let (_, text) = key_cmd(&["list", "--state", mstate.to_str().unwrap()]);
        text.contains(&format!("revocation of {c}")).then_some(())
    })
    .await;

    // The thief's root, signed by the stolen key and correctly chained.
    let served = client.root().await.unwrap();
    let now = meridian_e2e::now();
    let forged = meridian_core::SignedRoot::sign(
        &meridian_core::Root {
            generation: g2 + 1,
            previous: served.hash,
            created: now,
            expires: now + 3600,
            ..served.root.clone()
        },
        &secret(&dir.path().join("c-key")),
    )
    .encode();
    *evil.fake_root.lock().unwrap() = forged;
    evil.set_mode(Mode::FakeRoot);
    let r = eventually("the stolen key's root to be refused", DEADLINE, || async {
        status(&http, maddr)
            .await?
            .refused
            .filter(|r| r.reason == "retired_key")
    })
    .await;
    assert_eq!((r.offered, r.served), (g2 + 1, g2), "{r:?}");

    // The origin's next generation, signed by the backup key, is taken.
    evil.set_mode(Mode::Honest);
    client.follow_keys().await;
    std::fs::write(content.join("f"), b"three").unwrap();
    let g3 = published_f(&client, g2, b"three").await;
    wait_generation(&http, maddr, g3).await;
    assert_eq!(signer(&http, maddr).await, b);
    let _ = &mut m;
}
