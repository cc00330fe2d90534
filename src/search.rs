//! `cargo search` through the proxy: `/api/v1/crates?q=…&per_page=…` relayed to crates.io's
//! web API under its data-access policy (at most one request per second, a descriptive
//! User-Agent), identical queries answered from a short-lived cache, and — when upstream
//! fails — an answer built from what this proxy has cached, so search works air-gapped.
//! The routes are in [`crate::http`]; this module knows nothing of HTTP responses.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use crate::index_cache::{IndexCache, IndexKey};
use crate::names::CrateName;
use crate::singleflight::SingleFlight;
use crate::storage::CrateStore;
use crate::upstream::{Upstream, UpstreamError};

/// How long an identical query is answered from memory.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a local answer (upstream failing) is reused for an identical query: a walk of
/// the caches and a listing of the crate store per client would be a cheap way to load the
/// proxy, but upstream should be asked again soon.
const LOCAL_TTL: Duration = Duration::from_secs(10);
/// Most queries kept in memory.
const CACHE_ENTRIES: usize = 1024;
/// Longest a query waits for its upstream slot before it gets a 429 instead.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(5);
const MAX_PER_PAGE: u32 = 100;
const MAX_QUERY_LEN: usize = 256;

/// Spaces upstream requests at least `interval` apart; callers queue for their slot, and get
/// `Err(retry_after)` when their slot is more than `max_wait` away.
pub struct RateLimiter {
    interval: Duration,
    max_wait: Duration,
    next: Mutex<Option<tokio::time::Instant>>,
}

impl RateLimiter {
    pub fn new(interval: Duration, max_wait: Duration) -> RateLimiter {
        RateLimiter {
            interval,
            max_wait,
            next: Mutex::new(None),
        }
    }

    pub async fn acquire(&self) -> Result<(), Duration> {
        let slot = {
            let mut next = self.next.lock().expect("lock poisoned");
            let now = tokio::time::Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            if slot - now > self.max_wait {
                return Err(slot - now);
            }
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
        Ok(())
    }
}

/// A search, checked: a query of at most [`MAX_QUERY_LEN`] bytes, a page size of 1 to
/// [`MAX_PER_PAGE`], a page from 1.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SearchQuery {
    q: String,
    per_page: u32,
    page: u32,
}

impl SearchQuery {
    /// The query cargo sent (`q`, `per_page`, `page`), or why it is refused.
    pub fn new(
        q: Option<String>,
        per_page: Option<u32>,
        page: Option<u32>,
    ) -> Result<SearchQuery, &'static str> {
        let q = q.unwrap_or_default();
        if q.trim().is_empty() {
            return Err("missing search query `q`");
        }
        if q.len() > MAX_QUERY_LEN || q.contains('\0') {
            return Err("search query too long or invalid");
        }
        Ok(SearchQuery {
            q,
            per_page: per_page.unwrap_or(10).clamp(1, MAX_PER_PAGE),
            page: page.unwrap_or(1).max(1),
        })
    }
}

type SearchKey = SearchQuery;

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The answer cache (an identical query less than a minute ago).
    Cache,
    Upstream,
    /// Built from what this proxy has cached: upstream failed.
    Local,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Local => "local",
        }
    }
}

/// Upstream's answer as it came: status and JSON body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Bytes,
}

/// The outcome of a search.
#[derive(Debug)]
pub enum SearchAnswer {
    /// A JSON body for cargo with upstream's status (200, or a 4xx about the query).
    Found {
        status: u16,
        body: Bytes,
        source: Source,
    },
    /// The upstream slot is further away than a client should wait.
    RateLimited { retry_after: Duration },
    /// The search task failed.
    Failed,
}

pub struct Search {
    upstream: Upstream,
    api: url::Url,
    limiter: RateLimiter,
    /// Answers by query: until when, the answer, where it came from.
    cache: Mutex<HashMap<SearchKey, (Instant, Answer, Source)>>,
    flights: SingleFlight<SearchKey, Result<(Answer, Source), Duration>>,
    index: Arc<IndexCache>,
    crates: CrateStore,
}

#[derive(Debug, Clone)]
enum SearchFailure {
    Upstream(UpstreamError),
    RateLimited(Duration),
}

impl Search {
    pub fn new(
        upstream: Upstream,
        api: url::Url,
        interval: Duration,
        index: Arc<IndexCache>,
        crates: CrateStore,
    ) -> Search {
        Search {
            upstream,
            api,
            limiter: RateLimiter::new(interval, MAX_QUEUE_WAIT),
            cache: Mutex::default(),
            flights: SingleFlight::default(),
            index,
            crates,
        }
    }

    fn cached(&self, key: &SearchKey) -> Option<(Answer, Source)> {
        let cache = self.cache.lock().expect("lock poisoned");
        cache
            .get(key)
            .filter(|(until, _, _)| Instant::now() < *until)
            .map(|(_, a, source)| (a.clone(), *source))
    }

    fn remember(&self, key: SearchKey, answer: Answer, source: Source) {
        let ttl = if source == Source::Local {
            LOCAL_TTL
        } else {
            CACHE_TTL
        };
        let now = Instant::now();
        let mut cache = self.cache.lock().expect("lock poisoned");
        cache.retain(|_, (until, _, _)| now < *until);
        if cache.len() >= CACHE_ENTRIES
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (until, _, _))| *until)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(key, (now + ttl, answer, source));
    }
}

impl Search {
    /// Answers a search: from the answer cache, from upstream (one request at a time, spaced
    /// by the rate limit, identical queries coalesced), or from the local caches.
    pub async fn search(self: &Arc<Self>, query: &SearchQuery) -> SearchAnswer {
        if let Some((a, source)) = self.cached(query) {
            let source = match source {
                Source::Local => Source::Local,
                _ => Source::Cache,
            };
            return found(a, source);
        }
        let (s, k) = (self.clone(), query.clone());
        // One flight per query, the local fallback included: clients waiting on the same
        // query share one walk of the caches.
        let (res, _) = self
            .flights
            .run(query.clone(), move || async move {
                let (answer, source) = match ask_upstream(&s, &k).await {
                    Ok(answer) => (answer, Source::Upstream),
                    Err(SearchFailure::RateLimited(wait)) => return Err(wait),
                    Err(SearchFailure::Upstream(e)) => {
                        tracing::warn!(error = %e, "search upstream failed; answering from the cache");
                        (local_answer(&s, &k).await, Source::Local)
                    }
                };
                if answer.status == 200 {
                    s.remember(k, answer.clone(), source);
                }
                Ok((answer, source))
            })
            .await;
        match res {
            Some(Ok((answer, source))) => found(answer, source),
            Some(Err(retry_after)) => SearchAnswer::RateLimited { retry_after },
            None => SearchAnswer::Failed,
        }
    }
}

fn found(answer: Answer, source: Source) -> SearchAnswer {
    SearchAnswer::Found {
        status: answer.status,
        body: answer.body,
        source,
    }
}

async fn ask_upstream(search: &Search, key: &SearchKey) -> Result<Answer, SearchFailure> {
    search
        .limiter
        .acquire()
        .await
        .map_err(SearchFailure::RateLimited)?;
    let mut url = search
        .api
        .join("api/v1/crates")
        .map_err(|e| SearchFailure::Upstream(UpstreamError::Config(e.to_string())))?;
    url.query_pairs_mut()
        .append_pair("q", &key.q)
        .append_pair("per_page", &key.per_page.to_string())
        .append_pair("page", &key.page.to_string());
    let (status, body) = search
        .upstream
        .fetch_api(url)
        .await
        .map_err(SearchFailure::Upstream)?;
    // Server-side trouble and rate limiting fall back to the local answer; other answers
    // (200, a 400 about the query) are cargo's to show.
    if status >= 500 || status == 429 {
        return Err(SearchFailure::Upstream(UpstreamError::Status(status)));
    }
    Ok(Answer { status, body })
}

/// Crates this proxy knows (index files it cached, crate files in the crate store, which
/// with S3 are every replica's) whose name contains the query (case, `-` and `_` ignored),
/// with their newest non-yanked version from the cached index.
async fn local_answer(search: &Search, key: &SearchKey) -> Answer {
    let needle = normalize(&key.q);
    let index_root = search.index.store().root().to_path_buf();
    let n = needle.clone();
    let mut names = tokio::task::spawn_blocking(move || {
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for name in index_names(&index_root) {
            if normalize(&name).contains(&n) {
                names.entry(name).or_default();
            }
        }
        names
    })
    .await
    .unwrap_or_default();
    match search.crates.list().await {
        Ok(stored) => {
            for c in stored {
                let name = c.key.name().as_str();
                if normalize(name).contains(&needle) {
                    let versions = names.entry(name.to_string()).or_default();
                    versions.push(c.key.version().as_str().to_string());
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the crate store for a local search"),
    }

    let mut found = Vec::new();
    for (name, file_versions) in names {
        let Ok(crate_name) = name.parse::<CrateName>() else {
            continue;
        };
        let from_index = search
            .index
            .cached(&IndexKey::Crate(crate_name.index_path()))
            .await
            .and_then(|e| newest_in_index(&e.body));
        let (display, version) = match from_index {
            Some((n, v)) => (n, v),
            None => match newest(file_versions.iter().map(String::as_str)) {
                Some(v) => (name.clone(), v),
                None => continue,
            },
        };
        found.push((display, version));
    }
    // Exact matches first, then by name.
    found.sort_by_key(|(n, _)| (normalize(n) != needle, n.to_ascii_lowercase()));
    let total = found.len();
    // Both come from the client: u32 arithmetic would overflow.
    let start = (key.page as usize - 1).saturating_mul(key.per_page as usize);
    let crates: Vec<_> = found
        .into_iter()
        .skip(start)
        .take(key.per_page as usize)
        .map(|(name, version)| {
            serde_json::json!({
                "name": name,
                "max_version": version,
                "newest_version": version,
                "description": null,
            })
        })
        .collect();
    let body = serde_json::json!({ "crates": crates, "meta": { "total": total } }).to_string();
    Answer {
        status: 200,
        body: body.into(),
    }
}

fn normalize(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "_")
}

/// Names of the crates whose index files are cached under `root`. Blocking.
fn index_names(root: &std::path::Path) -> Vec<String> {
    match crate::storage::list_files(root) {
        Ok(files) => files
            .into_iter()
            .filter_map(|f| f.rel.parse::<crate::names::IndexPath>().ok())
            .map(|p| p.name().as_str().to_string())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the index cache for a local search");
            Vec::new()
        }
    }
}

/// The highest version, preferring releases over pre-releases.
fn newest<'a>(versions: impl Iterator<Item = &'a str>) -> Option<String> {
    versions
        .filter_map(|v| semver::Version::parse(v).ok())
        .max_by_key(|v| (v.pre.is_empty(), v.clone()))
        .map(|v| v.to_string())
}

/// Canonical name and newest non-yanked version from index file bytes.
fn newest_in_index(body: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Line {
        name: String,
        vers: String,
        #[serde(default)]
        yanked: bool,
    }
    let lines: Vec<Line> = body
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    let name = lines.first()?.name.clone();
    let v = newest(lines.iter().filter(|l| !l.yanked).map(|l| l.vers.as_str()))?;
    Some((name, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_spaces_requests_and_refuses_long_queues() {
        let rl = RateLimiter::new(Duration::from_secs(1), Duration::from_secs(3));
        let start = tokio::time::Instant::now();
        let mut granted = Vec::new();
        for _ in 0..4 {
            rl.acquire().await.unwrap();
            granted.push(start.elapsed());
        }
        assert_eq!(
            granted,
            [0, 1, 2, 3].map(Duration::from_secs).to_vec(),
            "one per second"
        );
        // Four callers at once: slots at +1s, +2s, +3s; the fourth would wait 4 s > 3 s.
        let rl = RateLimiter::new(Duration::from_secs(1), Duration::from_secs(3));
        rl.acquire().await.unwrap();
        let waits: Vec<_> = futures_util::future::join_all((0..4).map(|_| rl.acquire())).await;
        assert_eq!(waits.iter().filter(|w| w.is_ok()).count(), 3);
        assert!(matches!(waits[3], Err(d) if d > Duration::from_secs(3)));
    }

    #[test]
    fn newest_versions() {
        assert_eq!(
            newest(["1.0.0", "1.10.0", "1.9.0", "2.0.0-rc.1"].into_iter()).unwrap(),
            "1.10.0"
        );
        assert_eq!(newest(["0.1.0-alpha"].into_iter()).unwrap(), "0.1.0-alpha");
        let index = br#"{"name":"Foo","vers":"1.0.0","yanked":false}
{"name":"Foo","vers":"1.1.0","yanked":true}
"#;
        assert_eq!(
            newest_in_index(index).unwrap(),
            ("Foo".to_string(), "1.0.0".to_string())
        );
    }

    #[test]
    fn queries_ignore_case_and_dash_underscore() {
        assert_eq!(normalize("Serde-JSON"), "serde_json");
        assert!(normalize("serde_json").contains(&normalize("de-js")));
    }
}
