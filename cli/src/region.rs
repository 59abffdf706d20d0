//! `meridian region`: an operator adds a mirror to the network, or takes it
//! out, with one command against every GeoDNS instance's admin API.
//!
//! Each step prints what it does and what it found. Every command is safe
//! to rerun: a registration that is already there is reported unchanged, a
//! removal of a mirror that is gone is reported as done. An instance that
//! cannot be reached does not stop the others; the command then fails,
//! naming it, and a rerun finishes the work.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub(crate) enum RegionCommand {
    /// Register a mirror with every GeoDNS instance named, then wait until
    /// each one gives it clients (it is up and serves the newest
    /// generation).
    ///
    /// GeoDNS keeps the registration in its state_file, so it survives a
    /// restart. Rerunning with the same fields changes nothing; with other
    /// fields it updates the registration. A mirror defined in an
    /// instance's config file is refused there (the file wins).
    Add(Box<AddArgs>),
    /// Remove a registered mirror from every GeoDNS instance named: new
    /// clients go elsewhere at once (clients that resolved it before finish
    /// their downloads; drain it first to wait for them).
    Remove(RemoveArgs),
    /// Drain a mirror: every GeoDNS instance named stops sending it new
    /// clients, then this waits until its downloads have finished.
    ///
    /// Done means: the longest answer TTL has passed since the drain (no
    /// client can still be holding an answer that names it) and the
    /// mirror reports no download in flight (health probes and idle
    /// connections are not downloads). The drain is kept in each
    /// instance's state file, so it survives a restart; undo it with
    /// `meridian region resume`. Rerunning is safe.
    Drain(DrainArgs),
    /// Undo a drain (or a forced down) on every GeoDNS instance named.
    Resume(RemoveArgs),
}

/// The GeoDNS instances and how to reach their admin APIs.
#[derive(Debug, Args)]
pub(crate) struct Admins {
    /// A GeoDNS admin URL, `http://HOST:PORT` (repeat for each instance).
    #[arg(long = "admin", value_name = "URL", required = true)]
    pub admin: Vec<String>,
    /// A file holding the admin bearer token (or set MERIDIAN_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    #[command(flatten)]
    pub admins: Admins,
    /// The mirror's id (letters, digits, '-', '_', '.').
    #[arg(long)]
    pub id: String,
    /// The region it serves (a label, e.g. `eu-west`).
    #[arg(long, default_value = "")]
    pub region: String,
    /// Where it is: latitude in degrees (-90 to 90).
    #[arg(long, allow_negative_numbers = true)]
    pub latitude: f64,
    /// Where it is: longitude in degrees (-180 to 180).
    #[arg(long, allow_negative_numbers = true)]
    pub longitude: f64,
    /// An IPv4 address DNS answers with (repeat for more).
    #[arg(long)]
    pub ipv4: Vec<std::net::Ipv4Addr>,
    /// An IPv6 address DNS answers with (repeat for more).
    #[arg(long)]
    pub ipv6: Vec<std::net::Ipv6Addr>,
    /// Its status URL, `http://HOST:PORT/.meridian/status`.
    #[arg(long)]
    pub status_url: String,
    /// Its share among mirrors at a similar distance.
    #[arg(long)]
    pub weight: Option<f64>,
    /// Its egress capacity in bytes per second (instead of what it reports).
    #[arg(long)]
    pub capacity_bytes_per_sec: Option<u64>,
    /// Its country (ISO 3166 code), for the redirector's Link headers.
    #[arg(long)]
    pub country: Option<String>,
    /// The base URL the redirector sends downloads to [default: the status
    /// URL without /.meridian/status].
    #[arg(long)]
    pub url: Option<String>,
    /// How long to wait for every instance to give it clients (0s: do not
    /// wait).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    pub admins: Admins,
    /// The mirror's id.
    #[arg(long)]
    pub id: String,
    /// Give up waiting after this long, and report what is left (the drain
    /// stays in force).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
    /// Wait this long after the drain before counting downloads [default:
    /// the longest TTL of GeoDNS's answers, plus a second].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub settle: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct RemoveArgs {
    #[command(flatten)]
    pub admins: Admins,
    /// The mirror's id.
    #[arg(long)]
    pub id: String,
}

pub(crate) fn run(cmd: RegionCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            RegionCommand::Add(a) => add(*a).await,
            RegionCommand::Remove(r) => remove(r).await,
            RegionCommand::Drain(d) => drain(d).await,
            RegionCommand::Resume(r) => {
                let admin = Admin::new(&r.admins)?;
                let path = format!("{}/clear", mirror_path(&r.id));
                let done = |code: u16, _: &str| (code == 200).then_some(None);
                every_instance(
                    &admin,
                    &r.admins,
                    reqwest::Method::POST,
                    &path,
                    "resume",
                    done,
                )
                .await
            }
        }
    })
}

/// A GeoDNS admin API client.
pub(crate) struct Admin {
    http: reqwest::Client,
    token: String,
}

impl Admin {
    pub(crate) fn new(a: &Admins) -> anyhow::Result<Self> {
        let token = match &a.token_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("--token-file {}: cannot read it", f.display()))?
                .trim()
                .to_owned(),
            None => std::env::var("MERIDIAN_ADMIN_TOKEN").map_err(|_| {
                anyhow::anyhow!(
                    "no admin token: pass --token-file FILE or set MERIDIAN_ADMIN_TOKEN (the token in each GeoDNS's [admin])"
                )
            })?,
        };
        for u in &a.admin {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("--admin {u:?}: not http://HOST:PORT");
            }
        }
        Ok(Admin {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            token,
        })
    }

    /// Sends one request; returns (status, body) or why it could not.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<(u16, String), String> {
        let r = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| meridian_serve::describe(&e))?;
        let code = r.status().as_u16();
        let body = r.text().await.map_err(|e| meridian_serve::describe(&e))?;
        if code == 401 {
            return Err("the admin token was refused (401): check --token-file".into());
        }
        Ok((code, body.trim().to_owned()))
    }

    /// What instance `base` reports of every mirror it serves.
    pub(crate) async fn mirrors(&self, base: &str) -> Result<Vec<serde_json::Value>, String> {
        let (code, body) = self
            .send(reqwest::Method::GET, &format!("{base}/mirrors"))
            .await?;
        if code != 200 {
            return Err(format!("GET /mirrors: HTTP {code}: {body}"));
        }
        serde_json::from_str(&body)
            .map_err(|e| format!("GET /mirrors: not the expected JSON ({e})"))
    }

    /// What instance `base` reports of mirror `id` (`None`: not listed).
    pub(crate) async fn mirror(
        &self,
        base: &str,
        id: &str,
    ) -> Result<Option<serde_json::Value>, String> {
        Ok(self
            .mirrors(base)
            .await?
            .into_iter()
            .find(|m| m["id"] == id))
    }
}

pub(crate) fn base(u: &str) -> &str {
    u.trim_end_matches('/')
}

async fn add(a: AddArgs) -> anyhow::Result<()> {
    let admin = Admin::new(&a.admins)?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("region", &a.region)
        .append_pair("latitude", &a.latitude.to_string())
        .append_pair("longitude", &a.longitude.to_string())
        .append_pair("status_url", &a.status_url);
    for ip in &a.ipv4 {
        q.append_pair("ipv4", &ip.to_string());
    }
    for ip in &a.ipv6 {
        q.append_pair("ipv6", &ip.to_string());
    }
    if let Some(w) = a.weight {
        q.append_pair("weight", &w.to_string());
    }
    if let Some(c) = a.capacity_bytes_per_sec {
        q.append_pair("capacity_bytes_per_sec", &c.to_string());
    }
    if let Some(c) = &a.country {
        q.append_pair("country", c);
    }
    if let Some(u) = &a.url {
        q.append_pair("url", u);
    }
    let query = q.finish();
    let path = format!("{}?{query}", mirror_path(&a.id));
    let done = |code: u16, _: &str| matches!(code, 200 | 201).then_some(None);
    every_instance(
        &admin,
        &a.admins,
        reqwest::Method::PUT,
        &path,
        "register",
        done,
    )
    .await?;
    if a.wait.is_zero() {
        return Ok(());
    }
    wait_in_service(&admin, &a.admins, &a.id, a.wait, &a.status_url).await
}

/// Waits until every instance gives `id` clients (up and current),
/// printing each change of what an instance says of it.
pub(crate) async fn wait_in_service(
    admin: &Admin,
    admins: &Admins,
    id: &str,
    wait: Duration,
    status_url: &str,
) -> anyhow::Result<()> {
    let n = admins.admin.len();
    println!(
        "waiting up to {} for {id} to get clients (up and current) on every instance",
        humantime::format_duration(wait),
    );
    let until = Instant::now() + wait;
    let mut last = vec![String::new(); n];
    loop {
        let mut waiting = Vec::new();
        for (i, u) in admins.admin.iter().enumerate() {
            let why = match admin.mirror(base(u), id).await {
                Ok(Some(m)) if m["in_service"] == true => "in service".to_owned(),
                Ok(Some(m)) => m["why"].as_str().unwrap_or("not in service").to_owned(),
                Ok(None) => "not listed".to_owned(),
                Err(e) => e,
            };
            if why != last[i] {
                println!("  {}: {id} {why}", base(u));
                last[i] = why.clone();
            }
            if why != "in service" {
                waiting.push(format!("{}: {why}", base(u)));
            }
        }
        if waiting.is_empty() {
            println!("{id} is in service on {n} of {n} GeoDNS instances");
            return Ok(());
        }
        if Instant::now() >= until {
            bail!(
                "{id} is registered but not in service after {} on {} ({}); check that it is up and current (its status URL {status_url}), or wait longer",
                humantime::format_duration(wait),
                waiting.len(),
                waiting.join("; "),
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn remove(r: RemoveArgs) -> anyhow::Result<()> {
    let admin = Admin::new(&r.admins)?;
    let gone = format!("{} not registered (done)", r.id);
    let done = |code: u16, _: &str| match code {
        200 => Some(None),
        404 => Some(Some(gone.clone())),
        _ => None,
    };
    every_instance(
        &admin,
        &r.admins,
        reqwest::Method::DELETE,
        &mirror_path(&r.id),
        "remove",
        done,
    )
    .await
}

async fn drain(d: DrainArgs) -> anyhow::Result<()> {
    let admin = Admin::new(&d.admins)?;
    drain_and_wait(&admin, &d.admins, &d.id, d.deadline, d.settle).await
}

/// Drains `id` on every instance, then waits until the answers naming it
/// have expired (`settle`, default their longest TTL) and it has no
/// download in flight, or `deadline` passes.
pub(crate) async fn drain_and_wait(
    admin: &Admin,
    admins: &Admins,
    id: &str,
    deadline: Duration,
    settle: Option<Duration>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let path = format!("{}/drain", mirror_path(id));
    let done = |code: u16, _: &str| (code == 200).then_some(None);
    every_instance(admin, admins, reqwest::Method::POST, &path, "drain", done).await?;
    let first = base(&admins.admin[0]);
    let report = admin
        .mirror(first, id)
        .await
        .map_err(|e| anyhow::anyhow!("{first}: {e}"))?
        .with_context(|| format!("{first} does not list {}", id))?;
    let status_url = report["status_url"].as_str().unwrap_or("").to_owned();
    // TTLs are whole seconds, and a client counts its own from when the
    // answer reached it: one second more covers both.
    let settle = settle.unwrap_or(Duration::from_secs(
        report["answer_ttl"].as_u64().unwrap_or(0) + 1,
    ));
    println!(
        "{} drained on {} GeoDNS instances; waiting for its downloads to finish (answers naming it expire within {}; deadline {})",
        id,
        admins.admin.len(),
        humantime::format_duration(settle),
        humantime::format_duration(deadline)
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut last = None;
    loop {
        let now = match http.get(&status_url).send().await {
            Ok(r) => match r.bytes().await {
                Ok(b) => serde_json::from_slice::<meridian_serve::status::MirrorStatus>(&b)
                    .map(|s| (s.downloads_in_flight, s.active_connections))
                    .map_err(|e| format!("not a mirror status document ({e})")),
                Err(e) => Err(meridian_serve::describe(&e)),
            },
            Err(e) => Err(meridian_serve::describe(&e)),
        };
        let settled = t0.elapsed() >= settle;
        match &now {
            Ok((downloads, conns)) if last != Some((*downloads, *conns)) => {
                println!(
                    "  {:>5.1}s {}: {} in flight, {}",
                    t0.elapsed().as_secs_f64(),
                    id,
                    count(*downloads, "download"),
                    count(*conns, "connection"),
                );
                last = Some((*downloads, *conns));
            }
            Ok(_) => {}
            Err(e) => println!("  {status_url}: {e}"),
        }
        match now {
            Ok((0, _)) if settled => {
                println!(
                    "{} is drained: no download in flight after {:.1}s",
                    id,
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            // A mirror that stopped has no downloads either.
            Err(_) if settled && last.is_some_and(|(n, _)| n == 0) => {
                println!(
                    "{} does not answer its status URL; it has no downloads to wait for",
                    id
                );
                return Ok(());
            }
            _ => {}
        }
        if t0.elapsed() >= deadline {
            bail!(
                "{} is drained (no new clients) but {} after {}; wait longer with --deadline, or stop it now and lose those",
                id,
                match last {
                    Some((n, _)) => format!("{n} downloads are still in flight"),
                    None => format!("its status URL {status_url} does not answer"),
                },
                humantime::format_duration(deadline)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/mirrors/{id}`, the id percent-encoded.
pub(crate) fn mirror_path(id: &str) -> String {
    let enc: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    format!("/mirrors/{enc}")
}

/// Sends `method path` to every instance, printing each answer. `done`
/// says whether an answer (status, body) is success, and what to print
/// instead of the body. Any other answer is a refusal, the same on every
/// instance, so it stops the command; an instance not reached does not
/// stop the others, but fails the command at the end (rerunning is safe).
pub(crate) async fn every_instance(
    admin: &Admin,
    admins: &Admins,
    method: reqwest::Method,
    path: &str,
    verb: &str,
    done: impl Fn(u16, &str) -> Option<Option<String>>,
) -> anyhow::Result<()> {
    let n = admins.admin.len();
    let mut failed = Vec::new();
    for (i, u) in admins.admin.iter().enumerate() {
        match admin
            .send(method.clone(), &format!("{}{path}", base(u)))
            .await
        {
            Ok((code, body)) => match done(code, &body) {
                Some(said) => println!("[{}/{n}] {}: {}", i + 1, base(u), said.unwrap_or(body)),
                None => bail!("{}: {verb} refused (HTTP {code}): {body}", base(u)),
            },
            Err(e) => {
                println!("[{}/{n}] {}: cannot {verb}: {e}", i + 1, base(u));
                failed.push(format!("{}: {e}", base(u)));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {n} GeoDNS instances not reached ({}); rerun when they are back ({verb} again is safe)",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// `n thing` or `n things`.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}
