//! Test harness: a fake upstream (sparse index + downloads, counts requests, injects faults)
//! and the real proxy started on port 0 against it.
#![allow(dead_code)]

pub mod cargo;
pub mod git;
pub mod s3;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use cratere::config::Config;

/// What the fake upstream does wrong, per kind of request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status.
    Status(u16),
    /// Accept the request and never answer.
    Hang,
    /// Send headers and the first half of the body, then hang.
    HangMidBody,
    /// Content-Length of the whole body, but only the first half, then close.
    Truncate,
    /// Chunked body cut off after the first half (no final chunk).
    TruncateChunked,
    /// Chunked (no length): the first half at once, then after [`FakeUpstream::release`] one
    /// more byte and the body is cut off.
    GateThenCut,
    /// The right length, one byte flipped.
    Corrupt,
    /// Headers and the first half at once, the rest after [`FakeUpstream::release`].
    Gate,
    /// Headers and body only after [`FakeUpstream::release`].
    GateAll,
    /// The body in small pieces with pauses between them.
    Trickle { piece: usize, pause: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Config,
    Index,
    Crate,
    /// The web API (search).
    Api,
}

#[derive(Default)]
pub struct UpState {
    /// Index files by path (`se/rd/serde`).
    index: Mutex<HashMap<String, String>>,
    /// Crate files by `name/version` (canonical case).
    crates: Mutex<HashMap<String, Bytes>>,
    /// Requests by path, e.g. `/se/rd/serde`, `/dl/serde/1.0.0/download`.
    hits: Mutex<HashMap<String, usize>>,
    /// Conditional headers seen, by path.
    conditionals: Mutex<Vec<(String, String)>>,
    faults: Mutex<HashMap<Target, Fault>>,
    /// Send ETags and honour If-None-Match.
    etags: Mutex<bool>,
    /// The `dl` in config.json; default `{url}dl`.
    dl: Mutex<Option<String>>,
    gate: Mutex<Option<watch::Sender<bool>>>,
    /// When each web API request arrived.
    api_times: Mutex<Vec<std::time::Instant>>,
}

pub struct FakeUpstream {
    pub url: String,
    pub addr: SocketAddr,
    pub state: Arc<UpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// cargo's index path of a name.
pub fn index_path(name: &str) -> String {
    let n = name.to_ascii_lowercase();
    match n.len() {
        1 => format!("1/{n}"),
        2 => format!("2/{n}"),
        3 => format!("3/{}/{n}", &n[..1]),
        _ => format!("{}/{}/{n}", &n[..2], &n[2..4]),
    }
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (gate, _) = watch::channel(false);
        let state = Arc::new(UpState {
            gate: Mutex::new(Some(gate)),
            ..Default::default()
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeUpstream {
            url: format!("http://{addr}/"),
            addr,
            state,
            task,
        }
    }

    /// Publishes a crate version with the given bytes; returns its index line.
    pub fn publish_bytes(&self, name: &str, vers: &str, bytes: Bytes, deps: &str) -> String {
        let line = format!(
            r#"{{"name": "{name}", "vers": "{vers}", "deps": {deps}, "cksum": "{}", "features": {{}}, "yanked": false, "rust_version": "1.60", "future_field": {{"x": [1, 2]}}}}"#,
            sha256_hex(&bytes)
        );
        let mut index = self.state.index.lock().unwrap();
        let file = index.entry(index_path(name)).or_default();
        file.push_str(&line);
        file.push('\n');
        self.state
            .crates
            .lock()
            .unwrap()
            .insert(format!("{name}/{vers}"), bytes);
        line
    }

    /// Publishes a crate version with generated content of `size` bytes.
    pub fn publish(&self, name: &str, vers: &str, size: usize) -> Bytes {
        let seed = sha256_hex(format!("{name}-{vers}").as_bytes());
        let bytes: Vec<u8> = seed.bytes().cycle().take(size).collect();
        let bytes = Bytes::from(bytes);
        self.publish_bytes(name, vers, bytes.clone(), "[]");
        bytes
    }

    pub fn index_file(&self, name: &str) -> String {
        self.state.index.lock().unwrap()[&index_path(name)].clone()
    }

    pub fn set_index_file(&self, name: &str, content: &str) {
        self.state
            .index
            .lock()
            .unwrap()
            .insert(index_path(name), content.to_string());
    }

    pub fn remove_crate(&self, name: &str) {
        self.state.index.lock().unwrap().remove(&index_path(name));
    }

    pub fn hits(&self, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Every path requested so far.
    pub fn state_paths(&self) -> Vec<String> {
        self.state.hits.lock().unwrap().keys().cloned().collect()
    }

    pub fn total_hits(&self) -> usize {
        self.state.hits.lock().unwrap().values().sum()
    }

    pub fn crate_hits(&self, name: &str, vers: &str) -> usize {
        self.hits(&format!("/dl/{name}/{vers}/download"))
    }

    pub fn index_hits(&self, name: &str) -> usize {
        self.hits(&format!("/{}", index_path(name)))
    }

    pub fn conditionals(&self) -> Vec<(String, String)> {
        self.state.conditionals.lock().unwrap().clone()
    }

    /// Arrival times of web API (search) requests.
    pub fn api_times(&self) -> Vec<std::time::Instant> {
        self.state.api_times.lock().unwrap().clone()
    }

    pub fn set_fault(&self, target: Target, fault: Fault) {
        self.state.faults.lock().unwrap().insert(target, fault);
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn set_etags(&self, on: bool) {
        *self.state.etags.lock().unwrap() = on;
    }

    pub fn set_dl(&self, dl: &str) {
        *self.state.dl.lock().unwrap() = Some(dl.to_string());
    }

    /// Opens the gate of [`Fault::Gate`] / [`Fault::GateAll`].
    pub fn release(&self) {
        if let Some(g) = &*self.state.gate.lock().unwrap() {
            g.send_replace(true);
        }
    }

    /// Waits until `path` has been requested `n` times (polling, bounded).
    pub async fn wait_for_hits(&self, path: &str, n: usize) {
        wait_until(|| self.hits(path) >= n, &format!("{n} requests of {path}")).await;
    }
}

/// A server that accepts connections, reads the request, and resets the connection without
/// answering. Returns its base URL.
pub async fn resetting_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let std = stream.into_std().unwrap();
                let sock = socket2::SockRef::from(&std);
                let _ = sock.set_linger(Some(Duration::ZERO)); // close = RST
                drop(std);
            });
        }
    });
    format!("http://{addr}/")
}

/// Polls a condition every few milliseconds for up to 20 s: a wait for an observable event,
/// not a sleep standing in for one.
pub async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..4000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Like [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(mut cond: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..4000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn handle(State(st): State<Arc<UpState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    *st.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    for h in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        if let Some(v) = req.headers().get(&h) {
            st.conditionals
                .lock()
                .unwrap()
                .push((path.clone(), v.to_str().unwrap().to_string()));
        }
    }
    let rel = path.trim_start_matches('/');
    if let Some(rest) = rel.strip_prefix("r/") {
        // Everything under /r/ redirects to the same path without it.
        let mut location = format!("/{rest}");
        if let Some(q) = req.uri().query() {
            location = format!("{location}?{q}");
        }
        return (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
    }
    let (target, body) = if rel == "api/v1/crates" {
        st.api_times.lock().unwrap().push(std::time::Instant::now());
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let q = query.get("q").cloned().unwrap_or_default();
        let per_page: usize = query
            .get("per_page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(10);
        let mut names: Vec<String> = st
            .crates
            .lock()
            .unwrap()
            .keys()
            .map(|k| k.split('/').next().unwrap().to_string())
            .filter(|n| n.contains(&q))
            .collect();
        names.sort();
        names.dedup();
        let crates: Vec<_> = names
            .iter()
            .take(per_page)
            .map(|n| {
                serde_json::json!({"name": n, "max_version": "9.9.9", "description": format!("Upstream says {n} is great"), "future_field": true})
            })
            .collect();
        (
            Target::Api,
            Some(Bytes::from(
                serde_json::json!({"crates": crates, "meta": {"total": names.len(), "next_page": null}})
                    .to_string(),
            )),
        )
    } else if rel == "config.json" {
        let dl = st.dl.lock().unwrap().clone().unwrap_or_else(|| {
            format!(
                "http://{}/dl",
                req.headers()[header::HOST].to_str().unwrap()
            )
        });
        (
            Target::Config,
            Some(Bytes::from(
                serde_json::json!({"dl": dl, "api": "http://api.invalid"}).to_string(),
            )),
        )
    } else if let Some(dl) = rel.strip_prefix("dl/") {
        let key = dl.trim_end_matches("/download").to_string();
        let key = percent_encoding::percent_decode_str(&key)
            .decode_utf8_lossy()
            .to_string();
        (Target::Crate, st.crates.lock().unwrap().get(&key).cloned())
    } else {
        (
            Target::Index,
            st.index
                .lock()
                .unwrap()
                .get(rel)
                .map(|s| Bytes::from(s.clone())),
        )
    };
    let fault = st.faults.lock().unwrap().get(&target).cloned();
    if let Some(Fault::Status(code)) = fault {
        let mut r = (StatusCode::from_u16(code).unwrap(), "injected failure").into_response();
        if code == 429 || code == 503 {
            r.headers_mut()
                .insert(header::RETRY_AFTER, "1".parse().unwrap());
        }
        return r;
    }
    if fault == Some(Fault::Hang) {
        std::future::pending::<()>().await;
    }
    let gate = st.gate.lock().unwrap().as_ref().unwrap().subscribe();
    if fault == Some(Fault::GateAll) {
        let mut g = gate.clone();
        let _ = g.wait_for(|open| *open).await;
    }
    let Some(body) = body else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let etag = format!("\"up-{}\"", &sha256_hex(&body)[..16]);
    let mut headers = HeaderMap::new();
    if target == Target::Index && *st.etags.lock().unwrap() {
        if req
            .headers()
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.to_str().unwrap() == etag)
        {
            return StatusCode::NOT_MODIFIED.into_response();
        }
        headers.insert(header::ETAG, etag.parse().unwrap());
    }
    let half = body.len() / 2;
    let full_len = body.len();
    let with_len = |body: Body| {
        let mut r = Response::new(body);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, full_len.into());
        r
    };
    let two = vec![body.slice(..half), body.slice(half..)];
    let mut resp = match fault {
        Some(Fault::Truncate) => with_len(parts_body(vec![body.slice(..half)], None, false, false)),
        Some(Fault::TruncateChunked) => {
            Response::new(parts_body(vec![body.slice(..half)], None, false, true))
        }
        Some(Fault::GateThenCut) => Response::new(parts_body(
            vec![body.slice(..half), body.slice(half..half + 1)],
            Some(gate),
            false,
            true,
        )),
        Some(Fault::Corrupt) => {
            let mut v = body.to_vec();
            v[half] ^= 0xff;
            Response::new(Body::from(v))
        }
        Some(Fault::Gate) => with_len(parts_body(two, Some(gate), false, false)),
        Some(Fault::HangMidBody) => with_len(parts_body(two, None, true, false)),
        Some(Fault::Trickle { piece, pause }) => {
            let pieces: Vec<Bytes> = body.chunks(piece).map(Bytes::copy_from_slice).collect();
            let s = futures_util::stream::iter(pieces.into_iter().enumerate()).then(
                move |(i, p)| async move {
                    if i > 0 {
                        tokio::time::sleep(pause).await;
                    }
                    Ok::<_, std::io::Error>(p)
                },
            );
            with_len(Body::from_stream(s))
        }
        _ => Response::new(Body::from(body)),
    };
    resp.headers_mut().extend(headers);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        if target == Target::Crate {
            "application/octet-stream"
        } else {
            "text/plain"
        }
        .parse()
        .unwrap(),
    );
    resp
}

use futures_util::StreamExt;

/// A body sent in `parts`. Before the second part it waits for the gate (if given) or hangs
/// forever (`hang`); at the end it optionally fails, which makes hyper abort the response.
fn parts_body(
    parts: Vec<Bytes>,
    gate: Option<watch::Receiver<bool>>,
    hang: bool,
    end_with_error: bool,
) -> Body {
    let s = futures_util::stream::unfold(
        (parts.into_iter(), 0usize, gate, false),
        move |(mut it, i, gate, ended)| async move {
            if ended {
                return None;
            }
            match it.next() {
                Some(p) => {
                    if i == 1 {
                        if let Some(mut g) = gate.clone() {
                            let _ = g.wait_for(|open| *open).await;
                        }
                        if hang {
                            std::future::pending::<()>().await;
                        }
                    }
                    Some((Ok(p), (it, i + 1, gate, false)))
                }
                None if end_with_error => {
                    Some((Err(std::io::Error::other("cut off")), (it, i, gate, true)))
                }
                None => None,
            }
        },
    );
    Body::from_stream(s)
}

/// The proxy under test, serving on a port-0 listener.
pub struct Proxy {
    pub url: String,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub state: cratere::http::AppState,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.token.cancel();
        self.task.abort();
    }
}

impl Proxy {
    /// Test defaults: data under `dir`, a long TTL, short upstream timeouts.
    pub fn config(upstream_url: &str, dir: &Path) -> Config {
        let mut c = Config::for_dirs(dir.join("crates"), dir.join("index"));
        c.upstream.upstream_sparse = upstream_url.parse().unwrap();
        c.sparse.index_ttl = Duration::from_secs(3600);
        // Past the TTL a client waits for the revalidation (what most tests look at);
        // stale-while-revalidate has its own tests.
        c.sparse.index_max_stale = Duration::ZERO;
        c.upstream.upstream_connect_timeout = Duration::from_secs(2);
        c.upstream.upstream_idle_timeout = Duration::from_secs(2);
        // Fault tests inject many failures in a row; the breaker has its own tests.
        c.upstream.upstream_failure_threshold = 1000;
        c.upstream.upstream_backoff = Duration::from_millis(100);
        c.public.host = "127.0.0.1".into();
        // The git index syncs from GitHub by default; tests that want it point it at a
        // fixture repository (tests/git_index.rs).
        c.git.git_index = false;
        c
    }

    pub async fn start(upstream: &FakeUpstream, dir: &Path) -> Proxy {
        Self::start_with(Self::config(&upstream.url, dir)).await
    }

    /// Binds port 0, writes the real port into the public URL, serves.
    pub async fn start_with(config: Config) -> Proxy {
        Self::start_with_clock(config, Arc::new(cratere::clock::SystemClock)).await
    }

    /// [`Proxy::start_with`] with the clock usage records and cleanups read.
    pub async fn start_with_clock(
        mut config: Config,
        clock: Arc<dyn cratere::clock::Clock>,
    ) -> Proxy {
        init_test_log();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        config.public.port = addr.port();
        let dir = config.storage.cache.parent().unwrap().to_path_buf();
        let state = cratere::http::AppState::with_clock(config, clock).unwrap();
        let token = CancellationToken::new();
        let (s, t) = (state.clone(), token.clone());
        let task = tokio::spawn(async move {
            cratere::server::run(listener, s, t).await.unwrap();
        });
        // Startup is settled once the background adoption of the cache has written its
        // marker (at once on an empty cache), so tests that compare the cache see only their
        // requests' doing.
        wait_until(
            || state.core.usage.is_tracked(),
            "the adoption of the cache",
        )
        .await;
        Proxy {
            url: format!("http://{addr}"),
            addr,
            dir,
            state,
            token,
            task,
        }
    }

    /// Graceful shutdown, as on SIGTERM: the server and its jobs stop (the usage flusher
    /// writes what it has), then this returns.
    pub async fn stop(mut self) {
        self.token.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        task.await.unwrap();
    }

    pub fn crate_path(&self, rel: &str) -> PathBuf {
        self.dir.join("crates").join(rel)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// A metric's value from /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Logs go to the test output only with TEST_LOG set.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "debug".into()),
            )
            .with_test_writer()
            .try_init();
    }
}

/// Fetches a whole body; `Err` when the response was cut off or aborted.
pub async fn body_of(resp: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    resp.bytes().await
}

/// A running `cratere` binary whose stderr is collected in the background.
pub struct Running {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn spawn_server(envs: &[(&str, String)]) -> Running {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cratere"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CRATERE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CRATERE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.unwrap();
            if let Some(rest) = line.split("listen").nth(1) {
                let addr: String = rest
                    .trim_start_matches(['=', '"', ':'])
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                let _ = tx.send(addr);
            }
            l.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("server announced its address");
    Running { child, addr, log }
}

impl Running {
    /// kill -9.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    /// A failing test must not leave a server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
