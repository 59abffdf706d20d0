//! `meridian migrate`: moves a mirror's clients to another mirror (a new
//! host or address) as one verified operation, in six steps: plan, reserve,
//! replicate, validate, cut over, clean up.
//!
//! The steps keep their state where it already lives, in every GeoDNS
//! instance's state file (B registered as a standby, then cleared; A
//! drained, then removed), so a rerun reads where the last run stopped and
//! goes on from there: nothing to keep on the operator's machine. Until
//! the cut-over A serves as before, and a failed step says what it found.

use crate::region::{self, Admin, Admins};
use crate::units::human;
use anyhow::{Context, bail};
use clap::Args;
use meridian_core::{DirNode, EntryKind, Hash, PublicKey, SignedRoot, TrustedKeys, Verifier};
use meridian_serve::status::MirrorStatus;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    pub admins: Admins,
    /// The mirror to move from (A): its id as GeoDNS lists it.
    #[arg(long, value_name = "ID")]
    pub from: String,
    /// The id the new mirror (B) is registered under. B must be running
    /// already (`meridian mirror` on its host), following A or the origin.
    #[arg(long, value_name = "ID")]
    pub to: String,
    /// B's status URL, `http://HOST:PORT/.meridian/status`.
    #[arg(long, value_name = "URL")]
    pub to_status_url: String,
    /// An IPv4 address of B that DNS answers with (repeat for more).
    #[arg(long, value_name = "IP")]
    pub to_ipv4: Vec<std::net::Ipv4Addr>,
    /// An IPv6 address of B that DNS answers with (repeat for more).
    #[arg(long, value_name = "IP")]
    pub to_ipv6: Vec<std::net::Ipv6Addr>,
    /// B's base URL for the redirector [default: its status URL without
    /// /.meridian/status]. Every other field (region, coordinates, weight,
    /// capacity, countries) is copied from A.
    #[arg(long, value_name = "URL")]
    pub to_url: Option<String>,
    /// How many files the validate step downloads from B and checks
    /// against the signed manifest.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub sample: usize,
    /// Give up the replicate step if B has not reached A's generation by
    /// then.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub replicate_deadline: Duration,
    /// Give up the cut-over if B is not in service on every instance by
    /// then.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub cut_over_wait: Duration,
    /// Give up waiting for A's downloads to finish after this long (A stays
    /// drained; rerun to wait again).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub drain_deadline: Duration,
    /// Wait this long after draining A before counting its downloads
    /// [default: the longest TTL of GeoDNS's answers, plus a second].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub settle: Option<Duration>,
    /// In the clean-up, ask A to stop (its admin API, `POST
    /// /.meridian/admin/stop`: it exits as on SIGTERM), then remove it.
    #[arg(long)]
    pub stop_from: bool,
    /// A file holding A's `admin_token`, for --stop-from (or set
    /// MERIDIAN_MIRROR_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub mirror_token_file: Option<PathBuf>,
    /// Print the plan (and where a rerun would resume) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The step a run starts its changes at, read from what GeoDNS holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Start {
    Reserve,
    Replicate,
    CutOver,
    CleanUp,
}

const STEPS: [&str; 6] = [
    "plan",
    "reserve",
    "replicate",
    "validate",
    "cut over",
    "clean up",
];

/// What one instance lists of A and B.
struct Seen {
    base: String,
    a: Option<Value>,
    b: Option<Value>,
}

pub(crate) fn run(a: MigrateArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(migrate(a))
}

struct Clock {
    t0: Instant,
    step: Instant,
    times: Vec<(&'static str, Duration)>,
}

impl Clock {
    fn begin(&mut self, i: usize) {
        self.step = Instant::now();
        println!("== step {} of 6: {}", i + 1, STEPS[i]);
    }
    fn end(&mut self, i: usize) {
        let d = self.step.elapsed();
        println!("   {} done in {:.2}s", STEPS[i], d.as_secs_f64());
        self.times.push((STEPS[i], d));
    }
}

async fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let admin = Admin::new(&a.admins)?;
    if a.from == a.to {
        bail!(
            "--from and --to are both {:?}: B needs an id of its own",
            a.from
        );
    }
    if a.to_ipv4.is_empty() && a.to_ipv6.is_empty() {
        bail!("B needs an address to be answered with: give --to-ipv4 or --to-ipv6");
    }
    let stop_token = if a.stop_from {
        Some(mirror_token(a.mirror_token_file.as_deref())?)
    } else {
        None
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut clock = Clock {
        t0: Instant::now(),
        step: Instant::now(),
        times: Vec::new(),
    };

    // 1. Plan.
    clock.begin(0);
    let seen = look(&admin, &a).await?;
    let n = seen.len();
    let start = where_to_start(&a, &seen)?;
    let from = seen.iter().find_map(|s| s.a.clone());
    let a_status_url = from
        .as_ref()
        .and_then(|m| m["status_url"].as_str())
        .unwrap_or("")
        .to_owned();
    let b_base = node_base(&a.to_status_url)?;
    println!(
        "   move {} to {} ({}) on {n} GeoDNS instance{}",
        a.from,
        a.to,
        a.to_status_url,
        if n == 1 { "" } else { "s" }
    );
    let registration = match &from {
        Some(m) => Some(registration_of(&a, m)?),
        None => None,
    };
    if start < Start::CleanUp {
        let a_base = node_base(&a_status_url)?;
        let sa = status(&http, &a_status_url)
            .await
            .map_err(|e| anyhow::anyhow!("plan: A ({a_status_url}) does not answer: {e}; a migration starts from a serving mirror"))?;
        let sb = status(&http, &a.to_status_url).await.map_err(|e| {
            anyhow::anyhow!(
                "plan: B ({}) does not answer: {e}; start the new mirror first (meridian mirror --config … on its host)",
                a.to_status_url
            )
        })?;
        println!(
            "   A {}: serving generation {}, {} stored, sync {}",
            a.from,
            sa.generation,
            human(sa.store_bytes),
            state_word(&sa)
        );
        println!(
            "   B {}: serving generation {}, {} stored, {} free, sync {}",
            a.to,
            sb.generation,
            human(sb.store_bytes),
            sb.disk_free_bytes.map_or("unknown".into(), human),
            state_word(&sb)
        );
        let env = get_bytes(&http, &format!("{a_base}/.meridian/v1/root"))
            .await
            .map_err(|e| anyhow::anyhow!("plan: A's root: {e}"))?;
        let key = SignedRoot::decode(&env)
            .map_err(|e| anyhow::anyhow!("plan: A's root does not decode: {e}"))?
            .key
            .to_string();
        if !sb.trusted_keys.contains(&key) {
            bail!(
                "plan: B does not trust {key}, which signs A's generation {} (B trusts: {}); give B the same trust as A (trust = [...] in its config, then SIGHUP) and rerun. Nothing was changed.",
                sa.generation,
                if sb.trusted_keys.is_empty() {
                    "nothing it reports".to_owned()
                } else {
                    sb.trusted_keys.join(", ")
                }
            );
        }
        println!("   keys: B trusts {key}, which signs A's roots");
        let need = sa.store_bytes.saturating_sub(sb.store_bytes);
        match sb.disk_free_bytes {
            Some(free) if free < need => bail!(
                "plan: B has {} free but needs about {} more for A's store ({} stored on A, {} on B); free space on B's store and rerun. Nothing was changed.",
                human(free),
                human(need),
                human(sa.store_bytes),
                human(sb.store_bytes)
            ),
            Some(free) => println!(
                "   room: B needs about {} more, has {} free",
                human(need),
                human(free)
            ),
            None => println!("   room: B does not report its free space; not checked"),
        }
    }
    if let Some(q) = &registration {
        println!("   B's registration: {q}");
    }
    let first = match start {
        Start::Reserve => 1,
        Start::Replicate => 2,
        Start::CutOver => 4,
        Start::CleanUp => 5,
    };
    if first > 1 {
        println!(
            "   resuming at {} (found: {})",
            STEPS[first],
            found(&a, &seen)
        );
    }
    println!(
        "   steps to run: {}{}",
        STEPS[first..].join(", "),
        if a.stop_from {
            " (A is stopped at the end)"
        } else {
            ""
        }
    );
    clock.end(0);
    if a.dry_run {
        println!("dry run: nothing was changed");
        return Ok(());
    }
    let stopped_at = |step: usize, e: anyhow::Error| {
        let a_note = if step < 4 {
            format!(
                "{} still serves as before, {} is not answered",
                a.from, a.to
            )
        } else {
            format!("{} keeps serving the downloads it has", a.from)
        };
        anyhow::anyhow!(
            "migrate stopped at step {} ({}): {:#}\n{a_note}; rerun the same command to resume",
            step + 1,
            STEPS[step],
            e
        )
    };

    // 2. Reserve: B registered and forced down (probed, never answered).
    if first <= 1 {
        clock.begin(1);
        let q = registration.as_deref().unwrap_or_default();
        let path = format!("{}?{q}&forced=down", region::mirror_path(&a.to));
        let done = |code: u16, _: &str| {
            matches!(code, 200 | 201).then(|| Some(format!("{} registered as a standby", a.to)))
        };
        region::every_instance(
            &admin,
            &a.admins,
            reqwest::Method::PUT,
            &path,
            "register",
            done,
        )
        .await
        .map_err(|e| stopped_at(1, e))?;
        clock.end(1);
    }

    // 3. Replicate, 4. validate.
    if first <= 3 {
        clock.begin(2);
        replicate(&http, &a, &a_status_url)
            .await
            .map_err(|e| stopped_at(2, e))?;
        clock.end(2);
        clock.begin(3);
        validate(&http, &a, &a_status_url, &b_base)
            .await
            .map_err(|e| stopped_at(3, e))?;
        clock.end(3);
    }

    // 5. Cut over: B answered, then A drained until its downloads end.
    if first <= 4 {
        clock.begin(4);
        let path = format!("{}/clear", region::mirror_path(&a.to));
        let done =
            |code: u16, _: &str| (code == 200).then(|| Some(format!("{} may be answered", a.to)));
        let cut = async {
            region::every_instance(
                &admin,
                &a.admins,
                reqwest::Method::POST,
                &path,
                "clear",
                done,
            )
            .await?;
            region::wait_in_service(&admin, &a.admins, &a.to, a.cut_over_wait, &a.to_status_url)
                .await?;
            region::drain_and_wait(&admin, &a.admins, &a.from, a.drain_deadline, a.settle).await
        };
        cut.await.map_err(|e| stopped_at(4, e))?;
        clock.end(4);
    }

    // 6. Clean up: A stopped when asked, then removed.
    clock.begin(5);
    let clean = async {
        if let Some(token) = &stop_token {
            stop(&http, &a, &a_status_url, token).await?;
        }
        let gone = format!("{} not registered (done)", a.from);
        let kept = format!(
            "{} is in this instance's config file, which wins: it stays drained; remove its [[mirrors]] block there",
            a.from
        );
        let done = |code: u16, body: &str| match code {
            200 => Some(None),
            404 => Some(Some(gone.clone())),
            409 if body.contains("config file") => Some(Some(kept.clone())),
            _ => None,
        };
        region::every_instance(
            &admin,
            &a.admins,
            reqwest::Method::DELETE,
            &region::mirror_path(&a.from),
            "remove",
            done,
        )
        .await
    };
    clean.await.map_err(|e| stopped_at(5, e))?;
    clock.end(5);
    let times: Vec<String> = clock
        .times
        .iter()
        .map(|(s, d)| format!("{s} {:.2}s", d.as_secs_f64()))
        .collect();
    println!(
        "migrated {} to {} in {:.2}s ({})",
        a.from,
        a.to,
        clock.t0.elapsed().as_secs_f64(),
        times.join(", ")
    );
    Ok(())
}

/// Reads every instance's list. All must answer: a plan made without one
/// of them could not be carried out on it.
async fn look(admin: &Admin, a: &MigrateArgs) -> anyhow::Result<Vec<Seen>> {
    let mut seen = Vec::new();
    let mut missing = Vec::new();
    for u in &a.admins.admin {
        let base = region::base(u).to_owned();
        match admin.mirrors(&base).await {
            Ok(list) => {
                let pick = |id: &str| list.iter().find(|m| m["id"] == id).cloned();
                seen.push(Seen {
                    a: pick(&a.from),
                    b: pick(&a.to),
                    base,
                });
            }
            Err(e) => missing.push(format!("{base}: {e}")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "plan: {} of {} GeoDNS instances not reached ({}); every instance must answer before a migration starts. Nothing was changed; rerun when they are back",
            missing.len(),
            a.admins.admin.len(),
            missing.join("; ")
        );
    }
    Ok(seen)
}

/// Where the migration stands, from what the instances hold:
/// - A listed nowhere, B everywhere: only the clean-up can be left;
/// - A drained somewhere (a cut-over drains A only after B is answered
///   everywhere): the cut-over goes on;
/// - B listed and answered somewhere, A not drained: B's replication is
///   checked again, and validated, before any cut-over;
/// - else from the start (reserving B as a standby).
fn where_to_start(a: &MigrateArgs, seen: &[Seen]) -> anyhow::Result<Start> {
    let a_listed = seen.iter().filter(|s| s.a.is_some()).count();
    let b_listed = seen.iter().filter(|s| s.b.is_some()).count();
    let b_live = seen
        .iter()
        .any(|s| s.b.as_ref().is_some_and(|b| b["forced"] != "down"));
    let a_drained = seen
        .iter()
        .any(|s| s.a.as_ref().is_some_and(|m| m["forced"] == "drain"));
    Ok(if a_listed == 0 && b_listed == seen.len() {
        Start::CleanUp
    } else if a_listed == 0 {
        bail!(
            "plan: no GeoDNS instance lists {} (the mirror to move from); check --from against GET /mirrors",
            a.from
        );
    } else if b_listed > 0 && a_drained {
        Start::CutOver
    } else if b_live {
        Start::Replicate
    } else {
        Start::Reserve
    })
}

fn found(a: &MigrateArgs, seen: &[Seen]) -> String {
    seen.iter()
        .map(|s| {
            let say = |id: &str, m: &Option<Value>| match m {
                None => format!("{id} not listed"),
                Some(m) => format!(
                    "{id} {}{}",
                    m["standing"].as_str().unwrap_or("?"),
                    match m["forced"].as_str() {
                        Some("none") | None => String::new(),
                        Some(f) => format!(" (forced {f})"),
                    }
                ),
            };
            format!("{}: {}, {}", s.base, say(&a.from, &s.a), say(&a.to, &s.b))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// B's registration as a query string: A's fields with B's addresses and
/// URLs.
fn registration_of(a: &MigrateArgs, report: &Value) -> anyhow::Result<String> {
    let Some(fields) = report["fields"].as_object() else {
        bail!(
            "GeoDNS does not report {}'s fields (an older GeoDNS?); register B with `meridian region add` instead",
            a.from
        );
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        if matches!(
            k.as_str(),
            "id" | "ipv4" | "ipv6" | "status_url" | "url" | "forced"
        ) {
            continue;
        }
        let values = match v {
            Value::Array(vs) => vs.clone(),
            Value::Null => Vec::new(),
            v => vec![v.clone()],
        };
        for v in values {
            let s = match v {
                Value::String(s) => s,
                v => v.to_string(),
            };
            q.append_pair(k, &s);
        }
    }
    q.append_pair("status_url", &a.to_status_url);
    for ip in &a.to_ipv4 {
        q.append_pair("ipv4", &ip.to_string());
    }
    for ip in &a.to_ipv6 {
        q.append_pair("ipv6", &ip.to_string());
    }
    if let Some(u) = &a.to_url {
        q.append_pair("url", u);
    }
    Ok(q.finish())
}

/// Waits until B serves A's generation (or a newer one).
async fn replicate(
    http: &reqwest::Client,
    a: &MigrateArgs,
    a_status_url: &str,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut last = String::new();
    let mut b_last: Option<MirrorStatus> = None;
    loop {
        let sa = status(http, a_status_url).await;
        let sb = status(http, &a.to_status_url).await;
        let line = match (&sa, &sb) {
            (Ok(sa), Ok(sb)) => {
                if sb.generation > 0 && sb.generation >= sa.generation {
                    println!(
                        "   {:>6.1}s B serves generation {} (A: {})",
                        t0.elapsed().as_secs_f64(),
                        sb.generation,
                        sa.generation
                    );
                    return Ok(());
                }
                format!(
                    "B: generation {} of A's {}, {}{}",
                    sb.generation,
                    sa.generation,
                    state_word(sb),
                    sb.sync_progress
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default()
                )
            }
            (Err(e), _) => format!("A ({a_status_url}): {e}"),
            (_, Err(e)) => format!("B ({}): {e}", a.to_status_url),
        };
        if let Ok(sb) = sb {
            b_last = Some(sb);
        }
        if line != last {
            println!("   {:>6.1}s {line}", t0.elapsed().as_secs_f64());
            last = line;
        }
        if t0.elapsed() >= a.replicate_deadline {
            let why = match &b_last {
                Some(s) => format!(
                    "B serves generation {}, sync {}{}{}",
                    s.generation,
                    state_word(s),
                    s.last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default(),
                    s.refused
                        .as_ref()
                        .map(|r| format!("; it refused generation {} ({})", r.offered, r.reason))
                        .unwrap_or_default()
                ),
                None => format!("B's status URL {} never answered", a.to_status_url),
            };
            bail!(
                "B did not reach A's generation within {} ({last}): {why}; fix B's upstreams or trust (then SIGHUP it), or give it longer with --replicate-deadline",
                humantime::format_duration(a.replicate_deadline)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// B's root equals A's at the same generation, and a sample of files
/// downloaded from B matches the signed manifest.
async fn validate(
    http: &reqwest::Client,
    a: &MigrateArgs,
    a_status_url: &str,
    b_base: &str,
) -> anyhow::Result<()> {
    let a_base = node_base(a_status_url)?;
    // Both at one generation (one may be a publish ahead for a moment).
    let t0 = Instant::now();
    let (g, sb) = loop {
        let sa = status(http, a_status_url)
            .await
            .map_err(|e| anyhow::anyhow!("A: {e}"))?;
        let sb = status(http, &a.to_status_url)
            .await
            .map_err(|e| anyhow::anyhow!("B: {e}"))?;
        if sa.generation == sb.generation {
            break (sa.generation, sb);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "A and B do not serve the same generation within 60s (A {}, B {}): {}",
                sa.generation,
                sb.generation,
                if sb.generation > sa.generation {
                    "B is ahead of A: does it follow the same origin?"
                } else {
                    "B falls behind"
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let path = format!("/.meridian/v1/generations/{g}");
    let ra = get_bytes(http, &format!("{a_base}{path}"))
        .await
        .map_err(|e| anyhow::anyhow!("A's root of generation {g}: {e}"))?;
    let rb = get_bytes(http, &format!("{b_base}{path}"))
        .await
        .map_err(|e| anyhow::anyhow!("B's root of generation {g}: {e}"))?;
    let keys: Vec<PublicKey> = sb
        .trusted_keys
        .iter()
        .filter_map(|k| k.parse().ok())
        .collect();
    let verifier = Verifier::new(TrustedKeys::new(keys));
    let root_a = verifier
        .open(&ra)
        .map_err(|e| anyhow::anyhow!("A's root of generation {g} does not verify: {e}"))?;
    let root_b = verifier
        .open(&rb)
        .map_err(|e| anyhow::anyhow!("B's root of generation {g} does not verify: {e}"))?;
    if ra != rb {
        bail!(
            "B's root of generation {g} is not A's: B {} (tree {}), A {} (tree {}); B follows another chain (another origin?): rebuild B from an upstream of A's network (empty its state and store, fix its upstreams, restart it), then rerun",
            root_b.hash,
            root_b.root.tree,
            root_a.hash,
            root_a.root.tree
        );
    }
    println!(
        "   generation {g}: B's signed root equals A's (root {}, {} files, {})",
        root_a.hash,
        root_a.root.files,
        human(root_a.root.bytes)
    );
    // The sample, drawn from the manifest as A serves it.
    let files = walk(http, &a_base, root_a.root.tree).await?;
    let picked = pick(&files, a.sample);
    let mut sent = 0u64;
    for (i, (p, size, hash)) in picked.iter().enumerate() {
        let url = format!("{b_base}/{}", meridian_serve::urlpath::encode_path(p));
        let got = download(http, &url, *size, hash)
            .await
            .with_context(|| format!("{p} from B ({url}) does not verify"))?;
        sent += got;
        if picked.len() <= 20 || (i + 1) % (picked.len() / 10).max(1) == 0 {
            println!(
                "   [{}/{}] {p}: {} verified",
                i + 1,
                picked.len(),
                human(got)
            );
        }
    }
    println!(
        "   {} of {} files downloaded from B ({}) match the signed manifest",
        picked.len(),
        files.len(),
        human(sent)
    );
    Ok(())
}

/// The files of the tree under `top` (as many as a bounded walk finds:
/// up to 100,000 files in up to 5,000 directory nodes), each node fetched
/// from `base` and checked against its hash.
async fn walk(
    http: &reqwest::Client,
    base: &str,
    top: Hash,
) -> anyhow::Result<Vec<(String, u64, Hash)>> {
    let mut files = Vec::new();
    let mut dirs = std::collections::VecDeque::from([(String::new(), top)]);
    let mut nodes = 0;
    while let Some((prefix, h)) = dirs.pop_front() {
        if nodes >= 5_000 || files.len() >= 100_000 {
            break;
        }
        nodes += 1;
        let body = get_bytes(http, &format!("{base}/.meridian/v1/objects/{h}"))
            .await
            .map_err(|e| anyhow::anyhow!("directory node {h} from A: {e}"))?;
        if meridian_core::hash_bytes(&body) != h {
            bail!("directory node {h} from A does not match its hash");
        }
        let node = DirNode::decode(&body)
            .map_err(|e| anyhow::anyhow!("directory node {h} from A: {e}"))?;
        for e in &node.entries {
            let p = crate::units::child_path(&prefix, &e.name);
            match e.kind {
                EntryKind::File => files.push((p, e.size, e.hash)),
                EntryKind::Dir => dirs.push_back((p, e.hash)),
                EntryKind::Symlink => {}
            }
        }
    }
    Ok(files)
}

/// `n` files spread over the list at random, the largest always among
/// them (it is the one a slow or cut transfer would show on).
fn pick(files: &[(String, u64, Hash)], n: usize) -> Vec<(String, u64, Hash)> {
    if files.len() <= n {
        return files.to_vec();
    }
    let mut idx: Vec<usize> = Vec::with_capacity(n);
    if let Some((big, _)) = files.iter().enumerate().max_by_key(|(_, f)| f.1) {
        idx.push(big);
    }
    while idx.len() < n {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            // No randomness: evenly spaced instead.
            idx = (0..n).map(|i| i * files.len() / n).collect();
            break;
        }
        let i = (u64::from_le_bytes(b) % files.len() as u64) as usize;
        if !idx.contains(&i) {
            idx.push(i);
        }
    }
    idx.into_iter().map(|i| files[i].clone()).collect()
}

/// Downloads `url` and checks its length and blake3 against the manifest.
async fn download(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    hash: &Hash,
) -> anyhow::Result<u64> {
    let mut r = http
        .get(url)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", meridian_serve::describe(&e)))?;
    if r.status() != reqwest::StatusCode::OK {
        bail!("HTTP {}", r.status());
    }
    let mut h = blake3::Hasher::new();
    let mut got = 0u64;
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| anyhow::anyhow!("{}", meridian_serve::describe(&e)))?
    {
        got += chunk.len() as u64;
        if got > size {
            bail!("more than the {size} bytes the manifest names");
        }
        h.update(&chunk);
    }
    if got != size {
        bail!("{got} bytes, the manifest names {size}");
    }
    let found = Hash(*h.finalize().as_bytes());
    if found != *hash {
        bail!("blake3 {found}, the manifest names {hash}");
    }
    Ok(got)
}

/// Asks A to stop and waits until its status URL no longer answers.
async fn stop(
    http: &reqwest::Client,
    a: &MigrateArgs,
    a_status_url: &str,
    token: &str,
) -> anyhow::Result<()> {
    if a_status_url.is_empty() {
        println!(
            "   {} is no longer listed by GeoDNS; stop it on its host if it still runs",
            a.from
        );
        return Ok(());
    }
    let url = format!("{}/.meridian/admin/stop", node_base(a_status_url)?);
    match http.post(&url).bearer_auth(token).send().await {
        Ok(r) if r.status().is_success() => println!("   {}: asked to stop", a.from),
        Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => bail!(
            "{url}: the mirror token was refused (401): pass A's admin_token with --mirror-token-file"
        ),
        Ok(r) => bail!(
            "{url}: HTTP {} ({}); A's admin API must be on (admin_token in its config)",
            r.status(),
            r.text().await.unwrap_or_default().trim()
        ),
        Err(e) => {
            println!(
                "   {}: {} (already stopped)",
                a.from,
                meridian_serve::describe(&e)
            );
            return Ok(());
        }
    }
    let t0 = Instant::now();
    while status(http, a_status_url).await.is_ok() {
        if t0.elapsed() > a.drain_deadline {
            bail!(
                "{} still answers {a_status_url} {} after it was asked to stop",
                a.from,
                humantime::format_duration(a.drain_deadline)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "   {} stopped after {:.1}s",
        a.from,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn mirror_token(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    match file {
        Some(f) => Ok(std::fs::read_to_string(f)
            .with_context(|| format!("--mirror-token-file {}: cannot read it", f.display()))?
            .trim()
            .to_owned()),
        None => std::env::var("MERIDIAN_MIRROR_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "--stop-from needs A's admin token: pass --mirror-token-file FILE or set MERIDIAN_MIRROR_TOKEN"
            )
        }),
    }
}

/// `http://HOST:PORT` of a status URL `http://HOST:PORT/.meridian/status`.
fn node_base(status_url: &str) -> anyhow::Result<String> {
    match status_url.strip_suffix("/.meridian/status") {
        Some(b) if b.starts_with("http://") || b.starts_with("https://") => Ok(b.to_owned()),
        _ => bail!("status URL {status_url:?}: not http(s)://HOST:PORT/.meridian/status"),
    }
}

async fn status(http: &reqwest::Client, url: &str) -> Result<MirrorStatus, String> {
    let b = get_bytes(http, url).await?;
    serde_json::from_slice(&b).map_err(|e| format!("not a mirror status document ({e})"))
}

async fn get_bytes(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let r = http
        .get(url)
        .send()
        .await
        .map_err(|e| meridian_serve::describe(&e))?;
    if !r.status().is_success() {
        return Err(format!("{url}: HTTP {}", r.status()));
    }
    r.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| meridian_serve::describe(&e))
}

fn state_word(s: &MirrorStatus) -> String {
    serde_json::to_value(s.sync_state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        m: MigrateArgs,
    }

    fn seen(a: Option<&str>, b: Option<&str>) -> Seen {
        let m = |forced: &str| serde_json::json!({ "forced": forced });
        Seen {
            base: "http://g".into(),
            a: a.map(m),
            b: b.map(m),
        }
    }

    #[test]
    fn a_rerun_starts_where_geodns_says_the_last_run_stopped() {
        let args = Cli::parse_from([
            "m",
            "--admin",
            "http://g",
            "--from",
            "a",
            "--to",
            "b",
            "--to-status-url",
            "http://b/.meridian/status",
            "--to-ipv4",
            "127.0.0.1",
        ])
        .m;
        let at = |s: &[Seen]| where_to_start(&args, s).ok();
        // Nothing done yet, or B a standby: from the reservation.
        assert_eq!(at(&[seen(Some("none"), None)]), Some(Start::Reserve));
        assert_eq!(
            at(&[seen(Some("none"), Some("down"))]),
            Some(Start::Reserve)
        );
        // B answered somewhere, A not drained: checked again before a cut-over.
        let partial = [
            seen(Some("none"), Some("none")),
            seen(Some("none"), Some("down")),
        ];
        assert_eq!(at(&partial), Some(Start::Replicate));
        // A drained: the cut-over goes on; A gone everywhere: clean-up.
        assert_eq!(
            at(&[seen(Some("drain"), Some("none"))]),
            Some(Start::CutOver)
        );
        assert_eq!(at(&[seen(None, Some("none"))]), Some(Start::CleanUp));
        // A unknown and B not everywhere: a mistake, said so.
        assert_eq!(at(&[seen(None, None)]), None);
        assert_eq!(at(&[seen(None, Some("none")), seen(None, None)]), None);
    }
}
