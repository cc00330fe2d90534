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

use crate::cleanup::{Cleanup, Rules};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::downloads::Downloads;
use crate::git::GitIndex;
use crate::index_cache::IndexCache;
use crate::jobs::{FirstRun, spawn_scheduled};
use crate::metrics::Metrics;
use crate::search::Search;
use crate::sparse::PublicHosts;
use crate::storage::{CrateStore, FsStore};
use crate::upstream::Upstream;
use crate::usage::Usage;

/// Everything handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub hosts: Arc<PublicHosts>,
    pub index: Arc<IndexCache>,
    pub downloads: Arc<Downloads>,
    pub search: Arc<Search>,
    pub metrics: Arc<Metrics>,
    /// Last-use records of cached files.
    pub usage: Arc<Usage>,
    /// The cache cleanup, with the report of its last pass.
    pub cleanup: Arc<Cleanup>,
    /// The git index mirror, when `CRATERE_GIT_INDEX` is on.
    pub git: Option<Arc<GitIndex>>,
}

impl AppState {
    /// Opens the stores (creating directories, clearing abandoned temp files) and builds the
    /// upstream client. Files without a usage record yet are adopted by [`run`], in the
    /// background (or by the first cleanup, whichever comes first).
    pub fn new(config: Config) -> anyhow::Result<AppState> {
        AppState::with_clock(config, Arc::new(SystemClock))
    }

    /// [`AppState::new`] with the clock that usage records and cleanups read (tests move it).
    pub fn with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
        let crates = CrateStore::open(&config)?;
        let sparse_dir = config.index.join("sparse");
        let index_store = FsStore::open(&sparse_dir)
            .with_context(|| format!("CRATERE_INDEX={}", config.index.display()))?;
        let usage = Arc::new(Usage::new(crates.clone(), index_store.root(), clock));
        let cleanup = Arc::new(Cleanup::new(
            crates.clone(),
            index_store.root(),
            usage.clone(),
            Rules::from_config(&config),
        ));
        let metrics = Arc::new(Metrics::new());
        let upstream =
            Upstream::new(&config, metrics.clone()).context("building the upstream HTTP client")?;
        let index = Arc::new(IndexCache::new(
            index_store,
            upstream.clone(),
            config.index_ttl,
            metrics.clone(),
            usage.clone(),
            config.index_memory_cache,
        ));
        let search = Arc::new(Search::new(
            upstream.clone(),
            config.upstream_api.clone(),
            config.search_interval,
            index.clone(),
            crates.local().root().to_path_buf(),
        ));
        let downloads = Arc::new(Downloads::new(
            crates,
            index.clone(),
            upstream,
            config.upstream_dl.clone(),
            metrics.clone(),
            usage.clone(),
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
            search,
            metrics,
            usage,
            cleanup,
        })
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(crate::status::page))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::sparse::router())
        .merge(crate::downloads::router())
        .merge(crate::search::router())
        .merge(crate::git::http::router())
        .fallback(not_found)
        // Bounds the time to produce response headers (a download's body may then take as
        // long as it needs).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            state.config.request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::telemetry::access_log,
        ))
        .with_state(state)
}

/// Liveness: the process answers.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: the configuration is loaded (it is, or we would not be running), both local
/// directories accept writes, and the bucket (with S3 storage) answers.
async fn ready(State(st): State<AppState>) -> impl IntoResponse {
    let index = st.index.store().clone();
    let checked = async {
        st.downloads.store().check().await?;
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
        st.metrics.encode(),
    )
}

/// Copies state kept elsewhere (breaker, git mirror, last cleanup) into the gauges.
fn refresh_gauges(st: &AppState) {
    st.metrics
        .set_upstream_up(!st.downloads.upstream().breaker().is_open());
    if let Some(git) = &st.git {
        let s = git.status();
        st.metrics.set_git_sync(&crate::metrics::GitSyncFigures {
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
    if let Some(r) = st.cleanup.last() {
        st.metrics.set_cleanup(
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

/// Serves on an already-bound listener until `shutdown` is cancelled, with the background
/// jobs the configuration enables. On shutdown the listener stops accepting, in-flight
/// requests get up to `CRATERE_SHUTDOWN_GRACE` to finish, jobs stop; then it returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = state.config.clone();
    let jobs = TaskTracker::new();
    start_jobs(&state, &jobs, &shutdown);
    jobs.close();
    let limits = crate::server::Limits {
        max_header_bytes: config.max_header_bytes,
        max_headers: config.max_headers,
        header_read_timeout: config.header_read_timeout,
    };
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::tls_acceptor(cert, key)?),
        _ => None,
    };
    crate::server::serve(
        listener,
        router(state),
        limits,
        tls,
        shutdown.clone(),
        config.shutdown_grace,
    )
    .await;
    shutdown.cancel();
    jobs.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the scheduled jobs (each feature adds its own here, through
/// [`crate::jobs::spawn_scheduled`]).
fn start_jobs(state: &AppState, jobs: &TaskTracker, shutdown: &CancellationToken) {
    // Health probe of a down upstream: checked every second, probing only when the breaker's
    // back-off has elapsed.
    let upstream = state.downloads.upstream().clone();
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

    // Cache size for /metrics and the status page: a walk at startup and every 10 minutes,
    // in the background (startup time does not grow with the cache); stores in between
    // are added as they happen.
    let st = state.clone();
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "cache-size",
        "*/10 * * * *".parse().expect("valid schedule"),
        FirstRun::Immediately,
        {
            let stop = shutdown.clone();
            move || {
                let (st, stop) = (st.clone(), stop.clone());
                async move {
                    // Shutdown does not wait for a walk of a big cache.
                    let crates = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        listed = st.downloads.store().list() => listed?,
                    };
                    let bytes = crates.iter().map(|c| c.len).sum();
                    st.metrics.set_cache_size(crates.len() as u64, bytes);
                    Ok(())
                }
            }
        },
    );

    // Kept file mappings of zero-copy hits whose time is up are dropped even when idle.
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "sendfile-expiry",
        "*/10 * * * * *".parse().expect("valid schedule"),
        FirstRun::OnSchedule,
        || async {
            tokio::task::spawn_blocking(crate::sendfile::expire_kept).await?;
            Ok(())
        },
    );

    // A cache from before usage tracking (or from another tool): every crate file counts as
    // used now. In the background, so startup does not grow with the cache; a cleanup that
    // comes first adopts it itself.
    let (usage, stop) = (state.usage.clone(), shutdown.clone());
    jobs.spawn(async move {
        if usage.is_tracked() {
            return;
        }
        let adopt = tokio::task::spawn_blocking(move || usage.adopt_untracked());
        tokio::select! {
            _ = stop.cancelled() => {}
            res = adopt => match res {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot record uses of the cached crates"),
                Err(e) => tracing::warn!(error = %e, "adopting the cache failed"),
            },
        }
    });

    crate::usage::spawn_flusher(state.usage.clone(), jobs, shutdown.clone());
    if let Some(schedule) = state.config.cleanup_cache_schedule.0.clone() {
        let (cleanup, stop) = (state.cleanup.clone(), shutdown.clone());
        let metrics = state.metrics.clone();
        crate::jobs::spawn_scheduled(
            jobs,
            shutdown.clone(),
            "cleanup",
            schedule,
            FirstRun::OnSchedule,
            move || {
                let (cleanup, stop, metrics) = (cleanup.clone(), stop.clone(), metrics.clone());
                async move {
                    if let crate::cleanup::Outcome::Done(pass) =
                        cleanup.run_once(false, &stop).await?
                    {
                        // The pass counted what is left: exact figures for the gauges.
                        let r = &pass.report;
                        if !r.crates_skipped {
                            metrics.set_cache_size(r.crate_files_kept, r.crate_bytes_kept);
                        }
                    }
                    Ok(())
                }
            },
        );
    }
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

/// Runs the command the command line asked for.
pub async fn dispatch(cli: crate::config::Cli) -> anyhow::Result<std::process::ExitCode> {
    use crate::config::Command;
    use std::process::ExitCode;
    match cli.command {
        None => serve(cli.config).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Serve(config)) => serve(config).await.map(|()| ExitCode::SUCCESS),
        Some(Command::Cleanup(args)) => crate::cleanup::command(args).await,
        Some(Command::Warm(args)) => crate::warm::command(args).await,
    }
}

/// The `serve` command: bind, run, stop on SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    // Each connection and each file served takes a descriptor: use all the system allows.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the open-files limit");
    }
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
    if state.downloads.store().is_remote() {
        let store = state.downloads.store();
        match store.check().await {
            Ok(()) => {
                tracing::info!(store = %store.describe(), "crate files are kept in the bucket")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the bucket does not answer (yet): downloads go to upstream and /ready says 503 until it does"
            ),
        }
    }
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
