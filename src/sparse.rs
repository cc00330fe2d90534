//! Sparse index routes: the proxy's own `config.json` (per public host) and index files
//! relayed from the [`IndexCache`](crate::index_cache::IndexCache).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::app::AppState;
use crate::config::{Config, HostPort, Scheme};
use crate::error::AppError;
use crate::index_cache::{IndexKey, Served};
use crate::metrics::{Kind, Outcome};
use crate::names::IndexPath;

/// Response header saying how the cache answered: hit, miss, revalidated or stale.
pub const CACHE_HEADER: &str = "x-cratere-cache";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/index/config.json", get(config_json))
        .route("/index/{*path}", get(index_file))
}

/// The public URLs this proxy answers to: the primary host and the alternate hosts.
#[derive(Debug, Clone)]
pub struct PublicHosts {
    scheme: Scheme,
    primary: HostPort,
    alternates: Vec<HostPort>,
}

impl PublicHosts {
    pub fn new(config: &Config) -> PublicHosts {
        PublicHosts {
            scheme: config.scheme,
            primary: config.primary_host(),
            alternates: config.alternate_hosts.0.clone(),
        }
    }

    /// `scheme://authority` of the configured host the client named, or of the primary host
    /// when it named none of them. A `Host` header is never reflected as such.
    pub fn base_url_for(&self, requested: Option<&str>) -> String {
        let wanted = requested
            .and_then(|h| HostPort::parse(h).ok())
            .map(|h| h.authority(self.scheme));
        let chosen = wanted
            .and_then(|w| {
                std::iter::once(&self.primary)
                    .chain(&self.alternates)
                    .find(|h| h.authority(self.scheme) == w)
            })
            .unwrap_or(&self.primary);
        format!(
            "{}://{}",
            self.scheme.as_str(),
            chosen.authority(self.scheme)
        )
    }

    /// The primary public URL.
    pub fn primary_url(&self) -> String {
        self.base_url_for(None)
    }

    /// `scheme://authority` of every configured host, primary first.
    pub fn all_base_urls(&self) -> Vec<String> {
        std::iter::once(&self.primary)
            .chain(&self.alternates)
            .map(|h| format!("{}://{}", self.scheme.as_str(), h.authority(self.scheme)))
            .collect()
    }
}

/// The host a request named: the URI authority (HTTP/2) or the `Host` header.
pub fn requested_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
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
    let res = st.index.get(&key, false).await;
    let Some((entry, served)) = res? else {
        return Err(AppError::NotFound(format!(
            "no crate at {}",
            key.relative()
        )));
    };
    let outcome = match &served {
        Served::Hit => Outcome::Hit,
        Served::Miss => Outcome::Miss,
        Served::Revalidated => Outcome::Revalidated,
        Served::Stale(_) => Outcome::Stale,
    };
    st.metrics.cache(Kind::Index, outcome);

    let etag = entry.etag();
    let mut resp = if if_none_match(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = entry.body.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    let h = resp.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex etag"),
    );
    h.insert(
        CACHE_HEADER,
        HeaderValue::from_static(match served {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Revalidated => "revalidated",
            Served::Stale(_) => "stale",
        }),
    );
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

    fn hosts(alternates: &str) -> PublicHosts {
        let mut c = Config::for_dirs("c".into(), "i".into());
        c.host = "proxy.example".into();
        c.port = 8000;
        c.alternate_hosts = crate::config::AlternateHosts(
            serde_json::from_str::<Vec<String>>(alternates)
                .unwrap()
                .iter()
                .map(|h| HostPort::parse(h).unwrap())
                .collect(),
        );
        PublicHosts::new(&c)
    }

    #[test]
    fn config_host_selection() {
        let h = hosts(r#"["mirror.internal:9000", "plain.internal"]"#);
        assert_eq!(h.primary_url(), "http://proxy.example:8000");
        assert_eq!(
            h.all_base_urls(),
            [
                "http://proxy.example:8000",
                "http://mirror.internal:9000",
                "http://plain.internal"
            ]
        );
        assert_eq!(
            h.base_url_for(Some("proxy.example:8000")),
            "http://proxy.example:8000"
        );
        assert_eq!(
            h.base_url_for(Some("Mirror.Internal:9000")),
            "http://mirror.internal:9000"
        );
        assert_eq!(
            h.base_url_for(Some("plain.internal")),
            "http://plain.internal"
        );
        assert_eq!(
            h.base_url_for(Some("plain.internal:80")),
            "http://plain.internal"
        );
        for spoofed in [
            "evil.example",
            "mirror.internal:9001",
            "a/b",
            "",
            "plain.internal:8000",
        ] {
            assert_eq!(
                h.base_url_for(Some(spoofed)),
                "http://proxy.example:8000",
                "{spoofed}"
            );
        }
    }

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
