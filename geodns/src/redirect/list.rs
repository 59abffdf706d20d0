//! The redirector's reports: the mirror list of one path
//! (`PATH?mirrorlist`, HTML or JSON) and the download counts
//! (`/.meridian/stats`, JSON), the statistics MirrorBits users rely on.

use crate::health::Standing;
use crate::select::MirrorView;
use meridian_serve::files::html_escape as esc;
use serde::Serialize;
use std::fmt::Write;
use std::sync::Mutex;

/// Paths counted one by one; past this, downloads of new paths are counted
/// only in the total (memory stays bounded whatever clients ask).
const TRACKED: usize = 100_000;
/// Paths in the summary.
const TOP: usize = 100;

/// Downloads: one per GET that starts a download (no `Range`, or one from
/// byte 0), per file and per mirror.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    files: rustc_hash::FxHashMap<Box<str>, u64>,
    mirrors: rustc_hash::FxHashMap<Box<str>, u64>,
    total: u64,
    untracked: u64,
}

/// Whether a request with these headers starts a download (resumes and
/// the later ranges of a split download are not counted again).
pub(crate) fn starts_download(headers: &http::HeaderMap) -> bool {
    match headers
        .get(http::header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(r) => r
            .trim()
            .strip_prefix("bytes=")
            .is_some_and(|r| r.trim_start().starts_with("0-")),
    }
}

impl Counts {
    pub(crate) fn count(&self, path: &str, mirror: &str) {
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let c = &mut *guard;
        c.total += 1;
        // Lookups by &str: an allocation only for a path or mirror seen
        // for the first time.
        let tracked = c.files.len();
        match c.files.get_mut(path) {
            Some(n) => *n += 1,
            None if tracked < TRACKED => {
                c.files.insert(path.into(), 1);
            }
            None => c.untracked += 1,
        }
        match c.mirrors.get_mut(mirror) {
            Some(n) => *n += 1,
            None => {
                c.mirrors.insert(mirror.into(), 1);
            }
        }
    }

    /// The JSON summary: totals, by mirror, the most downloaded paths.
    pub(crate) fn summary(&self, since: i64) -> Vec<u8> {
        #[derive(Serialize)]
        struct File<'a> {
            path: &'a str,
            downloads: u64,
        }
        #[derive(Serialize)]
        struct Summary<'a> {
            since: i64,
            downloads: u64,
            by_mirror: std::collections::BTreeMap<&'a str, u64>,
            top_files: Vec<File<'a>>,
            files_counted: usize,
            downloads_of_uncounted_files: u64,
        }
        let Ok(c) = self.inner.lock() else {
            return b"{}".to_vec();
        };
        let mut top: Vec<File<'_>> = c
            .files
            .iter()
            .map(|(p, &n)| File {
                path: p,
                downloads: n,
            })
            .collect();
        top.sort_unstable_by(|a, b| b.downloads.cmp(&a.downloads).then(a.path.cmp(b.path)));
        top.truncate(TOP);
        serde_json::to_vec_pretty(&Summary {
            since,
            downloads: c.total,
            by_mirror: c.mirrors.iter().map(|(k, &v)| (k.as_ref(), v)).collect(),
            top_files: top,
            files_counted: c.files.len(),
            downloads_of_uncounted_files: c.untracked,
        })
        .unwrap_or_default()
    }
}

/// One mirror as the list shows it.
#[derive(Serialize)]
pub(crate) struct Row<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub country: Option<&'a str>,
    /// From the client, when the client was placed.
    pub distance_km: Option<f64>,
    pub standing: Standing,
    pub generation: u64,
    pub load: f64,
    /// It serves this path's exact bytes (the redirector may send clients).
    pub has_it: bool,
    pub url: Option<String>,
}

/// The rows for `views`, nearest first.
pub(crate) fn rows<'a>(
    views: &'a [MirrorView],
    dists: Option<&[f64]>,
    full_at: f64,
    countries: &'a rustc_hash::FxHashMap<String, Box<str>>,
    has: impl Fn(usize) -> bool,
    url: impl Fn(usize) -> String,
) -> Vec<Row<'a>> {
    let mut rows: Vec<Row<'a>> = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let has_it = has(i);
            Row {
                id: &v.id,
                region: &v.region,
                country: countries.get(&v.id).map(|c| c.as_ref()),
                distance_km: dists.and_then(|d| d.get(i).copied()),
                standing: Standing::of(v, full_at),
                generation: v.generation,
                load: v.health.load,
                has_it,
                url: has_it.then(|| url(i)),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.distance_km
            .unwrap_or(0.0)
            .total_cmp(&b.distance_km.unwrap_or(0.0))
    });
    rows
}

/// The HTML page of the mirror list for `path`.
pub(crate) fn html(path: &str, generation: u64, rows: &[Row<'_>]) -> String {
    let mut h = String::with_capacity(2048 + 400 * rows.len());
    let title = format!("Mirrors of /{}", esc(path));
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>body{{font:15px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:64rem;padding:0 .5rem}}\
         table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ccc}}\
         td.num{{text-align:right}}.scroll{{overflow-x:auto}}</style></head><body>\
         <h1>{title}</h1><p>Generation {generation}. Nearest first; a mirror is sent clients for this path \
         only when it serves its exact bytes and is in service.</p><div class=\"scroll\"><table>\
         <thead><tr><th scope=\"col\">Mirror</th><th scope=\"col\">Region</th><th scope=\"col\">Country</th>\
         <th scope=\"col\">Distance</th><th scope=\"col\">State</th><th scope=\"col\">Generation</th>\
         <th scope=\"col\">Load</th><th scope=\"col\">This path</th></tr></thead><tbody>"
    );
    for r in rows {
        let dist = r
            .distance_km
            .map_or_else(|| "?".to_owned(), |d| format!("{d:.0} km"));
        let state = r.standing.reason();
        let this = match &r.url {
            Some(u) => format!("<a href=\"{0}\">{0}</a>", esc(u)),
            None => "not served here".to_owned(),
        };
        let _ = write!(
            h,
            "<tr data-id=\"{id}\"><th scope=\"row\">{id}</th><td>{region}</td><td>{cc}</td>\
             <td class=\"num\">{dist}</td><td>{state}</td><td class=\"num\">{g}</td>\
             <td class=\"num\">{load:.0}%</td><td>{this}</td></tr>",
            id = esc(r.id),
            region = esc(r.region),
            cc = esc(r.country.unwrap_or("")),
            g = r.generation,
            load = r.load * 100.0,
        );
    }
    h.push_str("</tbody></table></div></body></html>\n");
    h
}
