//! The HTTP server loop: accepts connections on a pre-bound listener and serves them with
//! hyper (HTTP/1.1, and HTTP/2 with prior knowledge), with limits on header size and count and
//! a timeout on reading request headers, so slow or hostile clients cannot hold resources;
//! stops accepting on shutdown and drains connections for at most the grace period. Plain HTTP
//! connections also switch to HTTP/2 on `Upgrade: h2c` (see [`crate::h2c`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{AppState, router};

/// Serves on an already-bound listener until `shutdown` is cancelled, with the background
/// jobs the configuration enables. On shutdown the listener stops accepting, in-flight
/// requests get up to `CRATERE_SHUTDOWN_GRACE` to finish, jobs stop; then it returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = state.config.server.clone();
    let jobs = TaskTracker::new();
    state.spawn_jobs(&jobs, &shutdown);
    crate::sendfile::spawn_expiry(&jobs, &shutdown);
    jobs.close();
    let limits = Limits {
        max_header_bytes: config.max_header_bytes,
        max_headers: config.max_headers,
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        open: state.core.metrics.connections_gauge(),
    };
    let max_connections = config
        .max_connections
        .unwrap_or_else(|| derived_connection_limit(&state.config));
    tracing::info!(
        max_connections,
        "connection limit (CRATERE_MAX_CONNECTIONS; beyond it new connections wait in the backlog)"
    );
    state.core.metrics.set_connections_max(max_connections);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    serve(
        listener,
        router(state),
        Listener {
            limits,
            tls,
            max_connections,
        },
        shutdown.clone(),
        config.shutdown_grace,
    )
    .await;
    shutdown.cancel();
    jobs.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Descriptors kept aside from connections: the listener, logs, the index and usage files, and
/// slack for whatever else a request opens.
const RESERVED_FDS: u64 = 256;

/// The default connection limit, from the open-file limit (already raised to its hard limit
/// by `serve`): what is left after the reserve, the hot files kept open for `sendfile`
/// ([`crate::sendfile::HOT_FILES`]), the upstream connections with the temp files of their
/// downloads (three each) and the git backends' pipes (four each), halved, so that each
/// connection can also have one file open while it is sent.
pub fn derived_connection_limit(config: &crate::config::Config) -> usize {
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    connection_budget(
        nofile,
        config.upstream.upstream_concurrency as u64,
        config.git.git_max_processes as u64,
    )
}

/// [`derived_connection_limit`] for an open-file limit; at least 16.
pub fn connection_budget(nofile: u64, upstream_concurrency: u64, git_processes: u64) -> usize {
    let reserved =
        RESERVED_FDS + crate::sendfile::HOT_FILES + 3 * upstream_concurrency + 4 * git_processes;
    (nofile.saturating_sub(reserved) / 2).clamp(16, usize::MAX as u64) as usize
}

/// A connection's place under the connection limit, held by everything serving it (an h2c
/// upgrade carries it on).
type Slot = Arc<tokio::sync::OwnedSemaphorePermit>;

/// How the listener takes connections: their limits, TLS, and how many may be open at once.
struct Listener {
    limits: Limits,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
}

/// TLS for the listener: certificate chain and key from PEM files, ALPN `h2` and `http/1.1`
/// (cargo then negotiates HTTP/2 and multiplexes its requests over one connection).
fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "CRATERE_TLS_CERT={}: cannot read certificates",
                cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "CRATERE_TLS_CERT={}: no certificate in the file",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "CRATERE_TLS_KEY={}: cannot read a private key",
            key.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("CRATERE_TLS_CERT / CRATERE_TLS_KEY: the key does not fit the certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Connection-level limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line + headers), bytes.
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Time a client has to send a complete request head; for a new connection, counted
    /// from the accept (TLS handshake, protocol detection, HTTP/2 preface included).
    pub header_read_timeout: Duration,
    /// Longest time a connection stays open with no request in progress.
    pub idle_timeout: Duration,
    /// Connections open now (`cratere_connections_open`).
    pub open: prometheus_client::metrics::gauge::Gauge,
}

/// hyper's HTTP/1.1 and HTTP/2 settings: the limits on heads, streams and idle time.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper needs at least 8 KiB of buffer; the head must fit in it.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        // What a stream may have queued for sending (hyper's default is 400 KiB): with 640
        // streams of crate hits in flight, the queued bodies were most of the RSS (bench:
        // 173 MiB peak; 73 MiB with this and 64 KiB reads).
        .max_send_buf_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// One plain connection: `sendfile` for hits on HTTP/1.1, h2c upgrades, prior-knowledge
/// HTTP/2.
fn serve_plain(
    stream: TcpStream,
    slot: Slot,
    app: &Router,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    limits: &Limits,
) {
    let service = PlainService {
        inner: TowerToHyperService::new(app.clone()),
        upgrade: Arc::new(UpgradeCtx {
            app: app.clone(),
            builder: builder.clone(),
            watcher: std::sync::Mutex::new(Some(graceful.watcher())),
            preface_timeout: limits.header_read_timeout,
            max_header_list: limits.max_header_bytes,
            limits: limits.clone(),
            slot: slot.clone(),
        }),
    };
    let activity = Activity::new();
    let service = Tracked::new(service, &activity);
    let io = TokioIo::new(crate::sendfile::SendfileStream::new(stream));
    let conn = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(with_deadlines(conn, activity, limits.clone(), slot));
}

/// One TLS connection: the handshake within the head-read timeout, then HTTP/1.1 or HTTP/2
/// as ALPN chose.
fn serve_tls(
    stream: TcpStream,
    slot: Slot,
    app: &Router,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    limits: &Limits,
    acceptor: &TlsAcceptor,
) {
    let activity = Activity::new();
    let service = Tracked::new(TowerToHyperService::new(app.clone()), &activity);
    let (acceptor, builder) = (acceptor.clone(), builder.clone());
    let limits = limits.clone();
    let handshake_timeout = limits.header_read_timeout;
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tls), service)
            .into_owned();
        with_deadlines(watcher.watch(conn), activity, limits, slot).await;
    });
}

/// Serves `app` until `shutdown`; then waits up to `grace` for open connections to finish.
/// At the connection limit it stops accepting until a connection closes: new clients wait in
/// the kernel's listen backlog, and the descriptors of the open ones stay usable.
async fn serve(
    listener: TcpListener,
    app: Router,
    on: Listener,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let Listener {
        limits,
        tls,
        max_connections,
    } = on;
    let builder = connection_builder(&limits);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tracing::warn!(
                    max_connections,
                    "connection limit reached; new connections wait until one closes"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                }
            }
        };
        let slot = Arc::new(slot);
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => serve_plain(stream, slot, &app, &builder, &graceful, &limits),
            Some(acceptor) => serve_tls(stream, slot, &app, &builder, &graceful, &limits, acceptor),
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed; closing the remaining connections");
        }
    }
}

/// What a plain HTTP connection needs to switch to HTTP/2 on `Upgrade: h2c`.
struct UpgradeCtx {
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    /// Taken by the one upgrade a connection can have, so that the HTTP/2 connection it becomes
    /// is drained on shutdown like any other.
    watcher: std::sync::Mutex<Option<Watcher>>,
    preface_timeout: Duration,
    /// The HTTP/2 server's header list limit (the upgraded request must fit it).
    max_header_list: usize,
    limits: Limits,
    slot: Slot,
}

/// The service of a plain HTTP connection: the router, plus the h2c upgrade.
#[derive(Clone)]
struct PlainService {
    inner: TowerToHyperService<Router>,
    upgrade: Arc<UpgradeCtx>,
}

type PlainFuture = futures_util::future::Either<
    std::future::Ready<Result<axum::response::Response, std::convert::Infallible>>,
    TowerToHyperServiceFuture<Router, hyper::Request<hyper::body::Incoming>>,
>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for PlainService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = PlainFuture;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        use futures_util::future::Either;
        if crate::h2c::wants_upgrade(&req, self.upgrade.max_header_list)
            && let Some(watcher) = self.upgrade.watcher.lock().ok().and_then(|mut w| w.take())
        {
            let stream_one = crate::h2c::stream_one_frames(req.method(), req.uri(), req.headers());
            let on_upgrade = hyper::upgrade::on(&mut req);
            let ctx = self.upgrade.clone();
            tokio::spawn(async move {
                let upgraded = match on_upgrade.await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(error = %e, "h2c upgrade did not happen");
                        return;
                    }
                };
                let mut io = TokioIo::new(upgraded);
                let prefix = match tokio::time::timeout(
                    ctx.preface_timeout,
                    crate::h2c::splice_preface(&mut io, &stream_one),
                )
                .await
                {
                    Ok(Ok(prefix)) => prefix,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "h2c upgrade failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("h2c upgrade: no HTTP/2 preface in time");
                        return;
                    }
                };
                let io = TokioIo::new(crate::h2c::Prefixed::new(prefix, io));
                let activity = Activity::new();
                let service = Tracked::new(TowerToHyperService::new(ctx.app.clone()), &activity);
                let conn = ctx.builder.serve_connection(io, service).into_owned();
                let slot = ctx.slot.clone();
                with_deadlines(watcher.watch(conn), activity, ctx.limits.clone(), slot).await;
            });
            return Either::Left(std::future::ready(Ok(crate::h2c::switching_protocols())));
        }
        // Crate hits on this connection may be sent with sendfile: over HTTP/1.1 only, where
        // hyper hands the body's buffers to the connection untouched (h2 copies the start of
        // every DATA frame, which must never read a file's mapping).
        if req.version() == hyper::Version::HTTP_11 {
            req.extensions_mut().insert(crate::sendfile::Plain);
        }
        Either::Right(self.inner.call(req))
    }
}

/// What a connection is doing, for its deadlines: requests seen, requests in progress (a
/// response counts until its body has been sent or dropped), and since when it is idle.
struct Activity {
    /// Shared by the connection's requests (in their extensions).
    scope: crate::http::Connection,
    seen: AtomicU64,
    in_flight: AtomicUsize,
    idle_since: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            scope: crate::http::Connection::new(),
            seen: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.idle_since.lock().expect("lock poisoned").elapsed())
    }
}

/// One request in progress; its end makes the connection idle if it was the last.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.seen.fetch_add(1, Ordering::SeqCst);
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().expect("lock poisoned") = tokio::time::Instant::now();
        }
    }
}

/// A hyper service whose requests are counted in an [`Activity`] until their response body
/// ends.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    fn new(inner: S, activity: &Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity: activity.clone(),
        }
    }
}

impl<S, B> hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        >,
    S::Future: Send + 'static,
{
    type Response = hyper::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>,
    >;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.activity.scope.clone());
        let guard = InFlight::start(&self.activity);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| TrackedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted as in progress until it is dropped.
struct TrackedBody<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs a connection until it ends, or until it breaks a deadline: no complete first
/// request within `header_read_timeout` of the accept (a client that sends nothing, half an
/// HTTP/2 preface, or nothing after its TLS handshake), or no request in progress for
/// `idle_timeout`. Dropping the connection closes it, and its `slot` under the connection
/// limit is free once nothing else serving it holds it.
async fn with_deadlines<C, E>(conn: C, activity: Arc<Activity>, limits: Limits, _slot: Slot)
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let accepted = tokio::time::Instant::now();
    let watchdog = async {
        loop {
            let now = tokio::time::Instant::now();
            let first_due = accepted + limits.header_read_timeout;
            if activity.seen.load(Ordering::SeqCst) == 0 && now >= first_due {
                tracing::debug!("no request in time; closing the connection");
                return;
            }
            let idle_due = match activity.idle_for() {
                Some(idle) if idle >= limits.idle_timeout => {
                    tracing::debug!("idle connection closed");
                    return;
                }
                Some(idle) => now + (limits.idle_timeout - idle),
                None => now + limits.idle_timeout,
            };
            let wake = if activity.seen.load(Ordering::SeqCst) == 0 {
                idle_due.min(first_due)
            } else {
                idle_due
            };
            tokio::time::sleep_until(wake).await;
        }
    };
    limits.open.inc();
    tokio::select! {
        res = conn => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = watchdog => {}
    }
    limits.open.dec();
}

#[cfg(test)]
mod tests {
    use super::connection_budget;

    #[test]
    fn the_connection_budget_leaves_room_for_files_and_upstream() {
        // A container's usual hard limit, the defaults (64 upstream, 32 git).
        assert_eq!(connection_budget(1_048_576, 64, 32), (1_048_576 - 1600) / 2);
        assert_eq!(connection_budget(4096, 64, 32), 1248);
        // A small limit still leaves a usable minimum.
        assert_eq!(connection_budget(1024, 64, 32), 16);
    }
}
