//! `meridian`: one binary, one subcommand per role.
#![forbid(unsafe_code)]

mod check;
mod config;
mod demo;
mod get;
mod key;
mod keygen;
mod migrate;
mod probe;
mod region;
mod restore;
mod units;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Meridian: a geo-distributed download mirror network with signed content.
#[derive(Debug, Parser)]
#[command(
    name = "meridian",
    version,
    about,
    long_about = None,
    after_help = "Environment:\n  MERIDIAN_LOG  what to log, as a tracing filter: a level (error, warn, info, debug,\n                trace) and per-module overrides, e.g. `info,meridian_mirror=debug`\n                [default: info]\n  NO_COLOR      set to log without colours (they are off anyway when stderr is\n                not a terminal)\n\nLogs go to stderr. See `meridian <command> --help` for each command."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an ed25519 signing key for an origin.
    ///
    /// Writes the secret key to FILE with mode 0600 and prints the public
    /// key, which mirrors need as `--trust`.
    Keygen {
        /// Where to write the secret key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Rotate or revoke an origin's signing key, or list key statements.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Run an origin: watch a directory and publish signed generations.
    Origin(Box<config::OriginArgs>),
    /// Run a mirror: pull and verify generations, serve downloads.
    Mirror(Box<config::MirrorArgs>),
    /// Run the GeoDNS server (authoritative DNS that steers clients to mirrors).
    Geodns {
        /// TOML config (see deploy/geodns.toml). Reloaded on SIGHUP and on change.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Check the config (and open its GeoIP databases), print a summary
        /// and exit: 0 if it would start, 1 with the reason if not.
        #[arg(long)]
        check: bool,
    },
    /// Add a mirror to the network, or take it out, on every GeoDNS
    /// instance (through their admin APIs).
    #[command(subcommand)]
    Region(region::RegionCommand),
    /// Move a mirror's clients to another mirror (a new host or address)
    /// in six steps: plan, reserve, replicate, validate, cut over, clean up.
    ///
    /// plan: B answers, trusts the key that signs A's roots and has room
    /// for A's store (--dry-run stops here). reserve: B is registered on
    /// every GeoDNS instance as a standby (probed, never answered), with
    /// A's fields and its own addresses. replicate: waits until B serves
    /// A's generation. validate: B's signed root equals A's, and a sample
    /// of files downloaded from B matches the signed manifest. cut over: B
    /// is answered, then A is drained until its downloads finish. clean up:
    /// A is stopped (with --stop-from) and removed.
    ///
    /// A failed step stops the command, says what it found, and leaves A
    /// serving (before the cut-over, B is never answered). The steps'
    /// state is kept by GeoDNS, so the same command run again resumes at
    /// the step it reached.
    Migrate(Box<migrate::MigrateArgs>),
    /// Download files from several mirrors at once, every byte verified
    /// against the signed manifest.
    ///
    /// The mirrors come from a redirector URL (its redirect and its
    /// `Link: rel=duplicate` headers), a mirror's own URL, or --mirror. The
    /// newest fresh root that verifies with --trust names the file's blake3
    /// hash; its block hashes (checked against that hash) check each 256
    /// KiB block as it arrives. A mirror that sends a bad byte is dropped
    /// and its range fetched from another. The file is written under its
    /// own name in the current directory (or -o), atomically; an
    /// interrupted run resumes from what verified. A directory is fetched
    /// whole.
    ///
    /// Exit codes: 0 done; 1 a usage or local error; 3 not found; 4 no
    /// mirror reachable (what verified is kept: rerun to resume); 5
    /// verification failed on every mirror (nothing is kept).
    Get(Box<get::GetArgs>),
    /// Rebuild a lost origin (content and state) from a mirror.
    ///
    /// Fetches the newest root that verifies with --trust, then every node
    /// and blob, each verified; writes the content directory exactly as
    /// published (bytes, directories, symlinks, executable bits, file mtimes) and
    /// an origin state (objects, the newest root, key statements, a seeded
    /// hash cache). Interrupted, it resumes when rerun with the same --state.
    /// The origin started on the result continues at the next generation,
    /// and every mirror follows it.
    Restore(restore::RestoreArgs),
    /// Run a whole demo network on this machine until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Health-check a running part over HTTP (for containers with no curl).
    ///
    /// One GET of URL; exit 0 on a 2xx answer (printed), 1 otherwise, with
    /// the reason. For example `meridian probe
    /// http://127.0.0.1:8080/.meridian/ready` for a mirror's readiness, or
    /// `/.meridian/health` for an origin's or a mirror's liveness.
    Probe {
        /// `http://HOST:PORT/PATH`.
        #[arg(
            env = "MERIDIAN_PROBE_URL",
            default_value = "http://127.0.0.1:8080/.meridian/health"
        )]
        url: String,
        /// Give up after this long, e.g. `3s`.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn init_logging() {
    init_logging_at("info,hickory_server=warn");
}

/// Logging with `default` as the filter unless MERIDIAN_LOG says another.
fn init_logging_at(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal: never in a log file, a pipe
    // or the journal, and never with NO_COLOR set.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause, without a backtrace: what
            // failed, on which input, and (in the message) what to do.
            eprintln!(
                "meridian: error: {}",
                meridian_serve::describe_chain(e.chain())
            );
            match e.downcast_ref::<get::Failure>() {
                Some(f) => std::process::ExitCode::from(f.outcome as u8),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { out, force } => keygen::run(&out, force),
        Command::Key(cmd) => key::run(cmd),
        Command::Region(cmd) => region::run(cmd),
        Command::Migrate(a) => migrate::run(*a),
        Command::Get(a) => {
            init_logging_at("warn");
            get::run(*a)
        }
        Command::Origin(args) => {
            init_logging();
            let (once, check) = (args.once, args.check);
            let cfg = args.clone().into_config()?;
            if check {
                return check::origin(&cfg);
            }
            if once {
                return publish_once(cfg);
            }
            runtime()?.block_on(run_origin(cfg, *args))
        }
        Command::Mirror(args) => {
            init_logging();
            let check = args.check;
            let cfg = args.clone().into_config()?;
            if check {
                return check::mirror(&cfg);
            }
            runtime()?.block_on(run_mirror(cfg, *args))
        }
        Command::Geodns { config, check } => {
            init_logging();
            if check {
                return check::geodns(&config);
            }
            runtime()?.block_on(async {
                let h = meridian_geodns::start(config).await?;
                shutdown_signal().await;
                h.shutdown().await;
                Ok(())
            })
        }
        Command::Restore(args) => {
            init_logging();
            runtime()?.block_on(restore::run(args))
        }
        Command::Demo(args) => {
            init_logging();
            runtime()?.block_on(demo::run(args))
        }
        Command::Probe { url, timeout } => probe::run(&url, timeout),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn publish_once(cfg: meridian_origin::OriginConfig) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let key = meridian_origin::service::load_key(&cfg.key_file)?;
    let mut p = meridian_origin::Publisher::open(cfg, key)?;
    let opened = t0.elapsed();
    let t1 = std::time::Instant::now();
    let outcome = p.publish()?;
    let publish = t1.elapsed();
    p.gc()?;
    match outcome {
        meridian_origin::PublishOutcome::Published {
            generation,
            files_hashed,
            bytes_hashed,
        } => println!(
            "published generation {generation}: hashed {files_hashed} files, {bytes_hashed} bytes; publish {:.3} s (state load {:.3} s)",
            publish.as_secs_f64(),
            opened.as_secs_f64()
        ),
        meridian_origin::PublishOutcome::Unchanged => {
            println!(
                "unchanged; scan {:.3} s (state load {:.3} s)",
                publish.as_secs_f64(),
                opened.as_secs_f64()
            )
        }
    }
    Ok(())
}

async fn run_origin(
    cfg: meridian_origin::OriginConfig,
    args: config::OriginArgs,
) -> anyhow::Result<()> {
    let handle = meridian_origin::Origin::start(cfg).await?;
    tracing::info!(public_key = %handle.public_key, "origin ready");
    until_stopped(|| {
        handle
            .reload(args.clone().into_config()?)
            .map_err(anyhow::Error::from)
    })
    .await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn run_mirror(
    cfg: meridian_mirror::MirrorConfig,
    args: config::MirrorArgs,
) -> anyhow::Result<()> {
    let handle = meridian_mirror::start(cfg).await?;
    tokio::select! {
        r = until_stopped(|| {
            handle
                .reload(args.clone().into_config()?)
                .map_err(anyhow::Error::from)
        }) => r?,
        _ = handle.stop_requested() => tracing::info!("stop asked through the admin API"),
    }
    tracing::info!("draining: finishing in-flight downloads, then exiting");
    handle.shutdown().await;
    Ok(())
}

/// Runs until Ctrl-C or SIGTERM. On SIGHUP, `reload` reads the config
/// file again (with the same flags on top) and puts it in force; it names
/// the settings that take a restart, and a config that does not validate
/// is refused while the running one stays.
async fn until_stopped(
    reload: impl Fn() -> anyhow::Result<Vec<&'static str>>,
) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = hup.recv() => match reload() {
                Ok(kept) if kept.is_empty() => tracing::info!("configuration reloaded"),
                Ok(kept) => tracing::warn!(
                    unchanged = ?kept,
                    "configuration reloaded, but for settings that take a restart"
                ),
                Err(e) => tracing::error!(
                    error = %meridian_serve::describe_chain(e.chain()),
                    "configuration NOT reloaded; the running one stays in force"
                ),
            },
        }
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
