//! GeoIP lookups: MaxMind GeoIP2/GeoLite2 City and the DB-IP lite City
//! layout (ip-location-db), told apart by the shape of each record, and
//! reloaded without a restart when the file is replaced.

use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Where a client is.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: Option<String>,
    /// Two-letter continent code (EU, AS, NA, SA, AF, OC, AN).
    pub continent: Option<String>,
}

/// A lookup result: the location, if the database has one, and the prefix
/// length of the database network that decided it (for the ECS scope).
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    pub location: Option<Arc<Location>>,
    pub prefix: u8,
}

/// (database id, data-section offset) -> decoded location.
type RecordCache = rustc_hash::FxHashMap<(u64, usize), Option<Arc<Location>>>;

static NEXT_DB_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// Decoded records by (database id, data-section offset). Many networks
    /// share one record (a city), and decoding allocates; the query path
    /// then only walks the search tree.
    static RECORDS: std::cell::RefCell<RecordCache> =
        std::cell::RefCell::new(rustc_hash::FxHashMap::default());
    /// Lookups by (database id, address): resolvers send the same client
    /// subnets (ECS addresses are zero past their prefix) and source
    /// addresses over and over, and a hit skips the search-tree walk.
    static ADDRESSES: std::cell::RefCell<rustc_hash::FxHashMap<(u64, bool, u128), Lookup>> =
        std::cell::RefCell::new(rustc_hash::FxHashMap::default());
}

/// Addresses remembered per thread before the cache starts over.
const ADDRESS_CACHE: usize = 65_536;

#[derive(Deserialize, Default)]
struct Names {
    #[serde(default)]
    iso_code: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

/// A coordinate stored as a double (MaxMind) or as a single-precision
/// float (the real DB-IP lite files); the decoder refuses one where the
/// other is asked for, so either is taken as it comes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Coord(f64);

impl<'de> Deserialize<'de> for Coord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Coord;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a coordinate (float or double)")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Coord, E> {
                Ok(Coord(v))
            }
            fn visit_f32<E>(self, v: f32) -> Result<Coord, E> {
                Ok(Coord(f64::from(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Coord, E> {
                Ok(Coord(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Coord, E> {
                Ok(Coord(v as f64))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
struct GeoLocation {
    latitude: Option<Coord>,
    longitude: Option<Coord>,
}

/// Both layouts at once; whichever fields are present decide.
#[derive(Deserialize, Default)]
struct Record {
    // GeoIP2 / GeoLite2 City
    #[serde(default)]
    location: Option<GeoLocation>,
    #[serde(default)]
    country: Option<Names>,
    #[serde(default)]
    continent: Option<Names>,
    // DB-IP lite, ip-location-db layout
    #[serde(default)]
    latitude: Option<Coord>,
    #[serde(default)]
    longitude: Option<Coord>,
    #[serde(default)]
    country_code: Option<String>,
}

/// Continent of a country code, for databases (DB-IP lite) that carry no
/// continent. Covers the countries whose continent is unambiguous by region
/// blocks used by operators; unknown codes give `None`.
pub fn continent_of(country: &str) -> Option<&'static str> {
    const EU: &[&str] = &[
        "AD", "AL", "AT", "BA", "BE", "BG", "BY", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI",
        "FO", "FR", "GB", "GG", "GI", "GR", "HR", "HU", "IE", "IM", "IS", "IT", "JE", "LI", "LT",
        "LU", "LV", "MC", "MD", "ME", "MK", "MT", "NL", "NO", "PL", "PT", "RO", "RS", "RU", "SE",
        "SI", "SK", "SM", "UA", "VA", "XK",
    ];
    const AS: &[&str] = &[
        "AE", "AF", "AM", "AZ", "BD", "BH", "BN", "BT", "CN", "GE", "HK", "ID", "IL", "IN", "IQ",
        "IR", "JO", "JP", "KG", "KH", "KP", "KR", "KW", "KZ", "LA", "LB", "LK", "MM", "MN", "MO",
        "MV", "MY", "NP", "OM", "PH", "PK", "PS", "QA", "SA", "SG", "SY", "TH", "TJ", "TL", "TM",
        "TR", "TW", "UZ", "VN", "YE",
    ];
    const NA: &[&str] = &[
        "AG", "BB", "BS", "BZ", "CA", "CR", "CU", "DM", "DO", "GD", "GT", "HN", "HT", "JM", "KN",
        "LC", "MX", "NI", "PA", "PR", "SV", "TT", "US", "VC",
    ];
    const SA: &[&str] = &[
        "AR", "BO", "BR", "CL", "CO", "EC", "GY", "PE", "PY", "SR", "UY", "VE",
    ];
    const OC: &[&str] = &[
        "AU", "FJ", "KI", "MH", "FM", "NR", "NZ", "PG", "PW", "SB", "TO", "TV", "VU", "WS",
    ];
    const AF: &[&str] = &[
        "AO", "BF", "BI", "BJ", "BW", "CD", "CF", "CG", "CI", "CM", "CV", "DJ", "DZ", "EG", "ER",
        "ET", "GA", "GH", "GM", "GN", "GQ", "GW", "KE", "KM", "LR", "LS", "LY", "MA", "MG", "ML",
        "MR", "MU", "MW", "MZ", "NA", "NE", "NG", "RW", "SC", "SD", "SL", "SN", "SO", "SS", "ST",
        "SZ", "TD", "TG", "TN", "TZ", "UG", "ZA", "ZM", "ZW",
    ];
    for (code, list) in [
        ("EU", EU),
        ("AS", AS),
        ("NA", NA),
        ("SA", SA),
        ("OC", OC),
        ("AF", AF),
    ] {
        if list.contains(&country) {
            return Some(code);
        }
    }
    None
}

/// Why a database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoError {
    #[error("cannot open GeoIP database {path}: {source}")]
    Open {
        path: String,
        source: maxminddb::MaxMindDbError,
    },
    #[error(
        "GeoIP database {0} has neither GeoIP2 City nor DB-IP City records (tried a sample lookup)"
    )]
    Layout(String),
}

/// An open database.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
    /// Distinguishes this database in the per-thread record cache.
    id: u64,
    pub database_type: String,
    pub path: PathBuf,
    pub modified: Option<SystemTime>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("path", &self.path)
            .field("type", &self.database_type)
            .finish()
    }
}

impl GeoDb {
    /// Opens and sanity-checks a database.
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let reader = maxminddb::Reader::open_readfile(path).map_err(|source| GeoError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let database_type = reader.metadata().database_type.clone();
        let db = GeoDb {
            reader,
            id: NEXT_DB_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            database_type,
            path: path.to_path_buf(),
            modified,
        };
        // A database whose records decode as neither layout is refused now,
        // not at query time: walk a few networks and require a location.
        let mut found = false;
        if let Ok(it) = db.reader.networks(Default::default()) {
            for item in it.take(64).flatten() {
                if let Ok(Some(r)) = item.decode::<Record>()
                    && to_location(r).is_some()
                {
                    found = true;
                    break;
                }
            }
        }
        if !found {
            return Err(GeoError::Layout(path.display().to_string()));
        }
        Ok(db)
    }

    /// Looks an address up.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let key = match ip {
            IpAddr::V4(a) => (self.id, false, u128::from(u32::from(a))),
            IpAddr::V6(a) => (self.id, true, u128::from(a)),
        };
        if let Some(hit) = ADDRESSES.with(|c| c.borrow().get(&key).cloned()) {
            return hit;
        }
        let found = self.lookup_uncached(ip);
        ADDRESSES.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= ADDRESS_CACHE {
                c.clear();
            }
            c.insert(key, found.clone());
        });
        found
    }

    fn lookup_uncached(&self, ip: IpAddr) -> Lookup {
        let Ok(res) = self.reader.lookup(ip) else {
            return Lookup {
                location: None,
                prefix: 0,
            };
        };
        let prefix = res.network().map(|n| n.prefix()).unwrap_or(0);
        let Some(offset) = res.offset() else {
            return Lookup {
                location: None,
                prefix,
            };
        };
        let decode = || {
            res.decode::<Record>()
                .ok()
                .flatten()
                .and_then(to_location)
                .map(Arc::new)
        };
        let location = RECORDS.with(|c| {
            let mut c = c.borrow_mut();
            if let Some(hit) = c.get(&(self.id, offset)) {
                return hit.clone();
            }
            if c.len() > 200_000 {
                c.clear();
            }
            let loc = decode();
            c.insert((self.id, offset), loc.clone());
            loc
        });
        Lookup { location, prefix }
    }
}

fn to_location(r: Record) -> Option<Location> {
    let (lat, lon) = match (&r.location, r.latitude, r.longitude) {
        (
            Some(GeoLocation {
                latitude: Some(a),
                longitude: Some(b),
            }),
            _,
            _,
        ) => (a.0, b.0),
        (_, Some(a), Some(b)) => (a.0, b.0),
        _ => return None,
    };
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return None;
    }
    let country = r
        .country
        .and_then(|c| c.iso_code)
        .or(r.country_code)
        .map(|c| c.to_ascii_uppercase());
    let continent = r
        .continent
        .and_then(|c| c.code)
        .or_else(|| country.as_deref().and_then(continent_of).map(str::to_owned));
    Some(Location {
        lat,
        lon,
        country,
        continent,
    })
}

/// The databases in use: `geoip` (any family) and, optionally, `geoip_v6`
/// (asked first for IPv6 clients; DB-IP lite ships its IPv4 and IPv6 data
/// as two files). Each is replaced atomically on reload.
#[derive(Debug)]
pub struct GeoSet {
    pub main: GeoHandle,
    pub v6: GeoHandle,
}

impl GeoSet {
    /// The first database (in the client's family's order) that locates
    /// `ip`, and its answer.
    pub fn locate(&self, ip: IpAddr) -> Option<Lookup> {
        let v6 = matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_none());
        let order = if v6 {
            [&self.v6, &self.main]
        } else {
            [&self.main, &self.v6]
        };
        order
            .into_iter()
            .filter_map(|h| h.get())
            .map(|db| db.lookup(ip))
            .find(|l| l.location.is_some())
    }
}

/// One database in use, replaced atomically on reload.
#[derive(Debug)]
pub struct GeoHandle {
    current: arc_swap::ArcSwapOption<GeoDb>,
}

impl GeoHandle {
    pub fn new(db: Option<GeoDb>) -> Self {
        GeoHandle {
            current: arc_swap::ArcSwapOption::from(db.map(Arc::new)),
        }
    }
    pub fn get(&self) -> Option<Arc<GeoDb>> {
        self.current.load_full()
    }
    /// Reloads if the file changed; a file that does not open keeps the old
    /// database in service (logged), as when `geoipupdate` is interrupted.
    pub fn reload_if_changed(&self, path: &Path) -> bool {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if self
            .get()
            .is_some_and(|d| d.modified == modified && d.path == path)
        {
            return false;
        }
        match GeoDb::open(path) {
            Ok(db) => {
                tracing::info!(path = %path.display(), database_type = %db.database_type, "GeoIP database loaded");
                self.current.store(Some(Arc::new(db)));
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "GeoIP database not reloaded; keeping the previous one");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmdb::{Writer, dbip_city, geoip2_city};

    fn write(dir: &Path, name: &str, w: &Writer) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, w.build()).expect("write mmdb");
        p
    }

    #[test]
    fn both_layouts_round_trip_through_maxminddb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut g = Writer::new("GeoLite2-City");
        g.insert(
            "81.2.69.0".parse().expect("ip"),
            24,
            &geoip2_city(51.5, -0.1, "GB", "EU", "London"),
        );
        g.insert(
            "36.68.0.0".parse().expect("ip"),
            16,
            &geoip2_city(-6.2, 106.8, "ID", "AS", "Jakarta"),
        );
        g.insert(
            "2001:db8::".parse().expect("ip"),
            32,
            &geoip2_city(39.0, -77.5, "US", "NA", "Ashburn"),
        );
        let db = GeoDb::open(&write(dir.path(), "g.mmdb", &g)).expect("opens");
        let l = db.lookup("81.2.69.142".parse().expect("ip"));
        assert_eq!(l.prefix, 24);
        let loc = l.location.expect("located");
        assert_eq!((loc.lat, loc.lon), (51.5, -0.1));
        assert_eq!(loc.country.as_deref(), Some("GB"));
        assert_eq!(loc.continent.as_deref(), Some("EU"));
        assert_eq!(db.lookup("36.68.1.1".parse().expect("ip")).prefix, 16);
        assert!(
            db.lookup("2001:db8::1".parse().expect("ip"))
                .location
                .is_some()
        );
        assert!(db.lookup("8.8.8.8".parse().expect("ip")).location.is_none());

        let mut d = Writer::new("DBIP-City-Lite");
        d.insert(
            "200.0.0.0".parse().expect("ip"),
            8,
            &dbip_city(-23.5, -46.6, "BR", "Sao Paulo"),
        );
        d.insert(
            "200.1.2.0".parse().expect("ip"),
            24,
            &dbip_city(51.5, -0.1, "GB", "London"),
        );
        let db = GeoDb::open(&write(dir.path(), "d.mmdb", &d)).expect("opens");
        let l = db.lookup("200.5.5.5".parse().expect("ip"));
        assert_eq!(
            l.location
                .as_ref()
                .and_then(|l| l.continent.clone())
                .as_deref(),
            Some("SA")
        );
        let l = db.lookup("200.1.2.3".parse().expect("ip"));
        assert_eq!(
            l.prefix, 24,
            "a more specific network overrides the broader one"
        );
        assert_eq!(
            l.location.and_then(|l| l.country.clone()).as_deref(),
            Some("GB")
        );
    }

    /// Lookups are cached per thread by address; a reloaded database must
    /// answer from its own data, never from the old database's entries.
    #[test]
    fn a_reloaded_database_is_not_answered_from_the_old_ones_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = |cc: &str, lat: f64| {
            let mut g = Writer::new("GeoLite2-City");
            g.insert(
                "81.2.69.0".parse().expect("ip"),
                24,
                &geoip2_city(lat, -0.1, cc, "EU", "x"),
            );
            g
        };
        let h = GeoHandle::new(None);
        let p = write(dir.path(), "a.mmdb", &db("GB", 51.5));
        assert!(h.reload_if_changed(&p));
        let ip: IpAddr = "81.2.69.7".parse().expect("ip");
        let country = |h: &GeoHandle| {
            h.get()
                .expect("db")
                .lookup(ip)
                .location
                .and_then(|l| l.country.clone())
        };
        assert_eq!(country(&h).as_deref(), Some("GB"));
        assert_eq!(country(&h).as_deref(), Some("GB"), "cached");
        let q = write(dir.path(), "b.mmdb", &db("DE", 52.5));
        assert!(h.reload_if_changed(&q));
        assert_eq!(country(&h).as_deref(), Some("DE"));
    }

    #[test]
    fn garbage_file_is_refused_and_reload_keeps_the_old_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut g = Writer::new("GeoLite2-City");
        g.insert(
            "81.2.69.0".parse().expect("ip"),
            24,
            &geoip2_city(51.5, -0.1, "GB", "EU", "London"),
        );
        let p = write(dir.path(), "g.mmdb", &g);
        let h = GeoHandle::new(None);
        assert!(h.reload_if_changed(&p));
        std::fs::write(&p, b"this is not a database").expect("garbage");
        assert!(!h.reload_if_changed(&p));
        let db = h.get().expect("old database kept");
        assert!(
            db.lookup("81.2.69.1".parse().expect("ip"))
                .location
                .is_some()
        );
    }
}
