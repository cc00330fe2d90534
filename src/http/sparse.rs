//! Sparse index routes: the proxy's own `config.json` (per public host) and index files
//! relayed from the [`IndexCache`](crate::index_cache::IndexCache), with a strong ETag of
//! the exact bytes and `If-None-Match` answered with 304.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{AppError, AppState, CACHE_HEADER, requested_host};
use crate::index_cache::{IndexKey, Served};
use crate::metrics::{Kind, Outcome};
use crate::names::IndexPath;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/index/config.json", get(config_json))
        .route("/index/{*path}", get(index_file))
}

async fn config_json(State(st): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let base = st.hosts.base_url_for(requested_host(&uri, &headers));
    let body = serde_json::json!({
        "dl": format!("{base}/api/v1/crates"),
        "api": base,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn index_file(
    State(st): State<AppState>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let path: IndexPath = path
        .parse()
        .map_err(|_| AppError::NotFound("not an index path".into()))?;
    let key = IndexKey::Crate(path);
    let res = st.core.index.get(&key, false).await;
    let Some((entry, served)) = res? else {
        return Err(AppError::NotFound(format!(
            "no crate at {}",
            key.relative()
        )));
    };
    let (outcome, label) = match &served {
        Served::Hit => (Outcome::Hit, "hit"),
        Served::Miss => (Outcome::Miss, "miss"),
        Served::Revalidated => (Outcome::Revalidated, "revalidated"),
        Served::Revalidating => (Outcome::StaleWhileRevalidate, "stale-while-revalidate"),
        Served::Stale(_) => (Outcome::Stale, "stale"),
    };
    st.core.metrics.cache(Kind::Index, outcome);

    let etag = entry.etag.clone();
    let mut resp = if if_none_match(&headers, etag.to_str().unwrap_or_default()) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = entry.body.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(CACHE_HEADER, HeaderValue::from_static(label));
    if matches!(served, Served::Stale(_)) {
        h.insert(
            header::WARNING,
            HeaderValue::from_static("110 cratere \"Response is Stale\""),
        );
    }
    Ok(resp)
}

/// Whether `If-None-Match` matches our ETag (weak comparison, as RFC 9110 asks for GET).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let mut h = HeaderMap::new();
        assert!(!if_none_match(&h, "\"a\""));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"b\", W/\"a\""),
        );
        assert!(if_none_match(&h, "\"a\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"b\""));
        assert!(!if_none_match(&h, "\"a\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, "\"a\""));
    }
}
