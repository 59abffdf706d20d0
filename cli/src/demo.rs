//! `meridian demo`: a whole mirror network on one machine.

use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Flags of `meridian demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep state here between runs (content in DIR/content). Default: a
    /// fresh temporary directory, removed on exit.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Origin HTTP port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub origin_port: u16,
}

/// Demo content: a few files of different sizes, one of 100 MiB.
fn write_demo_content(content: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(content.join("releases/1.0"))?;
    let readme = content.join("README.txt");
    if !readme.exists() {
        std::fs::write(
            &readme,
            "Meridian demo content. Drop files here and watch them propagate.\n",
        )?;
    }
    let small = content.join("releases/1.0/SHA256SUMS");
    if !small.exists() {
        std::fs::write(&small, "placeholder checksums file\n")?;
    }
    let mid = content.join("releases/1.0/tool-1.0.tar.gz");
    if !mid.exists() {
        write_pattern(&mid, 5 << 20, 1)?;
    }
    let big = content.join("releases/1.0/disk-image-1.0.img");
    if !big.exists() {
        eprintln!("creating demo content: 100 MiB disk image ...");
        write_pattern(&big, 100 << 20, 2)?;
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

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (base, _temp) = match &args.dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = std::env::temp_dir().join(format!("meridian-demo-{}", std::process::id()));
            (t.clone(), Some(TempDirGuard(t)))
        }
    };
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let content = base.join("content");
    write_demo_content(&content)?;
    let key_file = base.join("origin.key");
    if !key_file.exists() {
        crate::keygen::generate(&key_file, false)?;
    }
    let origin_addr = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), args.origin_port);
    let mut cfg =
        meridian_origin::OriginConfig::new(content.clone(), base.join("origin-state"), key_file);
    cfg.listen = origin_addr;
    let origin = meridian_origin::Origin::start(cfg).await.with_context(|| {
        format!("cannot start the origin on {origin_addr} (use --origin-port to pick another port)")
    })?;

    println!();
    println!("Meridian demo network is up.");
    println!("  state:       {}", base.display());
    println!("  content:     {}   (drop files here)", content.display());
    println!(
        "  origin:      http://{}/.meridian/health",
        origin.http_addr
    );
    println!("  public key:  {}", origin.public_key);
    println!();
    println!("Try:");
    println!(
        "  curl -s http://{}/.meridian/v1/root | head -c 64 | xxd",
        origin.http_addr
    );
    println!(
        "  curl -s http://{}/.meridian/metrics | grep generation",
        origin.http_addr
    );
    println!(
        "  cp /etc/os-release {}/  # a new generation follows within seconds",
        content.display()
    );
    println!();
    println!("Press Ctrl-C to stop.");
    crate::shutdown_signal().await;
    println!("stopping ...");
    origin.shutdown().await;
    Ok(())
}

struct TempDirGuard(PathBuf);
impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
