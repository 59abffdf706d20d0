//! Mirror selection: a pure function of the client's location and the
//! mirrors' states, unit-tested on its own.
//!
//! Rules:
//! 1. **Eligible**: mirrors with an address of the queried family (A → IPv4,
//!    AAAA → IPv6) whose country/continent restrictions admit the client
//!    (a restricted mirror is not eligible for a client of unknown location).
//! 2. **Usable**: eligible, up (health thresholds), current (serves the
//!    newest generation minus the allowed lag), not draining, not forced
//!    down by an operator, and below `full_at` of its capacity.
//! 3. **Band**: usable mirrors within `band` × the nearest one's great-circle
//!    distance (+ `band_km`) share the clients. The first address is drawn
//!    by weight × spare capacity, so a mirror near capacity gets
//!    proportionally less traffic; the rest follow nearest first. A region
//!    that is full (every mirror at `full_at`) is not usable, so its clients
//!    spill to the next-nearest region.
//! 4. **No location**: usable mirrors by weight × spare capacity.
//! 5. **Everything down**: the configured fallback addresses if any; else the
//!    least-bad eligible mirrors (answering probes, then current, then not
//!    draining, then least loaded, then nearest). Never an empty answer
//!    while any mirror has an address of the family.

use crate::geoip::Location;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address family asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What the health checker knows about a mirror.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// Up by the up/down thresholds.
    pub up: bool,
    /// The last probe succeeded.
    pub answering: bool,
    /// Serves a generation no older than allowed.
    pub current: bool,
    pub draining: bool,
    /// Taken out by an operator.
    pub forced_down: bool,
    /// egress / capacity (0 = idle, 1 = at capacity).
    pub load: f64,
    /// When the mirror last went up, down or draining (answers naming it
    /// get the short TTL for a while after).
    pub changed_at: Option<std::time::Instant>,
}

impl Health {
    /// Whether the state changed less than `window` before `now`.
    pub fn changed_within(&self, window: std::time::Duration, now: std::time::Instant) -> bool {
        self.changed_at
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }
}

/// A mirror as the selector sees it.
#[derive(Debug, Clone)]
pub struct MirrorView {
    pub id: String,
    pub region: String,
    pub lat: f64,
    pub lon: f64,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    pub weight: f64,
    pub countries: Vec<String>,
    pub continents: Vec<String>,
    pub health: Health,
    /// The generation it last reported serving (0: none yet).
    pub generation: u64,
}

/// Tuning (from config).
#[derive(Debug, Clone)]
pub struct Params {
    pub answers: usize,
    pub band: f64,
    pub band_km: f64,
    pub full_at: f64,
    pub fallback: Vec<IpAddr>,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    /// Indexes into the mirror slice, in answer order.
    Mirrors { picks: Vec<usize>, degraded: bool },
    /// The configured fallback addresses.
    Fallback(Vec<IpAddr>),
    /// No mirror has an address of this family: NODATA.
    Nothing,
}

/// Great-circle distance in km (haversine, mean Earth radius).
pub(crate) fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().min(1.0).asin()
}

impl MirrorView {
    fn has(&self, f: Family) -> bool {
        match f {
            Family::V4 => !self.v4.is_empty(),
            Family::V6 => !self.v6.is_empty(),
        }
    }
    /// The mirror's first address of the family.
    pub fn addr(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.v4.first().copied().map(IpAddr::V4),
            Family::V6 => self.v6.first().copied().map(IpAddr::V6),
        }
    }
    fn admits(&self, client: Option<&Location>) -> bool {
        if self.countries.is_empty() && self.continents.is_empty() {
            return true;
        }
        let Some(c) = client else { return false };
        let by_country = c
            .country
            .as_ref()
            .is_some_and(|x| self.countries.iter().any(|y| y.eq_ignore_ascii_case(x)));
        let by_continent = c
            .continent
            .as_ref()
            .is_some_and(|x| self.continents.iter().any(|y| y.eq_ignore_ascii_case(x)));
        by_country || by_continent
    }
    /// Usable for new clients.
    pub fn usable(&self, full_at: f64) -> bool {
        self.serving(full_at) && self.health.current
    }
    /// Up, not draining, not taken out and not full, whatever generation
    /// it serves: the redirector's test, which checks the file itself.
    pub fn serving(&self, full_at: f64) -> bool {
        let h = &self.health;
        h.up && !h.draining && !h.forced_down && h.load < full_at
    }
    fn share(&self, full_at: f64) -> f64 {
        let spare = (1.0 - self.health.load / full_at).clamp(0.02, 1.0);
        self.weight * spare
    }
}

/// A uniform number in [0, 1) from 64 random bits.
fn unit(r: u64) -> f64 {
    (r >> 11) as f64 / (1u64 << 53) as f64
}

/// Draws one index from `pool` with probability proportional to `w`.
fn draw(pool: &[usize], w: impl Fn(usize) -> f64, r: u64) -> usize {
    draw_from(|| pool.iter().copied(), w, r).unwrap_or(pool[pool.len() - 1])
}

/// [`draw`] over a pool given as a repeatable iterator (two passes: the
/// total, then the pick), so a caller need not collect it. `None` only for
/// an empty pool.
fn draw_from<I: Iterator<Item = usize>>(
    pool: impl Fn() -> I,
    w: impl Fn(usize) -> f64,
    r: u64,
) -> Option<usize> {
    let total: f64 = pool().map(&w).sum();
    let mut x = unit(r) * total;
    let mut last = None;
    for i in pool() {
        x -= w(i);
        if x < 0.0 {
            return Some(i);
        }
        last = Some(i);
    }
    last
}

/// Chooses mirrors for one answer. `random` spreads clients among equals.
pub(crate) fn select(
    client: Option<&Location>,
    family: Family,
    mirrors: &[MirrorView],
    p: &Params,
    random: u64,
) -> Choice {
    let dists: Vec<f64> = match client {
        Some(c) => mirrors
            .iter()
            .map(|m| distance_km(c.lat, c.lon, m.lat, m.lon))
            .collect(),
        None => Vec::new(),
    };
    select_with_distances(client, &dists, family, mirrors, p, random)
}

/// [`select`] with each mirror's distance from the client precomputed
/// (`dists[i]` for `mirrors[i]`; ignored without a client location), so a
/// caller can cache distances per client location.
pub(crate) fn select_with_distances(
    client: Option<&Location>,
    dists: &[f64],
    family: Family,
    mirrors: &[MirrorView],
    p: &Params,
    random: u64,
) -> Choice {
    let eligible: Vec<usize> = (0..mirrors.len())
        .filter(|&i| mirrors[i].has(family) && mirrors[i].admits(client))
        .collect();
    if eligible.is_empty() {
        return if mirrors.iter().any(|m| m.has(family)) && !p.fallback.is_empty() {
            Choice::Fallback(p.fallback.clone())
        } else if mirrors.iter().any(|m| m.has(family)) {
            // Restricted away from this client: least-bad among all with the family.
            let all: Vec<usize> = (0..mirrors.len())
                .filter(|&i| mirrors[i].has(family))
                .collect();
            least_bad(client, all, mirrors, p)
        } else {
            Choice::Nothing
        };
    }
    let usable: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|&i| mirrors[i].usable(p.full_at))
        .collect();
    if usable.is_empty() {
        if !p.fallback.is_empty() {
            return Choice::Fallback(p.fallback.clone());
        }
        return least_bad(client, eligible, mirrors, p);
    }
    let n = p.answers.max(1);
    let share = |i: usize| mirrors[i].share(p.full_at);
    if client.is_none() {
        // No location: by weight and spare capacity, without replacement.
        let mut pool = usable;
        let mut picks = Vec::with_capacity(n);
        let mut r = random;
        while picks.len() < n && !pool.is_empty() {
            let i = draw(&pool, share, r);
            picks.push(i);
            pool.retain(|&x| x != i);
            r = r.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        return Choice::Mirrors {
            picks,
            degraded: false,
        };
    }
    let dist = |i: usize| dists.get(i).copied().unwrap_or(f64::MAX);
    let mut by_dist = usable;
    by_dist.sort_by(|&a, &b| dist(a).total_cmp(&dist(b)));
    let nearest = dist(by_dist[0]);
    let limit = nearest * p.band + p.band_km;
    let band: Vec<usize> = by_dist
        .iter()
        .copied()
        .filter(|&i| dist(i) <= limit)
        .collect();
    let first = draw(&band, share, random);
    let mut picks = vec![first];
    picks.extend(by_dist.iter().copied().filter(|&i| i != first).take(n - 1));
    Choice::Mirrors {
        picks,
        degraded: false,
    }
}

/// Every mirror index, nearest first, for [`select_ranked`]: a stable sort
/// by distance, so equal distances keep config order as in
/// [`select_with_distances`].
pub(crate) fn rank(dists: &[f64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..dists.len() as u32).collect();
    order.sort_by(|&a, &b| dists[a as usize].total_cmp(&dists[b as usize]));
    order
}

/// Every mirror's distance from one client location, and the mirrors ranked
/// nearest first ([`rank`]): what [`select_ranked`] walks. The hot query
/// path caches one per client location and mirror coordinates.
#[derive(Debug)]
pub(crate) struct Ranked {
    pub(crate) dists: Vec<f64>,
    pub(crate) order: Vec<u32>,
}

impl Ranked {
    /// Every mirror at distance 0 (a client with no location), in config
    /// order: the band is everyone, drawn by weight and spare capacity.
    pub(crate) fn unplaced(mirrors: &[MirrorView]) -> Ranked {
        Ranked {
            dists: vec![0.0; mirrors.len()],
            order: (0..mirrors.len() as u32).collect(),
        }
    }

    pub(crate) fn new(client: &Location, mirrors: &[MirrorView]) -> Ranked {
        let dists: Vec<f64> = mirrors
            .iter()
            .map(|m| distance_km(client.lat, client.lon, m.lat, m.lon))
            .collect();
        let order = rank(&dists);
        Ranked { dists, order }
    }
}

/// [`select_with_distances`] for a located client without allocating: it
/// walks `ranked` (of this client's location) and reuses `picks`. When at
/// least one mirror is usable it writes the very picks
/// [`select_with_distances`] returns for the same inputs (not degraded) and
/// returns true; otherwise it returns false and the caller takes the
/// general path (fallback or least-bad).
pub(crate) fn select_ranked(
    client: &Location,
    ranked: &Ranked,
    family: Family,
    mirrors: &[MirrorView],
    p: &Params,
    random: u64,
    picks: &mut Vec<usize>,
) -> bool {
    let ok = |i: usize| {
        mirrors
            .get(i)
            .is_some_and(|m| m.has(family) && m.admits(Some(client)) && m.usable(p.full_at))
    };
    pick_ranked(ranked, mirrors, p, random, ok, p.answers.max(1), picks)
}

/// The redirector's choice for one file: the mirrors that pass `has` (the
/// file is in the generation it serves, with the same bytes) and are
/// serving, whatever their generation; otherwise as [`select_ranked`]. Up
/// to `n` picks, nearest band first; false when none qualifies.
#[allow(clippy::too_many_arguments)]
pub(crate) fn select_for_file(
    client: Option<&Location>,
    ranked: &Ranked,
    mirrors: &[MirrorView],
    p: &Params,
    random: u64,
    has: impl Fn(usize) -> bool,
    n: usize,
    picks: &mut Vec<usize>,
) -> bool {
    let ok = |i: usize| {
        mirrors
            .get(i)
            .is_some_and(|m| m.admits(client) && m.serving(p.full_at) && has(i))
    };
    pick_ranked(ranked, mirrors, p, random, ok, n, picks)
}

/// The one band rule: among the mirrors `ok` admits, walked nearest first,
/// the first pick is drawn by weight and spare capacity from those within
/// `band` × the nearest's distance (+ `band_km`), then the rest nearest
/// first, `n` in all.
fn pick_ranked(
    ranked: &Ranked,
    mirrors: &[MirrorView],
    p: &Params,
    random: u64,
    ok: impl Fn(usize) -> bool,
    n: usize,
    picks: &mut Vec<usize>,
) -> bool {
    let Ranked { dists, order } = ranked;
    let dist = |i: usize| dists.get(i).copied().unwrap_or(f64::MAX);
    let ranked = || order.iter().map(|&i| i as usize).filter(|&i| ok(i));
    let Some(nearest) = ranked().next() else {
        return false;
    };
    let limit = dist(nearest) * p.band + p.band_km;
    let band = || ranked().filter(move |&i| dist(i) <= limit);
    let first = draw_from(band, |i| mirrors[i].share(p.full_at), random).unwrap_or(nearest);
    picks.clear();
    picks.push(first);
    picks.extend(ranked().filter(|&i| i != first).take(n.max(1) - 1));
    true
}

fn least_bad(
    client: Option<&Location>,
    mut pool: Vec<usize>,
    mirrors: &[MirrorView],
    p: &Params,
) -> Choice {
    let key = |i: usize| {
        let h = &mirrors[i].health;
        let d = client
            .map(|c| distance_km(c.lat, c.lon, mirrors[i].lat, mirrors[i].lon))
            .unwrap_or(0.0);
        (
            h.forced_down,
            !h.answering,
            !h.current,
            h.draining,
            (h.load * 1000.0) as i64,
            (d * 10.0) as i64,
        )
    };
    pool.sort_by_key(|&i| key(i));
    pool.truncate(p.answers.max(1));
    Choice::Mirrors {
        picks: pool,
        degraded: true,
    }
}

/// Parses `a.b.c.d/len` or `v6/len`.
pub(crate) fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.trim().parse().ok()?;
    let len: u8 = l.trim().parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// Whether `ip` is inside `net/len`.
pub(crate) fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, lat: f64, lon: f64) -> MirrorView {
        MirrorView {
            id: id.into(),
            region: id.into(),
            lat,
            lon,
            v4: vec![Ipv4Addr::new(127, 0, 10, id.len() as u8)],
            v6: vec![],
            weight: 1.0,
            countries: vec![],
            continents: vec![],
            health: Health {
                up: true,
                answering: true,
                current: true,
                ..Default::default()
            },
            generation: 1,
        }
    }

    proptest::proptest! {
        /// The allocation-free hot-path selector gives exactly the general
        /// selector's answer whenever it answers at all, and declines only
        /// when the general one has no usable mirror (fallback/least-bad).
        #[test]
        fn ranked_selection_equals_the_general_one(
            mirrors in proptest::collection::vec(
                (-80.0f64..80.0, -179.0f64..179.0, 0u8..8, 0.0f64..1.2, 0.5f64..3.0, 0u8..4),
                1..12,
            ),
            lat in -80.0f64..80.0,
            lon in -179.0f64..179.0,
            answers in 1usize..4,
            band in 1.0f64..2.0,
            random in proptest::prelude::any::<u64>(),
            v6 in proptest::prelude::any::<bool>(),
        ) {
            let views: Vec<MirrorView> = mirrors
                .iter()
                .enumerate()
                .map(|(i, &(la, lo, state, load, weight, restrict))| {
                    let mut v = m(&format!("m{i}"), la, lo);
                    // Coarse grid so equal distances (ties) happen too.
                    v.lat = (la / 20.0).round() * 20.0;
                    v.lon = (lo / 40.0).round() * 40.0;
                    v.weight = weight;
                    v.health.up = state & 1 == 0;
                    v.health.current = state & 2 == 0;
                    v.health.draining = state & 4 != 0 && state & 1 != 0;
                    v.health.load = load;
                    if restrict == 1 {
                        v.countries = vec!["DE".into()];
                    }
                    if restrict == 2 {
                        v.continents = vec!["EU".into()];
                    }
                    if i % 3 == 2 {
                        v.v6 = vec![Ipv6Addr::LOCALHOST];
                    }
                    v
                })
                .collect();
            let client = Location {
                lat,
                lon,
                country: Some("DE".into()),
                continent: Some("EU".into()),
            };
            let p = Params { answers, band, band_km: 50.0, full_at: 0.9, fallback: vec![] };
            let family = if v6 { Family::V6 } else { Family::V4 };
            let ranked = Ranked::new(&client, &views);
            let general = select_with_distances(Some(&client), &ranked.dists, family, &views, &p, random);
            let mut picks = vec![99];
            let answered = select_ranked(&client, &ranked, family, &views, &p, random, &mut picks);
            match general {
                Choice::Mirrors { picks: g, degraded: false } => {
                    proptest::prop_assert!(answered);
                    proptest::prop_assert_eq!(g, picks);
                }
                _ => proptest::prop_assert!(!answered),
            }
        }
    }
    fn world() -> Vec<MirrorView> {
        vec![
            m("jakarta", -6.2, 106.8),
            m("london", 51.5, -0.1),
            m("ashburn", 39.0, -77.5),
            m("saopaulo", -23.5, -46.6),
        ]
    }
    fn at(lat: f64, lon: f64) -> Location {
        Location {
            lat,
            lon,
            country: None,
            continent: None,
        }
    }
    fn params() -> Params {
        Params {
            answers: 2,
            band: 1.5,
            band_km: 100.0,
            full_at: 0.9,
            fallback: vec![],
        }
    }
    fn ids(c: &Choice, ms: &[MirrorView]) -> Vec<String> {
        match c {
            Choice::Mirrors { picks, .. } => picks.iter().map(|&i| ms[i].id.clone()).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nearest_first() {
        let ms = world();
        let paris = at(48.9, 2.35);
        assert_eq!(
            ids(&select(Some(&paris), Family::V4, &ms, &params(), 7), &ms),
            vec!["london", "ashburn"]
        );
        let singapore = at(1.35, 103.8);
        assert_eq!(
            ids(
                &select(Some(&singapore), Family::V4, &ms, &params(), 7),
                &ms
            )[0],
            "jakarta"
        );
        let rio = at(-22.9, -43.2);
        assert_eq!(
            ids(&select(Some(&rio), Family::V4, &ms, &params(), 7), &ms)[0],
            "saopaulo"
        );
    }

    #[test]
    fn dead_draining_stale_and_forced_mirrors_are_skipped() {
        let paris = at(48.9, 2.35);
        for breaks in [
            |h: &mut Health| h.up = false,
            |h: &mut Health| h.draining = true,
            |h: &mut Health| h.current = false,
            |h: &mut Health| h.forced_down = true,
            |h: &mut Health| h.load = 0.95,
        ] {
            let mut ms = world();
            breaks(&mut ms[1].health);
            let got = ids(&select(Some(&paris), Family::V4, &ms, &params(), 1), &ms);
            assert!(!got.contains(&"london".to_string()), "{got:?}");
            assert_eq!(got[0], "ashburn", "spills to the next-nearest region");
        }
    }

    #[test]
    fn band_spreads_by_weight_and_spare_capacity() {
        let mut ms = world();
        ms.push(m("paris", 48.9, 2.35));
        // In the Channel: London ~130 km, Paris ~200 km, both inside 1.5x + 100 km.
        let london_client = at(50.5, 1.0);
        let count = |ms: &[MirrorView]| {
            let mut paris = 0;
            for r in 0..10_000u64 {
                let c = select(
                    Some(&london_client),
                    Family::V4,
                    ms,
                    &params(),
                    r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                if ids(&c, ms)[0] == "paris" {
                    paris += 1;
                }
            }
            paris
        };
        let even = count(&ms);
        assert!(
            (4_000..6_000).contains(&even),
            "paris got {even} of 10000 at equal weight"
        );
        ms[4].health.load = 0.45; // half of full_at: about half the share
        let loaded = count(&ms);
        assert!(
            (2_500..4_200).contains(&loaded),
            "paris got {loaded} when half loaded"
        );
        // Far mirrors are outside the band: Ashburn never comes first for London.
        for r in 0..1000u64 {
            assert_ne!(
                ids(
                    &select(Some(&london_client), Family::V4, &ms, &params(), r << 20),
                    &ms
                )[0],
                "ashburn"
            );
        }
    }

    #[test]
    fn families_restrictions_and_no_location() {
        let mut ms = world();
        ms[2].v6 = vec!["::1".parse().expect("ip")];
        let paris = at(48.9, 2.35);
        assert_eq!(
            ids(&select(Some(&paris), Family::V6, &ms, &params(), 1), &ms),
            vec!["ashburn"]
        );
        ms[1].countries = vec!["GB".into()];
        let fr = Location {
            country: Some("FR".into()),
            continent: Some("EU".into()),
            ..paris.clone()
        };
        assert_eq!(
            ids(&select(Some(&fr), Family::V4, &ms, &params(), 1), &ms)[0],
            "ashburn"
        );
        let gb = Location {
            country: Some("GB".into()),
            ..fr.clone()
        };
        assert_eq!(
            ids(&select(Some(&gb), Family::V4, &ms, &params(), 1), &ms)[0],
            "london"
        );
        let none = select(None, Family::V4, &ms, &params(), 99);
        assert!(
            !ids(&none, &ms).contains(&"london".to_string()),
            "restricted mirrors need a known client"
        );
        let ms = world();
        assert_eq!(
            select(Some(&paris), Family::V6, &ms, &params(), 1),
            Choice::Nothing
        );
    }

    #[test]
    fn everything_down_never_answers_empty() {
        let mut ms = world();
        for x in &mut ms {
            x.health = Health::default();
        }
        ms[3].health.answering = true; // stale but answering
        let paris = at(48.9, 2.35);
        match select(Some(&paris), Family::V4, &ms, &params(), 1) {
            Choice::Mirrors { picks, degraded } => {
                assert!(degraded);
                assert_eq!(
                    ms[picks[0]].id, "saopaulo",
                    "answering beats nearer but dead"
                );
                assert_eq!(picks.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let mut p = params();
        p.fallback = vec!["192.0.2.1".parse().expect("ip")];
        assert_eq!(
            select(Some(&paris), Family::V4, &ms, &p, 1),
            Choice::Fallback(p.fallback.clone())
        );
    }

    #[test]
    fn distances_and_cidrs() {
        let d = distance_km(51.5, -0.1, 39.0, -77.5);
        assert!((5800.0..6000.0).contains(&d), "{d}");
        let (n, l) = parse_cidr("81.2.69.0/24").expect("cidr");
        assert!(cidr_contains(n, l, "81.2.69.200".parse().expect("ip")));
        assert!(!cidr_contains(n, l, "81.2.70.1".parse().expect("ip")));
        assert!(parse_cidr("1.2.3.4/33").is_none());
    }
}
