//! Request input as types: crate names, versions and index paths.
//!
//! These are the only way a string from a client becomes part of a filesystem path, a storage key
//! or an upstream URL. Each constructor enforces crates.io's rules, so traversal (`..`, `/`, `%2F`
//! after decoding), NUL bytes and over-long values cannot be represented at all.

use std::fmt;
use std::str::FromStr;

/// Longest crate name crates.io accepts.
pub const MAX_NAME_LEN: usize = 64;
/// Longest version string crates.io accepts.
pub const MAX_VERSION_LEN: usize = 150;

/// Why a name, version or path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("crate name is empty")]
    Empty,
    #[error("crate name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("crate name must start with an ASCII letter")]
    BadStart,
    #[error("crate name may only contain ASCII letters, digits, `-` and `_`")]
    BadChar,
    #[error("version is longer than {MAX_VERSION_LEN} characters")]
    VersionTooLong,
    #[error("version is not valid SemVer")]
    BadVersion,
    #[error("not an index path")]
    BadIndexPath,
}

/// A crate name that satisfies crates.io's rules (1–64 chars, ASCII alphanumeric, `-`, `_`,
/// starting with a letter). Keeps the case it was given.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CrateName(String);

impl CrateName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The lowercased name: what index paths and cache keys are built from, so every case
    /// variant of a name maps to the same file.
    pub fn to_lowercase(&self) -> CrateName {
        CrateName(self.0.to_ascii_lowercase())
    }

    /// cargo's prefix directories for this name, keeping its case: `1`, `2`, `3/s`, `se/rd`.
    pub fn prefix(&self) -> String {
        let mut out = String::with_capacity(5);
        self.push_prefix(&mut out);
        out
    }

    /// Appends [`CrateName::prefix`] to `out` (no allocation of its own: on every hit's path).
    fn push_prefix(&self, out: &mut String) {
        let n = &self.0;
        match n.len() {
            1 => out.push('1'),
            2 => out.push('2'),
            3 => {
                out.push_str("3/");
                out.push_str(&n[..1]);
            }
            _ => {
                out.push_str(&n[..2]);
                out.push('/');
                out.push_str(&n[2..4]);
            }
        }
    }

    /// The sparse index path of this crate (always lowercase, as cargo requests it).
    pub fn index_path(&self) -> IndexPath {
        IndexPath(self.to_lowercase())
    }
}

impl FromStr for CrateName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !first.is_ascii_alphabetic() {
            return Err(NameError::BadStart);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(NameError::BadChar);
        }
        Ok(CrateName(s.to_string()))
    }
}

impl fmt::Display for CrateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SemVer version string as crates.io accepts it (at most 150 chars). The original text is
/// kept, because it is what the index line and the upstream URL use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(String);

impl Version {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Version {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.len() > MAX_VERSION_LEN {
            return Err(NameError::VersionTooLong);
        }
        // semver's grammar only admits [0-9A-Za-z.+-], so '/', '\\', NUL and ".." segments
        // cannot get through (a ".." would need an empty identifier, which SemVer rejects).
        semver::Version::parse(s).map_err(|_| NameError::BadVersion)?;
        Ok(Version(s.to_string()))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sparse index path of one crate, e.g. `se/rd/serde`. Only built from a lowercased
/// [`CrateName`], so it can be joined to a directory or a URL safely.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IndexPath(CrateName);

impl IndexPath {
    /// The crate name this path belongs to (lowercase).
    pub fn name(&self) -> &CrateName {
        &self.0
    }

    /// Relative path, `/`-separated, no leading slash.
    pub fn as_relative(&self) -> String {
        let mut out = String::with_capacity(6 + self.0.0.len());
        self.push_relative(&mut out);
        out
    }

    fn push_relative(&self, out: &mut String) {
        self.0.push_index_path(out);
    }
}

impl CrateName {
    /// Appends `{prefix}/{name}`: the index path of a name that is lowercase already.
    fn push_index_path(&self, out: &mut String) {
        self.push_prefix(out);
        out.push('/');
        out.push_str(&self.0);
    }
}

impl FromStr for IndexPath {
    type Err = NameError;

    /// Accepts exactly the path cargo would request for some crate: the lowercase name as the
    /// last segment, behind the right prefix directories. Anything else is refused.
    fn from_str(s: &str) -> Result<Self, NameError> {
        let last = s.rsplit('/').next().unwrap_or_default();
        let name: CrateName = last.parse().map_err(|_| NameError::BadIndexPath)?;
        if name.as_str() != name.to_lowercase().as_str() {
            return Err(NameError::BadIndexPath);
        }
        let path = IndexPath(name);
        if path.as_relative() != s {
            return Err(NameError::BadIndexPath);
        }
        Ok(path)
    }
}

impl fmt::Display for IndexPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_relative())
    }
}

/// A crate file: canonical key of one `.crate` in the cache, e.g. `se/rd/serde/serde-1.0.200.crate`.
/// The name is lowercased so that every case variant of a request maps to one file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CrateKey {
    name: CrateName,
    version: Version,
}

impl CrateKey {
    pub fn new(name: &CrateName, version: &Version) -> Self {
        CrateKey {
            name: name.to_lowercase(),
            version: version.clone(),
        }
    }

    pub fn name(&self) -> &CrateName {
        &self.name
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Relative path in the crate cache (and object key under a prefix).
    /// Built in one allocation: this is on the path of every crate hit.
    pub fn as_relative(&self) -> String {
        let name = self.name.as_str();
        let version = self.version.as_str();
        let mut out = String::with_capacity(2 * name.len() + version.len() + 14);
        // `name` is lowercase already (see `new`), so it is its own index path.
        self.name.push_index_path(&mut out);
        out.push('/');
        out.push_str(name);
        out.push('-');
        out.push_str(version);
        out.push_str(".crate");
        out
    }
}

impl FromStr for CrateKey {
    type Err = NameError;

    /// Accepts exactly a key [`CrateKey::as_relative`] produces: the lowercase crate's index
    /// path, then `{name}-{version}.crate`. Anything else in a cache directory is not a crate.
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (dir, file) = s.rsplit_once('/').ok_or(NameError::BadIndexPath)?;
        let path: IndexPath = dir.parse()?;
        let version = file
            .strip_prefix(path.name().as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".crate"))
            .ok_or(NameError::BadIndexPath)?
            .parse()?;
        Ok(CrateKey {
            name: path.0,
            version,
        })
    }
}

impl fmt::Display for CrateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_relative())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_crates_io_rules() {
        for ok in [
            "a",
            "serde",
            "serde_json",
            "Inflector",
            "a-b_c9",
            &"x".repeat(64),
        ] {
            assert!(ok.parse::<CrateName>().is_ok(), "{ok}");
        }
        assert_eq!("".parse::<CrateName>(), Err(NameError::Empty));
        assert_eq!("x".repeat(65).parse::<CrateName>(), Err(NameError::TooLong));
        assert_eq!("9lives".parse::<CrateName>(), Err(NameError::BadStart));
        assert_eq!("_x".parse::<CrateName>(), Err(NameError::BadStart));
        for bad in ["a/b", "a.b", "..", "a\0b", "a b", "a%2F", "sérde", "a\\b"] {
            assert!(bad.parse::<CrateName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_are_semver_with_a_length_limit() {
        for ok in ["1.0.0", "0.1.0-alpha.1", "1.0.0+build.5", "1.2.3-rc.1+zz"] {
            assert_eq!(ok.parse::<Version>().unwrap().as_str(), ok);
        }
        for bad in [
            "1", "1.0", "../1.0.0", "1.0.0/..", "1.0.0\0", "v1.0.0", "", "1.0.0 ",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
        let long = format!("1.0.0-{}", "a".repeat(150));
        assert_eq!(long.parse::<Version>(), Err(NameError::VersionTooLong));
    }

    #[test]
    fn prefix_layout_matches_cargo() {
        let p = |n: &str| n.parse::<CrateName>().unwrap().index_path().as_relative();
        assert_eq!(p("a"), "1/a");
        assert_eq!(p("ab"), "2/ab");
        assert_eq!(p("syn"), "3/s/syn");
        assert_eq!(p("serde"), "se/rd/serde");
        assert_eq!(p("Inflector"), "in/fl/inflector");
        assert_eq!("Inflector".parse::<CrateName>().unwrap().prefix(), "In/fl");
    }

    #[test]
    fn index_paths_round_trip_and_refuse_everything_else() {
        for ok in ["1/a", "2/ab", "3/s/syn", "se/rd/serde", "ca/rg/cargo"] {
            assert_eq!(ok.parse::<IndexPath>().unwrap().as_relative(), ok);
        }
        for bad in [
            "",
            "serde",
            "se/rd/Serde",
            "SE/RD/serde",
            "se/rd/../serde",
            "../se/rd/serde",
            "se/rd/serde/",
            "/se/rd/serde",
            "xx/yy/serde",
            "3/x/syn",
            "2/abc",
            "config.json",
            "se//rd/serde",
            "se/rd/ser\0de",
        ] {
            assert!(bad.parse::<IndexPath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crate_keys_use_the_lowercase_name() {
        let k = CrateKey::new(&"Inflector".parse().unwrap(), &"0.11.4".parse().unwrap());
        assert_eq!(k.as_relative(), "in/fl/inflector/inflector-0.11.4.crate");
        let k = CrateKey::new(&"serde".parse().unwrap(), &"1.0.200".parse().unwrap());
        assert_eq!(k.as_relative(), "se/rd/serde/serde-1.0.200.crate");
        assert_eq!(k.as_relative().parse::<CrateKey>().unwrap(), k);
        for not_a_key in [
            "se/rd/serde/serde-1.0.200.crate.part",
            "se/rd/serde/serde_json-1.0.200.crate",
            "se/rd/Serde/Serde-1.0.200.crate",
            "se/rd/serde/serde-1.0.crate",
            "xx/rd/serde/serde-1.0.200.crate",
            "serde-1.0.200.crate",
            ".tmp/w-123",
        ] {
            assert!(not_a_key.parse::<CrateKey>().is_err(), "{not_a_key}");
        }
    }
}
