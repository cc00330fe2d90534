//! The HTTP layer: the router and its state, health, readiness and metrics, and one file per
//! route family calling the services below. This is the only place that knows axum, status
//! codes and the router state; services return their own errors, mapped to statuses once, in
//! [`error`].

mod access_log;
mod downloads;
mod error;
mod git;
mod ops;
mod search;
mod sparse;
mod status;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access_log::AccessLogLayer;
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

/// What the requests of one client connection share, put into each request's extensions by
/// the server. Over HTTP/2 one connection can carry hundreds of streams at once; this keeps
/// one of them from taking every git process.
#[derive(Clone)]
pub struct Connection {
    git_requests: Arc<tokio::sync::Semaphore>,
}

/// Git requests one connection may have in progress at once. A git client sends one at a
/// time; the second is headroom for a client that overlaps a retry.
pub const GIT_REQUESTS_PER_CONNECTION: usize = 2;

impl Connection {
    pub fn new() -> Connection {
        Connection {
            git_requests: Arc::new(tokio::sync::Semaphore::new(GIT_REQUESTS_PER_CONNECTION)),
        }
    }
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

/// Everything handlers share: the [`Core`] and what only the server needs. One `Arc`: axum
/// clones the state for every extractor of every request, and a clone of the fields one by
/// one (a dozen reference counts, bounced between the cores) was 3.6 % of a crate hit's CPU.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares.
pub struct Shared {
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
        Ok(AppState(Arc::new(Shared {
            hosts,
            git,
            config: Arc::new(config),
            core,
            search,
        })))
    }

    /// Every background job of the server, each spawned by the feature that owns it.
    pub fn spawn_jobs(&self, jobs: &TaskTracker, shutdown: &CancellationToken) {
        self.core.spawn_jobs(
            self.config.cleanup.cleanup_cache_schedule.0.clone(),
            jobs,
            shutdown,
        );
        if let Some(git) = &self.git {
            // Each sync knows which crates changed upstream: their cached sparse files are
            // revalidated at once, so freshness does not wait for the TTL.
            let index = self.core.index.clone();
            git.on_files_changed(Arc::new(move |files| index.refresh_changed(files)));
            crate::git::spawn_sync(git.clone(), jobs, shutdown);
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status::page))
        .merge(ops::router())
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
        .layer(AccessLogLayer(state.core.metrics.clone()))
        .with_state(state)
}

/// The host a request named: the URI authority (HTTP/2) or the `Host` header.
fn requested_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}
