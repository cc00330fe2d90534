//! The crate route, `/api/v1/crates/{crate}/{version}/download`: a hit or a streamed miss from
//! [`Downloads`](crate::downloads::Downloads), with the headers cargo needs.

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::get;

use super::{AppError, AppState, CACHE_HEADER};
use crate::metrics::{Kind, Outcome};
use crate::names::{CrateName, Version};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/crates/{crate}/{version}/download", get(download))
}

async fn download(
    State(st): State<AppState>,
    Path((krate, version)): Path<(String, String)>,
    plain: Option<Extension<crate::sendfile::Plain>>,
    version_of_http: axum::http::Version,
) -> Result<Response, AppError> {
    let name: CrateName = krate.parse()?;
    let version: Version = version.parse()?;
    let d = st
        .core
        .downloads
        .get(
            &name,
            &version,
            plain.is_some(),
            version_of_http < axum::http::Version::HTTP_11,
        )
        .await?;
    let outcome = if d.hit { Outcome::Hit } else { Outcome::Miss };
    st.core.metrics.cache(Kind::Crate, outcome);
    let mut resp = Response::new(Body::from_stream(d.body));
    let h = resp.headers_mut();
    // Never Content-Encoding: cargo would decode the body and its checksum would fail.
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        CACHE_HEADER,
        HeaderValue::from_static(if d.hit { "hit" } else { "miss" }),
    );
    if let Some(len) = d.len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Ok(resp)
}
