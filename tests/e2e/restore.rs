//! `meridian restore`: a lost origin rebuilt from a second-tier mirror.

use meridian_e2e::evil::{Evil, Mode};
use meridian_e2e::{Proc, ReadClient, eventually, http, keygen, noise, origin, wait_generation};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

/// Every entry under `root`: path, kind, executable bit, size, mtime (of
/// files and symlinks: the origin publishes no directory mtimes) and target.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if md.is_dir() {
                out.push(format!("{rel} dir"));
                stack.push(p);
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.push(format!("{rel} -> {} {}", t.display(), md.mtime()));
            } else {
                let x = md.permissions().mode() & 0o111 != 0;
                out.push(format!("{rel} file x={x} {} {}", md.len(), md.mtime()));
            }
        }
    }
    out.sort();
    out
}

/// Blobs of `size` bytes in a store's `objects/`.
fn objects_of_size(state: &Path, size: u64) -> usize {
    let Ok(shards) = std::fs::read_dir(state.join("objects")) else {
        return 0;
    };
    shards
        .flatten()
        .filter_map(|s| std::fs::read_dir(s.path()).ok())
        .flatten()
        .flatten()
        .filter(|o| o.metadata().is_ok_and(|m| m.len() == size))
        .count()
}

fn restore(
    from: &str,
    key: &meridian_core::PublicKey,
    dir: &Path,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(meridian_e2e::meridian_bin())
        .args(["restore", "--from", from, "--trust", &key.to_string()])
        .arg("--content")
        .arg(dir.join("content"))
        .arg("--state")
        .arg(dir.join("origin-state"))
        .args(extra)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Origin → m1 → m2. The origin is lost (killed, content and state gone)
/// and restored from m2: a mirror behind `--at-least` is refused first; a
/// restore killed (-9) halfway resumes without fetching again what it
/// verified; the content is exactly as it was (`diff -r`, modes, mtimes,
/// symlinks, an empty directory); the restored origin publishes the next
/// generation and both mirrors serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_origin_is_restored_from_a_second_tier_mirror_and_the_chain_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("pool/main")).unwrap();
    std::fs::create_dir_all(content.join("empty")).unwrap();
    const BLOB: usize = 1 << 20;
    for i in 0..8u32 {
        std::fs::write(
            content.join(format!("pool/main/pkg{i}.deb")),
            noise(BLOB, i + 1),
        )
        .unwrap();
    }
    std::fs::write(content.join("README"), b"read me\n").unwrap();
    std::fs::write(content.join("install.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        content.join("install.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("pool/main/pkg0.deb", content.join("latest.deb")).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    for f in ["README", "empty"] {
        std::fs::File::open(content.join(f))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let key = keygen(&dir.path().join("key"));
    let (mut o, oaddr) = origin(dir.path(), "200ms");
    let client = ReadClient::new(oaddr, key);
    let g = eventually("the origin to publish", DEADLINE, || async {
        let r = client.root().await?;
        (r.root.files == 10).then_some(r.root.generation)
    })
    .await;
    let (_m1, a1) = meridian_e2e::mirror(
        "m1",
        &[format!("http://{oaddr}")],
        &key,
        &dir.path().join("m1"),
        &["--poll-interval", "1s"],
    );
    let (_m2, a2) = meridian_e2e::mirror(
        "m2",
        &[format!("http://{a1}")],
        &key,
        &dir.path().join("m2"),
        &["--poll-interval", "1s"],
    );
    let http = http();
    wait_generation(&http, a2, g).await;
    let want = listing(&content);

    // The origin is lost.
    let lost = dir.path().join("lost");
    assert!(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&content)
            .arg(&lost)
            .status()
            .unwrap()
            .success()
    );
    o.child.kill().unwrap();
    o.child.wait().unwrap();
    std::fs::remove_dir_all(&content).unwrap();
    std::fs::remove_dir_all(dir.path().join("origin-state")).unwrap();
    let m2 = format!("http://{a2}");

    // A mirror behind what the operator knows was published is refused.
    let out = restore(&m2, &key, dir.path(), &["--at-least", &(g + 1).to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "serves generation {g}, older than --at-least {}",
            g + 1
        )),
        "{err}"
    );
    assert!(!content.exists(), "a refused restore writes no content");

    // Killed halfway (through a slow proxy, one blob at a time): two blobs
    // verified and stored, then kill -9.
    let (_evil, slow) = Evil::start(a2, Mode::Slow).await;
    let state = dir.path().join("origin-state");
    let mut killed = Proc::spawn(
        &[
            "restore",
            "--from",
            &format!("http://{}", slow.local_addr),
            "--trust",
            &key.to_string(),
            "--content",
            content.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--parallel",
            "1",
        ],
        &[],
    );
    eventually("two blobs to be restored", DEADLINE, || async {
        (objects_of_size(&state, BLOB as u64) >= 2).then_some(())
    })
    .await;
    meridian_e2e::signal(killed.child.id() as i32, "KILL");
    killed.wait_exit(DEADLINE).expect("killed");
    let kept = objects_of_size(&state, BLOB as u64);
    assert!(kept < 8, "the restore was not interrupted ({kept} blobs)");
    assert!(!content.exists());

    // Rerun: only what is missing is fetched.
    let out = restore(&m2, &key, dir.path(), &["--at-least", &g.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let fetched: usize = err
        .lines()
        .find(|l| l.contains("now serving generation"))
        .and_then(|l| l.split("blobs=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sync line: {err}"));
    assert!(
        fetched <= 10 - kept + 1,
        "fetched {fetched} blobs again after {kept} were kept: {err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("restored generation {g}")));

    // Exactly the lost content.
    let diff = std::process::Command::new("diff")
        .arg("-r")
        .arg(&lost)
        .arg(&content)
        .output()
        .unwrap();
    assert!(
        diff.status.success() && diff.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    assert_eq!(listing(&content), want);
    for f in ["current", "highest", "unflushed", "partial", "quarantine"] {
        assert!(
            !state.join(f).exists(),
            "mirror-only {f} left in the origin state"
        );
    }

    // The restored origin, where the old one was, continues the chain.
    let mut o2 = meridian_e2e::origin_at(dir.path(), "origin-state", "200ms", oaddr);
    std::fs::write(content.join("README"), b"read me again\n").unwrap();
    let next = eventually("the restored origin to publish", DEADLINE, || async {
        let r = client.root().await?;
        (r.root.generation > g).then_some(r.root.generation)
    })
    .await;
    assert_eq!(next, g + 1);
    o2.drain();
    assert!(
        !o2.log
            .iter()
            .any(|l| l.contains("hashed_files=1") && l.contains(&format!("generation={g}"))),
        "republished the restored generation"
    );
    for a in [a1, a2] {
        wait_generation(&http, a, g + 1).await;
    }
}
