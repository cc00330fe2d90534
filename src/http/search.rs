//! `cargo search` routes: `/api/v1/crates?q=…` answered by [`Search`](crate::search::Search);
//! every other `/api/v1/…` path answers 404 in the JSON error format cargo prints.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;

use super::AppState;
use crate::search::{SearchAnswer, SearchQuery};

/// Response header saying where a search answer came from: cache, upstream or local.
pub const SEARCH_HEADER: &str = "x-cratere-search";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/crates", get(search).fallback(not_served))
        .route("/api/v1/{*rest}", any(not_served))
}

/// A cargo-style JSON error: `{"errors":[{"detail":"…"}]}`.
fn json_error(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "detail": detail }] }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_served() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "this crates.io proxy does not serve that API endpoint",
    )
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
    let query = match SearchQuery::new(params.q, params.per_page, params.page) {
        Ok(q) => q,
        Err(why) => return json_error(StatusCode::BAD_REQUEST, why),
    };
    match st.search.search(&query).await {
        SearchAnswer::Found {
            status,
            body,
            source,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut r = (status, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut()
                .insert(SEARCH_HEADER, HeaderValue::from_static(source.as_str()));
            r
        }
        SearchAnswer::RateLimited { retry_after } => {
            let mut r = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many searches: crates.io allows one per second; try again shortly",
            );
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            r
        }
        SearchAnswer::Failed => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}
