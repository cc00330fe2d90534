//! `cratere warm <Cargo.lock>...`: fetches every crates.io package of the given lockfiles,
//! and their index files, into the cache, in-process through the same [`IndexCache`] and
//! [`Downloads`] the server uses (so every file is verified against the index checksum and
//! written through a temp file and an atomic rename, which is what makes it safe while a
//! server runs on the same directories). Afterwards the proxy can serve those projects with
//! no upstream at all.
//!
//! [`IndexCache`]: crate::index_cache::IndexCache
//! [`Downloads`]: crate::downloads::Downloads

use anyhow::Context;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::core::Core;
use crate::downloads::find_version;
use crate::index_cache::IndexKey;
use crate::names::{CrateKey, CrateName, Version};
use crate::storage::CrateStore;

/// The `source` of a crates.io package in a lockfile: the git index URL (what cargo writes
/// whichever protocol it used) or the sparse one.
pub const CRATES_IO_SOURCES: [&str; 2] = [
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
];

/// A crates.io package pinned by a lockfile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Package {
    pub name: CrateName,
    pub version: Version,
    /// sha256 of the `.crate`, from the lockfile.
    pub checksum: Option<String>,
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// The crates.io packages of one lockfile.
#[derive(Debug, Default)]
pub struct Lockfile {
    pub packages: Vec<Package>,
    /// Packages from elsewhere (path, git, other registries), not warmed.
    pub other_sources: usize,
}

/// Parses a Cargo.lock (any version: v1 keeps checksums in `[metadata]`, later versions on
/// each package).
pub fn parse_lockfile(text: &str) -> anyhow::Result<Lockfile> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        package: Vec<RawPackage>,
        #[serde(default)]
        metadata: toml::Table,
    }
    #[derive(Deserialize)]
    struct RawPackage {
        name: String,
        version: String,
        source: Option<String>,
        checksum: Option<String>,
    }
    let raw: Raw = toml::from_str(text).context("not a Cargo.lock")?;
    let mut out = Lockfile::default();
    for p in raw.package {
        let Some(source) = p.source.filter(|s| CRATES_IO_SOURCES.contains(&s.as_str())) else {
            out.other_sources += 1;
            continue;
        };
        let checksum = p.checksum.or_else(|| {
            let key = format!("checksum {} {} ({source})", p.name, p.version);
            raw.metadata.get(&key)?.as_str().map(str::to_string)
        });
        out.packages.push(Package {
            name: p
                .name
                .parse()
                .with_context(|| format!("package name `{}`", p.name))?,
            version: p
                .version
                .parse()
                .with_context(|| format!("version `{}` of {}", p.version, p.name))?,
            checksum: checksum.map(|c| c.to_ascii_lowercase()),
        });
    }
    Ok(out)
}

/// What warming one package did.
#[derive(Debug, Clone, Copy)]
pub struct Warmed {
    /// Fetched from upstream now (false: it was cached already).
    pub fetched: bool,
    pub bytes: u64,
}

/// Totals of a warm run.
#[derive(Debug, Default)]
pub struct WarmReport {
    pub fetched: usize,
    pub already_cached: usize,
    pub failed: Vec<(Package, String)>,
    /// Bytes of crate files fetched from upstream.
    pub bytes_fetched: u64,
    /// Bytes of all the packages' crate files.
    pub bytes_total: u64,
}

/// Warms the cache with `packages`, at most `jobs` at once. `each` is told every result as
/// it comes.
pub async fn warm(
    core: &Core,
    packages: Vec<Package>,
    jobs: usize,
    mut each: impl FnMut(&Package, &Result<Warmed, String>),
) -> WarmReport {
    let mut report = WarmReport::default();
    let mut results = futures_util::stream::iter(packages)
        .map(|p| async move {
            let res = warm_one(core, &p).await;
            (p, res)
        })
        .buffer_unordered(jobs.max(1));
    while let Some((p, res)) = results.next().await {
        each(&p, &res);
        match res {
            Ok(w) => {
                report.bytes_total += w.bytes;
                if w.fetched {
                    report.fetched += 1;
                    report.bytes_fetched += w.bytes;
                } else {
                    report.already_cached += 1;
                }
            }
            Err(e) => report.failed.push((p, e)),
        }
    }
    core.usage.flush().await;
    report
}

/// The index file (with the locked version in it) and the verified crate file of one package.
async fn warm_one(core: &Core, p: &Package) -> Result<Warmed, String> {
    let key = IndexKey::Crate(p.name.index_path());
    let mut listed = false;
    for force in [false, true] {
        match core.index.get(&key, force).await {
            Ok(Some((entry, _))) => {
                if find_version(&entry.body, &p.name, &p.version).is_some() {
                    listed = true;
                    break;
                }
            }
            Ok(None) => return Err("upstream has no such crate".into()),
            Err(e) => return Err(format!("index file: upstream {e}")),
        }
    }
    if !listed {
        return Err("the index does not list this version".into());
    }
    let cached = core
        .downloads
        .ensure_cached(&p.name, &p.version)
        .await
        .map_err(|e| e.to_string())?;
    let key = CrateKey::new(&p.name, &p.version);
    verify(&core.crates, &key, p.checksum.as_deref()).await?;
    Ok(Warmed {
        fetched: cached.fetched,
        bytes: cached.len,
    })
}

/// The stored file is there and, when the lockfile gives a checksum, has exactly that sha256
/// (read back from the store: from disk, or from the bucket).
async fn verify(store: &CrateStore, key: &CrateKey, checksum: Option<&str>) -> Result<(), String> {
    let stored = match store.open_read(key).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err("not in the cache".into()),
        Err(e) => return Err(format!("not in the cache: {e}")),
    };
    let Some(expected) = checksum else {
        return Ok(());
    };
    let mut hasher = Sha256::new();
    let mut body = stored.into_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the cached file: {e}"))?;
        hasher.update(&chunk);
    }
    let got = hex::encode(hasher.finalize());
    if got != expected {
        return Err(format!(
            "cached file has sha256 {got}, Cargo.lock says {expected}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_crates_io_packages_of_v4_and_v1_lockfiles() {
        let v4 = r#"
version = 4

[[package]]
name = "app"
version = "0.1.0"
dependencies = ["Inflector", "serde"]

[[package]]
name = "Inflector"
version = "0.11.4"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "FE438E1A7A55B5E9C6B9A0BA4B2DB59E00EB0D5B8C9DC4A8E0C2B62C59C7C1DB"

[[package]]
name = "serde"
version = "1.0.200"
source = "sparse+https://index.crates.io/"
checksum = "ddc6f9cc94d67c0e21aaf7eda3a010fd3af78ebf6e096aa6e2e13c79749cce4f"

[[package]]
name = "private"
version = "1.0.0"
source = "registry+https://example.com/index"
checksum = "00"

[[package]]
name = "forked"
version = "1.0.0"
source = "git+https://example.com/forked#abc"
"#;
        let lock = parse_lockfile(v4).unwrap();
        assert_eq!(lock.other_sources, 3);
        let names: Vec<_> = lock.packages.iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["Inflector 0.11.4", "serde 1.0.200"]);
        assert_eq!(
            lock.packages[0].checksum.as_deref(),
            Some("fe438e1a7a55b5e9c6b9a0ba4b2db59e00eb0d5b8c9dc4a8e0c2b62c59c7c1db")
        );

        let v1 = r#"
[[package]]
name = "itoa"
version = "0.4.8"
source = "registry+https://github.com/rust-lang/crates.io-index"

[metadata]
"checksum itoa 0.4.8 (registry+https://github.com/rust-lang/crates.io-index)" = "b71991ff56294aa922b450139ee08b3bfc70982c6b2c7562771375cf73542dd4"
"#;
        let lock = parse_lockfile(v1).unwrap();
        assert_eq!(
            lock.packages[0].checksum.as_deref(),
            Some("b71991ff56294aa922b450139ee08b3bfc70982c6b2c7562771375cf73542dd4")
        );
    }

    #[test]
    fn refuses_what_is_not_a_lockfile() {
        assert!(parse_lockfile("this is not toml").is_err());
        let bad = "[[package]]\nname = \"../etc\"\nversion = \"1.0.0\"\nsource = \"sparse+https://index.crates.io/\"\n";
        assert!(parse_lockfile(bad).is_err());
    }
}
