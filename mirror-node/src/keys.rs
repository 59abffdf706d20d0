//! How a mirror follows key statements (rotations, revocations) by itself.
//!
//! Every read API answer of an upstream names its statement set
//! (`X-Meridian-Keys`). When that differs from this mirror's, the mirror
//! fetches the upstream's list (`/.meridian/v1/keys`) and checks every
//! statement against the keys it trusts ([`meridian_core::Keyring`]): a
//! rotation must be signed by a key this mirror trusts and by the new key,
//! a revocation by another key in force. What is new is stored in
//! `keyring` before it is used, put in force at once, and served on to
//! downstream mirrors. An upstream cannot add trust: it can only pass on
//! statements the trusted keys signed. Damage to the stored list only
//! removes trust (roots signed by the new key are refused until an
//! upstream's list restores it), never adds any.

use crate::state::MirrorState;
use crate::sync::Syncer;
use meridian_core::{Hash, Keyring, TrustedKeys, Verifier};

impl MirrorState {
    /// The keyring of `trust` and the statements stored in the state
    /// directory.
    pub(crate) fn load_keyring(state_dir: &std::path::Path, trust: &TrustedKeys) -> Keyring {
        meridian_serve::keys::load(state_dir, trust)
    }

    /// Puts `ring` in force: verifier and the list served downstream.
    pub(crate) fn set_keyring(&self, ring: Keyring) {
        self.keys.store(meridian_serve::keys::KeysDoc::of(&ring));
        self.set_verifier(Verifier::with_keyring(ring));
    }

    /// Takes up the statements of an encoded list from `upstream`: stores
    /// and applies what is new and authorised. Returns how many were new.
    fn take_statements(&self, upstream: &str, list: &[u8]) -> Result<usize, String> {
        let _one_writer = self.keys_update.lock().map_err(|_| "poisoned".to_owned())?;
        let mut ring = self.verifier().keyring().clone();
        let (new, refused) = ring
            .add_list_after(list, self.served_generation())
            .map_err(|e| format!("{upstream}: {e}"))?;
        for e in &refused {
            tracing::warn!(%upstream, error = %e, "key statement refused");
        }
        if new == 0 {
            return Ok(0);
        }
        meridian_serve::keys::save(&self.cfg().state, &ring)
            .map_err(|e| format!("cannot store the key statements: {e}"))?;
        for s in ring.statements() {
            if self
                .verifier()
                .keyring()
                .statements()
                .iter()
                .all(|h| h.hash() != s.hash())
            {
                tracing::info!(%upstream, statement = %s.statement, "key statement taken up");
            }
        }
        self.set_keyring(ring);
        Ok(new)
    }
}

impl Syncer {
    /// Fetches upstream `i`'s statements if it names a set other than
    /// this mirror's (once per set it names).
    pub(crate) async fn learn_keys(&self, i: usize, advertised: Option<Hash>) {
        let Some(id) = advertised else { return };
        let state = &self.state;
        if id == state.keys.load().id {
            return;
        }
        let url = self.upstreams().url(i).to_owned();
        if state
            .keys_seen
            .lock()
            .is_ok_and(|m| m.get(&url) == Some(&id))
        {
            return;
        }
        let api = self.upstreams().api(i, "keys");
        let got = async {
            let r = self
                .upstreams()
                .get_ok(&api, Some(std::time::Duration::from_secs(30)))
                .await
                .map_err(|e| match e {
                    crate::upstreams::FetchFail::Transport(e)
                    | crate::upstreams::FetchFail::Bad(e) => e,
                    crate::upstreams::FetchFail::Local(e) => e.to_string(),
                })?;
            crate::upstreams::read_capped(
                r,
                (meridian_core::keyring::MAX_STATEMENTS
                    * meridian_core::keyring::MAX_STATEMENT_BYTES) as u64,
            )
            .await
        }
        .await;
        let list = match got {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(upstream = %url, error = %e, "cannot fetch the upstream's key statements");
                return;
            }
        };
        let s2 = state.clone();
        let u2 = url.clone();
        let took = tokio::task::spawn_blocking(move || s2.take_statements(&u2, &list))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match took {
            Ok(_) => {
                if let Ok(mut m) = state.keys_seen.lock() {
                    m.insert(url, id);
                }
            }
            Err(e) => tracing::error!(upstream = %url, error = %e, "key statements not taken up"),
        }
    }
}
