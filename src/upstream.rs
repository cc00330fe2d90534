//! The one HTTP client to upstream: timeouts, User-Agent, a bound on concurrent requests,
//! index fetches with validators and streamed crate downloads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::UpstreamConfig;
use crate::jobs::{FirstRun, spawn_scheduled};
use crate::metrics::{Kind, Metrics};
use crate::names::{CrateName, Version};

/// Largest index file accepted from upstream: ten times crates.io's biggest (aws-sdk-ec2,
/// 1.6 MB in December 2026). Index bodies are held whole while they are fetched (they are
/// checked whole before they are cached or sent), so this, times the one flight per file and
/// `CRATERE_UPSTREAM_CONCURRENCY`, bounds their memory.
pub const MAX_INDEX_FILE: usize = 16 << 20;

pub const USER_AGENT: &str = concat!(
    "cratere/",
    env!("CARGO_PKG_VERSION"),
    " (caching proxy for crates.io)"
);

/// How an upstream call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("broken response: {0}")]
    Body(String),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Config(String),
    #[error("marked down after repeated failures; not asked until a health probe succeeds")]
    Down,
    #[error("rate-limited us (HTTP 429)")]
    RateLimited { retry_after: Option<u64> },
    #[error("sent something that is not an index file")]
    NotAnIndex,
}

impl UpstreamError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Timeout => "timeout",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Status(429) => "status_429",
            UpstreamError::Status(s) if *s >= 500 => "status_5xx",
            UpstreamError::Status(_) => "status_other",
            UpstreamError::Body(_) => "body",
            UpstreamError::TooLarge(_) => "too_large",
            UpstreamError::Config(_) => "config",
            UpstreamError::Down => "down",
            UpstreamError::RateLimited { .. } => "status_429",
            UpstreamError::NotAnIndex => "malformed",
        }
    }

    /// Failures that say upstream itself is in trouble (as opposed to one bad file).
    fn counts_against_upstream(&self) -> bool {
        matches!(self, UpstreamError::Timeout | UpstreamError::Connect(_))
            || matches!(self, UpstreamError::Status(s) if *s >= 500)
    }
}

impl From<reqwest::Error> for UpstreamError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            UpstreamError::Timeout
        } else if e.is_connect() {
            UpstreamError::Connect(error_chain(&e))
        } else {
            UpstreamError::Body(error_chain(&e))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The health probe of a down upstream: checked every second, probing only when the
/// breaker's back-off has elapsed.
pub fn spawn_probe(upstream: Upstream, jobs: &TaskTracker, shutdown: &CancellationToken) {
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "upstream-probe",
        "* * * * * *".parse().expect("valid schedule"),
        FirstRun::OnSchedule,
        move || {
            let upstream = upstream.clone();
            async move {
                if upstream.breaker().probe_due() && !upstream.probe().await {
                    anyhow::bail!("upstream still down");
                }
                Ok(())
            }
        },
    );
}

/// HTTP validators upstream gave for an index file, replayed on revalidation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// Result of fetching an index file.
#[derive(Debug)]
pub enum IndexFetch {
    Modified { body: Bytes, validators: Validators },
    NotModified,
    NotFound,
}

/// A crate body being streamed from upstream. Holds an upstream slot until dropped.
pub struct CrateBody {
    /// Content-Length, when upstream sent one.
    pub len: Option<u64>,
    response: reqwest::Response,
    _permit: OwnedSemaphorePermit,
}

impl CrateBody {
    /// The next chunk, `None` at the end. A truncated body (fewer bytes than Content-Length, a
    /// missing final chunk) is an error, as is a stall longer than the idle timeout.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        Ok(self.response.chunk().await?)
    }
}

/// Stops asking a failing upstream for a while: after `threshold` consecutive failures
/// (timeouts, refused connections, 5xx) every call fails at once with
/// [`UpstreamError::Down`], so clients get stale index files and cached crates immediately
/// instead of after a timeout each. A health probe ([`Upstream::probe`]) closes it again; the
/// wait between probes doubles up to 5 minutes while upstream stays down.
pub struct Breaker {
    /// For logs: which upstream.
    name: &'static str,
    threshold: u32,
    backoff: Duration,
    /// Whether a client request may be the probe once the back-off has passed (for upstreams
    /// without a health probe of their own: the download host, the web API). The index has
    /// [`Upstream::probe`] instead, so no client ever waits on a down index.
    trial: bool,
    state: std::sync::Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    /// When open: the time of the next probe.
    open_until: Option<Instant>,
    wait: Duration,
    /// A probe (the health probe, or a half-open trial request) is out: only its failure
    /// lengthens the wait. Requests let through before the breaker opened fail too, but they
    /// say nothing new: counting them doubled the wait once each, up to 5 minutes after a
    /// short outage.
    probing: bool,
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);

impl Breaker {
    pub fn new(name: &'static str, threshold: u32, backoff: Duration, trial: bool) -> Breaker {
        Breaker {
            name,
            threshold,
            backoff,
            trial,
            state: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().expect("lock poisoned")
    }

    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// Whether an open breaker is due for a probe.
    pub fn probe_due(&self) -> bool {
        self.lock().open_until.is_some_and(|t| Instant::now() >= t)
    }

    /// Whether a request may go upstream now: `Ok(true)` when it is the half-open trial.
    fn check(&self) -> Result<bool, UpstreamError> {
        let mut st = self.lock();
        match st.open_until {
            None => Ok(false),
            // Half-open: this request is the probe; the others keep failing at once until
            // it succeeds (closing the breaker) or fails (doubling the wait).
            Some(t) if self.trial && Instant::now() >= t => {
                st.open_until = Some(Instant::now() + st.wait.max(self.backoff));
                st.probing = true;
                Ok(true)
            }
            Some(_) => Err(UpstreamError::Down),
        }
    }

    /// The health probe is about to ask upstream.
    fn probing(&self) {
        self.lock().probing = true;
    }

    fn success(&self) {
        let mut st = self.lock();
        if st.open_until.is_some() {
            tracing::info!(upstream = self.name, "upstream is back");
        }
        *st = BreakerState::default();
    }

    fn failure(&self, e: &UpstreamError) {
        if !e.counts_against_upstream() {
            return;
        }
        let mut st = self.lock();
        st.failures += 1;
        if st.open_until.is_some() {
            if st.probing {
                // A failed probe: wait longer before the next one.
                st.probing = false;
                st.wait = (st.wait * 2).min(MAX_BACKOFF);
                st.open_until = Some(Instant::now() + st.wait);
            }
        } else if st.failures >= self.threshold {
            st.wait = self.backoff;
            st.open_until = Some(Instant::now() + st.wait);
            tracing::warn!(upstream = self.name, failures = st.failures, error = %e,
                backoff = ?st.wait, "upstream marked down; serving from the cache until a probe succeeds");
        }
    }
}

/// The upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    /// `CRATERE_UPSTREAM_IDLE_TIMEOUT`: also the longest a client waits for a download to start.
    idle_timeout: Duration,
    sparse: Url,
    permits: Arc<Semaphore>,
    /// `CRATERE_UPSTREAM_CONCURRENCY`.
    concurrency: usize,
    metrics: Arc<Metrics>,
    /// One per upstream service, so that one failing does not take the others down: the
    /// sparse index, the download host, the web API (search).
    breakers: Arc<[Breaker; 3]>,
}

impl Upstream {
    /// How long a read from upstream may stall (`CRATERE_UPSTREAM_IDLE_TIMEOUT`).
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Whether at least half the upstream slots are free (background work may start).
    pub fn mostly_idle(&self) -> bool {
        self.permits.available_permits() * 2 >= self.concurrency
    }

    /// `CRATERE_UPSTREAM_CONCURRENCY`.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> anyhow::Result<Upstream> {
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.upstream_connect_timeout)
            .read_timeout(config.upstream_idle_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()?;
        Ok(Upstream {
            idle_timeout: config.upstream_idle_timeout,
            client,
            sparse: config.upstream_sparse.clone(),
            permits: Arc::new(Semaphore::new(config.upstream_concurrency)),
            concurrency: config.upstream_concurrency,
            metrics,
            breakers: Arc::new([Kind::Index, Kind::Crate, Kind::Api].map(|kind| {
                Breaker::new(
                    kind.as_str(),
                    config.upstream_failure_threshold,
                    config.upstream_backoff,
                    kind != Kind::Index,
                )
            })),
        })
    }

    /// The sparse index's breaker: "upstream down" on the status page and in
    /// `cratere_upstream_up`.
    pub fn breaker(&self) -> &Breaker {
        self.breaker_of(Kind::Index)
    }

    pub fn breaker_of(&self, kind: Kind) -> &Breaker {
        &self.breakers[match kind {
            Kind::Index => 0,
            Kind::Crate => 1,
            Kind::Api => 2,
        }]
    }

    /// Health probe: asks for upstream's config.json past the breaker; success closes it.
    /// Returns whether upstream answered.
    pub async fn probe(&self) -> bool {
        let url = match self.sparse.join("config.json") {
            Ok(u) => u,
            Err(_) => return false,
        };
        self.breaker().probing();
        let ok = match self.client.get(url).send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                self.breaker()
                    .failure(&UpstreamError::Status(r.status().as_u16()));
                false
            }
            Err(e) => {
                self.breaker().failure(&e.into());
                false
            }
        };
        if ok {
            self.breaker().success();
        }
        ok
    }

    /// Records a failed upstream call (metrics, breaker) and passes the error on.
    pub fn failed(&self, kind: Kind, e: UpstreamError) -> UpstreamError {
        self.metrics.upstream_error(kind, e.label(), &e.to_string());
        self.breaker_of(kind).failure(&e);
        e
    }

    fn answered(&self, kind: Kind) {
        self.metrics.upstream_ok();
        self.breaker_of(kind).success();
    }

    /// A slot for a request to `kind`'s upstream: the breaker is checked before the wait and
    /// again after it, so requests queued while upstream went down do not each wait for it.
    /// The half-open trial is not re-checked: its own admission moved the next probe time
    /// ahead, and a re-check would refuse it, leaving the breaker open for good.
    async fn slot(&self, kind: Kind) -> Result<OwnedSemaphorePermit, UpstreamError> {
        let trial = self.breaker_of(kind).check()?;
        let permit = self.permit().await;
        if !trial {
            self.breaker_of(kind).check()?;
        }
        Ok(permit)
    }

    /// Records bytes received from upstream.
    pub fn received(&self, n: usize) {
        self.metrics.fetched_from_upstream(n as u64);
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed")
    }

    /// Fetches `{upstream}{rel}` (an index path or `config.json`), conditionally when
    /// validators are known.
    pub async fn fetch_index(
        &self,
        rel: &str,
        known: &Validators,
    ) -> Result<IndexFetch, UpstreamError> {
        self.fetch_index_inner(rel, known)
            .await
            .map_err(|e| self.failed(Kind::Index, e))
    }

    async fn fetch_index_inner(
        &self,
        rel: &str,
        known: &Validators,
    ) -> Result<IndexFetch, UpstreamError> {
        let url = self
            .sparse
            .join(rel)
            .map_err(|e| UpstreamError::Config(e.to_string()))?;
        let _permit = self.slot(Kind::Index).await?;
        let mut req = self
            .client
            .get(url)
            .header("cargo-protocol", "version=1")
            .header(reqwest::header::ACCEPT, "text/plain");
        if let Some(etag) = &known.etag {
            req = req.header(IF_NONE_MATCH, etag);
        } else if let Some(lm) = &known.last_modified {
            req = req.header(IF_MODIFIED_SINCE, lm);
        }
        let started = Instant::now();
        let mut resp = req.send().await?;
        self.metrics
            .upstream_response(Kind::Index, started.elapsed());
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_MODIFIED if *known != Validators::default() => {
                return Ok(IndexFetch::NotModified);
            }
            // cargo treats 404, 410 and 451 as "no such crate".
            StatusCode::NOT_FOUND
            | StatusCode::GONE
            | StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS => {
                return Ok(IndexFetch::NotFound);
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(UpstreamError::RateLimited {
                    retry_after: retry_after(&resp),
                });
            }
            s => return Err(UpstreamError::Status(s.as_u16())),
        }
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let validators = Validators {
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_INDEX_FILE as u64)
        {
            return Err(UpstreamError::TooLarge(MAX_INDEX_FILE));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_INDEX_FILE {
                return Err(UpstreamError::TooLarge(MAX_INDEX_FILE));
            }
            body.extend_from_slice(&chunk);
            self.received(chunk.len());
        }
        self.answered(Kind::Index);
        Ok(IndexFetch::Modified {
            body: body.freeze(),
            validators,
        })
    }

    /// Starts a crate download; the body is read with [`CrateBody::chunk`]. `None`: upstream
    /// has no such file (404).
    pub async fn fetch_crate(&self, url: Url) -> Result<Option<CrateBody>, UpstreamError> {
        let permit = self.slot(Kind::Crate).await?;
        let started = Instant::now();
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.failed(Kind::Crate, e.into()))?;
        self.metrics
            .upstream_response(Kind::Crate, started.elapsed());
        match resp.status() {
            StatusCode::OK => {
                self.answered(Kind::Crate);
                Ok(Some(CrateBody {
                    len: resp.content_length(),
                    response: resp,
                    _permit: permit,
                }))
            }
            StatusCode::NOT_FOUND => {
                self.answered(Kind::Crate);
                Ok(None)
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let e = UpstreamError::RateLimited {
                    retry_after: retry_after(&resp),
                };
                Err(self.failed(Kind::Crate, e))
            }
            s => Err(self.failed(Kind::Crate, UpstreamError::Status(s.as_u16()))),
        }
    }
}

impl Upstream {
    /// A GET to upstream's web API (search). Returns status and body whatever the status;
    /// bodies over 8 MiB are refused.
    pub async fn fetch_api(&self, url: Url) -> Result<(u16, Bytes), UpstreamError> {
        const MAX: usize = 8 << 20;
        let _permit = self.slot(Kind::Api).await?;
        let started = Instant::now();
        let result = async {
            let mut resp = self
                .client
                .get(url)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await?;
            self.metrics.upstream_response(Kind::Api, started.elapsed());
            let status = resp.status().as_u16();
            let mut body = BytesMut::new();
            while let Some(chunk) = resp.chunk().await? {
                if body.len() + chunk.len() > MAX {
                    return Err(UpstreamError::TooLarge(MAX));
                }
                body.extend_from_slice(&chunk);
            }
            self.received(body.len());
            Ok((status, body.freeze()))
        }
        .await;
        match result {
            Ok((status, _)) if status >= 500 || status == 429 => {
                // The search module answers locally instead; no Retry-After needed.
                Err(self.failed(Kind::Api, UpstreamError::Status(status)))
            }
            Ok(ok) => {
                self.answered(Kind::Api);
                Ok(ok)
            }
            Err(e) => Err(self.failed(Kind::Api, e)),
        }
    }
}

/// `Retry-After` in seconds (the delay form; an HTTP date is ignored).
fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `body` looks like the index file of `name`: at least one line is a JSON object
/// with that `name` (any case) and a `vers`, and no line names another crate. Guards the cache
/// against error pages and misrouted answers that upstream sends with a 200; the lines
/// themselves are relayed untouched.
pub fn looks_like_index_of(body: &[u8], name: &str) -> bool {
    #[derive(Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
        #[allow(dead_code)]
        vers: serde::de::IgnoredAny,
    }
    let mut valid = 0;
    for line in body.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(l) if l.name.eq_ignore_ascii_case(name) => valid += 1,
            Ok(_) => return false,
            // A line cargo cannot parse is skipped by cargo too; relay it as it is.
            Err(_) => {}
        }
    }
    valid > 0
}

/// Expands cargo's `dl` template (`{crate}`, `{version}`, `{prefix}`, `{lowerprefix}`,
/// `{sha256-checksum}`; no marker → `/{crate}/{version}/download` appended).
pub fn crate_url(
    template: &str,
    name: &CrateName,
    version: &Version,
    cksum: &str,
) -> Result<Url, UpstreamError> {
    const MARKERS: [&str; 5] = [
        "{crate}",
        "{version}",
        "{prefix}",
        "{lowerprefix}",
        "{sha256-checksum}",
    ];
    let s = if MARKERS.iter().any(|m| template.contains(m)) {
        template
            .replace("{crate}", name.as_str())
            .replace("{version}", version.as_str())
            .replace("{prefix}", &name.prefix())
            .replace("{lowerprefix}", &name.to_lowercase().prefix())
            .replace("{sha256-checksum}", cksum)
    } else {
        format!(
            "{}/{name}/{version}/download",
            template.trim_end_matches('/')
        )
    };
    Url::parse(&s).map_err(|e| UpstreamError::Config(format!("bad download URL {s}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_probes_lengthen_the_wait_of_an_open_breaker() {
        let backoff = Duration::from_millis(100);
        let b = Breaker::new("test", 2, backoff, true);
        let e = UpstreamError::Status(503);
        b.failure(&e);
        b.failure(&e);
        assert!(b.is_open());
        // Requests let through before it opened fail one after another: no news.
        for _ in 0..20 {
            b.failure(&e);
        }
        assert_eq!(b.lock().wait, backoff);
        // A failed trial doubles the wait; its success closes the breaker.
        b.lock().open_until = Some(Instant::now());
        assert!(b.check().unwrap(), "the trial");
        assert!(b.check().is_err(), "only one trial at a time");
        b.failure(&e);
        assert_eq!(b.lock().wait, backoff * 2);
        b.failure(&e);
        assert_eq!(b.lock().wait, backoff * 2, "one doubling per probe");
        b.probing();
        b.success();
        assert!(!b.is_open());
        assert!(!b.check().unwrap());
    }

    #[test]
    fn index_bodies_are_recognised() {
        let good =
            b"{\"name\":\"Foo\",\"vers\":\"1.0.0\"}\n{\"name\": \"foo\", \"vers\": \"1.0.1\"}\n";
        assert!(looks_like_index_of(good, "foo"));
        let with_junk = b"{\"name\":\"foo\",\"vers\":\"1.0.0\"}\nnot json\n";
        assert!(looks_like_index_of(with_junk, "foo"));
        assert!(!looks_like_index_of(b"<html>502 Bad Gateway</html>", "foo"));
        assert!(!looks_like_index_of(b"", "foo"));
        let other =
            b"{\"name\":\"foo\",\"vers\":\"1.0.0\"}\n{\"name\":\"bar\",\"vers\":\"1.0.0\"}\n";
        assert!(!looks_like_index_of(other, "foo"));
    }

    #[test]
    fn dl_templates_expand_like_cargo() {
        let n: CrateName = "Inflector".parse().unwrap();
        let v: Version = "0.11.4+x".parse().unwrap();
        assert_eq!(
            crate_url("https://static.crates.io/crates", &n, &v, "ab")
                .unwrap()
                .as_str(),
            "https://static.crates.io/crates/Inflector/0.11.4+x/download"
        );
        assert_eq!(
            crate_url(
                "https://h/{prefix}/{lowerprefix}/{crate}/{crate}-{version}.crate?c={sha256-checksum}",
                &n,
                &v,
                "ab"
            )
            .unwrap()
            .as_str(),
            "https://h/In/fl/in/fl/Inflector/Inflector-0.11.4+x.crate?c=ab"
        );
    }
}
