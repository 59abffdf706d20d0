//! `meridian key`: rotate and revoke an origin's signing key, and list the
//! key statements a state directory holds.

use clap::Subcommand;
use meridian_core::PublicKey;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Rotate a stopped origin's key: from its next generation, roots are
    /// signed by NEW and OLD is retired.
    ///
    /// Writes a rotation statement, signed by both keys, into the origin's
    /// state directory; the origin publishes it and mirrors that trust OLD
    /// follow it by themselves (no config edit, no restart). Then start the
    /// origin with NEW. A running origin is rotated instead by pointing its
    /// key_file at NEW and reloading it (SIGHUP); this command refuses while
    /// an origin holds the state directory. Rerunning it is safe: a rotation
    /// already written is reported and nothing changes.
    Rotate {
        /// The origin's state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The key in use now (its secret key file).
        #[arg(long, value_name = "FILE")]
        old: PathBuf,
        /// The key to sign with from the next generation (from `meridian keygen`).
        #[arg(long, value_name = "FILE")]
        new: PathBuf,
    },
    /// Revoke a key believed stolen: roots it signs from a generation on
    /// are refused by every mirror that takes the statement up.
    ///
    /// Signed by SIGNER, another key that mirrors trust (a backup key in
    /// their `trust`, or the key the origin rotated to). Written into the
    /// origin's state directory; a running origin publishes it on its next
    /// reload (SIGHUP).
    Revoke {
        /// The origin's state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The public key to revoke (`ed25519:…`).
        #[arg(long, value_name = "KEY")]
        key: PublicKey,
        /// The secret key file that signs the revocation.
        #[arg(long, value_name = "FILE")]
        signer: PathBuf,
        /// The first generation refused [default: the origin's next].
        #[arg(long, value_name = "N")]
        from_generation: Option<u64>,
    },
    /// List the key statements held in a state directory (origin or mirror).
    List {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

fn secret(path: &Path) -> anyhow::Result<meridian_core::SecretKey> {
    Ok(meridian_origin::service::load_key(path)?)
}

pub(crate) fn run(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Rotate { state, old, new } => {
            let (old, new) = (secret(&old)?, secret(&new)?);
            if old.public() == new.public() {
                anyhow::bail!(
                    "--old and --new hold the same key ({}); generate a new one with `meridian keygen`",
                    old.public()
                );
            }
            let (s, already) = meridian_origin::keys::rotate_offline(&state, &old, &new)?;
            if already {
                println!("already done: {} (nothing written)", s.statement);
            } else {
                println!("wrote {}", s.statement);
            }
            println!(
                "next: start the origin with the new key (key_file = the --new file); it signs generation {} on",
                s.statement.from_generation
            );
            Ok(())
        }
        KeyCommand::Revoke {
            state,
            key,
            signer,
            from_generation,
        } => {
            let signer = secret(&signer)?;
            let s = meridian_origin::keys::revoke(&state, key, &signer, from_generation)?;
            println!("wrote {}", s.statement);
            println!(
                "next: reload the origin (systemctl reload meridian-origin, or kill -HUP) so it publishes the revocation"
            );
            Ok(())
        }
        KeyCommand::List { state } => {
            let path = meridian_serve::keys::keyring_path(&state);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("{}: no key statements", state.display());
                    return Ok(());
                }
                Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
            };
            let list = meridian_core::keyring::decode_list(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for env in list {
                let s = meridian_core::SignedStatement::decode(env)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let signers: Vec<String> = s.signers().map(|k: PublicKey| k.to_string()).collect();
                println!(
                    "{} {} (signed by {})",
                    s.hash(),
                    s.statement,
                    signers.join(", ")
                );
            }
            Ok(())
        }
    }
}
