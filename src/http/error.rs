//! The one error type at the HTTP edge, with its single status mapping. Services return
//! their own errors ([`DownloadError`], [`GitError`], [`UpstreamError`]); they become
//! statuses here and nowhere else.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::downloads::DownloadError;
use crate::git::GitError;
use crate::names::NameError;
use crate::upstream::UpstreamError;

/// Everything a handler can fail with. Clients get a short plain-text reason; internals are
/// logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    /// Not ready yet (e.g. the git index before its first sync); clients are told when to
    /// come back.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("the downloaded crate did not match the checksum in the index")]
    ChecksumMismatch,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<NameError> for AppError {
    fn from(e: NameError) -> Self {
        AppError::BadRequest(e.to_string())
    }
}

impl From<DownloadError> for AppError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::NotFound(m) => AppError::NotFound(m),
            DownloadError::Upstream(e) => AppError::Upstream(e),
            DownloadError::Checksum => AppError::ChecksumMismatch,
            DownloadError::Busy => AppError::Unavailable {
                reason: e.to_string(),
                retry_after_secs: 1,
            },
            e @ (DownloadError::Store(_) | DownloadError::Internal(_)) => {
                AppError::Internal(e.into())
            }
        }
    }
}

impl From<GitError> for AppError {
    fn from(e: GitError) -> Self {
        match e {
            GitError::NotReady { retry_after_secs } | GitError::Busy { retry_after_secs } => {
                AppError::Unavailable {
                    reason: e.to_string(),
                    retry_after_secs,
                }
            }
            GitError::BadRequest(m) => AppError::BadRequest(m),
            GitError::Backend(_) => AppError::Internal(e.into()),
        }
    }
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Upstream(UpstreamError::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            AppError::Upstream(UpstreamError::Down) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Upstream(UpstreamError::RateLimited { .. }) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Upstream(_) | AppError::ChecksumMismatch => StatusCode::BAD_GATEWAY,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            AppError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error\n".to_string()
            }
            AppError::Upstream(e) => {
                tracing::warn!(error = %e, "upstream failure");
                format!("upstream unavailable: {e}\n")
            }
            other => format!("{other}\n"),
        };
        let mut resp = (status, body).into_response();
        if let AppError::Upstream(UpstreamError::RateLimited { retry_after }) = &self {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.unwrap_or(1).min(60)),
            );
        }
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let AppError::Unavailable {
            retry_after_secs, ..
        } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}
