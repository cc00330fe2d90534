//! Work the index cache does before clients ask: refresh-ahead (files used recently are
//! revalidated shortly before their TTL runs out, so hot files never go stale on a client's
//! path) and dependency prefetch (when a crate's index file comes from upstream, the files of
//! the crates its newest version depends on are fetched too, recursively, so cargo's next
//! wave of requests finds them cached or in flight).
//!
//! Both run at lower priority than clients: each kind has its own small bound on requests
//! in flight, and refresh-ahead only starts while most upstream slots are free.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Background, IndexCache, IndexKey};
use crate::names::{CrateName, IndexPath};

/// Files asked for by a client within this many TTLs are kept fresh ahead of time.
const RECENT_TTLS: u32 = 2;

/// A file is revalidated ahead once this fraction of its TTL has passed (3/4).
const AHEAD_AT: (u32, u32) = (3, 4);

/// Most files tracked as recently used, and most prefetched files remembered (for the
/// "then used" metric).
const TRACKED: u64 = 100_000;

/// What the cache remembers for refresh-ahead and prefetch.
pub(super) struct Ahead {
    /// When a client last asked for each file (by the injected clock).
    recent: moka::sync::Cache<IndexKey, SystemTime>,
    /// Files claimed by a prefetch (`false`) or fetched by one (`true`), not asked for by a
    /// client yet.
    prefetched: moka::sync::Cache<IndexKey, bool>,
    /// `CRATERE_INDEX_PREFETCH`.
    prefetch: bool,
    /// Bounds on background requests in flight, per kind.
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    ahead_slots: Arc<tokio::sync::Semaphore>,
}

impl Ahead {
    pub(super) fn new(prefetch: bool, upstream_concurrency: usize) -> Ahead {
        Ahead {
            recent: moka::sync::Cache::new(TRACKED),
            prefetched: moka::sync::Cache::builder()
                .max_capacity(TRACKED)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            prefetch,
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(
                (upstream_concurrency / 4).max(1),
            )),
            ahead_slots: Arc::new(tokio::sync::Semaphore::new(
                (upstream_concurrency / 8).max(1),
            )),
        }
    }
}

impl IndexCache {
    /// Notes a client's use of `key` (for refresh-ahead) and whether a prefetch had fetched it.
    pub(super) fn note_client_use(&self, key: &IndexKey) {
        let now = self.clock.now();
        let known = self.ahead.recent.get(key);
        // At most one write per file per second: hits mostly only read.
        if known.is_none_or(|t| {
            now.duration_since(t)
                .is_ok_and(|d| d >= Duration::from_secs(1))
        }) {
            self.ahead.recent.insert(key.clone(), now);
        }
        if self.ahead.prefetch && self.ahead.prefetched.remove(key) == Some(true) {
            self.metrics.index_prefetch_used();
        }
    }

    /// One pass of refresh-ahead: starts the revalidation of each file a client used within
    /// the last two TTLs whose age has passed 3/4 of its TTL, while at least half the
    /// upstream slots are free. Returns how many were started.
    pub async fn refresh_ahead_once(self: &Arc<Self>) -> usize {
        let now = self.clock.now();
        let window = self.ttl * RECENT_TTLS;
        let due_at = self.ttl * AHEAD_AT.0 / AHEAD_AT.1;
        let mut started = 0;
        for (key, used) in self.ahead.recent.iter() {
            if now.duration_since(used).is_ok_and(|d| d > window) {
                self.ahead.recent.invalidate(&*key);
                continue;
            }
            let Some(entry) = self.memory_or_disk(&key).await else {
                continue;
            };
            if entry.gone || entry.age(now) < due_at {
                continue;
            }
            if !self.upstream.mostly_idle() {
                break;
            }
            let Ok(slot) = self.ahead.ahead_slots.clone().try_acquire_owned() else {
                break;
            };
            let (flight, joined) = self.refresh(&key, Some(Background::Ahead));
            if joined {
                continue;
            }
            started += 1;
            tokio::spawn(async move {
                flight.await;
                drop(slot);
            });
        }
        started
    }

    /// Prefetches the index files of the crates the newest version in `body` (the index
    /// file of `of`, just fetched from upstream) depends on.
    pub(super) fn prefetch_dependencies(self: &Arc<Self>, of: &IndexPath, body: &[u8]) {
        if !self.ahead.prefetch {
            return;
        }
        for name in dependencies_of_newest(body) {
            let path = name.index_path();
            if path == *of {
                continue;
            }
            let key = IndexKey::Crate(path);
            // Known already (cached, or prefetched): each wave goes one level further only.
            if self.memory.contains_key(&key) || self.ahead.prefetched.contains_key(&key) {
                continue;
            }
            self.ahead.prefetched.insert(key.clone(), false);
            let this = self.clone();
            tokio::spawn(async move {
                if this.memory_or_disk(&key).await.is_some() {
                    this.ahead.prefetched.invalidate(&key);
                    return;
                }
                let Ok(_slot) = this.ahead.prefetch_slots.clone().acquire_owned().await else {
                    return;
                };
                // A client may have fetched it while this waited for a slot.
                if this.memory.contains_key(&key) {
                    this.ahead.prefetched.invalidate(&key);
                    return;
                }
                let (flight, joined) = this.refresh(&key, Some(Background::Prefetch));
                if joined {
                    // A client's fetch (or another refresh) got there first: not ours.
                    this.ahead.prefetched.invalidate(&key);
                } else {
                    this.ahead.prefetched.insert(key.clone(), true);
                    this.metrics.index_prefetched();
                }
                flight.await;
            });
        }
    }
}

impl IndexCache {
    /// Revalidates the cached ones among these index files (paths as in the git index, e.g.
    /// `se/rd/serde`), in the background: the git mirror's sync saw them change upstream.
    pub fn refresh_changed(self: &Arc<Self>, paths: Vec<String>) {
        let this = self.clone();
        tokio::spawn(async move {
            for p in paths {
                let Ok(path) = p.parse::<IndexPath>() else {
                    continue;
                };
                let key = IndexKey::Crate(path);
                if this.memory_or_disk(&key).await.is_none() {
                    continue;
                }
                let Ok(slot) = this.ahead.ahead_slots.clone().acquire_owned().await else {
                    return;
                };
                let (flight, _) = this.refresh(&key, Some(Background::GitSync));
                tokio::spawn(async move {
                    flight.await;
                    drop(slot);
                });
            }
        });
    }
}

/// Runs refresh-ahead every eighth of the TTL (at least every second) until `shutdown`; not
/// at all with a TTL of 0 (every request revalidates then).
pub fn spawn_refresh_ahead(
    index: Arc<IndexCache>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    if index.ttl.is_zero() {
        return;
    }
    let stop = shutdown.clone();
    let period = (index.ttl / 8).max(Duration::from_secs(1));
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            index.refresh_ahead_once().await;
        }
    });
}

/// The crates the newest non-yanked, non-prerelease version in an index file depends on
/// for building (normal and build dependencies, not dev; not optional ones, which most
/// builds never turn on: measured on bench/project, including them left 60 % of the
/// prefetched files unused; target-specific ones too, since a lockfile covers every target),
/// on this registry, deduplicated. Index lines that do not parse are skipped.
pub fn dependencies_of_newest(body: &[u8]) -> Vec<CrateName> {
    #[derive(Deserialize)]
    struct Line {
        vers: String,
        #[serde(default)]
        deps: Vec<Dep>,
        #[serde(default)]
        yanked: bool,
    }
    #[derive(Deserialize)]
    struct Dep {
        name: String,
        /// The crate's real name when the dependency is renamed.
        #[serde(default)]
        package: Option<String>,
        #[serde(default)]
        kind: Option<String>,
        /// Another registry: not ours to fetch.
        #[serde(default)]
        registry: Option<String>,
        /// Only used when a feature turns it on: most never are.
        #[serde(default)]
        optional: bool,
    }
    let newest = body
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Line>(l).ok())
        .filter(|l| !l.yanked)
        .filter_map(|l| Some((semver::Version::parse(&l.vers).ok()?, l)))
        .filter(|(v, _)| v.pre.is_empty())
        .max_by(|(a, _), (b, _)| a.cmp(b));
    let Some((_, line)) = newest else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    line.deps
        .into_iter()
        .filter(|d| d.kind.as_deref() != Some("dev") && d.registry.is_none() && !d.optional)
        .filter_map(|d| d.package.unwrap_or(d.name).parse::<CrateName>().ok())
        .filter(|n| seen.insert(n.as_str().to_ascii_lowercase()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_of_the_newest_stable_version() {
        let body = br#"{"name":"a","vers":"1.0.0","deps":[{"name":"old","req":"1","kind":"normal"}],"cksum":"x","features":{},"yanked":false}
{"name":"a","vers":"1.2.0","deps":[{"name":"b","req":"1","kind":"normal"},{"name":"c","req":"1","kind":"build"},{"name":"t","req":"1","kind":"dev"},{"name":"renamed","package":"D","req":"1"},{"name":"opt","req":"1","optional":true},{"name":"b","req":"1","kind":"normal","target":"cfg(windows)"},{"name":"elsewhere","req":"1","registry":"https://example.com/index"}],"cksum":"x","features":{},"yanked":false}
{"name":"a","vers":"1.3.0","deps":[{"name":"yanked-dep","req":"1"}],"cksum":"x","features":{},"yanked":true}
{"name":"a","vers":"2.0.0-beta.1","deps":[{"name":"pre-dep","req":"1"}],"cksum":"x","features":{},"yanked":false}
not json
"#;
        let names: Vec<String> = dependencies_of_newest(body)
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        assert_eq!(names, ["b", "c", "D"]);
        assert!(dependencies_of_newest(b"").is_empty());
    }
}
