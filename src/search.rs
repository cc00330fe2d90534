//! `cargo search` through the proxy: `/api/v1/crates?q=…&per_page=…` relayed to crates.io's
//! web API under its data-access policy (at most one request per second, a descriptive
//! User-Agent), identical queries answered from a short-lived cache, and — when upstream
//! fails — an answer built from what this proxy has cached, so search works air-gapped.
//! Every other `/api/v1/…` path answers 404 in the JSON error format cargo prints.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use serde::Deserialize;

use crate::app::AppState;
use crate::index_cache::{IndexCache, IndexKey};
use crate::names::CrateName;
use crate::singleflight::SingleFlight;
use crate::upstream::{Upstream, UpstreamError};

/// Response header on answers built locally (upstream unreachable or failing).
pub const SEARCH_HEADER: &str = "x-cratere-search";

/// How long an identical query is answered from memory.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most queries kept in memory.
const CACHE_ENTRIES: usize = 1024;
/// Longest a query waits for its upstream slot before it gets a 429 instead.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(5);
const MAX_PER_PAGE: u32 = 100;
const MAX_QUERY_LEN: usize = 256;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/crates", get(search).fallback(not_served))
        .route("/api/v1/{*rest}", any(not_served))
}

/// A cargo-style JSON error: `{"errors":[{"detail":"…"}]}`.
pub fn json_error(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "detail": detail }] }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_served() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "this crates.io proxy does not serve that API endpoint",
    )
}

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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SearchKey {
    q: String,
    per_page: u32,
    page: u32,
}

#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Bytes,
}

pub struct Search {
    upstream: Upstream,
    api: url::Url,
    limiter: RateLimiter,
    cache: Mutex<HashMap<SearchKey, (Instant, Answer)>>,
    flights: SingleFlight<SearchKey, Result<Answer, SearchFailure>>,
    index: Arc<IndexCache>,
    crate_root: PathBuf,
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
        crate_root: PathBuf,
    ) -> Search {
        Search {
            upstream,
            api,
            limiter: RateLimiter::new(interval, MAX_QUEUE_WAIT),
            cache: Mutex::default(),
            flights: SingleFlight::default(),
            index,
            crate_root,
        }
    }

    fn cached(&self, key: &SearchKey) -> Option<Answer> {
        let cache = self.cache.lock().expect("lock poisoned");
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, a)| a.clone())
    }

    fn remember(&self, key: SearchKey, answer: Answer) {
        let mut cache = self.cache.lock().expect("lock poisoned");
        cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        if cache.len() >= CACHE_ENTRIES
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(key, (Instant::now(), answer));
    }
}

#[derive(Debug, Deserialize)]
struct Params {
    q: Option<String>,
    per_page: Option<u32>,
    page: Option<u32>,
}

async fn search(
    State(st): State<AppState>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return json_error(StatusCode::BAD_REQUEST, "invalid query parameters");
    };
    let q = params.q.unwrap_or_default();
    if q.trim().is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "missing search query `q`");
    }
    if q.len() > MAX_QUERY_LEN || q.contains('\0') {
        return json_error(StatusCode::BAD_REQUEST, "search query too long or invalid");
    }
    let key = SearchKey {
        q,
        per_page: params.per_page.unwrap_or(10).clamp(1, MAX_PER_PAGE),
        page: params.page.unwrap_or(1).max(1),
    };
    let search = st.search.clone();
    if let Some(a) = search.cached(&key) {
        return relay(a, "cache");
    }
    let s = search.clone();
    let k = key.clone();
    let (res, _) = search
        .flights
        .run(
            key.clone(),
            move || async move { ask_upstream(&s, &k).await },
        )
        .await;
    match res {
        Some(Ok(answer)) => {
            if answer.status == 200 {
                search.remember(key, answer.clone());
            }
            relay(answer, "upstream")
        }
        Some(Err(SearchFailure::RateLimited(wait))) => {
            let mut r = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many searches: crates.io allows one per second; try again shortly",
            );
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            r
        }
        Some(Err(SearchFailure::Upstream(e))) => {
            tracing::warn!(error = %e, "search upstream failed; answering from the cache");
            local_answer(&search, &key).await
        }
        None => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

fn relay(answer: Answer, source: &'static str) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = (status, answer.body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(SEARCH_HEADER, HeaderValue::from_static(source));
    r
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

/// Crates this proxy knows whose name contains the query (case, `-` and `_` ignored), with
/// their newest non-yanked version from the cached index.
async fn local_answer(search: &Search, key: &SearchKey) -> Response {
    let needle = normalize(&key.q);
    let index_root = search.index.store().root().to_path_buf();
    let crate_root = search.crate_root.clone();
    let n = needle.clone();
    let names = tokio::task::spawn_blocking(move || {
        let needle = n;
        let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, version) in walk_names(&index_root, false)
            .into_iter()
            .chain(walk_names(&crate_root, true))
        {
            if normalize(&name).contains(&needle) {
                let e = names.entry(name).or_default();
                e.extend(version);
            }
        }
        names
    })
    .await
    .unwrap_or_default();

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
    let start = ((key.page - 1) * key.per_page) as usize;
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
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(SEARCH_HEADER, HeaderValue::from_static("local"));
    r
}

fn normalize(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "_")
}

/// Names (and, for crate files, versions) found under a cache root. Index files are named
/// after their crate; crate files are `{name}-{version}.crate` in a directory named after the
/// crate. Blocking.
fn walk_names(root: &std::path::Path, crate_files: bool) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                if !name.starts_with('.') {
                    dirs.push(entry.path());
                }
            } else if crate_files {
                let parent = dir
                    .file_name()
                    .map(|p| p.to_string_lossy().to_string())
                    .unwrap_or_default();
                if let Some(v) = name
                    .strip_prefix(&format!("{parent}-"))
                    .and_then(|r| r.strip_suffix(".crate"))
                {
                    out.push((parent, Some(v.to_string())));
                }
            } else if name != "config.json" && name.parse::<CrateName>().is_ok() {
                out.push((name, None));
            }
        }
    }
    out
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
