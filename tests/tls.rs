//! HTTPS with rustls: ALPN negotiates HTTP/2 (or HTTP/1.1), and the real cargo fetches through
//! the proxy over HTTP/2 with the proxy's certificate as its CA.

mod common;

use common::cargo::{cargo, package_crates, publish_packaged, write, write_app_project};
use common::{FakeUpstream, Proxy};
use rustls::pki_types::pem::PemObject;

struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    pem: String,
}

fn self_signed(dir: &std::path::Path) -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = ck.cert.pem();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Tls { cert, key, pem }
}

async fn tls_proxy(up: &FakeUpstream, dir: &std::path::Path) -> (Proxy, Tls, String) {
    let tls = self_signed(dir);
    let mut cfg = Proxy::config(&up.url, &dir.join("data"));
    cfg.public.scheme = cratere::config::Scheme::Https;
    cfg.public.host = "localhost".into();
    cfg.server.tls_cert = Some(tls.cert.clone());
    cfg.server.tls_key = Some(tls.key.clone());
    let proxy = Proxy::start_with(cfg).await;
    let base = format!("https://localhost:{}", proxy.addr.port());
    (proxy, tls, base)
}

#[tokio::test]
async fn https_negotiates_http2_and_http1() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, tls, base) = tls_proxy(&up, dir.path()).await;
    let ca = reqwest::Certificate::from_pem(tls.pem.as_bytes()).unwrap();
    let resolve = ("localhost", proxy.addr);
    let h2 = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .resolve(resolve.0, resolve.1)
        .build()
        .unwrap();
    let r = h2
        .get(format!("{base}/index/config.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["dl"], format!("{base}/api/v1/crates"));
    let h1 = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve(resolve.0, resolve.1)
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port is refused.
    let plain = common::client()
        .get(format!("http://{}/health", proxy.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

/// cargo fetches the test app through `proxy` at `registry` (extra `config.toml` lines in
/// `extra`) and speaks only HTTP/2 to it; the proxy fetched the three crates once.
async fn cargo_fetches_over_http2_only(
    work: &std::path::Path,
    up: &FakeUpstream,
    proxy: &Proxy,
    registry: &str,
    extra: &str,
) {
    let crates = package_crates(&work.join("src-crates"));
    publish_packaged(up, &crates);
    let project = work.join("app");
    write_app_project(&project);
    let home = work.join("home");
    write(
        &home.join("config.toml"),
        &format!(
            "[source.crates-io]\nreplace-with = \"cratere\"\n[source.cratere]\n\
             registry = \"sparse+{registry}/index/\"\n[net]\nretry = 0\n{extra}"
        ),
    );
    let out = tokio::task::spawn_blocking(move || cargo(&project, &home, &["fetch"]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = &proxy.state.core.metrics;
    use cratere::metrics::{Kind, Outcome};
    assert_eq!(m.cache_count(Kind::Crate, Outcome::Miss), 3);
    let text = m.encode();
    assert!(
        text.contains("cratere_http_requests_by_version_total{version=\"HTTP/2.0\"}"),
        "cargo spoke HTTP/2:\n{text}"
    );
    assert!(
        !text.contains("version=\"HTTP/1.1\""),
        "and only HTTP/2:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_fetches_over_https_and_http2() {
    let work = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let (proxy, tls, base) = tls_proxy(&up, work.path()).await;
    let cainfo = format!("[http]\ncainfo = \"{}\"\n", tls.cert.display());
    cargo_fetches_over_http2_only(work.path(), &up, &proxy, &base, &cainfo).await;
}

#[tokio::test]
async fn plain_http_serves_http2_with_prior_knowledge() {
    let up = FakeUpstream::start().await;
    let body = up.publish("h2c", "1.0.0", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/api/v1/crates/h2c/1.0.0/download", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap(), body);
    // A hit, over HTTP/2: read into buffers (no sendfile; see `cratere::sendfile::Plain`).
    let r = client
        .get(format!("{}/api/v1/crates/h2c/1.0.0/download", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.bytes().await.unwrap(), body);
}

/// `Upgrade: h2c` (what curl, and so cargo, sends on plain http): the proxy answers 101, serves
/// the upgraded request on stream 1 and later requests multiplexed on the same connection.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_upgrades_to_h2c_for_curl() {
    let up = FakeUpstream::start().await;
    let body = up.publish("h2c", "1.0.0", 70_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let (url, out) = (proxy.url.clone(), out_dir.clone());
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-v", "--http2", "-H", "X-Trace: one"])
            .arg(format!("{url}/index/config.json"))
            .arg("-o")
            .arg(out.join("config.json"))
            .arg(format!("{url}/api/v1/crates/h2c/1.0.0/download"))
            .arg("-o")
            .arg(out.join("h2c.crate"))
            .arg(format!("{url}/api/v1/crates/h2c/1.0.0/download"))
            .arg("-o")
            .arg(out.join("h2c-again.crate"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&curl.stderr);
    assert!(curl.status.success(), "{log}");
    assert!(log.contains("< HTTP/1.1 101"), "{log}");
    assert_eq!(log.matches("< HTTP/2 200").count(), 3, "{log}");
    assert!(log.contains("Re-using existing connection"), "{log}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dl"], format!("{}/api/v1/crates", proxy.url));
    assert_eq!(std::fs::read(out_dir.join("h2c.crate")).unwrap(), body);
    // The second download is a hit.
    assert_eq!(
        std::fs::read(out_dir.join("h2c-again.crate")).unwrap(),
        body
    );
    let text = proxy.state.core.metrics.encode();
    assert!(
        text.contains("cratere_http_requests_by_version_total{version=\"HTTP/2.0\"} 3"),
        "{text}"
    );
}

/// An upgrade request with a body stays on HTTP/1.1, and a client that answers the 101 with
/// garbage instead of the HTTP/2 preface only loses its own connection.
#[tokio::test]
async fn h2c_upgrade_edge_cases() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
                   HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!("POST /health HTTP/1.1\r\nHost: x\r\n{upgrade}Content-Length: 2\r\n\r\nhi")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(
        head.starts_with("HTTP/1.1 ") && !head.starts_with("HTTP/1.1 101"),
        "{head}"
    );

    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n").as_bytes())
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nmore bytes to fill a preface")
        .await
        .unwrap();
    // The proxy closes the connection instead of serving the request.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));

    // The server is fine.
    let r = common::client()
        .get(format!("{}/health", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// On plain http cargo asks for HTTP/2 with `Upgrade: h2c` and, upgraded, multiplexes.
#[tokio::test(flavor = "multi_thread")]
async fn cargo_fetches_over_plain_http_with_h2c() {
    let work = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let proxy = Proxy::start(&up, &work.path().join("data")).await;
    cargo_fetches_over_http2_only(work.path(), &up, &proxy, &proxy.url, "").await;
}

#[tokio::test]
async fn a_client_that_stops_after_the_tls_handshake_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let tls = self_signed(dir.path());
    let mut cfg = Proxy::config(&up.url, &dir.path().join("data"));
    cfg.server.tls_cert = Some(tls.cert.clone());
    cfg.server.tls_key = Some(tls.key.clone());
    cfg.server.header_read_timeout = std::time::Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;

    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(tls.pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.expect("handshake");
    // Handshake done, and then nothing: the server must not hold the connection.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the server hung up");
}
