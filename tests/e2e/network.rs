//! The whole network, as `meridian demo` runs it: an origin, four regional
//! mirrors (sa-east pulling from us-east) and GeoDNS, all real processes.

use meridian_e2e::{Demo, Proc, dns_a, eventually, metric, signal, status};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
const REGIONS: [(&str, &str, u8, &str, &str); 4] = [
    // region, ECS prefix, len, its loopback client, its mirror address
    ("ap-southeast", "36.68.0.0", 16, "127.0.20.1", "127.0.10.1"),
    ("eu-west", "81.2.69.0", 24, "127.0.20.2", "127.0.10.2"),
    ("us-east", "3.208.0.0", 12, "127.0.20.3", "127.0.10.3"),
    ("sa-east", "200.147.0.0", 16, "127.0.20.4", "127.0.10.4"),
];

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn body(http: &reqwest::Client, url: String) -> Option<(u16, Vec<u8>)> {
    let r = http.get(url).send().await.ok()?;
    let code = r.status().as_u16();
    Some((code, r.bytes().await.ok()?.to_vec()))
}

async fn all_serve(demo: &Demo, http: &reqwest::Client, path: &str, want: &[u8]) {
    for (region, ..) in REGIONS {
        let m = demo.mirror(region);
        eventually(&format!("{region} to serve /{path}"), DEADLINE, || async {
            let (code, b) = body(http, format!("http://{m}/{path}")).await?;
            (code == 200 && b == want).then_some(())
        })
        .await;
    }
}

/// Waits until the demo content is published and every mirror serves the
/// origin's current generation, so a later change in the answers can only
/// come from what the test does (not from a mirror falling behind).
async fn settle(demo: &Demo, http: &reqwest::Client) {
    let readme = std::fs::read(demo.content().join("README.txt")).unwrap();
    all_serve(demo, http, "README.txt", &readme).await;
    let origin = demo.addr("origin");
    eventually(
        "every mirror to serve the origin's generation",
        DEADLINE,
        || async {
            let (_, b) = body(http, format!("http://{origin}/.meridian/health")).await?;
            let g = serde_json::from_slice::<serde_json::Value>(&b).ok()?["generation"].as_u64()?;
            for (region, ..) in REGIONS {
                if status(http, demo.mirror(region)).await?.generation != g {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

async fn first_for(demo: &Demo, ecs: (&str, u8)) -> Option<IpAddr> {
    dns_a(demo.addr("dns"), "dl.meridian.test.", Some(ecs), None)
        .await?
        .first()
        .copied()
}

async fn wait_all_in_service(demo: &Demo) {
    // GeoDNS itself must report every mirror in service: during start-up,
    // before any mirror has passed `up_after` probes, the least-bad rule also
    // answers with the nearest mirror, which must not count as "in service".
    let admin = demo.addr("admin");
    let token = demo.net["admin_token"].as_str().unwrap().to_owned();
    let http = http();
    eventually(
        "GeoDNS to report every mirror in service",
        DEADLINE,
        || async {
            let r = http
                .get(format!("http://{admin}/mirrors"))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            v.as_array()?
                .iter()
                .all(|m| m["in_service"] == true)
                .then_some(())
        },
    )
    .await;
    for (region, net, len, _, addr) in REGIONS {
        let want: IpAddr = addr.parse().unwrap();
        eventually(
            &format!("{region}'s clients to get {region}"),
            DEADLINE,
            || async { (first_for(demo, (net, len)).await? == want).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn a_new_file_propagates_to_every_mirror_and_geography_holds() {
    let demo = Demo::start(&[]);
    let http = http();
    wait_all_in_service(&demo).await;
    // Geography through ECS: every answer, not eventually one.
    for (region, net, len, _, addr) in REGIONS {
        for _ in 0..20 {
            assert_eq!(
                first_for(&demo, (net, len)).await,
                Some(addr.parse().unwrap()),
                "{region} by ECS"
            );
        }
    }
    // And through the source address.
    for (region, _, _, client, addr) in REGIONS {
        let got = dns_a(demo.addr("dns"), "dl.meridian.test.", None, Some(client))
            .await
            .unwrap();
        assert_eq!(
            got[0],
            addr.parse::<IpAddr>().unwrap(),
            "{region} by source address"
        );
    }
    // Propagation: drop a file, time until all four serve it byte for byte.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let t0 = Instant::now();
    std::fs::write(demo.content().join("fresh.iso"), &data).unwrap();
    all_serve(&demo, &http, "fresh.iso", &data).await;
    eprintln!(
        "PROPAGATION: a 3 MB file reached all four mirrors in {:.2} s (quiet period 500 ms)",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_killed_mirror_leaves_the_answers_and_comes_back_only_when_current() {
    let demo = Demo::start(&[]);
    let http = http();
    settle(&demo, &http).await;
    wait_all_in_service(&demo).await;
    let london: IpAddr = "127.0.10.2".parse().unwrap();
    let ashburn: IpAddr = "127.0.10.3".parse().unwrap();

    // SIGKILL the London mirror; measure until the last answer naming it.
    signal(demo.pid("mirror-eu-west"), "KILL");
    let killed = Instant::now();
    let last_seen = std::cell::Cell::new(Duration::ZERO);
    eventually("London to leave the answers", DEADLINE, || async {
        let got = dns_a(
            demo.addr("dns"),
            "dl.meridian.test.",
            Some(("81.2.69.0", 24)),
            None,
        )
        .await?;
        if got.contains(&london) {
            last_seen.set(killed.elapsed());
            return None;
        }
        // Stable for a second: no flapping back.
        (killed.elapsed() > last_seen.get() + Duration::from_secs(1)).then_some(())
    })
    .await;
    let last_seen = last_seen.get();
    // It left because the health checks took it out (not for any other reason).
    let admin = demo.addr("admin");
    let token = demo.net["admin_token"].as_str().unwrap().to_owned();
    let mirrors: serde_json::Value = serde_json::from_slice(
        &http
            .get(format!("http://{admin}/mirrors"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let eu = mirrors
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "eu-west")
        .unwrap()
        .clone();
    assert_eq!(
        eu["up"], false,
        "GeoDNS sees the killed mirror as down: {eu}"
    );
    assert_eq!(eu["why"], "down (failed health probes)", "{eu}");
    eprintln!(
        "FAILOVER: last answer naming the killed mirror {:.2} s after SIGKILL",
        last_seen.as_secs_f64()
    );
    assert_eq!(
        first_for(&demo, ("81.2.69.0", 24)).await,
        Some(ashburn),
        "London clients go to the next-nearest region"
    );

    // While it is down, publish a new generation.
    std::fs::write(demo.content().join("while-down.txt"), b"new").unwrap();
    all_serve_except(&demo, &http, "while-down.txt", b"new", "eu-west").await;

    // Restart it: it is answered again only once it serves the newest generation.
    let origin = demo.addr("origin");
    let newest = {
        let r = body(&http, format!("http://{origin}/.meridian/health"))
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&r.1).unwrap()["generation"]
            .as_u64()
            .unwrap()
    };
    let mut m = Proc::spawn(
        &[
            "mirror",
            "--config",
            demo.config("mirror-eu-west.toml").to_str().unwrap(),
        ],
        &[],
    );
    let maddr = m.listening("mirror");
    eventually("London to be answered again", DEADLINE, || async {
        let got = first_for(&demo, ("81.2.69.0", 24)).await?;
        if got == london {
            let s = status(&http, maddr).await.unwrap();
            assert!(
                s.generation >= newest,
                "answered before it was current: {s:?}"
            );
            return Some(());
        }
        None
    })
    .await;
    assert_eq!(
        body(&http, format!("http://{maddr}/while-down.txt"))
            .await
            .unwrap()
            .1,
        b"new"
    );
}

async fn all_serve_except(
    demo: &Demo,
    http: &reqwest::Client,
    path: &str,
    want: &[u8],
    skip: &str,
) {
    for (region, ..) in REGIONS.iter().filter(|r| r.0 != skip) {
        let m = demo.mirror(region);
        eventually(&format!("{region} to serve /{path}"), DEADLINE, || async {
            let (code, b) = body(http, format!("http://{m}/{path}")).await?;
            (code == 200 && b == want).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_frozen_mirror_is_taken_out_by_probe_timeouts() {
    let demo = Demo::start(&[]);
    settle(&demo, &http()).await;
    wait_all_in_service(&demo).await;
    let pid = demo.pid("mirror-us-east");
    signal(pid, "STOP");
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            signal(self.0, "CONT");
        }
    }
    let _cont = Cont(pid);
    let ashburn: IpAddr = "127.0.10.3".parse().unwrap();
    eventually(
        "the frozen mirror to leave the answers",
        DEADLINE,
        || async {
            let got = dns_a(
                demo.addr("dns"),
                "dl.meridian.test.",
                Some(("3.208.0.0", 12)),
                None,
            )
            .await?;
            (!got.contains(&ashburn)).then_some(())
        },
    )
    .await;
    signal(pid, "CONT");
    eventually("the thawed mirror to come back", DEADLINE, || async {
        (first_for(&demo, ("3.208.0.0", 12)).await? == ashburn).then_some(())
    })
    .await;
}

#[tokio::test]
async fn with_the_origin_down_mirrors_serve_and_dns_answers_then_publishing_resumes() {
    let demo = Demo::start(&[]);
    let http = http();
    wait_all_in_service(&demo).await;
    let readme = std::fs::read(demo.content().join("README.txt")).unwrap();
    all_serve(&demo, &http, "README.txt", &readme).await;
    signal(demo.pid("origin"), "KILL");
    // Mirrors keep serving the last generation; GeoDNS keeps answering with them.
    tokio::time::sleep(Duration::from_secs(3)).await; // several probe rounds without the origin
    for (region, net, len, _, addr) in REGIONS {
        assert_eq!(
            first_for(&demo, (net, len)).await,
            Some(addr.parse().unwrap()),
            "{region}"
        );
        let (code, _) = body(&http, format!("http://{}/README.txt", demo.mirror(region)))
            .await
            .unwrap();
        assert_eq!(code, 200);
    }
    // The origin comes back: publishing resumes and propagates.
    let mut o = Proc::spawn(
        &[
            "origin",
            "--config",
            demo.config("origin.toml").to_str().unwrap(),
        ],
        &[],
    );
    o.listening("origin");
    std::fs::write(demo.content().join("after-restart.txt"), b"resumed").unwrap();
    all_serve(&demo, &http, "after-restart.txt", b"resumed").await;
}

#[tokio::test]
async fn a_tampered_blob_is_rejected_downstream_and_quarantined_at_home() {
    let demo = Demo::start(&["--scrub-interval", "1s"]);
    let http = http();
    wait_all_in_service(&demo).await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
    std::fs::write(demo.content().join("victim.bin"), &data).unwrap();
    all_serve(&demo, &http, "victim.bin", &data).await;

    // us-east's disk is tampered with: same size, one byte different.
    let h = meridian_core::hash_bytes(&data).to_hex();
    let obj = demo
        .dir
        .path()
        .join("mirror-us-east/objects")
        .join(&h[..2])
        .join(&h);
    let mut bad = data.clone();
    bad[500_000] ^= 0xFF;
    std::fs::set_permissions(&obj, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&obj, &bad).unwrap();

    // The tampered mirror finds it (scrub), stops serving it, and repairs it.
    let us = demo.mirror("us-east");
    eventually(
        "us-east's scrubber to find the damage",
        DEADLINE,
        || async {
            let m = body(&http, format!("http://{us}/.meridian/metrics"))
                .await?
                .1;
            (metric(
                &String::from_utf8_lossy(&m),
                "meridian_mirror_scrub_failures_total",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    eventually(
        "us-east to serve the good bytes again",
        DEADLINE,
        || async {
            let (code, b) = body(&http, format!("http://{us}/victim.bin")).await?;
            assert!(
                code != 200 || b == data,
                "us-east served tampered bytes after detecting them"
            );
            (code == 200).then_some(())
        },
    )
    .await;

    // A mirror that uses a tampering upstream rejects the blob and takes it
    // from elsewhere: a fresh sa-east (us-east first, then the origin) while
    // us-east's copy is damaged again.
    std::fs::set_permissions(&obj, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&obj, &bad).unwrap();
    signal(demo.pid("mirror-sa-east"), "KILL");
    let cfg = std::fs::read_to_string(demo.config("mirror-sa-east.toml")).unwrap();
    let fresh = demo.dir.path().join("sa-east-fresh");
    let cfg = cfg
        .lines()
        .map(|l| {
            if l.starts_with("state = ") {
                format!("state = {:?}", fresh.display().to_string())
            } else if l.starts_with("listen = ") {
                "listen = \"127.0.10.4:0\"".into()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg_path = demo.dir.path().join("sa-fresh.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut sa = Proc::spawn(&["mirror", "--config", cfg_path.to_str().unwrap()], &[]);
    let sa_addr = sa.listening("mirror");
    eventually(
        "the fresh mirror to serve the good bytes",
        DEADLINE,
        || async {
            let (code, b) = body(&http, format!("http://{sa_addr}/victim.bin")).await?;
            assert!(
                code != 200 || b == data,
                "a downstream mirror served tampered bytes"
            );
            (code == 200).then_some(())
        },
    )
    .await;
    let m = String::from_utf8(
        body(&http, format!("http://{sa_addr}/.meridian/metrics"))
            .await
            .unwrap()
            .1,
    )
    .unwrap();
    assert!(
        metric(&m, "meridian_mirror_verify_failures_total") >= 1.0,
        "the bad blob from us-east was detected:\n{m}"
    );
}

#[tokio::test]
async fn continuous_downloads_while_files_change_never_mix_generations() {
    let demo = Demo::start(&[]);
    let http = http();
    wait_all_in_service(&demo).await;
    let path = demo.content().join("rolling.bin");
    let version = |v: u8| -> Vec<u8> {
        (0..2_000_000u32)
            .map(|i| (i as u8).wrapping_add(v))
            .collect()
    };
    std::fs::write(&path, version(0)).unwrap();
    let m = demo.mirror("eu-west");
    all_serve(&demo, &http, "rolling.bin", &version(0)).await;
    let valid: std::collections::HashSet<String> = (0..8u8)
        .map(|v| meridian_core::hash_bytes(&version(v)).to_hex())
        .collect();
    let writer = tokio::spawn(async move {
        for v in 1..8u8 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, version(v)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    });
    let started = Instant::now();
    let mut downloads = 0;
    let mut versions_seen = std::collections::HashSet::new();
    while !writer.is_finished() || started.elapsed() < Duration::from_secs(3) {
        assert!(started.elapsed() < Duration::from_secs(60), "bounded");
        let r = http
            .get(format!("http://{m}/rolling.bin"))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            continue;
        }
        let etag = r.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let b = r.bytes().await.unwrap();
        let got = meridian_core::hash_bytes(&b).to_hex();
        assert_eq!(got, etag, "the body matches the ETag of its own response");
        assert!(
            valid.contains(&got),
            "a body that is no published version (mixed generations?)"
        );
        versions_seen.insert(got);
        downloads += 1;
    }
    writer.await.unwrap();
    eprintln!(
        "{downloads} downloads, {} distinct versions, all consistent",
        versions_seen.len()
    );
    assert!(versions_seen.len() >= 2, "the downloads did span a change");
}

#[tokio::test]
async fn the_demo_is_up_with_its_content_and_restarts_a_part_that_dies() {
    let mut demo = Demo::start(&["--restart-after", "1s"]);
    let http = http();
    // "Up" means the content is served: no waiting for a first download.
    let readme = std::fs::read(demo.content().join("README.txt")).unwrap();
    for (region, ..) in REGIONS {
        let (code, b) = body(&http, format!("http://{}/README.txt", demo.mirror(region)))
            .await
            .unwrap();
        assert_eq!((code, b), (200, readme.clone()), "{region}");
    }
    let old = demo.pid("origin");
    signal(old, "KILL");
    let line = demo.proc.wait_line("exited", DEADLINE);
    assert!(
        line.contains("origin") && line.contains("restarting it in 1s"),
        "{line}"
    );
    demo.proc.wait_line("restarted origin", DEADLINE);
    let path = demo.dir.path().join("network.json");
    let new = eventually("network.json to name the new pid", DEADLINE, || async {
        let net: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        let pid = net["pids"]["origin"].as_u64()? as i32;
        (pid != old).then_some(pid)
    })
    .await;
    assert!(std::path::Path::new(&format!("/proc/{new}")).exists());
    // Back where it was, publishing again.
    std::fs::write(demo.content().join("after.txt"), b"back").unwrap();
    all_serve(&demo, &http, "after.txt", b"back").await;
}
