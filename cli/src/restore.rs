//! `meridian restore`: rebuild a lost origin from a mirror.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// A mirror (or any node's base URL) to restore from; repeat to try
    /// several in order.
    #[arg(long = "from", value_name = "URL", required = true)]
    from: Vec<String>,
    /// The lost origin's public key (as its mirrors trust it); repeat for
    /// several. Rotations the mirror holds are followed.
    #[arg(long, value_name = "ed25519:KEY", required = true)]
    trust: Vec<meridian_core::PublicKey>,
    /// The new origin's content directory (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    content: PathBuf,
    /// The new origin's state directory. Rerun with the same one to resume
    /// an interrupted restore.
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// Refuse a mirror whose newest generation is below N (the last
    /// generation you know the origin published), so a stale mirror cannot
    /// roll the origin back.
    #[arg(long, value_name = "N", default_value_t = 0)]
    at_least: u64,
    /// Blobs fetched at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    parallel: usize,
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

pub(crate) async fn run(a: RestoreArgs) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let cfg = meridian_mirror::RestoreConfig {
        upstreams: a.from,
        trust: a.trust,
        state: a.state.clone(),
        content: a.content.clone(),
        at_least: a.at_least,
        parallel_fetches: a.parallel,
    };
    let r = meridian_mirror::restore_origin(cfg, move |p| {
        if !tty {
            return; // the log has a progress line every few seconds
        }
        let eta = p
            .eta
            .map_or_else(|| "?".to_owned(), |d| format!("{}s", d.as_secs()));
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[Kfiles {}/{}  {:.1}/{:.1} MB  {:.1} MB/s  ETA {eta}",
            p.files_done,
            p.files_total,
            mb(p.bytes_done),
            mb(p.bytes_total),
            p.bytes_per_sec / 1e6
        );
        let _ = e.flush();
    })
    .await;
    if tty {
        eprintln!();
    }
    let r = r?;
    let seeded = meridian_origin::seed_hash_cache(&a.state, &a.content, &r.written)?;
    println!(
        "restored generation {} from {}: {} files, {:.1} MB in {:.1} s; hash cache seeded for {seeded} files",
        r.generation,
        r.upstream,
        r.files,
        mb(r.bytes),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "next: start the origin on it with the origin's secret key (from your backup):\n  meridian origin --content {} --state {} --key KEY_FILE\nit continues at generation {}",
        a.content.display(),
        a.state.display(),
        r.generation + 1
    );
    Ok(())
}
