//! Git smart HTTP routes at `/crates.io-index` (and `/crates.io-index.git`): `GET
//! info/refs?service=git-upload-pack` and `POST git-upload-pack`, each answered by
//! [`GitIndex::backend`] in the namespace of the host the client used. Pushing and the dumb
//! protocol are refused.

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{any, get, post};
use futures_util::{StreamExt, TryStreamExt};

use super::{AppError, AppState, Connection, GIT_REQUESTS_PER_CONNECTION, requested_host};
use crate::git::GitIndex;
use crate::git::backend::{CgiRequest, Service};

/// The two URL prefixes cargo users write (`registry = "http://HOST/crates.io-index"`).
const PREFIXES: [&str; 2] = ["/crates.io-index", "/crates.io-index.git"];

pub fn router() -> Router<AppState> {
    let mut r = Router::new();
    for p in PREFIXES {
        r = r
            .route(&format!("{p}/info/refs"), get(info_refs))
            .route(&format!("{p}/git-upload-pack"), post(upload_pack))
            .route(&format!("{p}/{{*rest}}"), any(other));
    }
    r
}

fn git_index(st: &AppState) -> Result<&GitIndex, AppError> {
    let git = st.git.as_deref().ok_or_else(|| {
        AppError::NotFound("the git index is disabled here (CRATERE_GIT_INDEX=false)".into())
    })?;
    git.check_ready()?;
    Ok(git)
}

async fn info_refs(
    State(st): State<AppState>,
    conn: Option<Extension<Connection>>,
    RawQuery(query): RawQuery,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let service = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned())
    });
    match service.as_deref() {
        Some("git-upload-pack") => {}
        Some("git-receive-pack") => return Err(read_only()),
        _ => {
            return Err(AppError::NotFound(
                "only git smart HTTP is served here (info/refs?service=git-upload-pack)".into(),
            ));
        }
    }
    serve(&st, conn, Service::Advertisement, &uri, &headers, None).await
}

async fn upload_pack(
    State(st): State<AppState>,
    conn: Option<Extension<Connection>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    serve(&st, conn, Service::UploadPack, &uri, &headers, Some(body)).await
}

async fn serve(
    st: &AppState,
    conn: Option<Extension<Connection>>,
    service: Service,
    uri: &Uri,
    headers: &HeaderMap,
    body: Option<Body>,
) -> Result<Response, AppError> {
    let git = git_index(st)?;
    // Held until the response body ends, like the process slot.
    let per_connection = match conn {
        Some(Extension(c)) => Some(c.git_requests.try_acquire_owned().map_err(|_| {
            git.count_busy();
            AppError::Unavailable {
                reason: format!(
                    "this connection already has {GIT_REQUESTS_PER_CONNECTION} git requests \
                     in progress; try again shortly"
                ),
                retry_after_secs: 1,
            }
        })?),
        None => None,
    };
    let host = git.host(&st.hosts.base_url_for(requested_host(uri, headers)));
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let req = CgiRequest {
        service,
        namespace: &host.namespace,
        content_type: header("content-type"),
        content_encoding: header("content-encoding"),
        git_protocol: header("git-protocol"),
        body: body.map(|b| Box::pin(b.into_data_stream().map_err(std::io::Error::other)) as _),
    };
    let answer = git.backend(req).await?;
    let body = answer.body.map(move |chunk| {
        let _held = &per_connection;
        chunk
    });
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::from_u16(answer.status)
        .map_err(|_| AppError::Internal(anyhow::anyhow!("git http-backend: bad status")))?;
    for (name, value) in answer.headers {
        let value = HeaderValue::from_str(&value).map_err(|_| {
            AppError::Internal(anyhow::anyhow!("git http-backend: bad value of {name}"))
        })?;
        resp.headers_mut()
            .append(HeaderName::from_static(name), value);
    }
    Ok(resp)
}

async fn other(uri: Uri) -> AppError {
    if uri.path().ends_with("/git-receive-pack") {
        read_only()
    } else {
        AppError::NotFound("only git smart HTTP (git-upload-pack) is served here".into())
    }
}

fn read_only() -> AppError {
    AppError::Forbidden("this git index is a read-only mirror: pushing is not allowed".into())
}
