//! Operations routes: `/health` (liveness), `/ready` (the stores accept writes, the bucket
//! answers) and `/metrics` (OpenMetrics text).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// Liveness: the process answers.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: the configuration is loaded (it is, or we would not be running), both local
/// directories accept writes, and the bucket (with S3 storage) answers; each answer is
/// reused for [`crate::core::READY_TTL`].
async fn ready(State(st): State<AppState>) -> impl IntoResponse {
    let details = st
        .core
        .ready_details()
        .map(|d| format!("{d}\n"))
        .unwrap_or_default();
    match st.core.ready().await {
        Ok(()) => (StatusCode::OK, format!("ready\n{details}")),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {e}\n{details}"),
        ),
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
            limited: git.limits().snapshot(),
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
