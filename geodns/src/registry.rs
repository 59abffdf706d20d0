//! What the admin API changes, and the one place it meets the config file:
//! mirrors registered at run time (`meridian region add`) and operator
//! overrides (down, drain), kept in `state_file`.
//!
//! The served configuration is always [`Registry::merge`] of the file and
//! the registrations, and the file wins: a registration may not take an id
//! the file defines (refused with 409), and if a later edit of the file
//! adds an id that is registered, the file's entry is the one served (the
//! registration stays stored, shadowed, with a warning). Each change is
//! validated as a whole before it is stored, and stored (atomically:
//! temporary file, fsync, rename) before it is served, so what a restart
//! reads is what was last answered 200.

use crate::config::{GeoDnsConfig, Mirror};
use crate::health::Forced;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The state file's format version.
const VERSION: u32 = 1;

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    /// Registered mirrors, by id.
    mirrors: BTreeMap<String, Mirror>,
    /// Operator overrides, by mirror id (config or registered).
    forced: BTreeMap<String, Forced>,
}

/// Why the state file could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "geodns state file {path}: {cause}. It holds the mirrors registered with `meridian region add` and the operators' down/drain overrides; restore it from a backup, or move it aside to start with the config file's mirrors only (then register the others again)"
)]
pub struct StateFileError {
    path: String,
    cause: String,
}

/// The registrations and overrides, with the file they live in.
#[derive(Debug)]
pub(crate) struct Registry {
    path: Option<PathBuf>,
    stored: Mutex<Stored>,
    /// The config as last read from its file (before the merge).
    file: Mutex<GeoDnsConfig>,
}

/// What a registration did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Registered {
    Added,
    Updated,
    Unchanged,
}

/// Why a change was refused: the HTTP status it answers and the message.
#[derive(Debug)]
pub(crate) struct Refused(pub http::StatusCode, pub String);

impl Registry {
    /// Reads `cfg.state_file` (none yet: empty). A damaged file is an error
    /// that names it: starting without it would silently drop mirrors and
    /// lift overrides.
    pub(crate) fn open(cfg: &GeoDnsConfig) -> Result<Self, StateFileError> {
        let stored = match &cfg.state_file {
            Some(p) => read(p)?,
            None => Stored::default(),
        };
        Ok(Registry {
            path: cfg.state_file.clone(),
            stored: Mutex::new(stored),
            file: Mutex::new(cfg.clone()),
        })
    }

    /// The served configuration: the file's, plus each registered mirror
    /// whose id the file does not define (the file wins).
    pub(crate) fn merge(&self, file: &GeoDnsConfig) -> GeoDnsConfig {
        let stored = lock(&self.stored);
        merged(file, &stored)
    }

    /// Remembers the config just read from its file (what registrations
    /// are merged with from now on).
    pub(crate) fn set_file(&self, file: GeoDnsConfig) {
        *lock(&self.file) = file;
    }

    /// Registers `m` (or updates its registration), with the override
    /// `forced` when given, in one write. Returns what it did and the
    /// configuration to serve now.
    pub(crate) fn register(
        &self,
        m: Mirror,
        forced: Option<Forced>,
    ) -> Result<(Registered, GeoDnsConfig), Refused> {
        use http::StatusCode as S;
        let Some(path) = &self.path else {
            return Err(Refused(
                S::CONFLICT,
                "this GeoDNS has no state_file, so a registration would not survive a restart; set state_file in its config (see deploy/geodns.toml)\n".into(),
            ));
        };
        m.check()
            .map_err(|e| Refused(S::BAD_REQUEST, format!("mirror {}: {e}\n", m.id)))?;
        let file = lock(&self.file).clone();
        if file.mirrors.iter().any(|f| f.id == m.id) {
            return Err(Refused(
                S::CONFLICT,
                format!(
                    "mirror {} is defined in the config file, which wins over registrations; change it there\n",
                    m.id
                ),
            ));
        }
        let mut stored = lock(&self.stored);
        let mut next = stored.clone();
        match forced {
            Some(Forced::None) => {
                next.forced.remove(&m.id);
            }
            Some(f) => {
                next.forced.insert(m.id.clone(), f);
            }
            None => {}
        }
        let what = match stored.mirrors.get(&m.id) {
            Some(old) if *old == m && next == *stored => {
                return Ok((Registered::Unchanged, merged(&file, &stored)));
            }
            Some(_) => Registered::Updated,
            None => Registered::Added,
        };
        next.mirrors.insert(m.id.clone(), m);
        let cfg = merged(&file, &next);
        cfg.validate()
            .map_err(|e| Refused(S::BAD_REQUEST, format!("{e}\n")))?;
        save(path, &next)?;
        *stored = next;
        Ok((what, cfg))
    }

    /// Removes the registration of `id` (and its override). `Ok(None)`: it
    /// was not registered.
    pub(crate) fn remove(&self, id: &str) -> Result<Option<GeoDnsConfig>, Refused> {
        use http::StatusCode as S;
        let file = lock(&self.file).clone();
        if file.mirrors.iter().any(|f| f.id == id) {
            return Err(Refused(
                S::CONFLICT,
                format!("mirror {id} is defined in the config file; remove it there\n"),
            ));
        }
        let mut stored = lock(&self.stored);
        if !stored.mirrors.contains_key(id) {
            return Ok(None);
        }
        let mut next = stored.clone();
        next.mirrors.remove(id);
        next.forced.remove(id);
        if let Some(path) = &self.path {
            save(path, &next)?;
        }
        *stored = next;
        Ok(Some(merged(&file, &stored)))
    }

    /// Stores an operator override (kept in memory only without a state
    /// file).
    pub(crate) fn set_forced(&self, id: &str, f: Forced) -> Result<(), Refused> {
        let mut stored = lock(&self.stored);
        let mut next = stored.clone();
        if f == Forced::None {
            next.forced.remove(id);
        } else {
            next.forced.insert(id.to_owned(), f);
        }
        if next == *stored {
            return Ok(());
        }
        if let Some(path) = &self.path {
            save(path, &next)?;
        }
        *stored = next;
        Ok(())
    }

    /// The stored overrides.
    pub(crate) fn forced(&self) -> BTreeMap<String, Forced> {
        lock(&self.stored).forced.clone()
    }

    /// Whether `id` comes from a registration (and not the file).
    pub(crate) fn is_registered(&self, id: &str) -> bool {
        !lock(&self.file).mirrors.iter().any(|m| m.id == id)
            && lock(&self.stored).mirrors.contains_key(id)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn merged(file: &GeoDnsConfig, stored: &Stored) -> GeoDnsConfig {
    let mut cfg = file.clone();
    for (id, m) in &stored.mirrors {
        if file.mirrors.iter().any(|f| &f.id == id) {
            tracing::warn!(mirror = %id, "a registered mirror's id is in the config file too; the file's entry is served");
            continue;
        }
        cfg.mirrors.push(m.clone());
    }
    cfg
}

fn read(path: &Path) -> Result<Stored, StateFileError> {
    let err = |cause: String| StateFileError {
        path: path.display().to_string(),
        cause,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Stored {
                version: VERSION,
                ..Stored::default()
            });
        }
        Err(e) => return Err(err(format!("cannot read it ({e})"))),
    };
    let s: Stored =
        serde_json::from_slice(&bytes).map_err(|e| err(format!("damaged: not its JSON ({e})")))?;
    if s.version != VERSION {
        return Err(err(format!(
            "version {} (this GeoDNS reads version {VERSION})",
            s.version
        )));
    }
    for (id, m) in &s.mirrors {
        if *id != m.id {
            return Err(err(format!(
                "damaged: mirror {id} holds the entry of {}",
                m.id
            )));
        }
        m.check()
            .map_err(|e| err(format!("damaged: mirror {id}: {e}")))?;
    }
    Ok(s)
}

fn save(path: &Path, s: &Stored) -> Result<(), Refused> {
    let mut s = s.clone();
    s.version = VERSION;
    let bytes = serde_json::to_vec_pretty(&s).unwrap_or_default();
    meridian_serve::store::write_atomic(path, &bytes).map_err(|e| {
        tracing::error!(path = %path.display(), error = %e, "cannot write the geodns state file; the change is refused");
        Refused(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot write the state file {}: {e}; nothing was changed (free space or fix its directory's permissions, then retry)\n",
                path.display()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(id: &str) -> Mirror {
        let mut m = crate::config::tests::minimal().mirrors[0].clone();
        m.id = id.into();
        m.ipv4 = vec!["127.0.10.9".parse().expect("test step")];
        m
    }

    #[test]
    fn registrations_and_overrides_survive_a_reopen_and_the_file_wins() {
        let dir = tempfile::tempdir().expect("test step");
        let mut cfg = crate::config::tests::minimal();
        cfg.state_file = Some(dir.path().join("state.json"));
        let r = Registry::open(&cfg).expect("test step");
        let (what, served) = r.register(registered("new"), None).expect("test step");
        assert_eq!(what, Registered::Added);
        assert_eq!(served.mirrors.len(), 2);
        assert_eq!(
            r.register(registered("new"), None).expect("test step").0,
            Registered::Unchanged
        );
        let mut moved = registered("new");
        moved.latitude = 10.0;
        assert_eq!(
            r.register(moved.clone(), None).expect("test step").0,
            Registered::Updated
        );
        // A standby: registered and forced down in one stored change.
        let (what, _) = r
            .register(moved.clone(), Some(Forced::Down))
            .expect("test step");
        assert_eq!(what, Registered::Updated);
        assert_eq!(r.forced().get("new"), Some(&Forced::Down));
        assert_eq!(
            r.register(moved, Some(Forced::Down)).expect("test step").0,
            Registered::Unchanged
        );
        r.set_forced("eu-west", Forced::Drain).expect("test step");
        // The config file's own id is refused.
        let e = r
            .register(registered("eu-west"), None)
            .expect_err("refused");
        assert_eq!(e.0, http::StatusCode::CONFLICT, "{}", e.1);

        let again = Registry::open(&cfg).expect("test step");
        let served = again.merge(&cfg);
        assert_eq!(served.mirrors.len(), 2);
        assert_eq!(served.mirrors[1].latitude, 10.0);
        assert_eq!(again.forced().get("eu-west"), Some(&Forced::Drain));
        assert_eq!(again.forced().get("new"), Some(&Forced::Down));
        // A file that later defines the registered id wins.
        let mut file = cfg.clone();
        file.mirrors.push(registered("new"));
        file.mirrors[1].latitude = 20.0;
        let served = again.merge(&file);
        again.set_file(file);
        assert_eq!(served.mirrors.len(), 2);
        assert_eq!(served.mirrors[1].latitude, 20.0);
        assert!(!again.is_registered("new"));
    }

    #[test]
    fn a_damaged_state_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().expect("test step");
        let mut cfg = crate::config::tests::minimal();
        let p = dir.path().join("state.json");
        cfg.state_file = Some(p.clone());
        let r = Registry::open(&cfg).expect("test step");
        r.register(registered("new"), None).expect("test step");
        let good = std::fs::read(&p).expect("test step");
        for bad in [
            &good[..good.len() / 2],
            b"{\"version\": 9, \"mirrors\": {}, \"forced\": {}}",
        ] {
            std::fs::write(&p, bad).expect("test step");
            let e = Registry::open(&cfg).expect_err("refused").to_string();
            assert!(
                e.contains(&p.display().to_string()) && e.contains("move it aside"),
                "{e}"
            );
        }
    }
}
