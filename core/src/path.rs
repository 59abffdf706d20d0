//! Path rules, enforced when a manifest is built and again when it is parsed.
//!
//! A published path is a sequence of names separated by `/`. Each name is
//! valid UTF-8, 1..=255 bytes, not `.` or `..`, and contains no `/`, `\`,
//! NUL or other C0 control character. Names in one directory must stay
//! distinct after Unicode NFC normalisation, so that `café` spelled with a
//! combining accent and `café` precomposed cannot both exist: they would
//! collide on a normalising file system (macOS, many clients) and are a
//! classic spoofing trick.

use std::fmt;
use unicode_normalization::UnicodeNormalization;

/// Longest name in bytes (as on Linux).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest whole path in bytes (PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Deepest nesting of directories.
pub const MAX_DEPTH: usize = 128;

/// Why a name or path was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("empty path component in {0:?}")]
    Empty(String),
    #[error("path component `.` or `..` is not allowed: {0:?}")]
    DotComponent(String),
    #[error("absolute paths are not allowed: {0:?}")]
    Absolute(String),
    #[error("backslash is not allowed in a path: {0:?}")]
    Backslash(String),
    #[error("NUL or control character in path: {0:?}")]
    ControlChar(String),
    #[error("name longer than {MAX_NAME_BYTES} bytes: {0:?}")]
    NameTooLong(String),
    #[error("path longer than {MAX_PATH_BYTES} bytes or deeper than {MAX_DEPTH} levels: {0:?}")]
    TooLong(String),
    #[error("duplicate entry {0:?} in one directory")]
    Duplicate(String),
    #[error("names {0:?} and {1:?} differ only by Unicode normalisation")]
    NormalisationCollision(String, String),
    #[error("entries are not in canonical (sorted) order at {0:?}")]
    Unsorted(String),
    #[error("{0:?} is below a file, not a directory")]
    InsideFile(String),
    #[error("name is not valid UTF-8: {0}")]
    NotUtf8(String),
}

/// Checks a single name (one path component).
pub fn validate_name(name: &str) -> Result<(), PathError> {
    if name.is_empty() {
        return Err(PathError::Empty(name.to_owned()));
    }
    if name == "." || name == ".." {
        return Err(PathError::DotComponent(name.to_owned()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(PathError::NameTooLong(name.to_owned()));
    }
    for c in name.chars() {
        match c {
            '/' => return Err(PathError::Absolute(name.to_owned())),
            '\\' => return Err(PathError::Backslash(name.to_owned())),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                return Err(PathError::ControlChar(name.escape_debug().to_string()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Resolves a symlink `target` lexically against the directory `dir` that
/// holds the link (both relative to the tree root), `..` included. `None`
/// if the target is absolute or climbs above the root. Both the origin
/// (which refuses to publish escaping links) and the mirror (which follows
/// links inside the manifest) use this one rule.
pub fn resolve_symlink(dir: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
    for comp in target.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// The NFC form of a name, used to detect normalisation collisions.
pub fn nfc_key(name: &str) -> String {
    name.nfc().collect()
}

/// A validated relative path inside a published tree. The empty path is the
/// root directory.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(String);

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(String::new())
    }

    /// Parses a path such as `a/b/c.txt`. Rejects absolute paths, empty
    /// components (`a//b`, trailing `/`), `.` and `..`, backslashes and
    /// control characters.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(s.chars().take(64).collect()));
        }
        let mut depth = 0;
        for part in s.split('/') {
            depth += 1;
            match validate_name(part) {
                Ok(()) => {}
                Err(PathError::Empty(_)) => return Err(PathError::Empty(s.to_owned())),
                Err(PathError::DotComponent(_)) => {
                    return Err(PathError::DotComponent(s.to_owned()));
                }
                Err(e) => return Err(e),
            }
        }
        if depth > MAX_DEPTH {
            return Err(PathError::TooLong(s.chars().take(64).collect()));
        }
        Ok(RelPath(s.to_owned()))
    }

    /// The path joined with one more validated name.
    pub fn join(&self, name: &str) -> Result<Self, PathError> {
        validate_name(name)?;
        if self.0.is_empty() {
            Self::parse(name)
        } else {
            Self::parse(&format!("{}/{}", self.0, name))
        }
    }

    /// The path as text (no leading slash).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root directory.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components of the path.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RelPath({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in ["a", "a/b/c.txt", "dists/bookworm/Release", "ünïcode/名前"] {
            assert_eq!(RelPath::parse(p).map(|r| r.to_string()), Ok(p.to_owned()));
        }
        assert!(RelPath::parse("").is_ok_and(|p| p.is_root()));
    }

    #[test]
    fn rejects_every_bad_shape() {
        type Check = fn(&PathError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("../../etc/passwd", |e| {
                matches!(e, PathError::DotComponent(_))
            }),
            ("a/../b", |e| matches!(e, PathError::DotComponent(_))),
            ("a/./b", |e| matches!(e, PathError::DotComponent(_))),
            ("a//b", |e| matches!(e, PathError::Empty(_))),
            ("a/b/", |e| matches!(e, PathError::Empty(_))),
            ("a\\b", |e| matches!(e, PathError::Backslash(_))),
            ("a\0b", |e| matches!(e, PathError::ControlChar(_))),
            ("a\nb", |e| matches!(e, PathError::ControlChar(_))),
        ];
        for (p, want) in cases {
            let got = RelPath::parse(p);
            assert!(matches!(&got, Err(e) if want(e)), "{p:?} gave {got:?}");
        }
        assert!(matches!(
            RelPath::parse(&"x".repeat(256)),
            Err(PathError::NameTooLong(_))
        ));
        assert!(matches!(
            RelPath::parse(&vec!["d"; MAX_DEPTH + 1].join("/")),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn symlink_resolution_is_lexical_and_contained() {
        assert_eq!(resolve_symlink("a/b", "../c"), Some("a/c".into()));
        assert_eq!(resolve_symlink("a", "./x/y"), Some("a/x/y".into()));
        assert_eq!(resolve_symlink("", "../etc/passwd"), None);
        assert_eq!(resolve_symlink("a", "../../x"), None);
        assert_eq!(resolve_symlink("a", "/etc/passwd"), None);
    }

    #[test]
    fn nfc_key_folds_combining_forms() {
        let composed = "caf\u{e9}";
        let decomposed = "cafe\u{301}";
        assert_ne!(composed, decomposed);
        assert_eq!(nfc_key(composed), nfc_key(decomposed));
    }
}
