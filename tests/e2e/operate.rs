//! Operators' commands against the running demo network: a mirror joins
//! with `meridian region add`, and leaves with `meridian region remove`,
//! under continuous downloads by a client that follows DNS as a stub
//! resolver does (it caches each answer for its TTL).

use meridian_e2e::{Demo, Proc, admin_get, cli, dns_a, dns_a_ttl, eventually, signal};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);
/// Paris, in the demo's GeoIP data: nearer the joining mirror than any
/// demo mirror.
pub(crate) const PARIS: (&str, u8) = ("2.16.0.0", 13);
const NEW_IP: &str = "127.0.10.5";
pub(crate) const FILE: &str = "releases/1.0/tool-1.0.tar.gz";

/// What a download loop saw: verified downloads per mirror address, and
/// every failure.
#[derive(Default, Debug)]
pub(crate) struct Seen {
    pub by_ip: HashMap<IpAddr, u32>,
    pub failed: Vec<String>,
}

impl Seen {
    /// Prints the downloads per mirror under `label` and fails the test if
    /// any download failed.
    pub(crate) fn assert_no_failures(&self, label: &str) {
        let total: u32 = self.by_ip.values().sum();
        eprintln!(
            "{label}: downloads by mirror {:?}, {} failed",
            self.by_ip,
            self.failed.len()
        );
        assert!(
            self.failed.is_empty(),
            "{label}: {} of {} downloads failed: {:?}",
            self.failed.len(),
            total as usize + self.failed.len(),
            self.failed
        );
    }
}

/// A client in Paris: resolves `dl.meridian.test`, keeps the answer for its
/// TTL (the last good one while GeoDNS does not answer, as a stub resolver
/// serves stale), downloads FILE from the first address and checks every
/// byte. `pace` is a pause after each chunk of a body (a slower client,
/// whose downloads stay in flight a while). At most 6,000 downloads and
/// 240 s.
pub(crate) fn paris_client(
    dns: SocketAddr,
    ports: Arc<Mutex<HashMap<IpAddr, SocketAddr>>>,
    want: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    pace: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let t0 = Instant::now();
        let mut cached: Option<(IpAddr, Instant)> = None;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && n < 6_000 && t0.elapsed() < Duration::from_secs(240)
        {
            n += 1;
            let fresh = cached.filter(|(_, until)| Instant::now() < *until);
            let ip = match fresh {
                Some((ip, _)) => ip,
                None => match dns_a_ttl(dns, "dl.meridian.test.", Some(PARIS), None).await {
                    Some((ips, ttl)) if !ips.is_empty() => {
                        cached = Some((ips[0], Instant::now() + Duration::from_secs(ttl.into())));
                        ips[0]
                    }
                    _ => match cached {
                        Some((ip, _)) => ip,
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                },
            };
            let Some(addr) = ports.lock().unwrap().get(&ip).copied() else {
                seen.lock()
                    .unwrap()
                    .failed
                    .push(format!("DNS answered {ip}, not a mirror"));
                continue;
            };
            let r = http.get(format!("http://{addr}/{FILE}")).send().await;
            let outcome = match r {
                Ok(mut r) if r.status() == 200 => {
                    let mut b = Vec::with_capacity(want.len());
                    let mut cut = None;
                    loop {
                        match r.chunk().await {
                            Ok(Some(c)) => b.extend_from_slice(&c),
                            Ok(None) => break,
                            Err(e) => {
                                cut = Some(e);
                                break;
                            }
                        }
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                    match cut {
                        None if b[..] == want[..] => Ok(()),
                        None => Err(format!("{addr}: {} bytes, not the file", b.len())),
                        Some(e) => Err(format!("{addr}: cut after {} bytes: {e}", b.len())),
                    }
                }
                Ok(r) => Err(format!("{addr}: HTTP {}", r.status())),
                Err(e) => Err(format!("{addr}: {e}")),
            };
            let mut s = seen.lock().unwrap();
            match outcome {
                Ok(()) => *s.by_ip.entry(ip).or_default() += 1,
                Err(e) => s.failed.push(e),
            }
        }
    })
}

/// GeoDNS's report of mirror `id` (`None` while not listed or not
/// answering).
pub(crate) async fn report(
    http: &reqwest::Client,
    demo: &Demo,
    id: &str,
) -> Option<serde_json::Value> {
    let token = demo.net["admin_token"].as_str()?;
    let body = admin_get(http, demo.addr("admin"), "/mirrors", token).await?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
    list.into_iter().find(|m| m["id"] == id)
}

pub(crate) async fn paris_first(demo: &Demo) -> Option<IpAddr> {
    dns_a(demo.addr("dns"), "dl.meridian.test.", Some(PARIS), None)
        .await?
        .first()
        .copied()
}

/// The joining mirror's config: pulling from `upstream`.
fn mirror_config(path: &std::path::Path, demo: &Demo, state: &std::path::Path, upstream: &str) {
    let cfg = format!(
        "id = \"eu-central\"\nupstreams = [\"{upstream}\"]\ntrust = [\"{}\"]\nstate = \"{}\"\nlisten = \"{NEW_IP}:0\"\npoll_interval = \"1s\"\nregion = \"eu-central\"\n",
        demo.net["public_key"].as_str().unwrap(),
        state.display()
    );
    std::fs::write(path, cfg).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_joins_with_one_command_gets_clients_once_current_and_its_registration_survives_a_restart()
 {
    let mut demo = Demo::start(&["--restart-after", "1s"]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let token_file = demo.dir.path().join("admin-token");
    std::fs::write(&token_file, demo.net["admin_token"].as_str().unwrap()).unwrap();
    let admin_url = format!("http://{}", demo.addr("admin"));
    for id in ["eu-west", "us-east", "ap-southeast", "sa-east"] {
        eventually(&format!("{id} in service"), DEADLINE, || async {
            (report(&http, &demo, id).await?["in_service"] == true).then_some(())
        })
        .await;
    }

    // The new mirror runs, but pulls from nowhere: up, not current.
    let mdir = demo.dir.path().join("eu-central");
    let mcfg = demo.dir.path().join("eu-central.toml");
    mirror_config(&mcfg, &demo, &mdir, "http://127.0.0.1:1");
    let mut m = Proc::spawn(&["mirror", "--config", mcfg.to_str().unwrap()], &[]);
    let maddr = m.listening("mirror");
    let status_url = format!("http://{maddr}/.meridian/status");

    // Downloads from Paris all along.
    let mut ports: HashMap<IpAddr, SocketAddr> = demo.net["mirrors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| {
            let a: SocketAddr = v.as_str().unwrap().parse().unwrap();
            (a.ip(), a)
        })
        .collect();
    ports.insert(maddr.ip(), maddr);
    let want = Arc::new(std::fs::read(demo.content().join(FILE)).unwrap());
    let (stop, seen) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Seen::default())),
    );
    let client = paris_client(
        demo.addr("dns"),
        Arc::new(Mutex::new(ports)),
        want,
        stop.clone(),
        seen.clone(),
        Duration::ZERO,
    );

    let region = |what: &str, rest: &[&str]| {
        let mut args = vec![
            "region",
            what,
            "--admin",
            &admin_url,
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        args.extend_from_slice(rest);
        cli(&args)
    };
    let add = |wait: &str| {
        region(
            "add",
            &[
                "--id",
                "eu-central",
                "--region",
                "eu-central",
                "--latitude",
                "48.9",
                "--longitude",
                "2.35",
                "--ipv4",
                NEW_IP,
                "--status-url",
                &status_url,
                "--country",
                "FR",
                "--wait",
                wait,
            ],
        )
    };
    let (ok, out) = add("0s");
    assert!(ok && out.contains("eu-central: registered"), "{out}");
    let (ok, out) = add("0s");
    assert!(
        ok && out.contains("already registered, unchanged"),
        "rerun: {out}"
    );
    // Probed and up, but behind: no client is sent to it.
    let r = eventually("eu-central to be probed up", DEADLINE, || async {
        report(&http, &demo, "eu-central")
            .await
            .filter(|r| r["up"] == true)
    })
    .await;
    assert_eq!(r["in_service"], false, "{r}");
    assert_eq!(r["source"], "registered", "{r}");
    let new_ip: IpAddr = NEW_IP.parse().unwrap();
    assert_ne!(paris_first(&demo).await, Some(new_ip), "{r}");
    // A failed wait says why, and the registration stays.
    let (ok, out) = add("2s");
    assert!(!ok && out.contains("not in service after 2s"), "{out}");

    // It pulls from the origin now; the command returns once it has clients.
    let origin = demo.addr("origin");
    mirror_config(&mcfg, &demo, &mdir, &format!("http://{origin}"));
    signal(m.child.id() as i32, "HUP");
    let t0 = Instant::now();
    let (ok, out) = add("60s");
    assert!(ok && out.contains("in service on 1 of 1"), "{out}");
    eprintln!(
        "eu-central in service {:?} after its upstream was fixed",
        t0.elapsed()
    );
    assert_eq!(paris_first(&demo).await, Some(new_ip));
    eventually(
        "the Paris client to download from eu-central",
        DEADLINE,
        || async {
            (seen
                .lock()
                .unwrap()
                .by_ip
                .get(&new_ip)
                .copied()
                .unwrap_or(0)
                >= 3)
                .then_some(())
        },
    )
    .await;

    // An operator drains it; GeoDNS restarts (kill -9); the registration
    // and the drain are both still there.
    let post = |what: &'static str| {
        http.post(format!("{admin_url}/mirrors/eu-central/{what}"))
            .bearer_auth(demo.net["admin_token"].as_str().unwrap())
            .send()
    };
    assert_eq!(post("drain").await.unwrap().status(), 200);
    eventually("Paris to be sent elsewhere", DEADLINE, || async {
        let first = paris_first(&demo).await?;
        (first != new_ip).then_some(())
    })
    .await;
    let old = demo.pid("geodns");
    signal(old, "KILL");
    demo.proc.wait_line("restarted geodns", DEADLINE);
    let r = eventually(
        "the restarted GeoDNS to list eu-central",
        DEADLINE,
        || async { report(&http, &demo, "eu-central").await },
    )
    .await;
    assert_eq!(
        (r["source"].as_str(), r["forced"].as_str()),
        (Some("registered"), Some("drain")),
        "{r}"
    );
    assert_eq!(r["in_service"], false, "{r}");
    let first = eventually("the restarted GeoDNS to answer", DEADLINE, || {
        paris_first(&demo)
    })
    .await;
    assert_ne!(
        first, new_ip,
        "a drained mirror is answered after a restart"
    );
    assert_eq!(post("clear").await.unwrap().status(), 200);
    eventually("eu-central to be answered again", DEADLINE, || async {
        (paris_first(&demo).await? == new_ip).then_some(())
    })
    .await;

    // A drain returns only once the mirror's downloads are done: one slow
    // download holds it past the settle time; GeoDNS's probes (every
    // second, all along) do not.
    let mut slow = http
        .get(format!("http://{maddr}/{FILE}"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let mut got = slow.chunk().await.unwrap().unwrap().to_vec();
    let t_drain = Instant::now();
    let mut drain = std::process::Command::new(meridian_e2e::meridian_bin())
        .args(["region", "drain", "--admin", &admin_url, "--token-file"])
        .arg(&token_file)
        .args(["--id", "eu-central", "--settle", "2s", "--deadline", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        "Paris to be sent elsewhere after the drain",
        DEADLINE,
        || async { (paris_first(&demo).await? != new_ip).then_some(()) },
    )
    .await;
    while t_drain.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        drain.try_wait().unwrap().is_none(),
        "the drain returned with a download in flight"
    );
    while let Some(c) = slow.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    let finished = t_drain.elapsed();
    assert_eq!(got, std::fs::read(demo.content().join(FILE)).unwrap());
    let out = tokio::task::spawn_blocking(move || drain.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("eu-central is drained"), "{text}");
    assert!(text.contains("1 download in flight"), "{text}");
    eprintln!(
        "drain: the slow download ended {finished:?} after the drain began; the command said:\n{text}"
    );
    let (ok, out) = region("resume", &["--id", "eu-central"]);
    assert!(ok, "{out}");

    // Bad registrations: each refused with what is wrong.
    let put = |query: String| {
        let http = http.clone();
        let url = format!("{admin_url}/mirrors/{query}");
        let token = demo.net["admin_token"].as_str().unwrap().to_owned();
        async move {
            let r = http.put(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let base = "latitude=1&longitude=2&ipv4=127.0.10.9&status_url=http%3A%2F%2F127.0.10.9%3A1%2F.meridian%2Fstatus".to_owned();
    for (query, code, says) in [
        (format!("eu-west?{base}"), 409, "defined in the config file"),
        (
            format!("x1?{}", base.replace("127.0.10.9&", "127.0.10.999&")),
            400,
            "ipv4 \"127.0.10.999\": not an IPv4 address",
        ),
        (
            format!("x1?{base}&latitude=3"),
            400,
            "latitude: given twice",
        ),
        (
            format!("x1?{}", base.replace("latitude=1", "latitude=100")),
            400,
            "latitude 100: out of range",
        ),
        (
            format!("x1?{base}&speed=9"),
            400,
            "\"speed\": unknown field",
        ),
        (
            format!("x1?{}", base.replace("&status_url", "&statusurl")),
            400,
            "unknown field",
        ),
    ] {
        let (got, body) = put(query.clone()).await;
        assert_eq!(got, code, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let r = http
        .put(format!("{admin_url}/mirrors/x1?{base}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a registration without the token");
    assert!(report(&http, &demo, "x1").await.is_none());

    // It leaves with one command (safe to rerun); its downloads go on.
    let remove = || region("remove", &["--id", "eu-central"]);
    let (ok, out) = remove();
    assert!(ok && out.contains("eu-central: removed"), "{out}");
    let (ok, out) = remove();
    assert!(ok && out.contains("not registered (done)"), "rerun: {out}");
    assert!(report(&http, &demo, "eu-central").await.is_none());
    assert_ne!(paris_first(&demo).await, Some(new_ip));

    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let s = seen.lock().unwrap();
    s.assert_no_failures("join and leave under load");
    assert!(s.by_ip.len() >= 2, "{:?}", s.by_ip);
    let _ = &mut m;
}

/// A mirror restarted on its state tells the truth as soon as it listens:
/// the generation it serves, and whether that is its upstream's (`idle`,
/// upstream_generation = generation), not `starting` for a poll interval
/// (30 s here). States are the status document's enum, not free text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mirror_reports_its_real_state_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("content")).unwrap();
    std::fs::write(dir.path().join("content/f"), b"one").unwrap();
    let key = meridian_e2e::keygen(&dir.path().join("key"));
    let (_o, oaddr) = meridian_e2e::origin(dir.path(), "200ms");
    let ups = [format!("http://{oaddr}")];
    let slow = ["--poll-interval", "30s"];
    let state = dir.path().join("m");
    let (mut m, a) = meridian_e2e::mirror("m", &ups, &key, &state, &slow);
    let http = meridian_e2e::http();
    // Until the origin has published f (a file inside its quiet period
    // waits for a later generation) and the mirror serves that.
    let g = eventually("the mirror to serve f", DEADLINE, || async {
        let b = http
            .get(format!("http://{a}/f"))
            .send()
            .await
            .ok()?
            .bytes()
            .await
            .ok()?;
        let s = meridian_e2e::status(&http, a).await?;
        (&b[..] == b"one").then_some(s.generation)
    })
    .await;
    signal(m.child.id() as i32, "KILL");
    m.wait_exit(DEADLINE);
    let t0 = Instant::now();
    let (_m2, a2) = meridian_e2e::mirror("m", &ups, &key, &state, &slow);
    let listening = t0.elapsed();
    let s = eventually(
        "the restarted mirror to say it is current",
        Duration::from_secs(5),
        || async {
            let s = meridian_e2e::status(&http, a2).await?;
            (s.sync_state == meridian_serve::status::SyncState::Idle).then_some(s)
        },
    )
    .await;
    assert!(
        s.generation >= g && s.upstream_generation == s.generation,
        "{s:?}"
    );
    eprintln!(
        "listening {listening:?} after the restart, idle at generation {g} {:?} after it",
        t0.elapsed()
    );
}
