//! Request paths: the one way a URL path becomes a published path
//! (`normalise`), and a published path becomes a URL path again
//! (`encode_path`). The mirror serves by them; the redirector builds its
//! targets by them, so a target is always a configured base URL plus an
//! encoded published path, never a piece of the request.

/// Percent-decodes and normalises a request path. `.` and empty segments
/// are dropped, `..` pops a segment (never above the root), and every
/// remaining name must be a valid published name: NUL, control characters,
/// backslashes and invalid UTF-8 are refused. Returns the path without
/// leading slash and whether it named a directory (trailing slash).
pub fn normalise(raw: &str) -> Option<(std::borrow::Cow<'_, str>, bool)> {
    // Fast path: a plain path (no escapes, no dot or empty segments) is
    // already normal; it only needs its names checked.
    if let Some(rest) = raw.strip_prefix('/')
        && !raw.contains('%')
    {
        let trailing = rest.ends_with('/');
        let body = rest.strip_suffix('/').unwrap_or(rest);
        let plain = body.is_empty()
            || body
                .split('/')
                .all(|seg| seg != "." && seg != ".." && meridian_core::validate_name(seg).is_ok());
        if plain {
            return Some((body.into(), trailing || body.is_empty()));
        }
    }
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let decoded = String::from_utf8(bytes).ok()?;
    let trailing = decoded.ends_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            s => {
                meridian_core::validate_name(s).ok()?;
                parts.push(s);
            }
        }
    }
    Some((parts.join("/").into(), trailing))
}

/// Percent-encodes a normalised path for a URL (a Location, an href):
/// controls, space, quotes and the URL delimiters are escaped.
pub fn encode_path(p: &str) -> String {
    encoded(p).to_string()
}

/// [`encode_path`] as a `Display`, to write into a buffer without a
/// `String` of its own.
pub fn encoded(p: &str) -> percent_encoding::PercentEncode<'_> {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'<')
        .add(b'>')
        .add(b'?')
        .add(b'`')
        .add(b'{')
        .add(b'}');
    percent_encoding::utf8_percent_encode(p, SET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_never_escapes() {
        assert_eq!(normalise("/a/b.txt"), Some(("a/b.txt".into(), false)));
        assert_eq!(normalise("/a//b/./c/"), Some(("a/b/c".into(), true)));
        assert_eq!(normalise("/a/../b"), Some(("b".into(), false)));
        assert_eq!(normalise("/"), Some(("".into(), true)));
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a/%2E%2E/%2e%2e/x",
            "/a%00b",
            "/a%0ab",
            "/a%5cb",
            "/%ff",
            "/..",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
        // An encoded slash is a separator after decoding, still contained.
        assert_eq!(normalise("/a%2fb"), Some(("a/b".into(), false)));
    }
}
