//! Metrics owned by the app (no globals), exposed in Prometheus text format at `/metrics`, and
//! the few live figures the status page shows. Labels never carry crate names: their
//! cardinality would be unbounded.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What a cache event is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    Index,
    Crate,
    /// The web API (search).
    Api,
}

/// How a request was answered relative to the cache.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache without asking upstream.
    Hit,
    /// Not cached (or changed upstream): fetched.
    Miss,
    /// Cached copy confirmed unchanged by upstream.
    Revalidated,
    /// Upstream failed; the cached copy was served anyway.
    Stale,
    /// Past its TTL, served at once while revalidated in the background.
    StaleWhileRevalidate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Index => "index",
            Kind::Crate => "crate",
            Kind::Api => "api",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::StaleWhileRevalidate => "stale_while_revalidate",
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, enc: &mut LabelValueEncoder) -> std::fmt::Result {
        enc.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, enc: &mut LabelValueEncoder) -> std::fmt::Result {
        enc.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: Kind,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route pattern (`/index/{*path}`), never the concrete path.
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: Kind,
    error: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// Requests per minute over the last hour, for the status page chart: one slot per minute of
/// the hour, each an atomic holding the minute it counts (high bits) and its count (low bits).
/// A request bumps its minute's slot with one compare-and-swap: no lock, no allocation.
struct Traffic {
    requests: [AtomicU64; TRAFFIC_MINUTES as usize],
    hits: [AtomicU64; TRAFFIC_MINUTES as usize],
}

const TRAFFIC_MINUTES: u64 = 60;
/// Low bits of a traffic slot: the count.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl Traffic {
    fn new() -> Traffic {
        Traffic {
            requests: [const { AtomicU64::new(0) }; TRAFFIC_MINUTES as usize],
            hits: [const { AtomicU64::new(0) }; TRAFFIC_MINUTES as usize],
        }
    }

    /// The stamp of `minute` in a slot's high bits (the minute modulo 2^24: unique within
    /// 31 years, and only ever compared within the hour).
    fn stamp(minute: u64) -> u64 {
        (minute & ((1 << (64 - COUNT_BITS)) - 1)) << COUNT_BITS
    }

    fn bump(slots: &[AtomicU64], minute: u64) {
        let slot = &slots[(minute % TRAFFIC_MINUTES) as usize];
        let stamp = Self::stamp(minute);
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            // A slot still holding an older minute starts over at 1.
            let next = if cur & !COUNT_MASK == stamp {
                cur + 1
            } else {
                stamp | 1
            };
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    fn count(slots: &[AtomicU64], minute: u64) -> u64 {
        let v = slots[(minute % TRAFFIC_MINUTES) as usize].load(Ordering::Relaxed);
        if v & !COUNT_MASK == Self::stamp(minute) {
            v & COUNT_MASK
        } else {
            0
        }
    }
}

/// The routes whose requests are counted without a look-up in the labelled family: the
/// ones every cargo run hits. Others go through the family (a lock and a label).
const HOT_ROUTES: [&str; 3] = [
    "/index/{*path}",
    "/api/v1/crates/{crate}/{version}/download",
    "/index/config.json",
];
const HOT_STATUSES: [u16; 3] = [200, 304, 404];

/// Counters of a labelled family resolved once, on first use (so a series still appears only
/// once it has counted something), then bumped with no lock and no label built.
struct Resolved<const N: usize>([OnceLock<Counter>; N]);

impl<const N: usize> Resolved<N> {
    fn new() -> Self {
        Resolved([const { OnceLock::new() }; N])
    }

    fn get(&self, i: usize, resolve: impl FnOnce() -> Counter) -> &Counter {
        self.0[i].get_or_init(resolve)
    }
}

const KINDS: usize = 3;
const OUTCOMES: usize = 5;

/// The last git index sync, refreshed from the mirror's status at each scrape.
#[derive(Default)]
struct GitGauges {
    ready: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    last_duration: Gauge<f64, AtomicU64>,
    last_ok: Gauge,
    attempts: Gauge,
    failures: Gauge,
    limited: Family<LimitLabels, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    /// Why it ran: stale_while_revalidate, ahead, prefetch, git_sync.
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    /// Which limit: busy, body_too_large, body_too_slow, client_stopped_reading.
    limit: &'static str,
}

/// The last cache cleanup.
#[derive(Default)]
struct CleanupGauges {
    last_run: Gauge<f64, AtomicU64>,
    last_duration: Gauge<f64, AtomicU64>,
    removed_files: Family<KindLabels, Gauge>,
    removed_bytes: Family<KindLabels, Gauge>,
}

/// Figures of one git sync attempt for [`Metrics::set_git_sync`].
pub struct GitSyncFigures {
    pub ready: bool,
    pub last_success_unix: Option<f64>,
    pub last_duration: Option<Duration>,
    pub last_ok: Option<bool>,
    pub attempts: u64,
    pub failures: u64,
    /// Git requests refused or cut off since start, by limit ([`crate::git::LimitCounts`]).
    pub limited: [(&'static str, u64); 4],
}

pub struct Metrics {
    registry: Registry,
    connections_open: Gauge,
    connections_max: Gauge,
    cache: Family<CacheLabels, Counter>,
    coalesced: Family<KindLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    versions: Family<VersionLabels, Counter>,
    bytes: Family<SourceLabels, Counter>,
    upstream_latency: Family<KindLabels, Histogram>,
    upstream_errors: Family<ErrorLabels, Counter>,
    downloads_in_flight: Gauge,
    ready_checks: Counter,
    s3_conditional: Gauge,
    refreshes: Family<RefreshLabels, Counter>,
    refreshes_failed: Family<RefreshLabels, Counter>,
    refreshes_changed: Family<RefreshLabels, Counter>,
    prefetched: Counter,
    prefetch_used: Counter,
    cache_files: Gauge,
    cache_bytes: Gauge,
    upstream_up: Gauge,
    git: GitGauges,
    cleanup: CleanupGauges,
    last_upstream_ok: AtomicI64,
    last_upstream_error: AtomicI64,
    last_upstream_error_text: Mutex<String>,
    traffic: Traffic,
    hot_cache: Resolved<{ KINDS * OUTCOMES }>,
    hot_requests: Resolved<{ HOT_ROUTES.len() * HOT_STATUSES.len() }>,
    hot_versions: Resolved<4>,
    hot_bytes: Resolved<2>,
    started: SystemTime,
    scans: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

impl GitGauges {
    fn registered(registry: &mut Registry) -> GitGauges {
        let gauges = GitGauges::default();
        registry.register(
            "git_index_ready",
            "1 once the git index mirror serves every host",
            gauges.ready.clone(),
        );
        registry.register(
            "git_sync_last_success_timestamp_seconds",
            "Start time of the last successful git index sync (unix seconds)",
            gauges.last_success.clone(),
        );
        registry.register(
            "git_sync_last_duration_seconds",
            "Duration of the last git index sync attempt",
            gauges.last_duration.clone(),
        );
        registry.register(
            "git_sync_last_ok",
            "1 if the last git index sync attempt succeeded, 0 if it failed",
            gauges.last_ok.clone(),
        );
        registry.register(
            "git_sync_attempts",
            "Git index sync attempts since start",
            gauges.attempts.clone(),
        );
        registry.register(
            "git_sync_failures",
            "Failed git index sync attempts since start",
            gauges.failures.clone(),
        );
        registry.register(
            "git_requests_limited",
            "Git requests refused (busy) or cut off by a limit since start",
            gauges.limited.clone(),
        );
        gauges
    }
}

impl CleanupGauges {
    fn registered(registry: &mut Registry) -> CleanupGauges {
        let gauges = CleanupGauges::default();
        registry.register(
            "cleanup_last_run_timestamp_seconds",
            "Start time of the last cache cleanup (unix seconds)",
            gauges.last_run.clone(),
        );
        registry.register(
            "cleanup_last_duration_seconds",
            "Duration of the last cache cleanup",
            gauges.last_duration.clone(),
        );
        registry.register(
            "cleanup_last_removed_files",
            "Files removed by the last cache cleanup",
            gauges.removed_files.clone(),
        );
        registry.register(
            "cleanup_last_removed_bytes",
            "Bytes removed by the last cache cleanup",
            gauges.removed_bytes.clone(),
        );
        gauges
    }
}

/// Registers `metric` under `name` and hands it back.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Every exported series, registered in one place. Over 80 lines, and kept whole: it is a
    /// flat list of declarations (name, help, kind), read as the catalogue of `/metrics`.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cratere");
        let cache = register(
            &mut registry,
            "cache_requests",
            "Requests for index files and crates by cache outcome (hit, miss, revalidated, stale)",
            Family::<CacheLabels, Counter>::default(),
        );
        let coalesced = register(
            &mut registry,
            "coalesced_requests",
            "Requests that joined an upstream fetch already in flight",
            Family::<KindLabels, Counter>::default(),
        );
        let requests = register(
            &mut registry,
            "http_requests",
            "HTTP requests by route and status",
            Family::<RequestLabels, Counter>::default(),
        );
        let connections_open = register(
            &mut registry,
            "connections_open",
            "Client connections open now (an h2c upgrade counts as a second one)",
            Gauge::default(),
        );
        let connections_max = register(
            &mut registry,
            "connections_max",
            "The connection limit (CRATERE_MAX_CONNECTIONS, or derived from the open-file limit)",
            Gauge::default(),
        );
        registry.register(
            "sendfile_bytes",
            "Body bytes sent with sendfile(2), straight from the page cache (process-wide)",
            crate::sendfile::BYTES_SENT.clone(),
        );
        let versions = register(
            &mut registry,
            "http_requests_by_version",
            "HTTP requests by protocol version (HTTP/1.1, HTTP/2.0)",
            Family::<VersionLabels, Counter>::default(),
        );
        let bytes = register(
            &mut registry,
            "bytes",
            "Body bytes served from the cache (source=cache) and fetched from upstream (source=upstream)",
            Family::<SourceLabels, Counter>::default(),
        );
        let upstream_latency = register(
            &mut registry,
            "upstream_response_seconds",
            "Time from an upstream request to its response headers",
            Family::<KindLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
        );
        let upstream_errors = register(
            &mut registry,
            "upstream_errors",
            "Failed upstream requests by kind of failure",
            Family::<ErrorLabels, Counter>::default(),
        );
        let downloads_in_flight = register(
            &mut registry,
            "downloads_in_flight",
            "Crate downloads from upstream in progress",
            Gauge::default(),
        );
        let ready_checks = register(
            &mut registry,
            "ready_checks",
            "Readiness checks of the stores run (each /ready answer is reused for 2 s)",
            Counter::default(),
        );
        let s3_conditional = register(
            &mut registry,
            "s3_conditional_writes",
            "Whether the bucket honours conditional writes, as last probed: 1 yes (cleanups take \
             the fleet-wide lease), 0 no (no lease; only CRATERE_CLEANUP_LEADER cleans crates), \
             -1 not known (not probed yet, no answer, or local storage)",
            Gauge::default(),
        );
        s3_conditional.set(-1);
        let refreshes = register(
            &mut registry,
            "index_background_refreshes",
            "Index files revalidated upstream with no client waiting, by reason",
            Family::<RefreshLabels, Counter>::default(),
        );
        let refreshes_failed = register(
            &mut registry,
            "index_background_refreshes_failed",
            "Background revalidations that upstream did not answer, by reason",
            Family::<RefreshLabels, Counter>::default(),
        );
        let refreshes_changed = register(
            &mut registry,
            "index_background_refreshes_changed",
            "Background revalidations that found the file changed upstream, by reason",
            Family::<RefreshLabels, Counter>::default(),
        );
        let prefetched = register(
            &mut registry,
            "index_prefetched",
            "Index files fetched by dependency prefetch before any client asked for them",
            Counter::default(),
        );
        let prefetch_used = register(
            &mut registry,
            "index_prefetch_used",
            "Prefetched index files a client then asked for (within an hour)",
            Counter::default(),
        );
        let cache_files = register(
            &mut registry,
            "cache_files",
            "Crate files in the cache (as of the last scan, plus files added since)",
            Gauge::default(),
        );
        let cache_bytes = register(
            &mut registry,
            "cache_size_bytes",
            "Bytes of crate files in the cache (as of the last scan, plus files added since)",
            Gauge::default(),
        );
        let upstream_up = register(
            &mut registry,
            "upstream_up",
            "1 while upstream is considered up, 0 while marked down after repeated failures",
            Gauge::default(),
        );
        upstream_up.set(1);
        let git = GitGauges::registered(&mut registry);
        let cleanup = CleanupGauges::registered(&mut registry);
        Metrics {
            registry,
            connections_open,
            connections_max,
            upstream_up,
            git,
            cleanup,
            cache,
            coalesced,
            requests,
            versions,
            bytes,
            upstream_latency,
            upstream_errors,
            downloads_in_flight,
            ready_checks,
            s3_conditional,
            refreshes,
            refreshes_failed,
            refreshes_changed,
            prefetched,
            prefetch_used,
            cache_files,
            cache_bytes,
            last_upstream_ok: AtomicI64::new(0),
            last_upstream_error: AtomicI64::new(0),
            last_upstream_error_text: Mutex::new(String::new()),
            traffic: Traffic::new(),
            hot_cache: Resolved::new(),
            hot_requests: Resolved::new(),
            hot_versions: Resolved::new(),
            hot_bytes: Resolved::new(),
            started: SystemTime::now(),
            scans: AtomicU64::new(0),
        }
    }

    /// A background revalidation of an index file ended.
    pub fn index_background_refresh(&self, reason: &'static str, ok: bool, changed: bool) {
        let l = RefreshLabels { reason };
        self.refreshes.get_or_create(&l).inc();
        if !ok {
            self.refreshes_failed.get_or_create(&l).inc();
        }
        if changed {
            self.refreshes_changed.get_or_create(&l).inc();
        }
    }

    pub fn index_prefetched(&self) {
        self.prefetched.inc();
    }

    pub fn index_prefetch_used(&self) {
        self.prefetch_used.inc();
    }

    pub fn count_ready_check(&self) {
        self.ready_checks.inc();
    }

    /// `cratere_s3_conditional_writes` ([`crate::storage::s3::Conditional::gauge`]).
    pub fn set_s3_conditional(&self, value: i64) {
        self.s3_conditional.set(value);
    }

    pub fn set_connections_max(&self, n: usize) {
        self.connections_max.set(n as i64);
    }

    /// The gauge of open client connections, which the server keeps.
    pub fn connections_gauge(&self) -> Gauge {
        self.connections_open.clone()
    }

    pub fn cache(&self, kind: Kind, outcome: Outcome) {
        self.hot_cache
            .get(kind as usize * OUTCOMES + outcome as usize, || {
                self.cache
                    .get_or_create(&CacheLabels { kind, outcome })
                    .clone()
            })
            .inc();
    }

    pub fn cache_count(&self, kind: Kind, outcome: Outcome) -> u64 {
        self.cache
            .get_or_create(&CacheLabels { kind, outcome })
            .get()
    }

    pub fn coalesced(&self, kind: Kind) {
        self.coalesced.get_or_create(&KindLabels { kind }).inc();
    }

    /// The protocol version of a request.
    pub fn request_version(&self, version: &'static str) {
        let i = match version {
            "HTTP/1.1" => 0,
            "HTTP/2.0" => 1,
            "HTTP/1.0" => 2,
            _ => 3,
        };
        self.hot_versions
            .get(i, || {
                self.versions
                    .get_or_create(&VersionLabels { version })
                    .clone()
            })
            .inc();
    }

    /// One finished HTTP request.
    pub fn request(&self, route: &str, status: u16, hit: bool) {
        let hot = HOT_ROUTES
            .iter()
            .position(|r| *r == route)
            .zip(HOT_STATUSES.iter().position(|s| *s == status));
        let family = || {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.to_string(),
                    status,
                })
                .clone()
        };
        match hot {
            Some((r, s)) => self
                .hot_requests
                .get(r * HOT_STATUSES.len() + s, family)
                .inc(),
            None => family().inc(),
        };
        let minute = unix_now() as u64 / 60;
        Traffic::bump(&self.traffic.requests, minute);
        if hit {
            Traffic::bump(&self.traffic.hits, minute);
        }
    }

    /// Requests and cache hits per minute for the last hour, oldest first, zeros filled in.
    pub fn traffic(&self) -> Vec<(u64, u64)> {
        let now = unix_now() as u64 / 60;
        (now + 1 - TRAFFIC_MINUTES..=now)
            .map(|m| {
                (
                    Traffic::count(&self.traffic.requests, m),
                    Traffic::count(&self.traffic.hits, m),
                )
            })
            .collect()
    }

    fn bytes_counter(&self, source: &'static str) -> &Counter {
        self.hot_bytes.get(usize::from(source == "upstream"), || {
            self.bytes.get_or_create(&SourceLabels { source }).clone()
        })
    }

    pub fn served_from_cache(&self, n: u64) {
        self.bytes_counter("cache").inc_by(n);
    }

    pub fn fetched_from_upstream(&self, n: u64) {
        self.bytes_counter("upstream").inc_by(n);
    }

    pub fn bytes_served_from_cache(&self) -> u64 {
        self.bytes
            .get_or_create(&SourceLabels { source: "cache" })
            .get()
    }

    pub fn bytes_fetched_from_upstream(&self) -> u64 {
        self.bytes
            .get_or_create(&SourceLabels { source: "upstream" })
            .get()
    }

    /// An upstream request answered (any status) after `elapsed`.
    pub fn upstream_response(&self, kind: Kind, elapsed: Duration) {
        self.upstream_latency
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
    }

    /// Upstream answered as expected (a 200, 304 or 404).
    pub fn upstream_ok(&self) {
        self.last_upstream_ok
            .store(unix_now(), std::sync::atomic::Ordering::Relaxed);
    }

    /// An upstream request failed; `error` is a short kind (`timeout`, `connect`, `status_5xx`…).
    pub fn upstream_error(&self, kind: Kind, error: &str, detail: &str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                kind,
                error: error.to_string(),
            })
            .inc();
        self.last_upstream_error
            .store(unix_now(), std::sync::atomic::Ordering::Relaxed);
        *self.last_upstream_error_text.lock().expect("lock poisoned") = detail.to_string();
    }

    /// (last success, last error, last error text), unix seconds, 0 = never.
    pub fn upstream_health(&self) -> (i64, i64, String) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.last_upstream_ok.load(Relaxed),
            self.last_upstream_error.load(Relaxed),
            self.last_upstream_error_text
                .lock()
                .expect("lock poisoned")
                .clone(),
        )
    }

    pub fn download_started(&self) {
        self.downloads_in_flight.inc();
    }

    pub fn download_ended(&self) {
        self.downloads_in_flight.dec();
    }

    pub fn downloads_in_flight(&self) -> i64 {
        self.downloads_in_flight.get()
    }

    /// A crate file entered the cache.
    pub fn crate_stored(&self, len: u64) {
        self.cache_files.inc();
        self.cache_bytes.inc_by(len as i64);
    }

    /// Sets the cache size from a full scan.
    pub fn set_cache_size(&self, files: u64, bytes: u64) {
        self.cache_files.set(files as i64);
        self.cache_bytes.set(bytes as i64);
        self.scans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (files, bytes) of the crate cache, and whether a scan has completed yet.
    pub fn cache_size(&self) -> (u64, u64, bool) {
        (
            self.cache_files.get().max(0) as u64,
            self.cache_bytes.get().max(0) as u64,
            self.scans.load(std::sync::atomic::Ordering::Relaxed) > 0,
        )
    }

    pub fn started(&self) -> SystemTime {
        self.started
    }

    pub fn set_upstream_up(&self, up: bool) {
        self.upstream_up.set(up as i64);
    }

    pub fn set_git_sync(&self, f: &GitSyncFigures) {
        self.git.ready.set(f.ready as i64);
        if let Some(t) = f.last_success_unix {
            self.git.last_success.set(t);
        }
        if let Some(d) = f.last_duration {
            self.git.last_duration.set(d.as_secs_f64());
        }
        if let Some(ok) = f.last_ok {
            self.git.last_ok.set(ok as i64);
        }
        self.git.attempts.set(f.attempts as i64);
        self.git.failures.set(f.failures as i64);
        for (limit, n) in f.limited {
            self.git
                .limited
                .get_or_create(&LimitLabels { limit })
                .set(n as i64);
        }
    }

    /// Records a finished cleanup: (crate files, crate bytes, index files, index bytes) removed.
    pub fn set_cleanup(&self, at: SystemTime, duration: Duration, removed: (u64, u64, u64, u64)) {
        let unix = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.cleanup.last_run.set(unix.as_secs_f64());
        self.cleanup.last_duration.set(duration.as_secs_f64());
        let (cf, cb, inf, ib) = removed;
        let set = |fam: &Family<KindLabels, Gauge>, kind, v: u64| {
            fam.get_or_create(&KindLabels { kind }).set(v as i64);
        };
        set(&self.cleanup.removed_files, Kind::Crate, cf);
        set(&self.cleanup.removed_bytes, Kind::Crate, cb);
        set(&self.cleanup.removed_files, Kind::Index, inf);
        set(&self.cleanup.removed_bytes, Kind::Index, ib);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_series_and_no_crate_names() {
        let m = Metrics::new();
        m.cache(Kind::Crate, Outcome::Hit);
        m.request("/api/v1/crates/{crate}/{version}/download", 200, true);
        m.upstream_error(Kind::Index, "timeout", "timed out");
        m.upstream_response(Kind::Index, Duration::from_millis(30));
        m.set_cache_size(3, 300);
        let text = m.encode();
        for needle in [
            "cratere_cache_requests_total{kind=\"crate\",outcome=\"hit\"} 1",
            "cratere_http_requests_total{route=\"/api/v1/crates/{crate}/{version}/download\",status=\"200\"} 1",
            "cratere_upstream_errors_total{kind=\"index\",error=\"timeout\"} 1",
            "cratere_upstream_response_seconds_count{kind=\"index\"} 1",
            "cratere_cache_files 3",
            "cratere_cache_size_bytes 300",
            "cratere_downloads_in_flight 0",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        let t = m.traffic();
        assert_eq!(t.len(), 60);
        assert_eq!(t[59], (1, 1));
    }

    #[test]
    fn traffic_slots_start_over_when_their_minute_comes_round_again() {
        let t = Traffic::new();
        Traffic::bump(&t.requests, 100);
        Traffic::bump(&t.requests, 100);
        assert_eq!(Traffic::count(&t.requests, 100), 2);
        // The same slot an hour later: the old count is not carried over, nor read back.
        assert_eq!(Traffic::count(&t.requests, 160), 0);
        Traffic::bump(&t.requests, 160);
        assert_eq!(Traffic::count(&t.requests, 160), 1);
        assert_eq!(Traffic::count(&t.requests, 100), 0);
    }

    #[test]
    fn hot_and_other_routes_count_in_the_same_series() {
        let m = Metrics::new();
        m.request("/index/{*path}", 200, true);
        m.request("/index/{*path}", 200, false);
        m.request("/index/{*path}", 503, false);
        m.request("/health", 200, false);
        m.request_version("HTTP/2.0");
        m.served_from_cache(5);
        m.fetched_from_upstream(7);
        let text = m.encode();
        for needle in [
            "cratere_http_requests_total{route=\"/index/{*path}\",status=\"200\"} 2",
            "cratere_http_requests_total{route=\"/index/{*path}\",status=\"503\"} 1",
            "cratere_http_requests_total{route=\"/health\",status=\"200\"} 1",
            "cratere_http_requests_by_version_total{version=\"HTTP/2.0\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert!(
            !text.contains("status=\"304\""),
            "no series before its first count"
        );
        assert_eq!(m.bytes_served_from_cache(), 5);
        assert_eq!(m.bytes_fetched_from_upstream(), 7);
        assert_eq!(m.traffic()[59], (4, 1));
    }
}
