//! The answer plan: for a question about a mirror name, which mirrors go
//! back, with which TTL and ECS scope, and whether the answer is degraded.
//!
//! **Architecture invariant: these rules have one owner.** The UDP hot path
//! ([`crate::fast`]) and the hickory handler ([`crate::dns`], used for TCP
//! and for every UDP query the hot path does not take) both call [`plan`],
//! and only encode what it returns. The rules:
//!
//! * the client is the ECS address when the query carries ECS with a
//!   source prefix above 0, else the packet's source address;
//! * it is placed by the first operator override whose network holds it,
//!   else by GeoIP, else at the configured default location (or nowhere);
//! * [`crate::select`] chooses the mirrors;
//! * the TTL is the short `ttl_changing` when the answer is degraded or a
//!   mirror in it changed state within the last `ttl`, else `ttl`;
//!   fallback addresses always get `ttl_changing`;
//! * the ECS scope echoed is the prefix of the network that placed the
//!   client, 0 when the client was not placed, when the answer is not a
//!   mirror answer, or when the query's source prefix is 0.
//!
//! Test: `fast::tests::both_paths_give_the_same_answer_to_every_question`
//! (a property test over questions, ECS, health and clocks).

use crate::geoip::{GeoSet, Location};
use crate::health::Views;
use crate::select::{self, Choice, Family, Params, Ranked};
use crate::wire::Ecs;
use crate::zone::ZoneData;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything a query needs, swapped as a whole on config reload.
#[derive(Debug)]
pub struct Runtime {
    pub zones: Vec<ZoneData>,
    pub params: Params,
    pub ttl: Duration,
    pub ttl_changing: Duration,
    pub default_location: Option<Arc<Location>>,
    /// (network, prefix, location) overrides, checked before GeoIP.
    pub overrides: Vec<(IpAddr, u8, Arc<Location>)>,
    /// Every dynamic name in lower-case wire format, for the UDP fast path.
    pub hot_names: Vec<Vec<u8>>,
    /// Each mirror's download base URL (no trailing slash), by id: the
    /// redirector's only targets.
    pub bases: rustc_hash::FxHashMap<String, Arc<str>>,
    /// Each mirror's country (lower-case ISO code) where configured.
    pub countries: rustc_hash::FxHashMap<String, Box<str>>,
}

/// The splitmix64 output function: well-spread bits from a counter (the
/// random streams that spread clients among equal mirrors).
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A question about a mirror name, as far as the answer depends on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Question {
    pub(crate) family: Family,
    /// The query's Client Subnet option, if any.
    pub(crate) ecs: Option<Ecs>,
    /// The packet's source address.
    pub(crate) src: IpAddr,
}

/// Who we think the client is (no allocation: locations are shared).
pub(crate) struct Client {
    pub(crate) location: Option<Arc<Location>>,
    /// Prefix of the network that placed the client.
    scope: u8,
    /// Whether an operator override placed the client.
    overridden: bool,
}

impl Client {
    /// The country label for metrics.
    pub(crate) fn country(&self) -> &str {
        match self.location.as_deref().and_then(|l| l.country.as_deref()) {
            Some(c) => c,
            None if self.overridden => "override",
            None => "unknown",
        }
    }
}

/// Places `ip`: an operator override, else GeoIP, else the default.
pub(crate) fn locate(rt: &Runtime, geo: &GeoSet, ip: IpAddr) -> Client {
    for (net, len, loc) in &rt.overrides {
        if select::cidr_contains(*net, *len, ip) {
            return Client {
                location: Some(loc.clone()),
                scope: *len,
                overridden: true,
            };
        }
    }
    if let Some(l) = geo.locate(ip) {
        return Client {
            location: l.location,
            scope: l.prefix,
            overridden: false,
        };
    }
    // Not located: the answer does not depend on location.
    Client {
        location: rt.default_location.clone(),
        scope: 0,
        overridden: false,
    }
}

/// What goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The mirrors in `picks`, in order, each with its address of the
    /// asked family.
    Mirrors { degraded: bool },
    /// The configured fallback addresses of the asked family.
    Fallback,
    /// No mirror has the family: an empty answer.
    Nothing,
}

/// The plan for one answer.
pub(crate) struct Plan {
    pub(crate) kind: Kind,
    pub(crate) ttl: u32,
    /// The ECS scope prefix to echo.
    pub(crate) scope: u8,
    pub(crate) client: Client,
}

fn secs(d: Duration) -> u32 {
    d.as_secs().min(u64::from(u32::MAX)) as u32
}

/// Plans the answer to `q` from the views snapshot at `now`; `random`
/// spreads clients among equals. Mirror picks are written to `picks`
/// (reused: no allocation in the common case, a located client with a
/// usable mirror).
pub(crate) fn plan(
    rt: &Runtime,
    geo: &GeoSet,
    views: &Views,
    q: Question,
    now: Instant,
    random: u64,
    picks: &mut Vec<usize>,
) -> Plan {
    let ip = match q.ecs {
        Some(e) if e.source > 0 => e.addr,
        _ => q.src,
    };
    let client = locate(rt, geo, ip);
    picks.clear();
    let kind = match client.location.as_deref() {
        // The common case: located, some mirror usable.
        Some(loc)
            if with_ranked(views, loc, |r| {
                select::select_ranked(loc, r, q.family, views, &rt.params, random, picks)
            }) =>
        {
            Kind::Mirrors { degraded: false }
        }
        loc => match select::select(loc, q.family, views, &rt.params, random) {
            Choice::Mirrors { picks: p, degraded } => {
                picks.extend(p);
                Kind::Mirrors { degraded }
            }
            Choice::Fallback(_) => Kind::Fallback,
            Choice::Nothing => Kind::Nothing,
        },
    };
    let ttl = match kind {
        Kind::Mirrors { degraded } => {
            let changing = picks
                .iter()
                .any(|&i| views[i].health.changed_within(rt.ttl, now));
            if changing || degraded {
                secs(rt.ttl_changing)
            } else {
                secs(rt.ttl)
            }
        }
        Kind::Fallback | Kind::Nothing => secs(rt.ttl_changing),
    };
    let placed = client.location.is_some() && matches!(kind, Kind::Mirrors { .. });
    let scope = match q.ecs {
        Some(e) if e.source > 0 && placed => client.scope,
        _ => 0,
    };
    Plan {
        kind,
        ttl,
        scope,
        client,
    }
}

/// The fallback addresses of `family`.
pub(crate) fn fallback(rt: &Runtime, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
    rt.params
        .fallback
        .iter()
        .copied()
        .filter(move |ip| ip.is_ipv4() == (family == Family::V4))
}

thread_local! {
    /// (coordinates fingerprint, lat bits, lon bits) -> [`Ranked`].
    static RANKED: std::cell::RefCell<rustc_hash::FxHashMap<(u64, u64, u64), Ranked>> =
        std::cell::RefCell::new(rustc_hash::FxHashMap::default());
}

/// Distances per client location, cached per thread (65,536 locations).
pub(crate) fn with_ranked<R>(views: &Views, loc: &Location, f: impl FnOnce(&Ranked) -> R) -> R {
    RANKED.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 65_536 {
            c.clear();
        }
        let key = (views.coords, loc.lat.to_bits(), loc.lon.to_bits());
        let r = c.entry(key).or_insert_with(|| Ranked::new(loc, views));
        f(r)
    })
}
