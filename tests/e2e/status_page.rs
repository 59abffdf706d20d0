//! GeoDNS's public status page, as a person sees it: headless Chromium
//! (over WebDriver) with the page left open against the running demo.

use meridian_e2e::browser::Browser;
use meridian_e2e::{Demo, eventually, signal};
use serde_json::Value;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

async fn status_json(http: &reqwest::Client, demo: &Demo) -> Option<Value> {
    let r = http
        .get(format!("http://{}/status.json", demo.addr("status")))
        .send()
        .await
        .ok()?;
    serde_json::from_slice(&r.bytes().await.ok()?).ok()
}

/// Real clients in four countries (dig, from loopback addresses the demo's
/// GeoIP database places in Indonesia, Britain, the US and Brazil).
fn dig_from_every_region(demo: &Demo, times: usize) {
    let dns = demo.addr("dns");
    for client in ["127.0.20.1", "127.0.20.2", "127.0.20.3", "127.0.20.4"] {
        for _ in 0..times {
            let out = std::process::Command::new("dig")
                .args(["-b", client, &format!("@{}", dns.ip())])
                .args(["-p", &dns.port().to_string()])
                .args(["dl.meridian.test", "A", "+short", "+tries=1", "+time=2"])
                .output()
                .expect("dig (dnsutils)");
            assert!(out.status.success(), "dig from {client}: {out:?}");
        }
    }
    // And a resolver asking for clients in France, Australia and Japan.
    for subnet in ["2.16.0.0/13", "1.0.0.0/24", "203.0.113.0/24"] {
        let out = std::process::Command::new("dig")
            .arg(format!("@{}", dns.ip()))
            .args(["-p", &dns.port().to_string()])
            .args(["dl.meridian.test", "A", "+short", "+tries=1", "+time=2"])
            .arg(format!("+subnet={subnet}"))
            .output()
            .expect("dig (dnsutils)");
        assert!(out.status.success(), "dig for {subnet}: {out:?}");
    }
}

/// The page draws every mirror with its state, the last minute's steering
/// as lines and a table, and follows a killed mirror to "down" by itself,
/// with no reload. The public listener takes no writes and shows no token;
/// the admin listener still wants its token.
#[tokio::test]
async fn the_status_page_shows_every_mirror_and_follows_a_killed_one_without_a_reload() {
    let demo = Demo::start(&[]);
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let base = format!("http://{}", demo.addr("status"));
    eventually("every mirror in service", DEADLINE, || async {
        let s = status_json(&http, &demo).await?;
        let m = s["mirrors"].as_array()?;
        (m.len() == 4 && m.iter().all(|m| m["standing"] == "in_service")).then_some(())
    })
    .await;
    dig_from_every_region(&demo, 3);

    let browser = Browser::start(1280, 900).await;
    browser.open(&format!("{base}/")).await;
    // A mark a reload would wipe.
    browser.eval("window.__meridianMark = 42; return 1;").await;
    let drawn = browser
        .wait_for(
            "four mirrors drawn in service",
            DEADLINE,
            r#"return Array.from(document.querySelectorAll('#markers .mirror'))
                 .map(g => [g.dataset.id, g.dataset.standing, g.querySelector('title').textContent]);"#,
            |v| {
                v.as_array().is_some_and(|a| {
                    a.len() == 4 && a.iter().all(|m| m[1] == "in_service")
                })
            },
        )
        .await;
    let ids: Vec<&str> = drawn
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    for want in ["ap-southeast", "eu-west", "us-east", "sa-east"] {
        assert!(ids.contains(&want), "{want} not drawn: {drawn}");
    }
    // Each state is in words too: the marker's label, its title, the table.
    for m in drawn.as_array().unwrap() {
        assert!(m[2].as_str().unwrap().contains("in service"), "{m}");
    }
    let rows = browser
        .eval(
            r#"return Array.from(document.querySelectorAll('#mirrors tbody tr'))
                 .map(r => [r.dataset.id, r.querySelector('td.state').textContent]);"#,
        )
        .await;
    assert_eq!(rows.as_array().unwrap().len(), 4, "{rows}");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r[1] == "in service"),
        "{rows}"
    );
    // Steering: each country to its own region's mirror, as lines and rows.
    let flows = browser
        .wait_for(
            "steering of the four countries drawn",
            DEADLINE,
            r#"return {
                 lines: Array.from(document.querySelectorAll('#flows path'))
                   .map(p => p.dataset.country + '>' + p.dataset.mirror),
                 rows: Array.from(document.querySelectorAll('#steering tbody tr[data-country]'))
                   .map(r => r.dataset.country + '>' + r.dataset.mirror) };"#,
            |v| {
                [
                    "ID>ap-southeast",
                    "GB>eu-west",
                    "US>us-east",
                    "BR>sa-east",
                    "FR>eu-west",
                    "AU>ap-southeast",
                ]
                .iter()
                .all(|f| {
                    v["lines"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|x| x == f))
                        && v["rows"]
                            .as_array()
                            .is_some_and(|r| r.iter().any(|x| x == f))
                })
            },
        )
        .await;
    eprintln!("steering drawn: {flows}");

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");

    // Kill a mirror: the open page turns it to down by itself.
    signal(demo.pid("mirror-eu-west"), "KILL");
    let killed = std::time::Instant::now();
    browser
        .wait_for(
            "eu-west drawn down",
            Duration::from_secs(20),
            r#"const g = document.querySelector('#markers .mirror[data-id="eu-west"]');
               const r = document.querySelector('#mirrors tbody tr[data-id="eu-west"] td.state');
               return [g && g.dataset.standing, r && r.textContent, window.__meridianMark];"#,
            |v| v[0] == "down" && v[1] == "down",
        )
        .await;
    if let Ok(path) = std::env::var("MERIDIAN_SCREENSHOT") {
        // The picture in the docs: the whole page, one mirror down.
        browser.resize(1280, 1240).await;
        std::fs::write(&path, browser.screenshot().await).unwrap();
        eprintln!("screenshot written to {path}");
    }
    let after = browser.eval("return window.__meridianMark;").await;
    assert_eq!(after, 42, "the page was reloaded");
    eprintln!(
        "STATUS PAGE: killed mirror drawn down {:.1} s after SIGKILL, no reload",
        killed.elapsed().as_secs_f64()
    );
    let summary = browser
        .eval("return document.getElementById('summary').textContent;")
        .await;
    assert!(
        summary
            .as_str()
            .unwrap()
            .contains("3 of 4 mirrors in service")
            && summary.as_str().unwrap().contains("1 down"),
        "{summary}"
    );

    // Readable in a narrow window: the page itself never scrolls sideways
    // (wide tables scroll in their own box).
    browser.resize(380, 800).await;
    let widths = browser
        .wait_for(
            "a 380 px window",
            Duration::from_secs(10),
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            |v| v[1].as_u64().is_some_and(|w| w < 420),
        )
        .await;
    assert!(
        widths[0].as_u64().unwrap() <= widths[1].as_u64().unwrap(),
        "the page scrolls sideways at {widths}"
    );

    // Read-only, and nothing of the admin's.
    let token = demo.net["admin_token"].as_str().unwrap();
    for path in ["/", "/app.js", "/status.json", "/places.json"] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let csp = r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        let body = r.text().await.unwrap();
        assert!(!body.contains(token), "{path} shows the admin token");
    }
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        for path in ["/", "/status.json", "/mirrors/eu-west/down"] {
            let r = http
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 405, "{method} {path}");
        }
    }
    for path in ["/mirrors", "/metrics"] {
        let r = http
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "the public listener has no {path}");
        let r = http
            .get(format!("http://{}{path}", demo.addr("admin")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "the admin {path} without the token");
    }
}

/// The committed map is exactly what geodns/status/make_map.py makes from
/// the pinned Natural Earth data (.ci/run installs it from npm).
#[test]
fn status_map_is_what_make_map_makes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = root.join("geodns/status");
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new("python3")
        .arg(status.join("make_map.py"))
        .arg(root.join("target/npm/node_modules"))
        .arg(out.path())
        .output()
        .expect("python3");
    assert!(
        run.status.success(),
        "make_map.py: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    for f in ["world.svg", "places.json"] {
        let made = std::fs::read(out.path().join(f)).unwrap();
        let committed = std::fs::read(status.join(f)).unwrap();
        assert!(
            made == committed,
            "geodns/status/{f} is not what make_map.py makes; run it and commit the result"
        );
    }
    let places: serde_json::Value =
        serde_json::from_slice(&std::fs::read(status.join("places.json")).unwrap()).unwrap();
    // Every country the demo's GeoIP database names has a place.
    for c in ["ID", "GB", "US", "BR", "FR", "AU", "JP", "SG"] {
        assert!(places[c].is_array(), "no place for {c}");
    }
}
