//! The access log: one line per request (target `cratere::access`), written when the
//! response body has been sent (or abandoned), with its real size and duration; the request
//! counters of [`Metrics`] are fed from the same place.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::CACHE_HEADER;
use crate::metrics::Metrics;

/// The cache outcomes routes put in [`CACHE_HEADER`], kept as static strings (no copy).
const CACHE_LABELS: [&str; 5] = [
    "hit",
    "miss",
    "revalidated",
    "stale",
    "stale-while-revalidate",
];

/// Counts every request in the metrics and logs one access line when its body ends. A plain
/// tower layer rather than `axum::middleware::from_fn`, which boxes a future and clones the
/// inner service for every request. Nothing here allocates beyond the body wrapper unless
/// the access log is on (then the path is kept for the line).
#[derive(Clone)]
pub struct AccessLogLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request> for AccessLog<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let start = Instant::now();
        let version = match req.version() {
            axum::http::Version::HTTP_2 => "HTTP/2.0",
            axum::http::Version::HTTP_10 => "HTTP/1.0",
            axum::http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        };
        self.metrics.request_version(version);
        let started = Started {
            metrics: self.metrics.clone(),
            start,
            method: req.method().clone(),
            version,
            path: tracing::enabled!(target: "cratere::access", tracing::Level::INFO)
                .then(|| req.uri().path().to_string()),
            route: req.extensions().get::<MatchedPath>().cloned(),
        };
        AccessLogFuture {
            inner: self.inner.call(req),
            started: Some(started),
        }
    }
}

/// What is known of a request before its response.
struct Started {
    metrics: Arc<Metrics>,
    start: Instant,
    method: axum::http::Method,
    version: &'static str,
    path: Option<String>,
    route: Option<MatchedPath>,
}

pin_project_lite::pin_project! {
    /// The response of [`AccessLog`], its body wrapped to log when it ends.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        started: Option<Started>,
    }
}

impl<F, E> std::future::Future for AccessLogFuture<F>
where
    F: std::future::Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let started = this.started.take().expect("polled after completion");
        Poll::Ready(Ok(logged(started, resp)))
    }
}

fn logged(started: Started, resp: Response) -> Response {
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get(CACHE_HEADER)
        .and_then(|v| {
            CACHE_LABELS
                .into_iter()
                .find(|l| l.as_bytes() == v.as_bytes())
        })
        .unwrap_or("-");
    let expected = resp
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (parts, body) = resp.into_parts();
    let record = AccessRecord {
        started,
        expected,
        status,
        cache,
        bytes: 0,
        complete: false,
    };
    Response::from_parts(
        parts,
        Body::new(LoggedBody {
            inner: body,
            record: Some(record),
        }),
    )
}

struct AccessRecord {
    started: Started,
    /// Content-Length, when the response has one.
    expected: Option<u64>,
    status: u16,
    cache: &'static str,
    bytes: u64,
    complete: bool,
}

impl AccessRecord {
    fn finish(self) {
        let s = &self.started;
        let hit = self.cache == "hit";
        let route = s.route.as_ref().map_or("unmatched", |m| m.as_str());
        s.metrics.request(route, self.status, hit);
        if hit || self.cache == "stale" || self.cache == "revalidated" {
            s.metrics.served_from_cache(self.bytes);
        }
        tracing::info!(
            target: "cratere::access",
            method = %s.method,
            version = s.version,
            path = s.path.as_deref().unwrap_or("-"),
            status = self.status,
            bytes = self.bytes,
            duration_ms = s.start.elapsed().as_secs_f64() * 1000.0,
            cache = self.cache,
            complete = self.complete,
            "request"
        );
    }
}

/// A response body that counts what it sends and logs when it is done or dropped.
struct LoggedBody {
    inner: Body,
    record: Option<AccessRecord>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), self.record.as_mut()) {
                    r.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(mut r) = self.record.take() {
                    r.complete = true;
                    r.finish();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            // hyper stops polling once Content-Length bytes are out, so a body can be
            // dropped complete without having reported its end.
            r.complete = self.inner.is_end_stream() || r.expected == Some(r.bytes);
            r.finish();
        }
    }
}
