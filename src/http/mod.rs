//! The HTTP layer: the router and its state, health, readiness and metrics, and one file per
//! route family calling the services below. This is the only place that knows axum, status
//! codes and the router state; services return their own errors, mapped to statuses once, in
//! [`error`].

mod access_log;
mod downloads;
mod error;
mod git;
mod search;
mod sparse;
mod status;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access_log::access_log;
pub use error::AppError;
pub use search::SEARCH_HEADER;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::core::Core;
use crate::git::GitIndex;
use crate::hosts::PublicHosts;
use crate::search::Search;

/// Response header saying how the cache answered: hit, miss, revalidated or stale.
pub const CACHE_HEADER: &str = "x-cratere-cache";

/// Everything handlers share: the [`Core`] and what only the server needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub core: Core,
    pub hosts: Arc<PublicHosts>,
    pub search: Arc<Search>,
    /// The git index mirror, when `CRATERE_GIT_INDEX` is on.
    pub git: Option<Arc<GitIndex>>,
}

impl AppState {
    /// The [`Core`] with the system clock, plus hosts, search and the git mirror.
    pub fn new(config: Config) -> anyhow::Result<AppState> {
        AppState::with_clock(config, Arc::new(SystemClock))
    }

    /// [`AppState::new`] with the clock that usage records, cleanups and index freshness
    /// read (tests move it).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
        let core = Core::open(&config, clock)?;
        let search = Arc::new(Search::new(
            core.upstream.clone(),
            config.search.upstream_api.clone(),
            config.search.search_interval,
            core.index.clone(),
            core.crates.clone(),
        ));
        let hosts = Arc::new(PublicHosts::new(&config.public));
        let git = config
            .git
            .git_index
            .then(|| Arc::new(GitIndex::new(&config.git, &config.storage.index, &hosts)));
        Ok(AppState {
            hosts,
            git,
            config: Arc::new(config),
            core,
            search,
        })
    }

    /// Every background job of the server, each spawned by the feature that owns it.
    pub fn spawn_jobs(&self, jobs: &TaskTracker, shutdown: &CancellationToken) {
        self.core.spawn_jobs(
            self.config.cleanup.cleanup_cache_schedule.0.clone(),
            jobs,
            shutdown,
        );
        if let Some(git) = &self.git {
            crate::git::spawn_sync(git.clone(), jobs, shutdown);
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status::page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(sparse::router())
        .merge(downloads::router())
        .merge(search::router())
        .merge(git::router())
        .fallback(not_found)
        // Bounds the time to produce response headers (a download's body may then take as
        // long as it needs).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            state.config.server.request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.core.metrics.clone(),
            access_log,
        ))
        .with_state(state)
}

/// The host a request named: the URI authority (HTTP/2) or the `Host` header.
fn requested_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// Liveness: the process answers.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: the configuration is loaded (it is, or we would not be running), both local
/// directories accept writes, and the bucket (with S3 storage) answers.
async fn ready(State(st): State<AppState>) -> impl IntoResponse {
    let index = st.core.index.store().clone();
    let checked = async {
        st.core.crates.check().await?;
        tokio::task::spawn_blocking(move || {
            index
                .check_writable()
                .map_err(|e| format!("index cache (CRATERE_INDEX) not writable: {e}"))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }
    .await;
    match checked {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    refresh_gauges(&st);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.core.metrics.encode(),
    )
}

/// Copies state kept elsewhere (breaker, git mirror, last cleanup) into the gauges.
fn refresh_gauges(st: &AppState) {
    let m = &st.core.metrics;
    m.set_upstream_up(!st.core.upstream.breaker().is_open());
    if let Some(git) = &st.git {
        let s = git.status();
        m.set_git_sync(&crate::metrics::GitSyncFigures {
            ready: s.ready,
            last_success_unix: s
                .last_success
                .as_ref()
                .map(|r| r.started.timestamp_millis() as f64 / 1000.0),
            last_duration: s.last.as_ref().map(|r| r.duration),
            last_ok: s.last.as_ref().map(|r| r.result.is_ok()),
            attempts: s.attempts,
            failures: s.failures,
        });
    }
    if let Some(r) = st.core.cleanup.last() {
        m.set_cleanup(
            r.at,
            r.duration,
            (
                r.crate_files_removed,
                r.crate_bytes_removed,
                r.index_files_removed,
                r.index_bytes_removed,
            ),
        );
    }
}
async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}
