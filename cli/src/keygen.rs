//! `meridian keygen`.

use anyhow::{Context, bail};
use meridian_core::SecretKey;
use std::path::Path;

/// Writes a new secret key (0600) and prints the public key.
pub(crate) fn run(out: &Path, force: bool) -> anyhow::Result<()> {
    let key = generate(out, force)?;
    println!("secret key written to {} (mode 0600)", out.display());
    println!("public key (give this to every mirror as --trust):");
    println!("{}", key.public());
    Ok(())
}

/// Generates a key file and returns the key. The file is written by the
/// one atomic writer: a fresh temp file created exclusively with mode 0600
/// (never a planted file or symlink), fsynced, then renamed into place.
pub(crate) fn generate(out: &Path, force: bool) -> anyhow::Result<SecretKey> {
    // symlink_metadata: a dangling symlink counts as existing too.
    if out.symlink_metadata().is_ok() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            out.display()
        );
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SecretKey::from_seed(seed);
    meridian_serve::store::write_atomic_mode(out, key.to_file_text().as_bytes(), 0o600)
        .with_context(|| format!("cannot write the key file {}", out.display()))?;
    Ok(key)
}
