//! The origin as a real process: publishing, chain, crash recovery, bad input.

use meridian_core::Hash;
use meridian_e2e::{Proc, ReadClient, cli, eventually, hash_file, keygen};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

fn start_origin(dir: &Path, extra_env: &[(&str, &str)]) -> Proc {
    let args = meridian_e2e::origin_args(dir, "state", "200ms");
    Proc::spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        extra_env,
    )
}

/// Path → hash of every regular file on disk under `root`.
fn disk_files(root: &Path) -> BTreeMap<String, Hash> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = std::fs::symlink_metadata(e.path()).unwrap().file_type();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                out.insert(rel, hash_file(&e.path()));
            }
        }
    }
    out
}

/// Waits until the origin's newest generation lists exactly the files on
/// disk, with matching hashes; checks signature, chain link and object bytes.
async fn converge(client: &ReadClient, content: &Path, after: u64) -> u64 {
    let want = disk_files(content);
    eventually(
        "origin to publish the directory as it is on disk",
        DEADLINE,
        || async {
            let root = client.root().await?;
            if root.root.generation <= after {
                return None;
            }
            let got: BTreeMap<String, Hash> = client
                .files(root.root.tree)
                .await
                .into_iter()
                .map(|(p, (h, _))| (p, h))
                .collect();
            if got != want {
                return None;
            }
            // Every published file's bytes are served and match their hash.
            for h in got.values() {
                client.object(h).await;
            }
            // The chain: generation n names the hash of generation n-1.
            if root.root.generation > 1 {
                let url = format!("{}/generations/{}", client.base, root.root.generation - 1);
                let prev = meridian_e2e::try_get_bytes(&client.http, &url).await?;
                let prev = client.verifier.open(&prev).unwrap();
                meridian_core::check_link(&prev, &root).unwrap();
            }
            Some(root.root.generation)
        },
    )
    .await
}

#[tokio::test]
async fn publishes_adds_changes_and_deletes_with_a_verified_chain() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("pool/main")).unwrap();
    std::fs::write(content.join("README"), b"hello").unwrap();
    std::fs::write(content.join("pool/main/a.deb"), vec![7u8; 300_000]).unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let addr = origin.listening("origin");
    let client = ReadClient::new(addr, key);

    let g1 = converge(&client, &content, 0).await;
    std::fs::write(content.join("pool/main/b.deb"), vec![9u8; 1_000_000]).unwrap();
    let g2 = converge(&client, &content, g1).await;
    std::fs::write(content.join("README"), b"hello, changed").unwrap();
    let g3 = converge(&client, &content, g2).await;
    std::fs::remove_file(content.join("pool/main/a.deb")).unwrap();
    let g4 = converge(&client, &content, g3).await;
    assert!(g1 < g2 && g2 < g3 && g3 < g4);

    // Metrics reflect the work.
    let metrics = meridian_e2e::metrics_text(&client.http, addr)
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("meridian_origin_latest_generation {g4}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn range_requests_on_objects() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(content.join("f"), &data).unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    converge(&client, &content, 0).await;
    let h = hash_file(&content.join("f"));
    let r = client
        .http
        .get(format!("{}/objects/{h}", client.base))
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 1000-1999/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[1000..2000]);
    let r = client
        .http
        .get(format!("{}/objects/{h}", client.base))
        .header("Range", "bytes=200000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    let r = client
        .http
        .get(format!("{}/objects/{}", client.base, "00".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .http
        .get(format!("{}/objects/..%2f..%2fetc%2fpasswd", client.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_a_generation_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    let g = converge(&client, &content, 0).await;
    let url = format!("{}/wait?after={g}&timeout=60", client.base);
    let poll = tokio::spawn({
        let http = client.http.clone();
        async move { http.get(url).send().await.unwrap() }
    });
    // Nothing new yet: the poll is still waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !poll.is_finished(),
        "long poll returned before a new generation existed"
    );
    std::fs::write(content.join("new"), b"x").unwrap();
    let resp = tokio::time::timeout(DEADLINE, poll).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let v = client
        .verifier
        .verify_latest(&resp.bytes().await.unwrap(), meridian_e2e::now(), None)
        .unwrap();
    assert!(v.root.generation > g);
    // With nothing new, the poll times out with 204.
    let r = client
        .http
        .get(format!(
            "{}/wait?after={}&timeout=1",
            client.base, v.root.generation
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[test]
fn refuses_a_key_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    keygen(&dir.path().join("key"));
    std::fs::set_permissions(
        dir.path().join("key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut origin = start_origin(dir.path(), &[]);
    let status = origin.wait_exit(DEADLINE).expect("origin exits");
    assert!(!status.success());
    origin.drain();
    origin.wait_line("readable by group or others", Duration::from_secs(5));

    // 0600 but owned by another user, who could replace it: refused too.
    std::fs::set_permissions(
        dir.path().join("key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(dir.path().join("key"), Some(65534), None).unwrap();
    let mut origin = start_origin(dir.path(), &[]);
    let status = origin.wait_exit(DEADLINE).expect("origin exits");
    assert!(!status.success());
    origin.drain();
    origin.wait_line("is owned by uid 65534", Duration::from_secs(5));

    // The shape of a Kubernetes Secret volume with fsGroup
    // (deploy/kubernetes): root's, read-only, readable by the origin's own
    // group alone. Taken.
    std::os::unix::fs::chown(dir.path().join("key"), Some(0), Some(65534)).unwrap();
    std::fs::set_permissions(
        dir.path().join("key"),
        std::fs::Permissions::from_mode(0o440),
    )
    .unwrap();
    let mut origin = start_as_nobody(dir.path(), false);
    origin.listening("origin");
    drop(origin);
    // Writable by that group, or readable by others: refused.
    for mode in [0o460, 0o444] {
        std::fs::set_permissions(
            dir.path().join("key"),
            std::fs::Permissions::from_mode(mode),
        )
        .unwrap();
        let mut origin = start_as_nobody(dir.path(), false);
        let status = origin.wait_exit(DEADLINE).expect("origin exits");
        assert!(!status.success(), "mode {mode:o} taken");
        origin.drain();
        origin.wait_line("readable by group or others", Duration::from_secs(5));
    }
}

#[test]
fn an_expiry_shorter_than_resign_before_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    keygen(&dir.path().join("key"));
    let mut args = meridian_e2e::origin_args(dir.path(), "state", "200ms");
    args.extend(["--expiry".into(), "1d".into()]);
    let mut origin = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let status = origin.wait_exit(DEADLINE).expect("origin exits");
    assert!(!status.success());
    origin.drain();
    let line = origin.wait_line("resign_before", Duration::from_secs(5));
    assert!(
        line.contains("expiry (1day)") && line.contains("resign_before (3days)"),
        "{line}"
    );
    // Nothing was signed.
    assert!(
        !dir.path().join("state/roots").exists()
            || std::fs::read_dir(dir.path().join("state/roots"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn keygen_never_writes_the_secret_through_a_planted_temp_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    // An attacker's world-writable file, and the temp names keygen used to
    // use: one a symlink to it, one a plain 0644 file.
    let bait = dir.path().join("attacker");
    std::fs::write(&bait, b"").unwrap();
    std::fs::set_permissions(&bait, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::os::unix::fs::symlink(&bait, dir.path().join("k.tmp")).unwrap();
    keygen(&key);
    assert_eq!(
        std::fs::read(&bait).unwrap(),
        b"",
        "secret written through the symlink"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::read_to_string(&key).unwrap().contains("secret"),
        "not a key file"
    );

    let key2 = dir.path().join("k2");
    std::fs::write(dir.path().join("k2.tmp"), b"").unwrap();
    std::fs::set_permissions(
        dir.path().join("k2.tmp"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    keygen(&key2);
    let mode = std::fs::metadata(&key2).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key took a planted file's mode");
    // A second keygen without --force refuses, and leaves the key alone.
    let before = std::fs::read(&key2).unwrap();
    let out = std::process::Command::new(meridian_e2e::meridian_bin())
        .args(["keygen", "--out", key2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&key2).unwrap(), before);
}

#[tokio::test]
async fn crash_before_commit_keeps_the_last_generation_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("a"), b"first").unwrap();
    let key = keygen(&dir.path().join("key"));
    let g1;
    {
        let mut origin = start_origin(dir.path(), &[]);
        let client = ReadClient::new(origin.listening("origin"), key);
        g1 = converge(&client, &content, 0).await;
    }
    // The next publish dies after writing objects, before the root.
    std::fs::write(content.join("b"), vec![5u8; 2_000_000]).unwrap();
    let mut crashing = start_origin(
        dir.path(),
        &[("MERIDIAN_FAILPOINT", "origin-before-root-commit")],
    );
    let status = crashing
        .wait_exit(DEADLINE)
        .expect("failpoint aborts the origin");
    assert!(!status.success());
    let roots: Vec<_> = std::fs::read_dir(dir.path().join("state/roots"))
        .unwrap()
        .collect();
    assert_eq!(
        roots.len() as u64,
        g1,
        "no root was committed by the crashed publish"
    );

    // Restart: the last complete generation is the base; the next one follows it.
    let mut origin = start_origin(dir.path(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    let g2 = converge(&client, &content, g1).await;
    assert_eq!(
        g2,
        g1 + 1,
        "the next generation carries on from the last complete one"
    );
}

#[tokio::test]
async fn bad_names_and_escaping_symlinks_are_skipped_not_fatal() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("d")).unwrap();
    std::fs::write(content.join("good"), b"ok").unwrap();
    std::fs::write(content.join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x").unwrap();
    std::fs::write(content.join("new\nline"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", content.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../outside", content.join("d/escape2")).unwrap();
    std::os::unix::fs::symlink("../good", content.join("d/inside")).unwrap();
    std::fs::create_dir_all(content.join(".meridian")).unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let addr = origin.listening("origin");
    let client = ReadClient::new(addr, key);
    let root = eventually("a generation with the good file", DEADLINE, || async {
        let r = client.root().await?;
        client
            .files(r.root.tree)
            .await
            .contains_key("good")
            .then_some(r)
    })
    .await;
    let files = client.files(root.root.tree).await;
    assert_eq!(files.keys().collect::<Vec<_>>(), vec!["good"]);
    // The inside symlink is published; the escaping ones are not.
    let top = meridian_core::DirNode::decode(&client.object(&root.root.tree).await).unwrap();
    assert!(top.get("escape").is_none());
    let d = top.get("d").unwrap();
    let d = meridian_core::DirNode::decode(&client.object(&d.hash).await).unwrap();
    assert_eq!(
        d.get("inside").and_then(|e| e.target.clone()).as_deref(),
        Some("../good")
    );
    assert!(d.get("escape2").is_none());
    let metrics = meridian_e2e::metrics_text(&client.http, addr)
        .await
        .unwrap();
    for reason in ["not_utf8", "bad_name", "symlink_escapes", "reserved_name"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "no {reason} in {metrics}"
        );
    }
    origin.drain();
    origin.wait_line(
        "symlink points outside the content directory",
        Duration::from_secs(5),
    );
}

#[tokio::test]
async fn a_file_being_written_is_never_published_half_written() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let key = keygen(&dir.path().join("key"));
    // A longer quiet period than the writer's pauses.
    let args = meridian_e2e::origin_args(dir.path(), "state", "1s");
    let mut origin = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    converge(&client, &content, 0).await;
    let path = content.join("growing.iso");
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        for i in 0..40u8 {
            f.write_all(&vec![i; 64 * 1024]).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut seen = Vec::new();
    while !writer.is_finished() {
        if let Some(r) = client.root().await
            && let Some((h, size)) = client.files(r.root.tree).await.get("growing.iso")
        {
            seen.push((*h, *size));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.join().unwrap();
    let final_hash = hash_file(&content.join("growing.iso"));
    converge(&client, &content, 0).await;
    for (h, size) in seen {
        assert_eq!(h, final_hash, "a partial file ({size} bytes) was published");
    }
}

/// Runs the origin as `nobody`, so that file permissions apply (the tests
/// themselves run as root, which can read anything).
fn start_origin_unprivileged(dir: &Path) -> Proc {
    start_as_nobody(dir, true)
}

/// As [`start_origin_unprivileged`]; `own_key`: make `nobody` the key's
/// owner (else leave the key as it is).
fn start_as_nobody(dir: &Path, own_key: bool) -> Proc {
    use std::os::unix::fs::{PermissionsExt, chown};
    let nobody = 65534;
    for d in [dir, &dir.join("content")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::create_dir_all(dir.join("state")).unwrap();
    chown(dir.join("state"), Some(nobody), Some(nobody)).unwrap();
    if own_key {
        chown(dir.join("key"), Some(nobody), Some(nobody)).unwrap();
    }
    let bin = meridian_e2e::meridian_bin();
    let mut args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        bin.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(meridian_e2e::origin_args(dir, "state", "200ms"));
    Proc::spawn_cmd(
        "setpriv",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn an_unreadable_file_keeps_its_previous_version() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("doc.txt"), b"version one").unwrap();
    std::fs::set_permissions(
        content.join("doc.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(content.join("other.txt"), b"x").unwrap();
    std::fs::set_permissions(
        content.join("other.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin_unprivileged(dir.path());
    let addr = origin.listening("origin");
    let client = ReadClient::new(addr, key);
    let g = converge(&client, &content, 0).await;
    // Change it and make it unreadable to the origin; change another file too.
    std::fs::write(content.join("doc.txt"), b"version two, unreadable").unwrap();
    std::fs::set_permissions(
        content.join("doc.txt"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    std::fs::write(content.join("other.txt"), b"y").unwrap();
    let files = eventually("a generation with the other change", DEADLINE, || async {
        let r = client.root().await?;
        if r.root.generation <= g {
            return None;
        }
        let f = client.files(r.root.tree).await;
        (f.get("other.txt")?.0 == meridian_core::hash_bytes(b"y")).then_some(f)
    })
    .await;
    assert_eq!(
        files["doc.txt"].0,
        meridian_core::hash_bytes(b"version one"),
        "the previous version stays published"
    );
    let metrics = meridian_e2e::metrics_text(&client.http, addr)
        .await
        .unwrap();
    assert!(metrics.contains("reason=\"unreadable\""), "{metrics}");
    origin.drain();
    origin.wait_line("cannot be read", Duration::from_secs(5));
}

#[tokio::test]
async fn an_unreadable_directory_keeps_its_previous_content_in_every_scan() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("sub/deep")).unwrap();
    for (p, b) in [
        ("sub/a.txt", &b"in sub"[..]),
        ("sub/deep/b.txt", b"deeper"),
        ("top.txt", b"one"),
    ] {
        std::fs::write(content.join(p), b).unwrap();
    }
    for d in ["sub", "sub/deep"] {
        std::fs::set_permissions(content.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin_unprivileged(dir.path());
    let addr = origin.listening("origin");
    let mut client = ReadClient::new(addr, key);
    let mut g = converge(&client, &content, 0).await;
    let before = client.files(client.root().await.unwrap().root.tree).await;
    std::fs::set_permissions(content.join("sub"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // Each round: a change elsewhere, then a generation that still has
    // `sub` as it was, with the root's totals counting its files. First
    // the scan of the changed paths (which walks `sub` whole: its mode
    // changed), then a restart's full scan.
    for (round, top) in [(0, &b"two"[..]), (1, b"three")] {
        if round == 1 {
            drop(origin);
            origin = start_origin_unprivileged(dir.path());
            client = ReadClient::new(origin.listening("origin"), key);
        }
        std::fs::write(content.join("top.txt"), top).unwrap();
        let after = g;
        let (root, files) = eventually("a generation with top.txt changed", DEADLINE, || async {
            let r = client.root().await?;
            if r.root.generation <= after {
                return None;
            }
            let f = client.files(r.root.tree).await;
            (f.get("top.txt")?.0 == meridian_core::hash_bytes(top)).then_some((r.root, f))
        })
        .await;
        g = root.generation;
        for p in ["sub/a.txt", "sub/deep/b.txt"] {
            assert_eq!(files.get(p), before.get(p), "round {round}: {p} kept");
        }
        assert_eq!((root.files, files.len()), (3, 3), "round {round}");
        let bytes: u64 = files.values().map(|(_, n)| n).sum();
        assert_eq!(root.bytes, bytes, "round {round}");
    }
    std::fs::set_permissions(content.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
    origin.drain();
    origin.wait_line("keeping its previous content", Duration::from_secs(5));
}

#[tokio::test]
async fn a_full_disk_fails_the_publish_and_keeps_the_last_generation() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("small"), b"fits").unwrap();
    let key = keygen(&dir.path().join("key"));
    let state = dir.path().join("origin-state");
    std::fs::create_dir_all(&state).unwrap();
    let _disk = meridian_e2e::SmallDisk::mount(&state, "4m");
    let (mut origin, addr) = meridian_e2e::origin(dir.path(), "200ms");
    let client = ReadClient::new(addr, key);
    let g = converge(&client, &content, 0).await;
    // 8 MB does not fit in the 4 MB state file system.
    std::fs::write(content.join("big"), vec![1u8; 8_000_000]).unwrap();
    origin.wait_line("publish failed", DEADLINE);
    assert_eq!(
        client.root().await.unwrap().root.generation,
        g,
        "the last complete generation stays current"
    );
    let metrics = meridian_e2e::metrics_text(&client.http, addr)
        .await
        .unwrap();
    assert!(meridian_e2e::metric(&metrics, "meridian_origin_publish_errors_total") >= 1.0);
    // Room again: publishing carries on.
    std::fs::remove_file(content.join("big")).unwrap();
    std::fs::write(content.join("small"), b"fits, changed").unwrap();
    converge(&client, &content, g).await;
}

#[tokio::test]
async fn a_hundred_thousand_files_changing_at_once_make_one_consistent_generation() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_origin, addr) = meridian_e2e::origin(dir.path(), "500ms");
    let client = ReadClient::new(addr, key);
    let g = converge(&client, &content, 0).await;
    for d in 0..100 {
        let sub = content.join(format!("d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..1000 {
            std::fs::write(sub.join(format!("f{f:04}")), format!("{d}/{f}")).unwrap();
        }
    }
    let root = eventually(
        "one generation with all 100,000 files",
        Duration::from_secs(120),
        || async {
            let r = client.root().await?;
            (r.root.generation > g && r.root.files == 100_000).then_some(r)
        },
    )
    .await;
    // Spot-check content against the files on disk.
    let files = client.files(root.root.tree).await;
    assert_eq!(files.len(), 100_000);
    for (d, f) in [(0, 0), (42, 517), (99, 999)] {
        let h = files[&format!("d{d:02}/f{f:04}")].0;
        assert_eq!(h, meridian_core::hash_bytes(format!("{d}/{f}").as_bytes()));
    }
}

#[tokio::test]
async fn files_edited_in_place_before_their_copy_are_withdrawn_never_served() {
    // The origin hashes in place and hard-links (snapshot = "link"); private
    // copies are made later, from bytes hashed again. `--once` publishes and
    // exits before any copy is made; the files are then rewritten in place
    // (same inodes). The old objects must never be served: each is withdrawn.
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    for i in 0..50u32 {
        let data: Vec<u8> = (0..65_536u32).map(|x| (x ^ i) as u8).collect();
        std::fs::write(content.join(format!("f{i:03}")), data).unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let mut args = meridian_e2e::origin_args(dir.path(), "state", "0s");
    args.push("--once".into());
    let st = std::process::Command::new(meridian_e2e::meridian_bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let old = disk_files(&content);
    for i in 0..50u32 {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(content.join(format!("f{i:03}")))
            .unwrap();
        std::io::Write::write_all(&mut f, b"overwritten in place").unwrap();
    }
    let mut origin = start_origin(dir.path(), &[]);
    let addr = origin.listening("origin");
    let client = ReadClient::new(addr, key);
    for h in old.values() {
        let r = client
            .http
            .get(format!("http://{addr}/.meridian/v1/objects/{h}"))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert_eq!(
            code,
            404,
            "object {h} must be withdrawn, got {} bytes",
            body.len()
        );
    }
    // The edited files are published as they are now, and served right.
    converge(&client, &content, 1).await;
}

/// Retention and garbage collection: generations beyond the retention leave,
/// and the blobs only they referenced are removed, but not before the grace
/// period (a mirror mid-sync on the old generation can still fetch them).
#[tokio::test]
async fn old_generations_and_their_blobs_are_collected_after_retention_and_grace() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("image.iso"), vec![1u8; 100_000]).unwrap();
    std::fs::write(content.join("keep.txt"), b"unchanged").unwrap();
    let key = keygen(&dir.path().join("key"));
    let cfg = dir.path().join("origin.toml");
    std::fs::write(
        &cfg,
        "retain_generations = 1\nretain_age = \"0s\"\ngc_grace = \"3s\"\n",
    )
    .unwrap();
    let mut args = meridian_e2e::origin_args(dir.path(), "state", "200ms");
    args.extend(["--config".to_owned(), cfg.to_str().unwrap().to_owned()]);
    let mut origin = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let addr = origin.listening("origin");
    let client = ReadClient::new(addr, key);
    let g1 = converge(&client, &content, 0).await;
    let old = hash_file(&content.join("image.iso"));
    let status = |path: String| {
        let http = client.http.clone();
        async move {
            http.get(format!("http://{addr}/.meridian/v1/{path}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Replaced by a new file renamed over it, as a release tool does: the
    // old bytes stay intact for the collector (an in-place rewrite would
    // instead withdraw the old object if its private copy was not made
    // yet: another test's subject).
    let new = dir.path().join("image.iso.new");
    std::fs::write(&new, vec![2u8; 100_000]).unwrap();
    std::fs::rename(&new, content.join("image.iso")).unwrap();
    let g2 = converge(&client, &content, g1).await;
    // Just switched: the old blob is still there for mirrors mid-sync on g1.
    assert_eq!(status(format!("objects/{old}")).await, 200);

    eventually(
        "generation 1 and its blob to be collected",
        DEADLINE,
        || async {
            (status(format!("generations/{g1}")).await == 404
                && status(format!("objects/{old}")).await == 404)
                .then_some(())
        },
    )
    .await;
    // What the retained generation references is all still served.
    assert_eq!(status(format!("generations/{g2}")).await, 200);
    let root = client.root().await.unwrap();
    assert_eq!(root.root.generation, g2);
    let files = client.files(root.root.tree).await;
    for (h, _) in files.values() {
        client.object(h).await;
    }
    let metrics = meridian_e2e::metrics_text(&client.http, addr)
        .await
        .unwrap();
    let removed: u64 = metrics
        .lines()
        .find(|l| l.starts_with("meridian_origin_gc_objects_removed_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(removed >= 1, "{metrics}");
}

/// A long-poll for the next generation after `g`, from `src`.
async fn long_poll(base: &str, g: u64, src: &str) -> reqwest::Response {
    let http = reqwest::Client::builder()
        .local_address(src.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    http.get(format!("{base}/wait?after={g}&timeout=60"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn long_polls_are_capped_per_client_and_answered_at_once_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    let g = converge(&client, &content, 0).await;
    // One host holds at most 8 long-polls; the rest are refused at once
    // with Retry-After, not queued.
    let mut held = Vec::new();
    for i in 0..8 {
        let base = client.base.clone();
        held.push(tokio::spawn(async move {
            long_poll(&base, g, &format!("127.0.7.{}", i / 8 + 1)).await
        }));
    }
    // Wait until the origin holds them all (its waiters gauge).
    eventually("8 long-polls to be held", DEADLINE, || async {
        let m = client
            .http
            .get(format!("{}/../metrics", client.base))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (meridian_e2e::metric(&m, "meridian_origin_waiters") >= 8.0).then_some(())
    })
    .await;
    let r = long_poll(&client.base, g, "127.0.7.1").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    // Another host still gets its long-poll.
    let base = client.base.clone();
    held.push(tokio::spawn(async move {
        long_poll(&base, g, "127.0.7.2").await
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.last().unwrap().is_finished(),
        "other hosts are not capped"
    );

    // SIGTERM: every long-poll is answered at once (no news: 204) and the
    // origin exits promptly, instead of waiting out their 60 s.
    let t0 = std::time::Instant::now();
    meridian_e2e::signal(origin.child.id() as i32, "TERM");
    for h in held {
        let r = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("a long-poll answered within 5 s of SIGTERM")
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let status = origin
        .wait_exit(Duration::from_secs(10))
        .expect("origin exits");
    assert!(status.success());
    let took = t0.elapsed();
    eprintln!(
        "origin stopped {:.2} s after SIGTERM with 9 long-polls open",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn patches_are_computed_one_at_a_time_and_a_crowd_is_turned_away_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    let mut hashes = Vec::new();
    for i in 0..8u32 {
        let data: Vec<u8> = (0..4_000_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8)
            .collect();
        let p = content.join(format!("v{i}.bin"));
        std::fs::write(&p, &data).unwrap();
        hashes.push(hash_file(&p));
    }
    let key = keygen(&dir.path().join("key"));
    let mut origin = start_origin(dir.path(), &[]);
    let client = ReadClient::new(origin.listening("origin"), key);
    converge(&client, &content, 0).await;
    // 24 distinct pairs at once, from one client.
    let mut asks = Vec::new();
    for (a, b) in (0..8)
        .flat_map(|a| (0..8).map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .take(24)
    {
        let url = format!("{}/patch/{}/{}", client.base, hashes[a], hashes[b]);
        let http = client.http.clone();
        asks.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            let code = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let _ = r.bytes().await;
            (code, retry)
        }));
    }
    let mut served = 0;
    let mut refused = 0;
    for a in asks {
        match a.await.unwrap() {
            (200, _) => served += 1,
            (503, true) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("patches: {served} computed, {refused} turned away");
    assert!(served >= 1, "nothing was computed");
    assert!(refused >= 1, "every patch was queued and computed");
}

#[test]
fn check_validates_each_config_and_help_names_each_default() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let (ok, out) = cli(&[
        "mirror",
        "--config",
        deploy.join("mirror.toml").to_str().unwrap(),
        "--check",
    ]);
    assert!(ok && out.contains("mirror configuration OK"), "{out}");
    // A broken one names the cause, in one line, without a backtrace.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("geodns.toml");
    std::fs::write(
        &bad,
        "listen = [\"127.0.0.1:0\"]\nzones = []\nmirrors = []\n",
    )
    .unwrap();
    let (ok, out) = cli(&["geodns", "--config", bad.to_str().unwrap(), "--check"]);
    assert!(
        !ok && out.contains("meridian: error:") && out.contains("at least one zone"),
        "{out}"
    );
    assert!(!out.contains("stack backtrace"), "{out}");
    let empty_token = dir.path().join("m.toml");
    std::fs::write(
        &empty_token,
        "id = \"m\"\nupstreams = [\"http://127.0.0.1:1\"]\ntrust = [\"ed25519:0000000000000000000000000000000000000000000000000000000000000000\"]\nstate = \"/tmp/x\"\nadmin_token = \"\"\n",
    )
    .unwrap();
    let (ok, out) = cli(&[
        "mirror",
        "--config",
        empty_token.to_str().unwrap(),
        "--check",
    ]);
    assert!(!ok && out.contains("admin token is empty"), "{out}");
    // Each role's --help gives its own listen default; the top one explains
    // MERIDIAN_LOG.
    let (_, o) = cli(&["origin", "--help"]);
    assert!(
        o.contains("[default: 127.0.0.1:8080]") && !o.contains("8081"),
        "{o}"
    );
    let (_, m) = cli(&["mirror", "--help"]);
    assert!(
        m.contains("[default: 127.0.0.1:8081]") && m.contains("bytes per second"),
        "{m}"
    );
    let (_, top) = cli(&["--help"]);
    assert!(top.contains("MERIDIAN_LOG"), "{top}");
}

#[tokio::test]
async fn the_origin_honours_its_listener_timeouts() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    keygen(&dir.path().join("key"));
    let mut args = meridian_e2e::origin_args(dir.path(), "state", "200ms");
    args.extend(["--header-timeout".into(), "1s".into()]);
    let mut origin = Proc::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let addr = origin.listening("origin");
    // A connection that never sends a request head is closed after the
    // configured 1 s, not the default 20 s.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "still open after 5 s: {r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// SIGHUP makes the origin read its config file again (the systemd unit's
/// `ExecReload` sends it): the process stays, the publishing settings take
/// effect with the next generation (here `expiry`), a setting that takes a
/// restart is named, and a config that does not parse is refused while the
/// running one stays.
#[tokio::test]
async fn sighup_reloads_the_origins_publishing_settings() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), b"one").unwrap();
    let key = keygen(&dir.path().join("key"));
    let cfg_path = dir.path().join("origin.toml");
    let write_cfg = |expiry: &str, state: &str| {
        let mut t = toml::Table::new();
        t.insert("content".into(), content.display().to_string().into());
        t.insert(
            "state".into(),
            dir.path().join(state).display().to_string().into(),
        );
        t.insert(
            "key_file".into(),
            dir.path().join("key").display().to_string().into(),
        );
        t.insert("listen".into(), "127.0.0.1:0".into());
        t.insert("quiet".into(), "200ms".into());
        t.insert("expiry".into(), expiry.into());
        std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
    };
    write_cfg("7d", "state");
    let mut o = Proc::spawn(&["origin", "--config", cfg_path.to_str().unwrap()], &[]);
    let addr = o.listening("origin");
    let client = ReadClient::new(addr, key);
    let g1 = converge(&client, &content, 0).await;
    let life = |r: &meridian_core::VerifiedRoot| r.root.expires - r.root.created;
    assert_eq!(life(&client.root().await.unwrap()), 7 * 86_400);
    let pid = o.child.id() as i32;

    write_cfg("5d", "state");
    meridian_e2e::signal(pid, "HUP");
    o.wait_line("configuration reloaded", DEADLINE);
    std::fs::write(content.join("f"), b"two").unwrap();
    let g2 = converge(&client, &content, g1).await;
    let r = client.root().await.unwrap();
    assert_eq!(r.root.generation, g2);
    assert_eq!(
        life(&r),
        5 * 86_400,
        "the new expiry signs the next generation"
    );

    // A setting that takes a restart is named, and left as it is.
    write_cfg("5d", "elsewhere");
    meridian_e2e::signal(pid, "HUP");
    let line = o.wait_line("settings that take a restart", DEADLINE);
    assert!(line.contains("state"), "{line}");
    // A config that does not parse changes nothing.
    std::fs::write(&cfg_path, b"expiry = ").unwrap();
    meridian_e2e::signal(pid, "HUP");
    o.wait_line("configuration NOT reloaded", DEADLINE);
    std::fs::write(content.join("f"), b"three").unwrap();
    let g3 = converge(&client, &content, g2).await;
    assert_eq!(life(&client.root().await.unwrap()), 5 * 86_400);
    assert!(g3 > g2);
    assert!(
        o.child.try_wait().unwrap().is_none(),
        "the origin is still running"
    );
    assert!(!dir.path().join("elsewhere").exists());
}

/// A file written and closed, or renamed into place, is published without
/// waiting out `quiet` (10 s here); one still open for writing waits until
/// it is closed. Each publish below is timed from the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_files_are_published_at_once_and_open_ones_wait_until_closed() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, addr) = meridian_e2e::origin(dir.path(), "10s");
    let client = ReadClient::new(addr, key);
    let quiet = Duration::from_secs(10);
    let has = |name: &'static str| {
        let client = &client;
        async move {
            let r = client.root().await?;
            client
                .files(r.root.tree)
                .await
                .contains_key(name)
                .then_some(())
        }
    };
    eventually("the first generation", DEADLINE, || async {
        client.root().await.map(|_| ())
    })
    .await;

    // Written and closed.
    let t0 = std::time::Instant::now();
    std::fs::write(dir.path().join("content/closed.txt"), b"done").unwrap();
    eventually("closed.txt published", quiet, || has("closed.txt")).await;
    let closed = t0.elapsed();

    // Open for writing: not published while open, even as another file
    // is finished and published meanwhile.
    let mut open = std::fs::File::create(dir.path().join("content/open.txt")).unwrap();
    open.write_all(b"half").unwrap();
    open.flush().unwrap();
    // Renamed into place (written elsewhere on the same file system).
    let t1 = std::time::Instant::now();
    std::fs::write(dir.path().join("staged.txt"), b"renamed").unwrap();
    std::fs::rename(
        dir.path().join("staged.txt"),
        dir.path().join("content/renamed.txt"),
    )
    .unwrap();
    eventually("renamed.txt published", quiet, || has("renamed.txt")).await;
    let renamed = t1.elapsed();
    assert!(
        has("open.txt").await.is_none(),
        "a file still open for writing was published"
    );
    open.write_all(b" and the rest").unwrap();
    let t2 = std::time::Instant::now();
    drop(open);
    eventually("open.txt published once closed", quiet, || has("open.txt")).await;
    let after_close = t2.elapsed();
    eprintln!(
        "published after: close {closed:?}, rename {renamed:?}, close of a long-open file {after_close:?} (quiet {quiet:?})"
    );
    for (what, d) in [
        ("closed", closed),
        ("renamed", renamed),
        ("closed later", after_close),
    ] {
        assert!(
            d < Duration::from_secs(3),
            "{what}: {d:?}, not before the quiet period"
        );
    }
    let r = client.root().await.unwrap();
    let files = client.files(r.root.tree).await;
    assert_eq!(
        files["open.txt"].0,
        meridian_core::hash_bytes(b"half and the rest"),
        "the whole file, as closed"
    );
}

/// The tree a full scan of a copy of `content` makes (`meridian origin
/// --once`, its own state): the yardstick for what the running origin
/// built from changed paths alone.
fn full_scan_tree(dir: &Path, content: &Path, n: usize) -> Hash {
    let copy = dir.join(format!("copy{n}"));
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(content)
        .arg(&copy)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a");
    let state = dir.join(format!("full-state{n}"));
    let (ok, out) = cli(&[
        "origin",
        "--once",
        "--content",
        copy.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--key",
        dir.join("key").to_str().unwrap(),
        "--quiet",
        "0s",
    ]);
    assert!(ok, "{out}");
    let root = std::fs::read_dir(state.join("roots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let signed = meridian_core::SignedRoot::decode(&std::fs::read(root).unwrap()).unwrap();
    meridian_core::Root::decode(&signed.body).unwrap().tree
}

/// After its first full scan the origin looks only at the paths inotify
/// reports: each kind of change below (files added, rewritten, removed,
/// made executable; directories made deep at once, renamed, moved in from
/// outside, removed whole; a file turned into a directory and back;
/// symlinks; an empty directory) gives exactly the tree a full scan of
/// the same directory gives, and no publish in between is a full scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_from_changed_paths_give_the_tree_a_full_scan_gives() {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("content");
    for d in ["pool/main/a", "pool/main/b", "dists/stable", "old/deep/er"] {
        fs::create_dir_all(c.join(d)).unwrap();
    }
    for (i, f) in [
        "pool/main/a/a1.deb",
        "pool/main/a/a2.deb",
        "pool/main/b/b1.deb",
        "dists/stable/Release",
        "old/deep/er/x",
        "old/y",
        "top.txt",
        "turns-into-dir",
    ]
    .iter()
    .enumerate()
    {
        fs::write(c.join(f), meridian_e2e::noise(1000 + i * 300, i as u32)).unwrap();
    }
    fs::create_dir_all(c.join("becomes-file/inner")).unwrap();
    fs::write(c.join("becomes-file/inner/z"), b"z").unwrap();
    let key = keygen(&dir.path().join("key"));
    let (_o, addr) = meridian_e2e::origin(dir.path(), "200ms");
    let client = ReadClient::new(addr, key);
    let scans = |scope: &'static str| {
        let client = &client;
        async move {
            let m = meridian_e2e::metrics_text(&client.http, addr)
                .await
                .unwrap();
            m.lines()
                .find(|l| {
                    l.starts_with(&format!("meridian_origin_scans_total{{scope=\"{scope}\"}}"))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap()
        }
    };
    let mut g = converge(&client, &c, 0).await;
    assert_eq!(scans("full").await, 1, "the first scan is a full one");
    let outside = dir.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("sub/moved-in"), b"from outside").unwrap();
    fs::write(outside.join("top-of-moved"), b"also").unwrap();

    type Step = Box<dyn Fn(&Path)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "add, rewrite and remove files",
            Box::new(|c: &Path| {
                fs::write(c.join("pool/main/a/a3.deb"), b"new package").unwrap();
                fs::write(c.join("dists/stable/Release"), b"rewritten").unwrap();
                fs::remove_file(c.join("pool/main/a/a1.deb")).unwrap();
            }),
        ),
        (
            "a deep directory made at once",
            Box::new(|c: &Path| {
                fs::create_dir_all(c.join("new/x/y/z")).unwrap();
                fs::write(c.join("new/x/y/z/leaf"), b"deep").unwrap();
                fs::write(c.join("new/x/mid"), b"mid").unwrap();
                fs::create_dir_all(c.join("empty/dir")).unwrap();
            }),
        ),
        (
            "a directory renamed, one moved in, one removed whole",
            Box::new(|c: &Path| {
                fs::rename(c.join("pool/main/b"), c.join("pool/main/b-renamed")).unwrap();
                fs::rename(dir_outside(c), c.join("moved")).unwrap();
                fs::remove_dir_all(c.join("old")).unwrap();
            }),
        ),
        (
            "a file turned into a directory and a directory into a file",
            Box::new(|c: &Path| {
                fs::remove_file(c.join("turns-into-dir")).unwrap();
                fs::create_dir(c.join("turns-into-dir")).unwrap();
                fs::write(c.join("turns-into-dir/now"), b"inside").unwrap();
                fs::remove_dir_all(c.join("becomes-file")).unwrap();
                fs::write(c.join("becomes-file"), b"a file now").unwrap();
            }),
        ),
        (
            "symlinks and an executable bit",
            Box::new(|c: &Path| {
                std::os::unix::fs::symlink("a/a2.deb", c.join("pool/main/link")).unwrap();
                std::os::unix::fs::symlink("../../top.txt", c.join("moved/sub/up")).unwrap();
                fs::set_permissions(c.join("top.txt"), fs::Permissions::from_mode(0o755)).unwrap();
            }),
        ),
    ];
    for (n, (what, step)) in steps.iter().enumerate() {
        step(&c);
        g = converge(&client, &c, g).await;
        let want = full_scan_tree(dir.path(), &c, n);
        let got = eventually(what, DEADLINE, || async {
            let r = client.root().await?;
            (r.root.tree == want).then_some(r.root.tree)
        })
        .await;
        assert_eq!(got, want, "{what}");
    }
    assert_eq!(
        scans("full").await,
        1,
        "every later scan looked at changed paths only"
    );
    assert!(scans("changed").await >= steps.len() as u64);
}

/// `outside`, beside the content directory (moved into it by a step).
fn dir_outside(content: &Path) -> std::path::PathBuf {
    content.parent().unwrap().join("outside")
}
