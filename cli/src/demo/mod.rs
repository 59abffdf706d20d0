//! `meridian demo`: a whole mirror network on one machine.
//!
//! It writes a real config file for every component into `DIR/config/`,
//! generates a small GeoIP City database (or uses `--geoip`), and starts
//! the origin, four mirrors and GeoDNS as child processes of the same
//! binary, so any part can be killed, frozen or restarted on its own (the
//! end-to-end tests do exactly that). Where everything listens, and each
//! child's pid, is written to `DIR/network.json`.

use anyhow::{Context, bail};
use clap::Args;
use meridian_geodns::mmdb::{Writer, geoip2_city};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

mod children;
use children::Children;

/// Flags of `meridian demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Keep state here between runs (content in DIR/content). Default: a
    /// fresh temporary directory, removed on exit.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Use this MaxMind GeoIP2/GeoLite2 or DB-IP City database instead of
    /// the small generated one.
    #[arg(long, value_name = "FILE")]
    pub geoip: Option<PathBuf>,
    /// Origin HTTP port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8080)]
    pub origin_port: u16,
    /// Mirror HTTP port, on each mirror's own loopback address (0: any).
    #[arg(long, default_value_t = 8080)]
    pub mirror_port: u16,
    /// GeoDNS port on 127.0.0.1, UDP and TCP (0: any).
    #[arg(long, default_value_t = 5353)]
    pub dns_port: u16,
    /// GeoDNS admin HTTP port on 127.0.0.1 (0: any).
    #[arg(long, default_value_t = 8053)]
    pub admin_port: u16,
    /// GeoDNS status page (the network map, read-only) HTTP port on
    /// 127.0.0.1 (0: any).
    #[arg(long, default_value_t = 8054)]
    pub status_port: u16,
    /// GeoDNS's HTTP redirector (302 to the nearest mirror that has the
    /// file) port on 127.0.0.1 (0: any).
    #[arg(long, default_value_t = 8055)]
    pub redirect_port: u16,
    /// How often mirrors re-verify their stored blobs (e.g. `1h`, `2s`).
    #[arg(long, default_value = "1h")]
    pub scrub_interval: String,
    /// Size of the large demo file in MiB.
    #[arg(long, default_value_t = 100)]
    pub big_file_mib: u64,
    /// A part that dies is reported and started again after this long
    /// (e.g. `5s`); `0s` only reports it (to restart it yourself, run the
    /// command its log names).
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub restart_after: String,
}

/// One demo region.
pub(crate) struct Region {
    pub name: &'static str,
    pub city: &'static str,
    pub lat: f64,
    pub lon: f64,
    pub addr: Ipv4Addr,
    pub country: &'static str,
    pub continent: &'static str,
    /// A real-world prefix the generated database places here.
    pub prefix: (&'static str, u8),
    /// A loopback address the generated database places here, so a client
    /// bound to it is located by source address.
    pub loopback_client: Ipv4Addr,
}

/// The four demo regions.
pub(crate) const REGIONS: [Region; 4] = [
    Region {
        name: "ap-southeast",
        city: "Jakarta",
        lat: -6.2,
        lon: 106.8,
        addr: Ipv4Addr::new(127, 0, 10, 1),
        country: "ID",
        continent: "AS",
        prefix: ("36.68.0.0", 16),
        loopback_client: Ipv4Addr::new(127, 0, 20, 1),
    },
    Region {
        name: "eu-west",
        city: "London",
        lat: 51.5,
        lon: -0.1,
        addr: Ipv4Addr::new(127, 0, 10, 2),
        country: "GB",
        continent: "EU",
        prefix: ("81.2.69.0", 24),
        loopback_client: Ipv4Addr::new(127, 0, 20, 2),
    },
    Region {
        name: "us-east",
        city: "Ashburn",
        lat: 39.0,
        lon: -77.5,
        addr: Ipv4Addr::new(127, 0, 10, 3),
        country: "US",
        continent: "NA",
        prefix: ("3.208.0.0", 12),
        loopback_client: Ipv4Addr::new(127, 0, 20, 3),
    },
    Region {
        name: "sa-east",
        city: "São Paulo",
        lat: -23.5,
        lon: -46.6,
        addr: Ipv4Addr::new(127, 0, 10, 4),
        country: "BR",
        continent: "SA",
        prefix: ("200.147.0.0", 16),
        loopback_client: Ipv4Addr::new(127, 0, 20, 4),
    },
];

/// Where the running network listens (written to `network.json`).
#[derive(Debug, Serialize, serde::Deserialize, Clone)]
pub(crate) struct Network {
    pub origin: SocketAddr,
    pub public_key: String,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    pub admin_token: String,
    /// The GeoDNS status page (http://ADDR/).
    pub status: SocketAddr,
    /// The redirector (http://ADDR/PATH).
    pub redirector: SocketAddr,
    pub mirrors: BTreeMap<String, SocketAddr>,
    pub pids: BTreeMap<String, u32>,
    pub content: PathBuf,
    pub config_dir: PathBuf,
}

/// Writes the demo GeoIP database.
pub(crate) fn write_geoip(path: &Path) -> anyhow::Result<()> {
    let mut w = Writer::new("GeoLite2-City");
    for r in &REGIONS {
        let v = geoip2_city(r.lat, r.lon, r.country, r.continent, r.city);
        let ip: IpAddr = r.prefix.0.parse()?;
        w.insert(ip, r.prefix.1, &v);
        w.insert(IpAddr::V4(r.loopback_client), 32, &v);
    }
    // A few more places, so other clients land somewhere sensible.
    w.insert(
        "2.16.0.0".parse()?,
        13,
        &geoip2_city(48.9, 2.35, "FR", "EU", "Paris"),
    );
    w.insert(
        "1.0.0.0".parse()?,
        24,
        &geoip2_city(-33.9, 151.2, "AU", "OC", "Sydney"),
    );
    w.insert(
        "203.0.113.0".parse()?,
        24,
        &geoip2_city(35.7, 139.7, "JP", "AS", "Tokyo"),
    );
    std::fs::write(path, w.build()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn write_demo_content(content: &Path, big_mib: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(content.join("releases/1.0"))?;
    let readme = content.join("README.txt");
    if !readme.exists() {
        std::fs::write(
            &readme,
            "Meridian demo content. Drop files here and watch them propagate.\n",
        )?;
    }
    let mid = content.join("releases/1.0/tool-1.0.tar.gz");
    if !mid.exists() {
        write_pattern(&mid, 5 << 20, 1)?;
    }
    let big = content.join("releases/1.0/disk-image-1.0.img");
    if !big.exists() && big_mib > 0 {
        eprintln!("creating demo content: {big_mib} MiB disk image ...");
        write_pattern(&big, big_mib << 20, 2)?;
    }
    let sums = content.join("releases/1.0/B3SUMS");
    if !sums.exists() {
        let mut s = String::new();
        for f in ["tool-1.0.tar.gz", "disk-image-1.0.img"] {
            if let Ok(b) = std::fs::read(content.join("releases/1.0").join(f)) {
                s.push_str(&format!("{}  {f}\n", meridian_core::hash_bytes(&b)));
            }
        }
        std::fs::write(&sums, s)?;
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), written in 1 MiB blocks.
fn write_pattern(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn check_bindable(addr: SocketAddr) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => bail!(
            "cannot bind {addr}: the loopback address {} is not available on this machine. \
             Linux routes all of 127.0.0.0/8 to lo; elsewhere add it first (macOS: `sudo ifconfig lo0 alias {}`)",
            addr.ip(),
            addr.ip()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!(
                "cannot bind {addr}: the port is in use; pick others with --origin-port/--mirror-port/--dns-port/--admin-port/--status-port/--redirect-port"
            )
        }
        Err(e) => bail!("cannot bind {addr}: {e}"),
    }
}

/// Writes a component's config: a comment line, then `table` as TOML
/// (serialized, so every value is quoted and escaped as TOML wants).
fn write_config(path: &Path, table: &toml::Table) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `meridian demo`. See deploy/{} for every option.\n{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .map(|n| if n.starts_with("mirror") {
                "mirror.toml"
            } else {
                n
            })
            .unwrap_or("README"),
        toml::to_string(table)?
    );
    // Owner-only: the mirror and GeoDNS configs hold the admin token.
    meridian_serve::store::write_atomic_mode(path, text.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Sets `listen` in a config to the address actually bound, so a
/// restarted process (after port 0) comes back where the others expect it.
fn pin_listen(path: &Path, table: &mut toml::Table, addr: SocketAddr) -> anyhow::Result<()> {
    table.insert("listen".into(), addr.to_string().into());
    write_config(path, table)
}

fn s(v: impl ToString) -> toml::Value {
    toml::Value::String(v.to_string())
}

/// Waits until every mirror serves `path` (the demo content is in the
/// generation they serve), so the tour's first download works.
fn wait_served(mirrors: &BTreeMap<String, SocketAddr>, path: &str) -> anyhow::Result<()> {
    for (name, addr) in mirrors {
        wait_answer(&format!("mirror {name}"), *addr, path, b" 200")?;
    }
    Ok(())
}

/// Waits (60 s at most) until `HEAD path` on `addr` answers with `status`
/// (e.g. `b" 200"`).
fn wait_answer(what: &str, addr: SocketAddr, path: &str, status: &[u8; 4]) -> anyhow::Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .and_then(|mut c| {
                c.set_read_timeout(Some(Duration::from_secs(2)))?;
                c.write_all(
                    format!("HEAD {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )?;
                let mut head = [0u8; 12];
                c.read_exact(&mut head)?;
                Ok(head.ends_with(status))
            })
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} ({addr}) did not answer {path} as expected within 60 s; see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let restart_after = humantime::parse_duration(&args.restart_after).with_context(|| {
        format!(
            "--restart-after {:?} is not a duration (e.g. `5s`, or `0s` to only report)",
            args.restart_after
        )
    })?;
    let (base, _temp) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = std::env::temp_dir().join(format!("meridian-demo-{}", std::process::id()));
            (t.clone(), Some(TempDirGuard(t)))
        }
    };
    let base = std::path::absolute(&base)?;
    let config_dir = base.join("config");
    let logs = base.join("logs");
    for d in [&base, &config_dir, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let content = base.join("content");
    write_demo_content(&content, args.big_file_mib)?;
    let key_file = base.join("origin.key");
    let public_key = if key_file.exists() {
        meridian_origin::service::load_key(&key_file)?.public()
    } else {
        crate::keygen::generate(&key_file, false)?.public()
    };
    let geoip = match &args.geoip {
        Some(p) => std::path::absolute(p)?,
        None => {
            let p = base.join("demo-city.mmdb");
            write_geoip(&p)?;
            p
        }
    };
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for port in [
        args.origin_port,
        args.admin_port,
        args.status_port,
        args.redirect_port,
    ] {
        check_bindable(SocketAddr::new(lo, port))?;
    }
    for r in &REGIONS {
        check_bindable(SocketAddr::new(IpAddr::V4(r.addr), args.mirror_port))?;
    }
    let mut kids = Children::default();

    // Origin.
    let origin_cfg = config_dir.join("origin.toml");
    let mut table = toml::Table::new();
    table.insert("content".into(), s(content.display()));
    table.insert("state".into(), s(base.join("origin-state").display()));
    table.insert("key_file".into(), s(key_file.display()));
    table.insert("listen".into(), s(SocketAddr::new(lo, args.origin_port)));
    table.insert("quiet".into(), s("500ms"));
    write_config(&origin_cfg, &table)?;
    let log = kids.spawn(
        "origin",
        &[
            "origin".into(),
            "--config".into(),
            origin_cfg.display().to_string(),
        ],
        &logs,
    )?;
    let origin = kids.wait_listening("origin", &log, "origin")?;
    pin_listen(&origin_cfg, &mut table, origin)?;

    // Mirrors: sa-east pulls from us-east first (a second tier), then the origin.
    let admin_token = {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    let mut mirrors = BTreeMap::new();
    for r in &REGIONS {
        let mut upstreams = vec![format!("http://{origin}")];
        if r.name == "sa-east"
            && let Some(us) = mirrors.get("us-east")
        {
            upstreams.insert(0, format!("http://{us}"));
        }
        let cfg = config_dir.join(format!("mirror-{}.toml", r.name));
        let mut table = toml::Table::new();
        table.insert("id".into(), s(r.name));
        table.insert("region".into(), s(r.name));
        table.insert(
            "upstreams".into(),
            toml::Value::Array(upstreams.iter().map(s).collect()),
        );
        table.insert("trust".into(), toml::Value::Array(vec![s(public_key)]));
        table.insert(
            "state".into(),
            s(base.join(format!("mirror-{}", r.name)).display()),
        );
        table.insert(
            "listen".into(),
            s(SocketAddr::new(IpAddr::V4(r.addr), args.mirror_port)),
        );
        table.insert("admin_token".into(), s(&admin_token));
        table.insert("poll_interval".into(), s("10s"));
        table.insert("scrub_interval".into(), s(&args.scrub_interval));
        table.insert("reserve_free_bytes".into(), toml::Value::Integer(16 << 20));
        write_config(&cfg, &table)?;
        let name = format!("mirror-{}", r.name);
        let log = kids.spawn(
            &name,
            &[
                "mirror".into(),
                "--config".into(),
                cfg.display().to_string(),
            ],
            &logs,
        )?;
        let addr = kids.wait_listening(&name, &log, "mirror")?;
        pin_listen(&cfg, &mut table, addr)?;
        mirrors.insert(r.name.to_owned(), addr);
    }

    // GeoDNS.
    let mut table: toml::Table = toml::from_str(
        r#"
origin_health_url = ""
[selection]
answers = 2
ttl = "30s"
ttl_changing = "5s"
[health]
interval = "1s"
timeout = "500ms"
up_after = 2
down_after = 2
[[zones]]
name = "meridian.test"
dynamic = ["dl"]
ns = ["ns1.meridian.test."]
records = [
  { name = "ns1", type = "A", value = "127.0.0.1" },
  { name = "www", type = "CNAME", value = "dl.meridian.test." },
  { name = "@", type = "TXT", value = "Meridian demo zone" },
]
"#,
    )?;
    table.insert(
        "listen".into(),
        toml::Value::Array(vec![s(SocketAddr::new(lo, args.dns_port))]),
    );
    table.insert("geoip".into(), s(geoip.display()));
    // Registrations (`meridian region add`) and overrides survive a restart.
    table.insert(
        "state_file".into(),
        s(base.join("geodns-state.json").display()),
    );
    table.insert(
        "origin_health_url".into(),
        s(format!("http://{origin}/.meridian/health")),
    );
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), s(SocketAddr::new(lo, args.admin_port)));
    admin.insert("token".into(), s(&admin_token));
    table.insert("admin".into(), toml::Value::Table(admin));
    let mut public = toml::Table::new();
    public.insert("listen".into(), s(SocketAddr::new(lo, args.status_port)));
    table.insert("public".into(), toml::Value::Table(public));
    let mut redirector = toml::Table::new();
    redirector.insert("listen".into(), s(SocketAddr::new(lo, args.redirect_port)));
    redirector.insert(
        "upstreams".into(),
        toml::Value::Array(vec![s(format!("http://{origin}"))]),
    );
    redirector.insert(
        "trust".into(),
        toml::Value::Array(vec![s(public_key.to_string())]),
    );
    table.insert("redirector".into(), toml::Value::Table(redirector));
    let mut list = Vec::new();
    for r in &REGIONS {
        let mut m = toml::Table::new();
        m.insert("id".into(), s(r.name));
        m.insert("region".into(), s(r.name));
        m.insert("latitude".into(), toml::Value::Float(r.lat));
        m.insert("longitude".into(), toml::Value::Float(r.lon));
        m.insert("ipv4".into(), toml::Value::Array(vec![s(r.addr)]));
        m.insert("country".into(), s(r.country));
        m.insert(
            "status_url".into(),
            s(format!("http://{}/.meridian/status", mirrors[r.name])),
        );
        list.push(toml::Value::Table(m));
    }
    table.insert("mirrors".into(), toml::Value::Array(list));
    let geodns_cfg = config_dir.join("geodns.toml");
    write_config(&geodns_cfg, &table)?;
    let log = kids.spawn(
        "geodns",
        &[
            "geodns".into(),
            "--config".into(),
            geodns_cfg.display().to_string(),
        ],
        &logs,
    )?;
    let dns = kids.wait_listening("geodns", &log, "geodns")?;
    let admin = kids.wait_listening("geodns", &log, "geodns admin")?;
    let status = kids.wait_listening("geodns", &log, "geodns status page")?;
    let redirector = kids.wait_listening("geodns", &log, "geodns redirector")?;
    // Pinned like the others' (a restarted GeoDNS comes back on the same
    // ports). GeoDNS reloads the file it watches; the addresses it already
    // listens on stay.
    table.insert("listen".into(), toml::Value::Array(vec![s(dns)]));
    for (key, addr) in [
        ("admin", admin),
        ("public", status),
        ("redirector", redirector),
    ] {
        if let Some(toml::Value::Table(t)) = table.get_mut(key) {
            t.insert("listen".into(), s(addr));
        }
    }
    write_config(&geodns_cfg, &table)?;

    let network = Network {
        origin,
        public_key: public_key.to_string(),
        dns,
        admin,
        admin_token: admin_token.clone(),
        status,
        redirector,
        mirrors: mirrors.clone(),
        pids: kids.pids(),
        content: content.clone(),
        config_dir: config_dir.clone(),
    };
    // The content is in every mirror's generation before the network is
    // announced: the tour's first download works.
    wait_served(&mirrors, "/README.txt")?;
    // And the redirector sends downloads to them (its probes have passed),
    // so the tour's redirector and `meridian get` lines work at once.
    wait_answer("the redirector", redirector, "/README.txt", b" 302")?;
    let network_json = base.join("network.json");
    meridian_serve::store::write_atomic(&network_json, &serde_json::to_vec_pretty(&network)?)?;

    let port = dns.port();
    let mport = args.mirror_port;
    println!();
    println!("Meridian demo network is up. State: {}", base.display());
    println!();
    println!(
        "  origin     http://{origin}            (publishes {})",
        content.display()
    );
    for r in &REGIONS {
        println!(
            "  mirror     http://{:<21} {:<13} {}",
            mirrors[r.name], r.name, r.city
        );
    }
    println!("  geodns     {dns} udp+tcp, zone meridian.test, name dl.meridian.test");
    println!("  admin      http://{admin}/mirrors   (Authorization: Bearer {admin_token})");
    println!("  status map http://{status}/   (open it in a browser: mirrors and live steering)");
    println!("  redirector http://{redirector}/   (302 to the nearest mirror that has the file)");
    println!("  public key {public_key}");
    println!("  logs       {}", logs.display());
    println!();
    println!("Geo-steering (the first answer is the nearest healthy mirror):");
    println!(
        "  dig @127.0.0.1 -p {port} dl.meridian.test +subnet=81.2.69.0/24 +short     # London    -> 127.0.10.2"
    );
    println!(
        "  dig @127.0.0.1 -p {port} dl.meridian.test +subnet=36.68.0.0/16 +short     # Jakarta   -> 127.0.10.1"
    );
    println!(
        "  dig @127.0.0.1 -p {port} dl.meridian.test +subnet=200.147.0.0/16 +short   # São Paulo -> 127.0.10.4"
    );
    println!();
    println!("A verified download through the mirror DNS picks (checks the blake3 sums too):");
    println!(
        "  IP=$(dig @127.0.0.1 -p {port} dl.meridian.test +subnet=81.2.69.0/24 +short | head -1)"
    );
    println!(
        "  curl -sO --resolve dl.meridian.test:{mport}:$IP http://dl.meridian.test:{mport}/releases/1.0/tool-1.0.tar.gz"
    );
    println!(
        "  curl -s --resolve dl.meridian.test:{mport}:$IP http://dl.meridian.test:{mport}/releases/1.0/B3SUMS | grep tool | b3sum -c"
    );
    println!(
        "  curl -sI --resolve dl.meridian.test:{mport}:$IP http://dl.meridian.test:{mport}/releases/1.0/tool-1.0.tar.gz | grep -i blake3"
    );
    println!();
    println!("The redirector sends each download to the nearest mirror that has the file:");
    println!(
        "  curl -sIL --interface 127.0.20.2 http://{redirector}/releases/1.0/tool-1.0.tar.gz | grep -i -e '^location' -e '^link'   # London"
    );
    println!(
        "  wget --bind-address=127.0.20.1 -q http://{redirector}/releases/1.0/tool-1.0.tar.gz                                       # Jakarta"
    );
    println!(
        "  aria2c http://{redirector}/releases/1.0/tool-1.0.tar.gz.meta4                                                        # all four mirrors, pieces checked"
    );
    println!(
        "  curl -s 'http://{redirector}/releases/1.0/tool-1.0.tar.gz?mirrorlist=json'; curl -s http://{redirector}/.meridian/stats"
    );
    println!();
    println!(
        "A download from all four mirrors at once, every 256 KiB block checked against the signed root:"
    );
    println!(
        "  meridian get --trust {public_key} http://{redirector}/releases/1.0/tool-1.0.tar.gz"
    );
    println!();
    println!("Watch a change propagate to every mirror:");
    println!("  date > {}/hello.txt", content.display());
    println!("  for m in 1 2 3 4; do curl -s http://127.0.10.$m:{mport}/hello.txt; done");
    println!(
        "  curl -s http://{}/.meridian/status        # generation, sync state, load",
        mirrors["eu-west"]
    );
    println!();
    println!(
        "Failover: kill -9 the London mirror (pid {}) and ask again for London:",
        network.pids.get("mirror-eu-west").copied().unwrap_or(0)
    );
    println!("  dig @127.0.0.1 -p {port} dl.meridian.test +subnet=81.2.69.0/24 +short");
    println!();
    println!("Press Ctrl-C to stop everything.");
    let _ = std::io::stdout().flush();

    // Run until a signal. A part that dies is reported, and restarted after
    // --restart-after (network.json then names its new pid).
    let mut dead = BTreeMap::new();
    let mut network = network;
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if kids.supervise(&mut dead, restart_after) {
            network.pids = kids.pids();
            meridian_serve::store::write_atomic(
                &network_json,
                &serde_json::to_vec_pretty(&network)?,
            )?;
        }
    }
    println!("stopping ...");
    kids.stop();
    Ok(())
}

struct TempDirGuard(PathBuf);
impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
