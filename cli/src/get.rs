//! `meridian get`: a download from several mirrors at once in which every
//! byte is checked against a signed manifest before it is kept.
//!
//! 1. **Mirrors.** A redirector URL names them (its `302`'s `Location` and
//!    `Link: rel=duplicate`); a mirror's own URL names that one; `--mirror`
//!    adds more. A path with `--mirror` needs no redirector.
//! 2. **Manifest.** Each mirror's newest signed root is verified with
//!    `--trust` and checked fresh; the newest generation wins. The path is
//!    resolved in its tree, each directory node checked against its hash,
//!    to the file's blake3 hash and size.
//! 3. **Outboard.** For a file of more than one 256 KiB block, the block
//!    chaining values ([`meridian_core::outboard`]) from any mirror, checked
//!    against the file's hash.
//! 4. **Ranges.** Ranges of up to [`RANGE_BLOCKS`] blocks, fetched from the
//!    download path with `If-Match` on the blake3 ETag (a mirror that
//!    serves other bytes there, another generation's, answers 412 and is
//!    left out for this file; the mirror counts it as a download) by
//!    `--connections` workers per mirror, each
//!    block checked as its range arrives and written in place. A mirror
//!    that sends one bad byte is dropped at that range, which goes to
//!    another; one that fails or stalls three times running is dropped as
//!    unreachable.
//! 5. **Resume.** The partial file (`.NAME.meridian-part` beside the
//!    output) is checked block by block when a run starts: what verifies is
//!    kept, the rest fetched. No state file: nothing to damage.
//! 6. **Finish.** Flushed, renamed into place, directory flushed.

use crate::units::human;
use anyhow::Context;
use clap::Args;
use meridian_core::outboard::{self, BLOCK_LEN, Outboard};
use meridian_core::{DirNode, EntryKind, Hash, PublicKey, TrustedKeys, VerifiedRoot, Verifier};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Blocks per range: 4 MiB.
const RANGE_BLOCKS: u64 = 16;
/// Failures in a row after which a mirror is dropped as unreachable.
const MAX_FAILURES: u32 = 3;

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// What to download: a redirector URL (`http://dl.example.org/PATH`),
    /// a mirror's URL of the file, or a PATH in the published tree with
    /// --mirror. A directory is fetched whole. Repeat for more.
    #[arg(required = true, value_name = "URL|PATH")]
    pub sources: Vec<String>,
    /// A public key the origin signs with, `ed25519:…` (repeat, or
    /// comma-separate in MERIDIAN_TRUST). Nothing is kept unless it
    /// verifies against a root signed by one of them.
    #[arg(
        long,
        value_name = "KEY",
        env = "MERIDIAN_TRUST",
        value_delimiter = ',',
        required = true
    )]
    pub trust: Vec<String>,
    /// A mirror's base URL, `http://HOST:PORT`, to fetch from besides the
    /// ones a redirector names (repeat for more).
    #[arg(long, value_name = "URL")]
    pub mirror: Vec<String>,
    /// Where to write: a file name for one file, a directory for a
    /// directory or several sources [default: the name in the current
    /// directory].
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Connections per mirror.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub connections: usize,
    /// Drop a connection that sends nothing for this long (its range goes
    /// to another).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Print what was fetched from which mirror at the end (a progress bar
    /// shows on a terminal anyway).
    #[arg(short, long)]
    pub verbose: bool,
}

/// How `meridian get` ends, as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The path is in no verified tree (or the redirector says 404).
    NotFound = 3,
    /// No mirror answered (or every one that did failed or stalled).
    Unreachable = 4,
    /// Every mirror that answered sent bytes (or a root) that do not
    /// verify.
    VerifyFailed = 5,
}

/// An error with its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub outcome: Outcome,
    msg: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Failure {}

fn fail(outcome: Outcome, msg: impl Into<String>) -> anyhow::Error {
    Failure {
        outcome,
        msg: msg.into(),
    }
    .into()
}

pub(crate) fn run(a: GetArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(get(a))
}

/// One mirror, as a download sees it.
#[derive(Debug)]
struct Mirror {
    base: String,
    /// Dropped for the current file, and why.
    dropped: Mutex<Option<Drop>>,
    /// Dropped for every file: it sent bytes that do not verify.
    liar: AtomicBool,
    failures: AtomicUsize,
    bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drop {
    Lied,
    Unreachable,
    Lacks,
}

impl Mirror {
    fn new(base: String) -> Arc<Self> {
        Arc::new(Mirror {
            base,
            dropped: Mutex::new(None),
            liar: AtomicBool::new(false),
            failures: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
        })
    }
    fn live(&self) -> bool {
        !self.liar.load(Ordering::Relaxed) && self.dropped.lock().is_ok_and(|d| d.is_none())
    }
    fn drop_for(&self, why: Drop) {
        if why == Drop::Lied {
            self.liar.store(true, Ordering::Relaxed);
        }
        if let Ok(mut d) = self.dropped.lock() {
            d.get_or_insert(why);
        }
    }
}

/// What to fetch: a file of the verified tree, and where it goes.
struct Job {
    path: String,
    size: u64,
    hash: Hash,
    executable: bool,
    dest: PathBuf,
}

async fn get(a: GetArgs) -> anyhow::Result<()> {
    let keys: Vec<PublicKey> = a
        .trust
        .iter()
        .map(|k| {
            k.trim().parse().map_err(|e| {
                anyhow::anyhow!(
                    "--trust {k:?}: {e} (give the `ed25519:…` key that `meridian keygen` printed)"
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let verifier = Verifier::new(TrustedKeys::new(keys));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(a.connections.max(1) * 2)
        .build()?;
    let several = a.sources.len() > 1;
    let mut jobs = Vec::new();
    let mut all_mirrors: Vec<Arc<Mirror>> = Vec::new();
    for src in &a.sources {
        let (path, bases) = discover(&http, src, &a.mirror).await?;
        let mirrors: Vec<Arc<Mirror>> = bases
            .into_iter()
            .map(|b| match all_mirrors.iter().find(|m| m.base == b) {
                Some(m) => m.clone(),
                None => {
                    let m = Mirror::new(b);
                    all_mirrors.push(m.clone());
                    m
                }
            })
            .collect();
        let root = newest_root(&http, &verifier, &mirrors).await?;
        let found = resolve(&http, &mirrors, &root, &path).await?;
        let out_base = match (&a.output, several) {
            (Some(o), false) => Some(o.clone()),
            (Some(o), true) => Some(o.join(last_name(&path))),
            (None, _) => None,
        };
        match found {
            Found::File(e) => {
                let dest = out_base.unwrap_or_else(|| PathBuf::from(last_name(&path)));
                jobs.push(Job {
                    path: path.clone(),
                    size: e.size,
                    hash: e.hash,
                    executable: e.executable,
                    dest,
                });
            }
            Found::Dir(node) => {
                let dir = out_base.unwrap_or_else(|| PathBuf::from(last_name(&path)));
                for (rel, e) in walk(&http, &mirrors, node, &path).await? {
                    jobs.push(Job {
                        dest: dir.join(&rel),
                        path: if path.is_empty() {
                            rel
                        } else {
                            format!("{path}/{rel}")
                        },
                        size: e.size,
                        hash: e.hash,
                        executable: e.executable,
                    });
                }
            }
        }
        // Fetch this source's files now, with its mirrors.
        let t0 = Instant::now();
        let mut bytes = 0;
        for job in jobs.drain(..) {
            bytes += fetch_file(&http, &mirrors, &job, &a).await?;
        }
        if a.verbose {
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "{src}: {} verified in {secs:.2}s ({:.1} MB/s) from generation {}",
                human(bytes),
                bytes as f64 / secs.max(1e-9) / 1e6,
                root.root.generation
            );
            for m in &mirrors {
                let why = m.dropped.lock().ok().and_then(|d| *d);
                eprintln!(
                    "  {}: {}{}",
                    m.base,
                    human(m.bytes.load(Ordering::Relaxed)),
                    match why {
                        Some(Drop::Lied) => " (dropped: sent bytes that do not verify)",
                        Some(Drop::Unreachable) => " (dropped: failed or stalled)",
                        Some(Drop::Lacks) => " (does not hold the file)",
                        None => "",
                    }
                );
            }
        }
    }
    Ok(())
}

/// The path a source names (normalised, no leading slash) and the mirror
/// bases to fetch it from.
async fn discover(
    http: &reqwest::Client,
    src: &str,
    extra: &[String],
) -> anyhow::Result<(String, Vec<String>)> {
    let mut bases: Vec<String> = extra
        .iter()
        .map(|m| m.trim_end_matches('/').to_owned())
        .collect();
    let Some(rest) = src
        .strip_prefix("http://")
        .or_else(|| src.strip_prefix("https://"))
    else {
        let path = normal(src)?;
        if bases.is_empty() {
            anyhow::bail!(
                "{src:?} is a path: name a mirror with --mirror http://HOST:PORT, or give a redirector URL"
            );
        }
        return Ok((path, bases));
    };
    let scheme_len = src.len() - rest.len();
    let (authority, raw_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let raw_path = raw_path.split(['?', '#']).next().unwrap_or("/");
    let path = normal(raw_path)?;
    let origin = format!("{}{authority}", &src[..scheme_len]);
    let r = http.head(src).send().await.map_err(|e| {
        fail(
            Outcome::Unreachable,
            format!("{src}: {}", meridian_serve::describe(&e)),
        )
    });
    let r = match r {
        Ok(r) => r,
        Err(e) if bases.is_empty() => return Err(e),
        Err(e) => {
            eprintln!("meridian: {e}; trying the --mirror list");
            return Ok((path, bases));
        }
    };
    let status = r.status();
    if status.is_redirection() {
        // A redirector: the target and the duplicates, each a mirror base
        // plus the path as it encodes it.
        let enc = format!("/{}", meridian_serve::urlpath::encode_path(&path));
        let mut urls: Vec<String> = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .into_iter()
            .collect();
        for v in r.headers().get_all(reqwest::header::LINK) {
            let Ok(v) = v.to_str() else { continue };
            for link in v.split(',') {
                if link.contains("rel=duplicate")
                    && let Some(u) = link
                        .trim()
                        .strip_prefix('<')
                        .and_then(|l| l.split_once('>'))
                {
                    urls.push(u.0.to_owned());
                }
            }
        }
        for u in urls {
            let u = u.trim_end_matches('/');
            let enc = enc.trim_end_matches('/');
            if let Some(b) = u.strip_suffix(enc).filter(|b| !b.is_empty())
                && !bases.iter().any(|x| x == b)
            {
                bases.push(b.to_owned());
            }
        }
        if bases.is_empty() {
            return Err(fail(
                Outcome::Unreachable,
                format!("{src}: the redirect names no mirror of this path"),
            ));
        }
    } else if status.is_success() {
        // A mirror's own URL.
        if !bases.contains(&origin) {
            bases.insert(0, origin);
        }
    } else if status == reqwest::StatusCode::NOT_FOUND {
        return Err(fail(
            Outcome::NotFound,
            format!("{src}: not found (HTTP 404)"),
        ));
    } else if bases.is_empty() {
        return Err(fail(
            Outcome::Unreachable,
            format!(
                "{src}: HTTP {status}{}",
                if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                    ": no usable mirror has it now; try again later"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok((path, bases))
}

fn normal(p: &str) -> anyhow::Result<String> {
    let raw = if p.starts_with('/') {
        p.to_owned()
    } else {
        format!("/{p}")
    };
    let (n, _) = meridian_serve::urlpath::normalise(&raw).ok_or_else(|| {
        anyhow::anyhow!("{p:?}: not a valid path (.. above the top, or a bad escape)")
    })?;
    Ok(n.into_owned())
}

fn last_name(path: &str) -> String {
    path.rsplit('/')
        .find(|s| !s.is_empty())
        .unwrap_or("meridian-download")
        .to_owned()
}

/// The newest fresh root that verifies, of all the mirrors'. Mirrors whose
/// root does not verify are dropped for good.
async fn newest_root(
    http: &reqwest::Client,
    verifier: &Verifier,
    mirrors: &[Arc<Mirror>],
) -> anyhow::Result<VerifiedRoot> {
    let now = meridian_serve::unix_now();
    let fetches = mirrors.iter().map(|m| async move {
        let url = format!("{}/.meridian/v1/root", m.base);
        (m, get_bytes(http, &url, 1 << 20).await)
    });
    let mut best: Option<VerifiedRoot> = None;
    let mut problems = Vec::new();
    let mut answered = 0;
    for (m, r) in futures_util::future::join_all(fetches).await {
        match r {
            Ok(env) => {
                answered += 1;
                match verifier
                    .open(&env)
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        meridian_core::check_fresh(&v.root, now)
                            .map(|_| v)
                            .map_err(|e| e.to_string())
                    }) {
                    Ok(v) => {
                        if best
                            .as_ref()
                            .is_none_or(|b| v.root.generation > b.root.generation)
                        {
                            best = Some(v);
                        }
                    }
                    Err(e) => {
                        m.drop_for(Drop::Lied);
                        problems.push(format!("{}: its root does not verify: {e}", m.base));
                    }
                }
            }
            Err(e) => {
                m.drop_for(Drop::Unreachable);
                problems.push(format!("{}: {e}", m.base));
            }
        }
    }
    match best {
        Some(b) => {
            for p in &problems {
                tracing::warn!("{p}");
            }
            Ok(b)
        }
        None if answered == 0 => Err(fail(
            Outcome::Unreachable,
            format!("no mirror answered: {}", problems.join("; ")),
        )),
        None => Err(fail(
            Outcome::VerifyFailed,
            format!(
                "no mirror serves a fresh root that verifies with --trust: {} (is --trust the origin's key?)",
                problems.join("; ")
            ),
        )),
    }
}

enum Found {
    File(meridian_core::Entry),
    Dir(Hash),
}

/// A directory node by hash, from the first live mirror that sends one
/// that matches.
async fn node(http: &reqwest::Client, mirrors: &[Arc<Mirror>], h: Hash) -> anyhow::Result<DirNode> {
    let mut problems = Vec::new();
    for m in mirrors.iter().filter(|m| !m.liar.load(Ordering::Relaxed)) {
        let url = format!("{}/.meridian/v1/objects/{h}", m.base);
        match get_bytes(http, &url, meridian_core::MAX_NODE_BYTES as usize).await {
            Ok(b) if meridian_core::hash_bytes(&b) == h => match DirNode::decode(&b) {
                Ok(n) => return Ok(n),
                Err(e) => problems.push(format!("{}: node {h}: {e}", m.base)),
            },
            Ok(_) => {
                m.drop_for(Drop::Lied);
                problems.push(format!("{}: node {h} does not match its hash", m.base));
            }
            Err(e) => problems.push(format!("{}: node {h}: {e}", m.base)),
        }
    }
    Err(fail(
        Outcome::Unreachable,
        format!("no mirror sent directory node {h}: {}", problems.join("; ")),
    ))
}

/// `path` in `root`'s tree, each node checked.
async fn resolve(
    http: &reqwest::Client,
    mirrors: &[Arc<Mirror>],
    root: &VerifiedRoot,
    path: &str,
) -> anyhow::Result<Found> {
    let mut at = root.root.tree;
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, name) in parts.iter().enumerate() {
        let n = node(http, mirrors, at).await?;
        let Some(e) = n.get(name) else {
            return Err(fail(
                Outcome::NotFound,
                format!(
                    "/{path}: not in generation {} (no {name:?} in /{})",
                    root.root.generation,
                    parts[..i].join("/")
                ),
            ));
        };
        match e.kind {
            EntryKind::Dir => at = e.hash,
            EntryKind::File if i + 1 == parts.len() => return Ok(Found::File(e.clone())),
            EntryKind::File => {
                return Err(fail(
                    Outcome::NotFound,
                    format!("/{path}: /{} is a file", parts[..=i].join("/")),
                ));
            }
            EntryKind::Symlink => {
                return Err(fail(
                    Outcome::NotFound,
                    format!(
                        "/{path}: /{} is a symlink to {:?}: get what it points to",
                        parts[..=i].join("/"),
                        e.target.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
    }
    Ok(Found::Dir(at))
}

/// Every file under directory node `top`, by path relative to it.
async fn walk(
    http: &reqwest::Client,
    mirrors: &[Arc<Mirror>],
    top: Hash,
    shown: &str,
) -> anyhow::Result<Vec<(String, meridian_core::Entry)>> {
    let mut out = Vec::new();
    let mut dirs = VecDeque::from([(String::new(), top)]);
    while let Some((prefix, h)) = dirs.pop_front() {
        let n = node(http, mirrors, h).await?;
        for e in &n.entries {
            let rel = crate::units::child_path(&prefix, &e.name);
            match e.kind {
                EntryKind::File => out.push((rel, e.clone())),
                EntryKind::Dir => dirs.push_back((rel, e.hash)),
                EntryKind::Symlink => {
                    tracing::info!("/{shown}/{rel}: a symlink, not fetched");
                }
            }
        }
    }
    Ok(out)
}

/// The blocks still to fetch of one file, handed out as ranges.
struct Work {
    ranges: VecDeque<(u64, u64)>,
    /// Blocks not yet verified (queued or in flight).
    left: u64,
}

struct FileRun<'a> {
    job: &'a Job,
    file: Arc<std::fs::File>,
    outboard: Option<Arc<Outboard>>,
    work: Mutex<Work>,
    changed: tokio::sync::Notify,
    /// Bytes checked and written by this run (the progress bar's).
    verified: Arc<AtomicU64>,
}

/// Fetches one file to `job.dest`; returns the bytes fetched.
async fn fetch_file(
    http: &reqwest::Client,
    mirrors: &[Arc<Mirror>],
    job: &Job,
    a: &GetArgs,
) -> anyhow::Result<u64> {
    for m in mirrors {
        if let Ok(mut d) = m.dropped.lock()
            && *d != Some(Drop::Lied)
        {
            *d = None;
        }
        m.failures.store(0, Ordering::Relaxed);
    }
    let dest = job.dest.clone();
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow::anyhow!("{}: not a file name", dest.display()))?;
    let part = dir.join(format!(".{name}.meridian-part"));
    // Already there and verified: nothing to do (a rerun of a directory).
    {
        let (d, h) = (dest.clone(), job.hash);
        let size = job.size;
        let same = tokio::task::spawn_blocking(move || {
            // Streamed: a file of any size costs a buffer, not its length.
            let Ok(f) = std::fs::File::open(&d) else {
                return false;
            };
            f.metadata().is_ok_and(|m| m.len() == size)
                && blake3::Hasher::new()
                    .update_reader(f)
                    .is_ok_and(|hs| Hash(*hs.finalize().as_bytes()) == h)
        })
        .await
        .unwrap_or(false);
        if same {
            return Ok(0);
        }
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let outboard = if job.size > BLOCK_LEN {
        Some(Arc::new(fetch_outboard(http, mirrors, job).await?))
    } else {
        None
    };
    // A partial file left by an earlier run is checked block by block; a
    // new one holds nothing yet.
    let resuming = part.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part)
        .with_context(|| format!("{}: cannot open the partial file", part.display()))?;
    file.set_len(job.size)
        .with_context(|| format!("{}: cannot size it (disk full?)", part.display()))?;
    let file = Arc::new(file);
    // What a run before this one left verified.
    let done = if resuming {
        let (f, o, size, h) = (file.clone(), outboard.clone(), job.size, job.hash);
        tokio::task::spawn_blocking(move || verified_blocks(&f, o.as_deref(), size, &h))
            .await
            .context("checking the partial file")??
    } else {
        vec![false; outboard::blocks(job.size) as usize]
    };
    let n_blocks = outboard::blocks(job.size);
    // Ranges of up to 4 MiB while much is left, tapering to one block at
    // the end: every connection gets some, and the last ranges are short,
    // so no connection idles long while another finishes a big one.
    let live: Vec<&Arc<Mirror>> = mirrors.iter().filter(|m| m.live()).collect();
    let conns = (live.len() * a.connections.max(1)).max(1) as u64;
    let mut unassigned = done.iter().filter(|d| !**d).count() as u64;
    let mut ranges = VecDeque::new();
    let mut i = 0;
    while i < n_blocks {
        if done[i as usize] {
            i += 1;
            continue;
        }
        let per_range = (unassigned / (2 * conns)).clamp(1, RANGE_BLOCKS);
        let start = i;
        while i < n_blocks && !done[i as usize] && i - start < per_range {
            i += 1;
        }
        ranges.push_back((start, i - start));
        unassigned -= i - start;
    }
    let left: u64 = ranges.iter().map(|r| r.1).sum();
    let kept = done.iter().filter(|d| **d).count() as u64;
    if kept > 0 && a.verbose {
        eprintln!(
            "{}: resuming: {} of {} blocks already verified in {}",
            job.path,
            kept,
            n_blocks,
            part.display()
        );
    }
    let run = Arc::new(FileRun {
        job,
        file,
        outboard,
        work: Mutex::new(Work { ranges, left }),
        changed: tokio::sync::Notify::new(),
        verified: Arc::new(AtomicU64::new(0)),
    });
    let before: u64 = mirrors
        .iter()
        .map(|m| m.bytes.load(Ordering::Relaxed))
        .sum();
    let progress = progress_bar(&run);
    // The workers borrow the run for this scope only.
    // Each mirror's first connection, then each one's second, …: the
    // first ranges go to every mirror.
    let workers = (0..a.connections.max(1))
        .flat_map(|_| live.iter().copied())
        .map(|m| worker(http, m, &run, mirrors, a.stall_timeout));
    futures_util::future::join_all(workers).await;
    if let Some(p) = progress {
        p.finish();
    }
    let fetched = mirrors
        .iter()
        .map(|m| m.bytes.load(Ordering::Relaxed))
        .sum::<u64>()
        - before;
    let left = run.work.lock().map(|w| w.left).unwrap_or(1);
    if left > 0 {
        let all_lied = mirrors.iter().all(|m| m.liar.load(Ordering::Relaxed));
        let reasons: Vec<String> = mirrors
            .iter()
            .map(|m| {
                let d = if m.liar.load(Ordering::Relaxed) {
                    Some(Drop::Lied)
                } else {
                    m.dropped.lock().ok().and_then(|d| *d)
                };
                format!(
                    "{}: {}",
                    m.base,
                    match d {
                        Some(Drop::Lied) => "sent bytes that do not verify",
                        Some(Drop::Lacks) => "does not hold it",
                        _ => "failed or stalled",
                    }
                )
            })
            .collect();
        if all_lied {
            drop(run);
            let _ = std::fs::remove_file(&part);
            return Err(fail(
                Outcome::VerifyFailed,
                format!(
                    "/{}: every mirror sent bytes that do not verify against the signed hash {}; nothing was kept ({})",
                    job.path,
                    job.hash,
                    reasons.join("; ")
                ),
            ));
        }
        let outcome = if mirrors.iter().all(|m| {
            m.liar.load(Ordering::Relaxed)
                || m.dropped.lock().is_ok_and(|d| *d == Some(Drop::Lacks))
        }) {
            Outcome::NotFound
        } else {
            Outcome::Unreachable
        };
        return Err(fail(
            outcome,
            format!(
                "/{}: {left} of {n_blocks} blocks not fetched, no mirror left to ask ({}); what verified is kept in {}: rerun to resume",
                job.path,
                reasons.join("; "),
                part.display()
            ),
        ));
    }
    let (file, part2, dest2, exec) = (run.file.clone(), part.clone(), dest.clone(), job.executable);
    drop(run);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        file.sync_all()
            .with_context(|| format!("{}: cannot flush it", part2.display()))?;
        if exec {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata()?.permissions().mode() | 0o111;
            std::fs::set_permissions(&part2, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::rename(&part2, &dest2).with_context(|| {
            format!(
                "{}: cannot rename it to {}",
                part2.display(),
                dest2.display()
            )
        })?;
        let d = dest2
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(d).and_then(|d| d.sync_all()).ok();
        Ok(())
    })
    .await
    .context("finishing the file")??;
    Ok(fetched)
}

/// The outboard of `job`'s file, from the first mirror whose copy checks.
async fn fetch_outboard(
    http: &reqwest::Client,
    mirrors: &[Arc<Mirror>],
    job: &Job,
) -> anyhow::Result<Outboard> {
    let mut problems = Vec::new();
    let want = 5 + 32 * outboard::blocks(job.size) as usize;
    for m in mirrors.iter().filter(|m| m.live()) {
        let url = format!("{}/.meridian/v1/outboard/{}", m.base, job.hash);
        match get_bytes(http, &url, want).await {
            Ok(b) => match Outboard::check(&b, job.size, &job.hash) {
                Ok(o) => return Ok(o),
                Err(e) => {
                    m.drop_for(Drop::Lied);
                    problems.push(format!("{}: {e}", m.base));
                }
            },
            Err(e) if e.contains("HTTP 404") => {
                m.drop_for(Drop::Lacks);
                problems.push(format!("{}: does not hold it", m.base));
            }
            Err(e) => problems.push(format!("{}: {e}", m.base)),
        }
    }
    let outcome = if mirrors.iter().all(|m| m.liar.load(Ordering::Relaxed)) {
        Outcome::VerifyFailed
    } else if mirrors
        .iter()
        .all(|m| m.dropped.lock().is_ok_and(|d| *d == Some(Drop::Lacks)))
    {
        Outcome::NotFound
    } else {
        Outcome::Unreachable
    };
    Err(fail(
        outcome,
        format!(
            "/{}: no mirror sent the block hashes of blob {}: {}",
            job.path,
            job.hash,
            problems.join("; ")
        ),
    ))
}

/// Which blocks of the partial file already hold the right bytes.
fn verified_blocks(
    f: &std::fs::File,
    o: Option<&Outboard>,
    size: u64,
    hash: &Hash,
) -> anyhow::Result<Vec<bool>> {
    let n = outboard::blocks(size);
    let mut done = vec![false; n as usize];
    let mut buf = vec![0u8; BLOCK_LEN as usize];
    for (i, d) in done.iter_mut().enumerate() {
        let r = outboard::block_range(i as u64, size);
        let b = &mut buf[..(r.end - r.start) as usize];
        f.read_exact_at(b, r.start)
            .context("reading the partial file")?;
        *d = match o {
            Some(o) => o.verify_block(i as u64, b),
            None => outboard::verify_whole(b, hash),
        };
    }
    Ok(done)
}

/// One connection's loop: take a range, fetch it, check it, write it.
async fn worker(
    http: &reqwest::Client,
    m: &Arc<Mirror>,
    run: &Arc<FileRun<'_>>,
    mirrors: &[Arc<Mirror>],
    stall: Duration,
) {
    loop {
        if !m.live() {
            return;
        }
        let next = {
            let Ok(mut w) = run.work.lock() else { return };
            if w.left == 0 {
                return;
            }
            w.ranges.pop_front()
        };
        let Some((first, count)) = next else {
            // All handed out: wait until one comes back or all are done.
            let wait = run.changed.notified();
            if run
                .work
                .lock()
                .map(|w| w.left == 0 || !w.ranges.is_empty())
                .unwrap_or(true)
            {
                continue;
            }
            if mirrors.iter().all(|x| !x.live()) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), wait).await;
            continue;
        };
        match fetch_range(http, m, run, first, count, stall).await {
            Ok(()) => {
                m.failures.store(0, Ordering::Relaxed);
                let Ok(mut w) = run.work.lock() else { return };
                w.left -= count;
                drop(w);
                run.changed.notify_waiters();
            }
            Err((bad, why)) => {
                // Give back what did not verify (the blocks before it are
                // written and counted).
                if let Ok(mut w) = run.work.lock() {
                    w.left -= bad.0 - first;
                    w.ranges.push_front((bad.0, count - (bad.0 - first)));
                }
                run.changed.notify_waiters();
                match why {
                    RangeError::Lied => {
                        tracing::warn!(
                            "{}: blocks {}..{} of /{} do not verify: mirror dropped, the range goes to another",
                            m.base,
                            bad.0,
                            first + count,
                            run.job.path
                        );
                        m.drop_for(Drop::Lied);
                        return;
                    }
                    RangeError::Lacks => {
                        m.drop_for(Drop::Lacks);
                        return;
                    }
                    RangeError::Failed(e) => {
                        let n = m.failures.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::info!("{}: /{}: {e} ({n} in a row)", m.base, run.job.path);
                        if n as u32 >= MAX_FAILURES {
                            m.drop_for(Drop::Unreachable);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100 * n as u64)).await;
                    }
                }
            }
        }
    }
}

enum RangeError {
    Lied,
    Lacks,
    Failed(String),
}

/// Fetches blocks `first .. first + count`; on error, the first block not
/// written.
async fn fetch_range(
    http: &reqwest::Client,
    m: &Mirror,
    run: &FileRun<'_>,
    first: u64,
    count: u64,
    stall: Duration,
) -> Result<(), ((u64,), RangeError)> {
    let size = run.job.size;
    let start = first * BLOCK_LEN;
    let end = ((first + count) * BLOCK_LEN).min(size);
    // The download path, so the mirror counts it as a download; If-Match
    // with the blake3 ETag, so a mirror serving other bytes at that path
    // (another generation) answers 412 instead of them.
    let url = format!(
        "{}/{}",
        m.base,
        meridian_serve::urlpath::encode_path(&run.job.path)
    );
    let failed = |e: String| ((first,), RangeError::Failed(e));
    let req = http
        .get(&url)
        .header(reqwest::header::IF_MATCH, format!("\"{}\"", run.job.hash))
        .header(
            reqwest::header::RANGE,
            format!("bytes={start}-{}", end.max(1) - 1),
        );
    let mut r = tokio::time::timeout(stall, req.send())
        .await
        .map_err(|_| failed(format!("no answer in {stall:?}")))?
        .map_err(|e| failed(meridian_serve::describe(&e)))?;
    match r.status() {
        reqwest::StatusCode::PARTIAL_CONTENT => {}
        reqwest::StatusCode::OK if start == 0 && end == size => {}
        reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::PRECONDITION_FAILED => {
            return Err(((first,), RangeError::Lacks));
        }
        s => return Err(failed(format!("HTTP {s}"))),
    }
    let want = (end - start) as usize;
    let mut buf: Vec<u8> = Vec::with_capacity(want);
    let mut next_block = first;
    loop {
        let chunk = tokio::time::timeout(stall, r.chunk())
            .await
            .map_err(|_| {
                (
                    (next_block,),
                    RangeError::Failed(format!("stalled for {stall:?}")),
                )
            })?
            .map_err(|e| {
                (
                    (next_block,),
                    RangeError::Failed(meridian_serve::describe(&e)),
                )
            })?;
        let Some(c) = chunk else { break };
        if buf.len() + c.len() > want {
            // More than asked for: not the range (or endless).
            return Err(((next_block,), RangeError::Lied));
        }
        buf.extend_from_slice(&c);
        m.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
        // Check and write each whole block as soon as it is in.
        let whole = ((buf.len() as u64 + start) / BLOCK_LEN).min(first + count);
        let ready_to = if buf.len() == want {
            first + count
        } else {
            whole
        };
        if ready_to > next_block {
            next_block = check_and_write(run, start, &buf, next_block, ready_to).await?;
        }
    }
    if buf.len() < want {
        return Err((
            (next_block,),
            RangeError::Failed(format!("cut short at {} of {want} bytes", buf.len())),
        ));
    }
    if next_block < first + count {
        next_block = check_and_write(run, start, &buf, next_block, first + count).await?;
    }
    let _ = next_block;
    Ok(())
}

/// Checks blocks `from .. to` (held in `buf`, which starts at byte
/// `start`) and writes them; returns `to`, or the first that failed.
async fn check_and_write(
    run: &FileRun<'_>,
    start: u64,
    buf: &[u8],
    from: u64,
    to: u64,
) -> Result<u64, ((u64,), RangeError)> {
    let size = run.job.size;
    let lo = (outboard::block_range(from, size).start - start) as usize;
    let hi = (outboard::block_range(to - 1, size).end - start) as usize;
    let data = buf[lo..hi].to_vec();
    let (file, o, hash) = (run.file.clone(), run.outboard.clone(), run.job.hash);
    let res = tokio::task::spawn_blocking(move || -> Result<u64, (u64, bool)> {
        let mut off = 0usize;
        for i in from..to {
            let r = outboard::block_range(i, size);
            let len = (r.end - r.start) as usize;
            let b = &data[off..off + len];
            let ok = match &o {
                Some(o) => o.verify_block(i, b),
                None => outboard::verify_whole(b, &hash),
            };
            if !ok {
                return Err((i, true));
            }
            if file.write_all_at(b, r.start).is_err() {
                return Err((i, false));
            }
            off += len;
        }
        Ok(to)
    })
    .await
    .map_err(|e| ((from,), RangeError::Failed(e.to_string())))?;
    match res {
        Ok(t) => {
            let bytes =
                outboard::block_range(from, size).start..outboard::block_range(to - 1, size).end;
            run.verified
                .fetch_add(bytes.end - bytes.start, Ordering::Relaxed);
            Ok(t)
        }
        Err((i, true)) => {
            let done =
                outboard::block_range(from, size).start..outboard::block_range(i, size).start;
            run.verified
                .fetch_add(done.end - done.start, Ordering::Relaxed);
            Err(((i,), RangeError::Lied))
        }
        Err((i, false)) => Err((
            (i,),
            RangeError::Failed("cannot write the partial file (disk full?)".into()),
        )),
    }
}

/// On a terminal, a line redrawn every 200 ms: verified bytes and rate.
/// Stopping it ([`Bar::finish`]) draws the last state and ends the line.
struct Bar {
    task: tokio::task::JoinHandle<()>,
    draw: Box<dyn Fn() + Send + Sync>,
}

impl Bar {
    fn finish(self) {
        self.task.abort();
        (self.draw)();
        eprintln!();
    }
}

fn progress_bar(run: &FileRun<'_>) -> Option<Bar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let total = run.job.size;
    let name = last_name(&run.job.path);
    let verified = run.verified.clone();
    let t0 = Instant::now();
    let draw = move || {
        let done = verified.load(Ordering::Relaxed);
        eprint!(
            "\r{name}: {:>3}% {}/{} {:.1} MB/s   ",
            done * 100 / total.max(1),
            human(done),
            human(total),
            done as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e6
        );
    };
    let draw: Arc<dyn Fn() + Send + Sync> = Arc::new(draw);
    let d = draw.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            d();
        }
    });
    Some(Bar {
        task,
        draw: Box::new(move || draw()),
    })
}

async fn get_bytes(http: &reqwest::Client, url: &str, limit: usize) -> Result<Vec<u8>, String> {
    let mut r = tokio::time::timeout(Duration::from_secs(30), http.get(url).send())
        .await
        .map_err(|_| format!("{url}: no answer in 30s"))?
        .map_err(|e| meridian_serve::describe(&e))?;
    if !r.status().is_success() {
        return Err(format!("{url}: HTTP {}", r.status()));
    }
    let mut out = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(30), r.chunk())
        .await
        .map_err(|_| format!("{url}: stalled"))?
        .map_err(|e| meridian_serve::describe(&e))?
    {
        if out.len() + c.len() > limit {
            return Err(format!("{url}: more than {limit} bytes"));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}
