//! Byte ranges (RFC 9110 §14): parsing `Range`, coalescing, limits.
//!
//! Rules:
//! * A syntactically invalid `Range` header is ignored (full 200 response),
//!   as RFC 9110 requires.
//! * Satisfiable ranges are sorted and overlapping or adjacent ones are merged
//!   (RFC 9110 §14.2 allows coalescing); this defeats the "many overlapping
//!   ranges" amplification attack (CVE-2011-3192).
//! * More than `MAX_RANGES` (64) range specs: the header is ignored and the whole
//!   representation is sent, as Apache does since that CVE.
//! * If no range is satisfiable: 416 with `Content-Range: bytes */LEN`.

/// Most range specs considered in one header.
pub(crate) const MAX_RANGES: usize = 64;

/// What to send for a `Range` header against a representation of `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RangeResponse {
    /// 200 with the whole representation.
    Full,
    /// 206 with these inclusive `(first, last)` ranges, sorted, disjoint.
    Partial(Vec<(u64, u64)>),
    /// 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value.
pub(crate) fn parse(header: &str, len: u64) -> RangeResponse {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeResponse::Full;
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut count = 0;
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue; // RFC 9110 allows empty list elements
        }
        count += 1;
        if count > MAX_RANGES {
            return RangeResponse::Full;
        }
        let Some((a, b)) = part.split_once('-') else {
            return RangeResponse::Full;
        };
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            // suffix: last N bytes
            let Ok(n) = b.parse::<u64>() else {
                return RangeResponse::Full;
            };
            if n > 0 && len > 0 {
                ranges.push((len.saturating_sub(n), len - 1));
            }
            continue;
        }
        let Ok(first) = a.parse::<u64>() else {
            return RangeResponse::Full;
        };
        let last = if b.is_empty() {
            u64::MAX
        } else {
            match b.parse::<u64>() {
                Ok(l) if l >= first => l,
                _ => return RangeResponse::Full,
            }
        };
        if first < len {
            ranges.push((first, last.min(len - 1)));
        }
    }
    if count == 0 {
        return RangeResponse::Full;
    }
    if ranges.is_empty() {
        return RangeResponse::Unsatisfiable;
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, pb)) if a <= pb.saturating_add(1) => *pb = (*pb).max(b),
            _ => merged.push((a, b)),
        }
    }
    RangeResponse::Partial(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeResponse::*;

    #[test]
    fn single_suffix_open() {
        assert_eq!(parse("bytes=0-99", 1000), Partial(vec![(0, 99)]));
        assert_eq!(parse("bytes=900-", 1000), Partial(vec![(900, 999)]));
        assert_eq!(parse("bytes=-100", 1000), Partial(vec![(900, 999)]));
        assert_eq!(parse("bytes=-5000", 1000), Partial(vec![(0, 999)]));
        assert_eq!(parse("bytes=990-2000", 1000), Partial(vec![(990, 999)]));
    }

    #[test]
    fn multi_and_overlap_coalesce() {
        assert_eq!(
            parse("bytes=0-9, 20-29", 100),
            Partial(vec![(0, 9), (20, 29)])
        );
        assert_eq!(parse("bytes=0-50,10-20,51-60", 100), Partial(vec![(0, 60)]));
        assert_eq!(
            parse("bytes=50-60,0-5", 100),
            Partial(vec![(0, 5), (50, 60)])
        );
    }

    #[test]
    fn unsatisfiable_and_malformed() {
        assert_eq!(parse("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(parse("bytes=5-1", 1000), Full);
        assert_eq!(parse("bytes=abc", 1000), Full);
        assert_eq!(parse("items=0-1", 1000), Full);
        assert_eq!(parse("bytes=", 1000), Full);
        assert_eq!(parse("bytes=1-2-3", 1000), Full);
    }

    #[test]
    fn too_many_ranges_sends_everything() {
        let many: Vec<String> = (0..=MAX_RANGES).map(|i| format!("{i}-{i}")).collect();
        assert_eq!(parse(&format!("bytes={}", many.join(",")), 1000), Full);
        let ok: Vec<String> = (0..MAX_RANGES)
            .map(|i| format!("{}-{}", i * 2, i * 2))
            .collect();
        assert!(
            matches!(parse(&format!("bytes={}", ok.join(",")), 1000), Partial(v) if v.len() == MAX_RANGES)
        );
    }

    proptest::proptest! {
        #[test]
        fn partial_ranges_are_in_bounds_and_disjoint(h in "bytes=[0-9,\\- ]{0,40}", len in 0u64..5000) {
            if let Partial(v) = parse(&h, len) {
                for w in v.windows(2) {
                    proptest::prop_assert!(w[0].1 + 1 < w[1].0);
                }
                for (a, b) in v {
                    proptest::prop_assert!(a <= b && b < len);
                }
            }
        }
    }
}
