//! Scans of real directories: quiet periods, edits during a snapshot,
//! links, and the descriptor budget.

use super::*;
use crate::linked::Promoted;

fn scan_dir(
    content: &Path,
    store: &LinkedStore,
    prev: &HashMap<String, Entry>,
    quiet: Duration,
) -> ScanOutput {
    scan_mode(content, store, prev, quiet, Snapshot::Copy)
}

fn scan_mode(
    content: &Path,
    store: &LinkedStore,
    prev: &HashMap<String, Entry>,
    quiet: Duration,
    snapshot: Snapshot,
) -> ScanOutput {
    let cache = HashCache::default();
    let out = scan(&input(content, store, &cache, prev, quiet, snapshot)).expect("scan");
    published(store, out)
}

/// A full scan's output with `leaves` filled in from the tree it wrote
/// to the store (a full scan gives its tree, not its leaves).
fn published(store: &LinkedStore, mut out: ScanOutput) -> ScanOutput {
    assert_eq!(out.subtrees.len(), 1, "one subtree: the top");
    let top = out.subtrees[0].entry.hash;
    let mut leaves = HashMap::new();
    crate::publisher::walk_tree(
        store,
        top,
        |_| true,
        |p, e| {
            leaves.insert(p.to_owned(), e.clone());
        },
    )
    .expect("the scan's tree is in the store");
    let files = leaves
        .values()
        .filter(|e| e.kind == meridian_core::EntryKind::File);
    assert_eq!(out.subtrees[0].files, files.count() as u64);
    out.leaves = leaves;
    out
}

/// A scan's inputs: no watcher, two hashing threads.
fn input<'a>(
    content: &'a Path,
    store: &'a LinkedStore,
    cache: &'a HashCache,
    previous: &'a HashMap<String, Entry>,
    quiet: Duration,
    snapshot: Snapshot,
) -> ScanInput<'a> {
    ScanInput {
        content,
        store,
        cache,
        previous,
        quiet,
        closes: None,
        threads: 2,
        snapshot,
    }
}

#[test]
fn recent_files_wait_for_quiet_and_keep_their_previous_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = dir.path().join("c");
    fs::create_dir_all(&content).expect("mkdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    let f = content.join("f");
    fs::write(&f, b"new bytes").expect("write");
    let old = Entry::file("f", 3, Hash([1; 32]), false, 0);
    let prev: HashMap<String, Entry> = [("f".to_owned(), old.clone())].into();

    // Just written: not yet published; the previous version is kept.
    let out = scan_dir(&content, &store, &prev, Duration::from_secs(3600));
    assert_eq!(out.leaves.get("f"), Some(&old));
    assert!(out.needs_retry());
    // Without a previous version it is simply not published yet.
    let out = scan_dir(&content, &store, &HashMap::new(), Duration::from_secs(3600));
    assert!(out.leaves.is_empty());

    // Quiet long enough: published with the hash of its bytes.
    let out = scan_dir(&content, &store, &prev, Duration::ZERO);
    let e = out.leaves.get("f").expect("published");
    assert_eq!(e.hash, meridian_core::hash_bytes(b"new bytes"));
    assert_eq!(store.read(&e.hash).expect("snapshot"), b"new bytes");
    assert!(!out.needs_retry());
}

#[test]
fn a_file_that_changes_between_stat_and_copy_is_not_snapshotted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    let f = dir.path().join("f");
    fs::write(&f, b"before").expect("write");
    let before = StatKey::of(&fs::symlink_metadata(&f).expect("stat"));
    // The file changes after the scan's stat and before the snapshot.
    fs::write(&f, b"after, and longer").expect("rewrite");
    let mut buf = vec![0u8; 4096];
    let r = ingest(&store, &f, before, &mut buf);
    assert!(matches!(
        r,
        Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
    ));
    assert!(store.list().expect("list").is_empty(), "nothing was stored");
    assert_eq!(
        fs::read_dir(dir.path().join("s/tmp")).expect("tmp").count(),
        0,
        "no staging file left behind"
    );
    // Unchanged since the stat: snapshotted, with the hash of its bytes.
    let now = StatKey::of(&fs::symlink_metadata(&f).expect("stat"));
    let Ok((h, true, _)) = ingest(&store, &f, now, &mut buf) else {
        panic!("ingest failed")
    };
    assert_eq!(h, meridian_core::hash_bytes(b"after, and longer"));
}

#[test]
fn snapshot_is_immune_to_later_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = dir.path().join("c");
    fs::create_dir_all(&content).expect("mkdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    fs::write(content.join("f"), b"version one").expect("write");
    let out = scan_dir(&content, &store, &HashMap::new(), Duration::ZERO);
    let h = out.leaves["f"].hash;
    fs::write(content.join("f"), b"version two!").expect("rewrite");
    assert_eq!(store.read(&h).expect("object"), b"version one");
}

#[test]
fn a_hashed_file_is_linked_as_it_was_read_even_if_renamed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    let mut buf = vec![0u8; 4096];
    let replace = |path: &Path, bytes: &[u8]| {
        let tmp = path.with_extension("new");
        fs::write(&tmp, bytes).expect("write");
        fs::rename(&tmp, path).expect("rename over");
    };
    let hashed = |path: &Path, bytes: &[u8], buf: &mut [u8]| {
        fs::write(path, bytes).expect("write");
        let key = StatKey::of(&fs::symlink_metadata(path).expect("stat"));
        let Ok((file, h)) = hash_in_place(path, key, buf) else {
            panic!("hash failed")
        };
        assert_eq!(h, meridian_core::hash_bytes(bytes));
        (key, file, h)
    };

    // Held open from hashing to linking: a rename over the path in
    // between cannot swap the inode; the bytes that were hashed are kept.
    let a = dir.path().join("a");
    let (key, file, h) = hashed(&a, b"as published", &mut buf);
    replace(&a, b"the next version");
    let Ok((got, true, _)) = link_hashed(&store, &a, key, Some(file), h) else {
        panic!("link failed")
    };
    assert_eq!(got, h);
    assert!(!store.is_linked_only(&h), "kept as a private copy");
    assert_eq!(store.read(&h).expect("object"), b"as published");
    // The same, but edited in place before the rename: the bytes no
    // longer match what was hashed, so nothing is kept.
    let (key, file, h) = hashed(&a, b"published, then edited", &mut buf);
    fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"P"))
        .expect("edit in place");
    replace(&a, b"the next version");
    assert!(matches!(
        link_hashed(&store, &a, key, Some(file), h),
        Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
    ));
    assert!(!store.contains(&h));

    // Closed after hashing (the descriptor budget was spent) and renamed
    // over before the link: caught by the stat key, nothing is linked,
    // and the file is retried by a later scan.
    let b = dir.path().join("b");
    let (key, file, h) = hashed(&b, b"b as hashed", &mut buf);
    drop(file);
    replace(&b, b"b replaced");
    assert!(matches!(
        link_hashed(&store, &b, key, None, h),
        Err(IngestError::Skip(SkipReason::ChangedWhileHashing))
    ));
    assert!(!store.contains(&h));

    // Closed and untouched: reopened and linked.
    let c = dir.path().join("c");
    let (key, file, h) = hashed(&c, b"c stays", &mut buf);
    drop(file);
    assert!(matches!(
        link_hashed(&store, &c, key, None, h),
        Ok((_, true, _))
    ));
    assert_eq!(
        store.read_verified(&h).expect("read"),
        Some(b"c stays".to_vec())
    );
}

#[test]
fn files_past_the_descriptor_budget_are_reopened_and_linked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = dir.path().join("c");
    fs::create_dir_all(content.join("sub")).expect("mkdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    let names: Vec<String> = (0..50).map(|i| format!("sub/f{i}")).collect();
    for n in &names {
        fs::write(content.join(n), n.repeat(100)).expect("write");
    }
    let cache = HashCache::default();
    let previous = HashMap::new();
    let out = published(
        &store,
        scan_with_budget(
            &input(
                &content,
                &store,
                &cache,
                &previous,
                Duration::ZERO,
                Snapshot::Link,
            ),
            0,
        )
        .expect("scan"),
    );
    assert!(out.skipped.is_empty(), "{:?}", out.skipped);
    assert_eq!(out.files_hashed, 50);
    assert_eq!(store.list_linked().expect("list").len(), 50);
    for n in &names {
        let h = out.leaves[n].hash;
        assert_eq!(h, meridian_core::hash_bytes(n.repeat(100).as_bytes()));
        assert_eq!(
            store.read_verified(&h).expect("read"),
            Some(n.repeat(100).into_bytes())
        );
    }
}

#[test]
fn linked_files_are_copied_only_when_they_still_hash_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = dir.path().join("c");
    fs::create_dir_all(&content).expect("mkdir");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    fs::write(content.join("kept"), b"stays as published").expect("write");
    fs::write(content.join("edited"), b"first version").expect("write");
    let out = scan_mode(
        &content,
        &store,
        &HashMap::new(),
        Duration::ZERO,
        Snapshot::Link,
    );
    let (kept, edited) = (out.leaves["kept"].hash, out.leaves["edited"].hash);
    assert_eq!(kept, meridian_core::hash_bytes(b"stays as published"));
    // Hashed in place and linked: present, but not yet a private copy.
    assert!(store.contains(&kept) && store.contains(&edited));
    assert!(!store.path(&kept).exists(), "no copy made while publishing");
    assert_eq!(store.list_linked().expect("list").len(), 2);
    // Linking bumped each file's ctime; the cache holds the new key, so
    // a rescan hashes nothing again.
    let mut cache = HashCache::default();
    let leaves = out.leaves;
    cache.apply(out.cache, true);
    let again = scan(&ScanInput {
        content: &content,
        store: &store,
        cache: &cache,
        previous: &leaves,
        quiet: Duration::from_secs(3600),
        closes: None,
        threads: 2,
        snapshot: Snapshot::Link,
    })
    .expect("rescan");
    let again = published(&store, again);
    assert_eq!(again.files_hashed, 0, "{:?}", again.skipped);
    assert_eq!(again.leaves["kept"].hash, kept);

    // An in-place edit before the copy: the object is withdrawn, and its
    // changed bytes are never stored under the old name.
    fs::write(content.join("edited"), b"second version").expect("rewrite");
    assert_eq!(
        store.promote(&edited).expect("promote"),
        Promoted::Withdrawn
    );
    assert!(!store.contains(&edited));
    // An untouched one becomes a private copy, immune to later edits.
    assert_eq!(store.promote(&kept).expect("promote"), Promoted::Copied);
    fs::write(content.join("kept"), b"edited after the copy").expect("rewrite");
    assert_eq!(store.read(&kept).expect("copy"), b"stays as published");
    assert_eq!(store.promote(&kept).expect("again"), Promoted::Present);
    assert!(store.list_linked().expect("list").is_empty());
}

#[test]
fn a_changed_path_below_a_symlink_is_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = dir.path().join("c");
    fs::create_dir_all(content.join("real")).expect("mkdir");
    fs::write(content.join("real/f"), b"inside").expect("write");
    fs::create_dir_all(dir.path().join("outside")).expect("mkdir");
    fs::write(dir.path().join("outside/secret"), b"never published").expect("write");
    std::os::unix::fs::symlink("real", content.join("inlink")).expect("symlink");
    std::os::unix::fs::symlink(dir.path().join("outside"), content.join("out")).expect("symlink");
    let store = LinkedStore::open(&dir.path().join("s")).expect("store");
    let cache = HashCache::default();
    let previous = HashMap::new();
    let paths: Vec<String> = ["out/secret", "inlink/f", "inlink", "real/f"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    let out = scan_paths(
        &input(
            &content,
            &store,
            &cache,
            &previous,
            Duration::ZERO,
            Snapshot::Copy,
        ),
        &paths,
    )
    .expect("scan");
    for p in out.leaves.keys().chain(out.removed.iter()) {
        assert!(
            !p.starts_with("out/") && !p.starts_with("inlink/"),
            "{p} reached through a symlink: {out:?}"
        );
    }
    assert_eq!(out.leaves["inlink"].kind, meridian_core::EntryKind::Symlink);
    assert_eq!(
        out.leaves["real/f"].hash,
        meridian_core::hash_bytes(b"inside")
    );
}
