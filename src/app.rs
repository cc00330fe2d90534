//! Shared state, the router, the server loop and its shutdown.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::downloads::Downloads;
use crate::git::GitIndex;
use crate::index_cache::IndexCache;
use crate::jobs::FirstRun;
use crate::metrics::Metrics;
use crate::sparse::PublicHosts;
use crate::storage::FsStore;
use crate::upstream::Upstream;

/// Everything handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub hosts: Arc<PublicHosts>,
    pub index: Arc<IndexCache>,
    pub downloads: Arc<Downloads>,
    pub metrics: Arc<Metrics>,
    /// The git index mirror, when `CRATERE_GIT_INDEX` is on.
    pub git: Option<Arc<GitIndex>>,
}

impl AppState {
    /// Opens the stores (creating directories, clearing abandoned temp files) and builds the
    /// upstream client.
    pub fn new(config: Config) -> anyhow::Result<AppState> {
        let crates = FsStore::open(&config.cache)
            .with_context(|| format!("CRATERE_CACHE={}", config.cache.display()))?;
        let sparse_dir = config.index.join("sparse");
        let index_store = FsStore::open(&sparse_dir)
            .with_context(|| format!("CRATERE_INDEX={}", config.index.display()))?;
        let upstream = Upstream::new(&config).context("building the upstream HTTP client")?;
        let metrics = Arc::new(Metrics::new());
        let index = Arc::new(IndexCache::new(
            index_store,
            upstream.clone(),
            config.index_ttl,
            metrics.clone(),
        ));
        let downloads = Arc::new(Downloads::new(
            crates,
            index.clone(),
            upstream,
            config.upstream_dl.clone(),
            metrics.clone(),
        ));
        let hosts = Arc::new(PublicHosts::new(&config));
        let git = config
            .git_index
            .then(|| Arc::new(GitIndex::new(&config, &hosts)));
        Ok(AppState {
            hosts,
            git,
            config: Arc::new(config),
            index,
            downloads,
            metrics,
        })
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(crate::sparse::router())
        .merge(crate::downloads::router())
        .merge(crate::git::http::router())
        .fallback(not_found)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn health() -> &'static str {
    "ok\n"
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found\n")
}

/// Serves on an already-bound listener until `shutdown` is cancelled, with the background
/// jobs the configuration enables; returns once the server and every job have stopped.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let jobs = TaskTracker::new();
    start_jobs(&state, &jobs, &shutdown);
    jobs.close();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("serving HTTP");
    shutdown.cancel();
    jobs.wait().await;
    served
}

/// Starts the scheduled jobs (each feature adds its own here, through
/// [`crate::jobs::spawn_scheduled`]).
fn start_jobs(state: &AppState, jobs: &TaskTracker, shutdown: &CancellationToken) {
    if let Some(git) = &state.git {
        let (git, token) = (git.clone(), shutdown.clone());
        crate::jobs::spawn_scheduled(
            jobs,
            shutdown.clone(),
            "git-index-sync",
            git.schedule().clone(),
            FirstRun::Immediately,
            move || {
                let (git, token) = (git.clone(), token.clone());
                async move {
                    // Shutdown does not wait for a long fetch: dropping the sync kills git.
                    tokio::select! {
                        res = git.sync() => res.map(|_| ()),
                        _ = token.cancelled() => Ok(()),
                    }
                }
            },
        );
    }
}

/// The `serve` command: bind, run, stop on SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let addr = config.listen_addr();
    let state = AppState::new(config)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (CRATERE_LISTEN / CRATERE_PORT)"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        public = %state.hosts.primary_url(),
        upstream = %state.config.upstream_sparse,
        "cratere is serving; cargo registry = \"sparse+{}/index/\"",
        state.hosts.primary_url()
    );
    if let Some(git) = &state.git {
        tracing::info!(
            upstream = %state.config.upstream_git,
            schedule = %git.schedule(),
            "git index: cargo registry = \"{}/crates.io-index\" once the first sync completes",
            state.hosts.primary_url()
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_handler(shutdown.clone()));
    run(listener, state, shutdown).await
}

async fn signal_handler(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}
