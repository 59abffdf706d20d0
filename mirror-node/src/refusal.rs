//! Roots a mirror will not take, said once and shown while they last.
//!
//! A mirror that is offered a root it refuses (a rollback, a broken chain,
//! an unknown key, an expired or badly signed root), or whose upstream
//! serves an older generation than it does (an origin restarted with empty
//! state looks like that), keeps serving what it has. It logs the reason
//! once per new (upstream, generation, reason), and reports it, with both
//! generations, in its status document (`refused`) and its metrics
//! (`meridian_mirror_refused_roots_total{reason}`,
//! `meridian_mirror_refused_generation`) until a root is accepted or the
//! upstream catches up.

use crate::sync::Syncer;
use meridian_serve::status::RefusedRoot;
use meridian_serve::unix_now;

/// Every reason a refusal carries (the metric's label values).
pub(crate) const REASONS: [&str; 10] = [
    "rollback",
    "broken_chain",
    "unknown_key",
    "retired_key",
    "key_not_yet_valid",
    "bad_signature",
    "expired",
    "malformed",
    "below_floor",
    "upstream_behind",
];

/// The generation an envelope claims, without believing anything else in it.
pub(crate) fn claimed_generation(env: &[u8]) -> u64 {
    meridian_core::SignedRoot::decode(env)
        .ok()
        .and_then(|s| meridian_core::Root::decode(&s.body).ok())
        .map_or(0, |r| r.generation)
}

impl Syncer {
    /// Records a refusal from upstream `i`: counted every time, logged and
    /// put in the status once per new (upstream, generation, reason).
    pub(crate) fn note_refusal(&self, i: usize, offered: u64, reason: &'static str, error: String) {
        let upstream = self.upstreams().url(i).to_owned();
        let served = self.state.served_generation();
        let m = &self.state.metrics;
        m.refused_roots.with_label_values(&[reason]).inc();
        m.refused_generation.set(offered as i64);
        let mut new = false;
        self.state.set_status(|s| {
            let same = s.refused.as_ref().is_some_and(|r| {
                r.upstream == upstream && r.offered == offered && r.reason == reason
            });
            if !same {
                new = true;
                s.refused = Some(RefusedRoot {
                    upstream: upstream.clone(),
                    offered,
                    served,
                    reason: reason.to_owned(),
                    error: error.clone(),
                    since: unix_now(),
                });
            }
        });
        if new {
            tracing::warn!(
                %upstream,
                offered,
                served,
                reason,
                "{error}; still serving generation {served}"
            );
        } else {
            tracing::debug!(%upstream, offered, reason, "refused again");
        }
    }

    /// Ends the refusal shown, if any (a root was accepted), or only one of
    /// upstream `i` that was behind (it caught up).
    pub(crate) fn clear_refusal(&self, behind_of: Option<usize>) {
        let upstream = behind_of.map(|i| self.upstreams().url(i).to_owned());
        let mut cleared = false;
        self.state.set_status(|s| {
            let ends = s.refused.as_ref().is_some_and(|r| match &upstream {
                None => true,
                Some(u) => r.reason == "upstream_behind" && &r.upstream == u,
            });
            if ends {
                s.refused = None;
                cleared = true;
            }
        });
        if cleared {
            self.state.metrics.refused_generation.set(0);
        }
    }
}
