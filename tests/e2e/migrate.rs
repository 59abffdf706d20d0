//! `meridian migrate` moves a mirror to a new address under continuous
//! downloads by clients that follow DNS as stub resolvers do, through a
//! failure injected at each step, each stopping the migration with the old
//! mirror still serving, and a rerun that resumes.

use crate::operate::{FILE, Seen, paris_client, paris_first, report};
use meridian_e2e::{Demo, Proc, admin_get, cli, eventually, signal};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
const A_IP: &str = "127.0.10.5";
const B_IP: &str = "127.0.10.6";
const MIRROR_TOKEN: &str = "mirror-admin-token";

fn mirror_config(path: &Path, id: &str, listen: &str, trust: &str, state: &Path, upstream: &str) {
    let cfg = format!(
        "id = \"{id}\"\nupstreams = [\"{upstream}\"]\ntrust = [\"{trust}\"]\nstate = \"{}\"\nlisten = \"{listen}\"\npoll_interval = \"1s\"\nregion = \"eu-central\"\nadmin_token = \"{MIRROR_TOKEN}\"\n",
        state.display()
    );
    std::fs::write(path, cfg).unwrap();
}

/// A second GeoDNS instance: the demo's config on other ports, with its
/// own state file.
fn second_geodns(demo: &Demo) -> (Proc, String, std::path::PathBuf) {
    let text = std::fs::read_to_string(demo.config("geodns.toml")).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    t.insert(
        "listen".into(),
        toml::Value::Array(vec!["127.0.0.1:0".into()]),
    );
    t.insert(
        "state_file".into(),
        demo.dir
            .path()
            .join("geodns2-state.json")
            .to_str()
            .unwrap()
            .into(),
    );
    t.remove("public");
    t.remove("redirector");
    t["admin"]
        .as_table_mut()
        .unwrap()
        .insert("listen".into(), "127.0.0.1:0".into());
    let path = demo.dir.path().join("geodns2.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let (p, url) = start_geodns(&path, None);
    (p, url, path)
}

fn start_geodns(path: &Path, admin: Option<&str>) -> (Proc, String) {
    if let Some(a) = admin {
        // The same admin address again (the migration names it).
        let text = std::fs::read_to_string(path).unwrap();
        let mut t: toml::Table = text.parse().unwrap();
        t["admin"]
            .as_table_mut()
            .unwrap()
            .insert("listen".into(), a.trim_start_matches("http://").into());
        std::fs::write(path, toml::to_string(&t).unwrap()).unwrap();
    }
    let mut p = Proc::spawn(&["geodns", "--config", path.to_str().unwrap()], &[]);
    let a = p.listening("geodns admin");
    (p, format!("http://{a}"))
}

async fn listed(
    http: &reqwest::Client,
    admin: &str,
    token: &str,
    id: &str,
) -> Option<serde_json::Value> {
    let addr: SocketAddr = admin.trim_start_matches("http://").parse().ok()?;
    let body = admin_get(http, addr, "/mirrors", token).await?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
    list.into_iter().find(|m| m["id"] == id)
}

/// The generation an origin serves now.
async fn origin_generation(http: &reqwest::Client, addr: SocketAddr) -> Option<u64> {
    let env =
        meridian_e2e::try_get_bytes(http, &format!("http://{addr}/.meridian/v1/root")).await?;
    let signed = meridian_core::SignedRoot::decode(&env).ok()?;
    Some(meridian_core::Root::decode(&signed.body).ok()?.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_migrates_to_a_new_address_under_load_through_a_failure_at_each_step() {
    let demo = Demo::start(&[]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token = demo.net["admin_token"].as_str().unwrap().to_owned();
    let key = demo.net["public_key"].as_str().unwrap().to_owned();
    let token_file = demo.dir.path().join("admin-token");
    std::fs::write(&token_file, &token).unwrap();
    let mtoken_file = demo.dir.path().join("mirror-token");
    std::fs::write(&mtoken_file, MIRROR_TOKEN).unwrap();
    let g1 = format!("http://{}", demo.addr("admin"));
    let origin = format!("http://{}", demo.addr("origin"));

    // Short answer TTLs, so that a drain settles in seconds (GeoDNS
    // reloads its config file when it changes).
    let gpath = demo.config("geodns.toml");
    let text = std::fs::read_to_string(&gpath).unwrap();
    let text = text
        .replace("ttl = \"30s\"", "ttl = \"2s\"")
        .replace("ttl_changing = \"5s\"", "ttl_changing = \"1s\"");
    std::fs::write(&gpath, text).unwrap();
    signal(demo.pid("geodns"), "HUP");
    eventually("the 2 s TTL to be in force", DEADLINE, || async {
        (report(&http, &demo, "eu-west").await?["answer_ttl"] == 2).then_some(())
    })
    .await;
    let (mut geodns2, g2, g2_path) = second_geodns(&demo);

    // A: a registered mirror in Paris, given clients by both instances.
    let adir = demo.dir.path().join("a");
    let acfg = demo.dir.path().join("a.toml");
    mirror_config(
        &acfg,
        "eu-central",
        &format!("{A_IP}:0"),
        &key,
        &adir,
        &origin,
    );
    let mut a = Proc::spawn(&["mirror", "--config", acfg.to_str().unwrap()], &[]);
    let a_addr = a.listening("mirror");
    let (ok, out) = cli(&[
        "region",
        "add",
        "--admin",
        &g1,
        "--admin",
        &g2,
        "--token-file",
        token_file.to_str().unwrap(),
        "--id",
        "eu-central",
        "--region",
        "eu-central",
        "--latitude",
        "48.9",
        "--longitude",
        "2.35",
        "--ipv4",
        A_IP,
        "--status-url",
        &format!("http://{a_addr}/.meridian/status"),
        "--wait",
        "60s",
    ]);
    assert!(ok && out.contains("in service on 2 of 2"), "{out}");
    let (a_ip, b_ip): (IpAddr, IpAddr) = (A_IP.parse().unwrap(), B_IP.parse().unwrap());
    assert_eq!(paris_first(&demo).await, Some(a_ip));

    // B: the new host, trusting the wrong key and pulling from nowhere.
    let bdir = demo.dir.path().join("b");
    let bcfg = demo.dir.path().join("b.toml");
    let wrong = meridian_e2e::keygen(&demo.dir.path().join("wrong.key")).to_string();
    mirror_config(
        &bcfg,
        "eu-central-2",
        &format!("{B_IP}:0"),
        &wrong,
        &bdir,
        "http://127.0.0.1:1",
    );
    let mut b = Proc::spawn(&["mirror", "--config", bcfg.to_str().unwrap()], &[]);
    let b_addr = b.listening("mirror");
    let b_status = format!("http://{b_addr}/.meridian/status");
    // B's config on its own address, trusting A's key, from `upstream`.
    let b_config = |upstream: &str| {
        mirror_config(
            &bcfg,
            "eu-central-2",
            &b_addr.to_string(),
            &key,
            &bdir,
            upstream,
        )
    };

    // Three slow clients in Paris (each download is in flight for a
    // while), all along.
    let ports: HashMap<IpAddr, SocketAddr> = [(a_ip, a_addr), (b_ip, b_addr)].into();
    let ports = Arc::new(Mutex::new(ports));
    let want = Arc::new(std::fs::read(demo.content().join(FILE)).unwrap());
    let (stop, seen) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Seen::default())),
    );
    let clients: Vec<_> = (0..3)
        .map(|_| {
            paris_client(
                demo.addr("dns"),
                ports.clone(),
                want.clone(),
                stop.clone(),
                seen.clone(),
                Duration::from_millis(1),
            )
        })
        .collect();

    let migrate_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "migrate",
            "--admin",
            &g1,
            "--admin",
            &g2,
            "--token-file",
            token_file.to_str().unwrap(),
            "--from",
            "eu-central",
            "--to",
            "eu-central-2",
            "--to-status-url",
            &b_status,
            "--to-ipv4",
            B_IP,
            "--sample",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let migrate = |extra: &[&str]| {
        let args = migrate_args(extra);
        let t0 = Instant::now();
        let r = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        eprintln!("--- migrate {extra:?} ({:?}):\n{}", t0.elapsed(), r.1);
        r
    };
    // A still serves Paris; B is not answered, on either instance.
    let a_serves = |after: &'static str| {
        let (http, demo, token, g1, g2) = (&http, &demo, &token, &g1, &g2);
        async move {
            assert_eq!(paris_first(demo).await, Some(a_ip), "after {after}");
            for g in [g1, g2] {
                let r = listed(http, g, token, "eu-central").await.unwrap();
                assert_eq!(
                    (r["in_service"].as_bool(), r["forced"].as_str()),
                    (Some(true), Some("none")),
                    "A on {g} after {after}: {r}"
                );
                if let Some(r) = listed(http, g, token, "eu-central-2").await {
                    assert_eq!(r["in_service"], false, "B on {g} after {after}: {r}");
                }
            }
        }
    };

    // 1. plan: B does not trust the key that signs A's roots.
    let (ok, out) = migrate(&[]);
    assert!(
        !ok && out.contains("does not trust") && out.contains("Nothing was changed"),
        "{out}"
    );
    assert!(listed(&http, &g1, &token, "eu-central-2").await.is_none());
    a_serves("a plan refused").await;
    b_config("http://127.0.0.1:1");
    signal(b.child.id() as i32, "HUP");
    let (ok, out) = eventually("B's trust to be reloaded", DEADLINE, || async {
        let (ok, out) = migrate(&["--dry-run"]);
        ok.then_some((ok, out))
    })
    .await;
    assert!(
        ok && out.contains("dry run: nothing was changed")
            && out.contains("steps to run: reserve, replicate, validate, cut over, clean up"),
        "{out}"
    );
    assert!(listed(&http, &g1, &token, "eu-central-2").await.is_none());

    // 3. replicate: B cannot sync. It stays a standby, never answered.
    let (ok, out) = migrate(&["--replicate-deadline", "3s"]);
    assert!(
        !ok && out.contains("stopped at step 3 (replicate)")
            && out.contains("did not reach A's generation"),
        "{out}"
    );
    for g in [&g1, &g2] {
        let r = listed(&http, g, &token, "eu-central-2").await.unwrap();
        assert_eq!(
            (r["forced"].as_str(), r["standing"].as_str()),
            (Some("down"), Some("forced_down")),
            "{r}"
        );
    }
    a_serves("a failed replicate").await;

    // 4. validate: B follows another origin with the same key (a fork) and
    // serves a different root at A's generation.
    let g = meridian_e2e::status(&http, a_addr)
        .await
        .unwrap()
        .generation;
    let fdir = demo.dir.path().join("fork");
    std::fs::create_dir_all(fdir.join("content")).unwrap();
    std::fs::copy(demo.dir.path().join("origin.key"), fdir.join("key")).unwrap();
    let (mut fork, fork_addr) = meridian_e2e::origin(&fdir, "100ms");
    for i in 1..=g {
        if i > 1 {
            std::fs::write(fdir.join(format!("content/f{i}")), format!("{i}")).unwrap();
        }
        eventually("the fork to publish", DEADLINE, || async {
            (origin_generation(&http, fork_addr).await? >= i).then_some(())
        })
        .await;
    }
    assert_eq!(origin_generation(&http, fork_addr).await, Some(g));
    b_config(&format!("http://{fork_addr}"));
    signal(b.child.id() as i32, "HUP");
    let (ok, out) = migrate(&["--replicate-deadline", "60s"]);
    assert!(
        !ok && out.contains("stopped at step 4 (validate)") && out.contains("is not A's"),
        "{out}"
    );
    assert!(
        out.contains("resuming") || out.contains("steps to run: reserve"),
        "{out}"
    );
    a_serves("a failed validate").await;
    // The operator rebuilds B from the right upstream, on the same address.
    signal(b.child.id() as i32, "KILL");
    b.wait_exit(DEADLINE);
    signal(fork.child.id() as i32, "KILL");
    fork.wait_exit(DEADLINE);
    std::fs::remove_dir_all(&bdir).unwrap();
    b_config("http://127.0.0.1:1");
    let mut b = Proc::spawn(&["mirror", "--config", bcfg.to_str().unwrap()], &[]);
    assert_eq!(b.listening("mirror"), b_addr);

    // 5. cut over: a GeoDNS instance goes down during the migration (while
    // B replicates: its upstream is fixed once the instance is gone).
    let args = migrate_args(&["--replicate-deadline", "60s"]);
    let mut cmd: Vec<&str> = vec!["-c", "exec \"$0\" \"$@\" 1>&2"];
    let bin = meridian_e2e::meridian_bin();
    cmd.push(bin.to_str().unwrap());
    cmd.extend(args.iter().map(String::as_str));
    let mut run = Proc::spawn_cmd("sh", &cmd);
    run.wait_line("generation 0 of A's", DEADLINE);
    signal(geodns2.child.id() as i32, "KILL");
    geodns2.wait_exit(DEADLINE);
    b_config(&origin);
    signal(b.child.id() as i32, "HUP");
    let status = run.wait_exit(DEADLINE).expect("migrate to end");
    run.drain();
    let out = run.log.join("\n");
    eprintln!("--- migrate (GeoDNS 2 killed):\n{out}");
    assert!(
        !status.success()
            && out.contains("stopped at step 5 (cut over)")
            && out.contains("1 of 2 GeoDNS instances not reached"),
        "{out}"
    );
    assert!(out.contains("B's signed root equals A's"), "{out}");
    let r = listed(&http, &g1, &token, "eu-central").await.unwrap();
    assert_eq!(r["forced"], "none", "A is not drained: {r}");

    // The instance is back; the rerun resumes, validates again, cuts over
    // with a slow download held on A (the drain waits for it), stops A
    // and removes it.
    let (geodns2, _) = start_geodns(&g2_path, Some(&g2));
    let _geodns2 = geodns2;
    eventually("GeoDNS 2 to list both", DEADLINE, || async {
        listed(&http, &g2, &token, "eu-central-2").await?;
        listed(&http, &g2, &token, "eu-central").await
    })
    .await;
    let mut slow = http
        .get(format!("http://{a_addr}/{FILE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let mut got = slow.chunk().await.unwrap().unwrap().to_vec();
    let args = migrate_args(&[
        "--stop-from",
        "--mirror-token-file",
        mtoken_file.to_str().unwrap(),
    ]);
    let mut cmd: Vec<&str> = vec!["-c", "exec \"$0\" \"$@\" 1>&2"];
    cmd.push(bin.to_str().unwrap());
    cmd.extend(args.iter().map(String::as_str));
    let mut run = Proc::spawn_cmd("sh", &cmd);
    run.wait_line("resuming at replicate", DEADLINE);
    run.wait_line("drained on 2 GeoDNS instances", DEADLINE);
    let t_drain = Instant::now();
    // The settle time is the TTL (2 s) and a second; well past it, the
    // slow download still holds the command.
    while t_drain.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "the cut-over went on with a download in flight on A"
    );
    while let Some(c) = slow.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert!(got[..] == want[..], "the slow download from A");
    let status = run.wait_exit(DEADLINE).expect("migrate to end");
    run.drain();
    let out = run.log.join("\n");
    eprintln!("--- migrate (resumed):\n{out}");
    assert!(
        status.success() && out.contains("migrated eu-central to eu-central-2"),
        "{out}"
    );
    assert!(out.contains("eu-central stopped after"), "{out}");
    let a_exit = a.wait_exit(DEADLINE).expect("A to exit");
    assert!(a_exit.success(), "A stopped on request: {a_exit}");
    for g in [&g1, &g2] {
        assert!(listed(&http, g, &token, "eu-central").await.is_none());
        let r = listed(&http, g, &token, "eu-central-2").await.unwrap();
        assert_eq!(r["in_service"], true, "{r}");
    }
    assert_eq!(paris_first(&demo).await, Some(b_ip));
    // Rerunning a finished migration is safe.
    let (ok, out) = migrate(&[
        "--stop-from",
        "--mirror-token-file",
        mtoken_file.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("resuming at clean up"), "{out}");

    // At least 300 downloads in all, some from B, then stop the load.
    eventually("300 downloads, some from B", DEADLINE, || async {
        let s = seen.lock().unwrap();
        let total: u32 = s.by_ip.values().sum();
        (total >= 300 && s.by_ip.get(&b_ip).copied().unwrap_or(0) >= 10).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let s = seen.lock().unwrap();
    s.assert_no_failures("migration under load");
    assert!(
        s.by_ip.get(&a_ip).copied().unwrap_or(0) > 0,
        "{:?}",
        s.by_ip
    );
    let _ = &mut b;
}
