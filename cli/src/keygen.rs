//! `meridian keygen`.

use anyhow::{Context, bail};
use meridian_core::SecretKey;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes a new secret key (0600) and prints the public key.
pub fn run(out: &Path, force: bool) -> anyhow::Result<()> {
    let key = generate(out, force)?;
    println!("secret key written to {} (mode 0600)", out.display());
    println!("public key (give this to every mirror as --trust):");
    println!("{}", key.public());
    Ok(())
}

/// Generates a key file and returns the key.
pub fn generate(out: &Path, force: bool) -> anyhow::Result<SecretKey> {
    if out.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            out.display()
        );
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SecretKey::from_seed(seed);
    let tmp = out.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(key.to_file_text().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(key)
}
