//! A real S3-compatible server for tests: `s3s-fs` (installed by `scripts/test.sh` with
//! `cargo install s3s-fs --features binary`), started on a free port over a temp directory;
//! and a request-level round-robin HTTP balancer in front of several proxies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::net::TcpListener;

use cratere::config::{Config, S3Credentials, S3Endpoint, StorageKind};

pub const ACCESS_KEY: &str = "cratere-test";
pub const SECRET_KEY: &str = "cratere-test-secret";
pub const REGION: &str = "us-east-1";

/// The `s3s-fs` binary: `$S3S_FS`, else on PATH, else in `~/.cargo/bin`.
fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file());
    if let Some(p) = on_path {
        return p;
    }
    let home =
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/s3s-fs");
    assert!(
        home.is_file(),
        "s3s-fs not found: run ./scripts/test.sh (it installs it), or \
         `cargo install s3s-fs@0.14.1 --locked --features binary`"
    );
    home
}

/// A running s3s-fs with one bucket. Killed when dropped.
pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    pub async fn start() -> S3Server {
        Self::start_with_bucket("crates").await
    }

    pub async fn start_with_bucket(bucket: &str) -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let bucket = bucket.to_string();
        // s3s-fs keeps a bucket as a directory of its root.
        std::fs::create_dir_all(dir.path().join(&bucket)).unwrap();
        for _ in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let mut child = Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting s3s-fs");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            for _ in 0..400 {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port to someone else: try another
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return S3Server {
                        endpoint: format!("http://{addr}"),
                        bucket,
                        dir,
                        child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start");
    }

    /// The variables that put a `cratere` process on this bucket.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        bucket_envs(&self.bucket, &self.endpoint)
    }

    /// Puts an in-process configuration on this bucket.
    pub fn configure(&self, c: &mut Config) {
        configure_bucket(c, &self.bucket, &self.endpoint);
    }

    /// A client of the bucket, to look at it from the outside.
    pub fn client(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(&self.bucket)
                .with_endpoint(&self.endpoint)
                .with_region(REGION)
                .with_allow_http(true)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .with_virtual_hosted_style_request(false)
                .build()
                .unwrap(),
        )
    }

    /// Every key in the bucket, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .client()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// The crate objects (no usage records, no lease).
    pub async fn crate_keys(&self) -> Vec<String> {
        self.keys()
            .await
            .into_iter()
            .filter(|k| !k.split('/').any(|s| s.starts_with('.')))
            .collect()
    }

    pub async fn get(&self, key: &str) -> Option<bytes::Bytes> {
        match self.client().get(&Path::parse(key).unwrap()).await {
            Ok(r) => Some(r.bytes().await.unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Sends each request to the next backend in turn (a load balancer in front of replicas).
pub struct RoundRobin {
    pub url: String,
    pub addr: SocketAddr,
    /// Requests sent to each backend.
    pub counts: Arc<Vec<AtomicUsize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Rr {
    backends: Vec<String>,
    next: AtomicUsize,
    counts: Arc<Vec<AtomicUsize>>,
    client: reqwest::Client,
}

impl RoundRobin {
    /// Serves on `listener` (bound first, so that the replicas can be told its port).
    pub fn start(listener: TcpListener, backends: Vec<String>) -> RoundRobin {
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(
            (0..backends.len())
                .map(|_| AtomicUsize::new(0))
                .collect::<Vec<_>>(),
        );
        let rr = Arc::new(Rr {
            backends,
            next: AtomicUsize::new(0),
            counts: counts.clone(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        });
        let app = axum::Router::new().fallback(forward).with_state(rr);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        RoundRobin {
            url: format!("http://{addr}"),
            addr,
            counts,
            task,
        }
    }

    pub fn count(&self, i: usize) -> usize {
        self.counts[i].load(Ordering::SeqCst)
    }
}

async fn forward(State(rr): State<Arc<Rr>>, req: Request) -> Response {
    let i = rr.next.fetch_add(1, Ordering::SeqCst) % rr.backends.len();
    rr.counts[i].fetch_add(1, Ordering::SeqCst);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut out = rr.client.request(
        req.method().clone(),
        format!("http://{}{path}", rr.backends[i]),
    );
    for (k, v) in req.headers() {
        if !matches!(
            k.as_str(),
            "host" | "connection" | "upgrade" | "http2-settings" | "content-length"
        ) {
            out = out.header(k, v);
        }
    }
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let resp = match out.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Response::builder()
                .status(502)
                .body(Body::from(e.to_string()))
                .unwrap();
        }
    };
    let mut b = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if !matches!(k.as_str(), "connection" | "transfer-encoding") {
            b = b.header(k, v);
        }
    }
    b.body(Body::from_stream(
        resp.bytes_stream()
            .map(|r| r.map_err(std::io::Error::other)),
    ))
    .unwrap()
}

/// A bucket that ignores conditional writes, as Garage 2.5.0 was measured to (issue 21): a
/// second `PUT` with `If-None-Match: *`, or one with a stale `If-Match`, answers `200` and
/// overwrites the object. In memory, path-style, no signature checks; enough of S3 for
/// Cratere's probe, lease and cleanup: PUT, GET, HEAD, DELETE and ListObjectsV2. Counts the
/// PUTs of each key.
pub struct IgnoringS3 {
    pub endpoint: String,
    pub bucket: String,
    state: Arc<IgnoringState>,
}

#[derive(Default)]
struct IgnoringState {
    objects: std::sync::Mutex<std::collections::BTreeMap<String, (bytes::Bytes, u64)>>,
    puts: std::sync::Mutex<Vec<String>>,
    seq: std::sync::atomic::AtomicU64,
}

impl IgnoringS3 {
    pub async fn start() -> IgnoringS3 {
        let state = Arc::new(IgnoringState::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(ignoring_handler)
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        IgnoringS3 {
            endpoint: format!("http://{addr}"),
            bucket: "crates".into(),
            state,
        }
    }

    /// Puts an in-process configuration on this bucket.
    pub fn configure(&self, c: &mut Config) {
        configure_bucket(c, &self.bucket, &self.endpoint);
    }

    /// The environment of a `cratere` process on this bucket.
    pub fn envs(&self) -> Vec<(&'static str, String)> {
        bucket_envs(&self.bucket, &self.endpoint)
    }

    /// Every key PUT so far, in order.
    pub fn puts(&self) -> Vec<String> {
        self.state.puts.lock().unwrap().clone()
    }

    /// The keys stored now.
    pub fn keys(&self) -> Vec<String> {
        self.state.objects.lock().unwrap().keys().cloned().collect()
    }
}

async fn ignoring_handler(State(st): State<Arc<IgnoringState>>, req: Request) -> Response {
    use axum::http::{Method, StatusCode, header};
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = percent_decode(uri.path().trim_start_matches('/'));
    let (_bucket, key) = path.split_once('/').unwrap_or((path.as_str(), ""));
    let key = key.to_string();
    let not_found = || {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/xml")
            .body(Body::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>",
            ))
            .unwrap()
    };
    let etag = |n: u64| format!("\"etag-{n}\"");
    match method {
        Method::PUT => {
            let body = axum::body::to_bytes(req.into_body(), 64 << 20)
                .await
                .unwrap();
            let n = st.seq.fetch_add(1, Ordering::SeqCst) + 1;
            st.objects.lock().unwrap().insert(key.clone(), (body, n));
            st.puts.lock().unwrap().push(key);
            Response::builder()
                .header(header::ETAG, etag(n))
                .body(Body::empty())
                .unwrap()
        }
        Method::POST if uri.query() == Some("delete") => {
            // DeleteObjects: the keys of <Object><Key>…</Key></Object>.
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body);
            let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><DeleteResult>");
            for part in body.split("<Key>").skip(1) {
                let key = part.split("</Key>").next().unwrap_or_default();
                st.objects.lock().unwrap().remove(key);
                xml.push_str(&format!("<Deleted><Key>{key}</Key></Deleted>"));
            }
            xml.push_str("</DeleteResult>");
            Response::builder()
                .header(header::CONTENT_TYPE, "application/xml")
                .body(Body::from(xml))
                .unwrap()
        }
        Method::DELETE => {
            st.objects.lock().unwrap().remove(&key);
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .unwrap()
        }
        Method::GET | Method::HEAD if !key.is_empty() => {
            let Some((body, n)) = st.objects.lock().unwrap().get(&key).cloned() else {
                return not_found();
            };
            let r = Response::builder()
                .header(header::ETAG, etag(n))
                .header(header::LAST_MODIFIED, "Thu, 03 Dec 2026 00:00:00 GMT")
                .header(header::CONTENT_LENGTH, body.len());
            if method == Method::HEAD {
                r.body(Body::empty()).unwrap()
            } else {
                r.body(Body::from(body)).unwrap()
            }
        }
        Method::GET => {
            // ListObjectsV2, one page.
            let query = uri.query().unwrap_or("");
            let prefix = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .map(percent_decode)
                .unwrap_or_default();
            let mut xml = String::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><IsTruncated>false</IsTruncated>",
            );
            for (k, (body, n)) in st.objects.lock().unwrap().iter() {
                if k.starts_with(&prefix) {
                    xml.push_str(&format!(
                        "<Contents><Key>{k}</Key><LastModified>2026-12-03T00:00:00.000Z</LastModified><ETag>{}</ETag><Size>{}</Size></Contents>",
                        etag(*n).replace('"', "&quot;"),
                        body.len()
                    ));
                }
            }
            xml.push_str("</ListBucketResult>");
            Response::builder()
                .header(header::CONTENT_TYPE, "application/xml")
                .body(Body::from(xml))
                .unwrap()
        }
        _ => Response::builder()
            .status(StatusCode::NOT_IMPLEMENTED)
            .body(Body::empty())
            .unwrap(),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The environment of a `cratere` process on `bucket` at `endpoint` (the test credentials).
fn bucket_envs(bucket: &str, endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CRATERE_STORAGE", "s3".into()),
        ("CRATERE_S3_BUCKET", bucket.into()),
        ("CRATERE_S3_ENDPOINT", endpoint.into()),
        ("CRATERE_S3_REGION", REGION.into()),
        ("CRATERE_S3_PATH_STYLE", "true".into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
    ]
}

/// Puts an in-process configuration on `bucket` at `endpoint`.
fn configure_bucket(c: &mut Config, bucket: &str, endpoint: &str) {
    c.storage.kind = StorageKind::S3;
    c.storage.s3_bucket = Some(bucket.into());
    c.storage.s3_endpoint = S3Endpoint(Some(endpoint.into()));
    c.storage.s3_region = REGION.into();
    c.storage.s3_path_style = true;
    c.storage.s3_credentials = Some(S3Credentials {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
    });
}
