//! The bearer-token check every admin endpoint uses (mirror drain, GeoDNS
//! admin): `Authorization: Bearer <token>`, the scheme matched without
//! regard to case (RFC 9110 §11.1), the token compared in constant time.

use http::HeaderMap;

/// Whether `headers` carry `Bearer <token>`.
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an admin token is unusable, for config checks: an empty one would
/// let anyone in.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.trim().is_empty() {
        return Err(
            "the admin token is empty; set a long random one (e.g. `openssl rand -hex 32`), or leave it out to turn the admin API off",
        );
    }
    Ok(())
}

/// Warns when `path`, a config file that holds a token, can be read by
/// group or others.
pub fn warn_if_readable(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path) {
        let mode = md.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "{} holds {what} and is readable by group or others; run `chmod 600 {}` (or pass the token in the environment)",
                path.display(),
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_exact() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(http::header::AUTHORIZATION, v.parse().expect("header"));
            m
        };
        for ok in [
            "Bearer s3cret",
            "bearer s3cret",
            "BEARER s3cret",
            "BeArEr  s3cret",
        ] {
            assert!(bearer_matches(&h(ok), "s3cret"), "{ok}");
        }
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "Bearers3cret",
            "s3cret",
        ] {
            assert!(!bearer_matches(&h(bad), "s3cret"), "{bad}");
        }
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
        assert!(
            !bearer_matches(&h("Bearer "), ""),
            "an empty token never matches"
        );
        assert!(check_token("").is_err() && check_token("  ").is_err());
        assert!(check_token("x").is_ok());
    }
}
