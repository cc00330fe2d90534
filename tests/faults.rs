//! Upstream faults beyond the basic ones of tests/sparse.rs and tests/downloads.rs: malformed
//! index files and config.json, redirects, connection resets, rate limiting; and hostile
//! clients: huge or many headers, clients that never finish their request.

mod common;

use std::time::Duration;

use common::{FakeUpstream, Fault, Proxy, Target, body_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_malformed_index_file_is_never_cached() {
    let up = FakeUpstream::start().await;
    up.publish("foo", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg).await;
    let good = proxy.get("/index/3/f/foo").await.text().await.unwrap();

    for bad in [
        "<html><body>502 Bad Gateway</body></html>",
        "",
        "{\"name\":\"bar\",\"vers\":\"1.0.0\"}\n",
    ] {
        up.set_index_file("foo", bad);
        let r = proxy.get("/index/3/f/foo").await;
        assert_eq!(r.headers()["x-cratere-cache"], "stale", "{bad:?}");
        assert_eq!(r.text().await.unwrap(), good);
    }
    up.set_index_file("zed", "<html>nope</html>");
    let r = proxy.get("/index/3/z/zed").await;
    assert_eq!(r.status(), 502);
    assert!(!dir.path().join("index/sparse/3/z/zed").exists());
}

#[tokio::test]
async fn unparsable_lines_are_relayed_and_other_versions_still_download() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("mixed", "1.0.0", 100);
    let mut file = up.index_file("mixed");
    file.push_str("{this is not json\n");
    up.set_index_file("mixed", &file);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    assert_eq!(
        proxy.get("/index/mi/xe/mixed").await.text().await.unwrap(),
        file
    );
    let r = proxy.get("/api/v1/crates/mixed/1.0.0/download").await;
    assert_eq!(body_of(r).await.unwrap(), bytes);
}

#[tokio::test]
async fn a_missing_or_malformed_upstream_config_json_fails_downloads_clearly() {
    let up = FakeUpstream::start().await;
    up.publish("dep", "1.0.0", 100);
    for (fault, dl) in [
        (Some(Fault::Status(404)), None),
        (Some(Fault::Status(500)), None),
        (None, Some("not a url")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let proxy = Proxy::start(&up, dir.path()).await;
        up.clear_faults();
        if let Some(f) = &fault {
            up.set_fault(Target::Config, f.clone());
        }
        if let Some(dl) = dl {
            up.set_dl(dl);
        }
        let r = proxy.get("/api/v1/crates/dep/1.0.0/download").await;
        assert_eq!(r.status(), 502, "{fault:?} {dl:?}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("config.json")
                || text.contains("download URL")
                || text.contains("HTTP 500"),
            "{text}"
        );
        assert_eq!(up.crate_hits("dep", "1.0.0"), 0);
    }
    up.clear_faults();
    up.set_dl(&format!("{}dl", up.url));
}

#[tokio::test]
async fn redirects_are_followed_for_index_files_and_crates() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("moved", "1.0.0", 1000);
    up.set_dl(&format!("{}r/dl", up.url));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with(Proxy::config(&format!("{}r/", up.url), dir.path())).await;
    let r = proxy.get("/index/mo/ve/moved").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), up.index_file("moved"));
    let r = proxy.get("/api/v1/crates/moved/1.0.0/download").await;
    assert_eq!(body_of(r).await.unwrap(), bytes);
    assert_eq!(up.hits("/r/dl/moved/1.0.0/download"), 1);
    assert_eq!(up.crate_hits("moved", "1.0.0"), 1);
}

#[tokio::test]
async fn connection_resets_give_stale_copies_or_502s() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("reset", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    proxy.get("/index/re/se/reset").await.text().await.unwrap();
    proxy
        .get("/api/v1/crates/reset/1.0.0/download")
        .await
        .bytes()
        .await
        .unwrap();
    drop(proxy);

    let resetting = common::resetting_server().await;
    let mut cfg = Proxy::config(&resetting, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg).await;
    let r = proxy.get("/index/re/se/reset").await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale");
    let r = proxy.get("/api/v1/crates/reset/1.0.0/download").await;
    assert_eq!(
        body_of(r).await.unwrap(),
        bytes,
        "cached crates need no upstream"
    );
    let r = proxy.get("/index/ot/he/other").await;
    assert_eq!(r.status(), 502);
}

#[tokio::test]
async fn upstream_rate_limiting_is_passed_on_with_retry_after() {
    let up = FakeUpstream::start().await;
    up.publish("limited", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg).await;
    proxy
        .get("/index/li/mi/limited")
        .await
        .text()
        .await
        .unwrap();
    up.set_fault(Target::Crate, Fault::Status(429));
    up.set_fault(Target::Index, Fault::Status(429));
    let r = proxy.get("/api/v1/crates/limited/1.0.0/download").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(
        !proxy
            .crate_path("li/mi/limited/limited-1.0.0.crate")
            .exists()
    );
    let r = proxy.get("/index/li/mi/limited").await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale");
}

#[tokio::test]
async fn huge_or_numerous_headers_are_refused() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let client = common::client();
    let r = client
        .get(format!("{}/health", proxy.url))
        .header("x-big", "a".repeat(64 * 1024))
        .send()
        .await;
    assert!(
        r.map_or(true, |r| r.status() == 431),
        "a 64 KiB header is refused"
    );
    let mut req = client.get(format!("{}/health", proxy.url));
    for i in 0..200 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = req.send().await;
    assert!(
        r.map_or(true, |r| r.status() == 431),
        "200 headers are refused"
    );
    assert_eq!(proxy.get("/health").await.status(), 200, "still serving");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_disconnected() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.server.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(cfg).await;
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // ...and nothing more. The server closes the connection (possibly after a 408).
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server hung up on the slow client");
    let text = String::from_utf8_lossy(&buf);
    assert!(!text.contains("200 OK"), "{text}");
    assert_eq!(proxy.get("/health").await.status(), 200);
}

/// Reads until the server closes the connection; `true` if it did within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = Vec::new();
    matches!(
        tokio::time::timeout(within, stream.read_to_end(&mut buf)).await,
        Ok(Ok(_)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connections_that_never_send_a_request_are_closed() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.server.header_read_timeout = Duration::from_millis(300);
    let proxy = Proxy::start_with(cfg).await;
    // Nothing at all: the protocol sniffing must not wait forever.
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // Half an HTTP/2 preface.
    let mut half = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A complete preface and settings, then no request.
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    for (what, s) in [
        ("silent", &mut silent),
        ("half preface", &mut half),
        ("h2", &mut h2),
    ] {
        assert!(closed_within(s, Duration::from_secs(10)).await, "{what}");
    }
    assert_eq!(proxy.get("/health").await.status(), 200);
}

#[tokio::test]
async fn idle_connections_are_closed_http1_and_http2_alike() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.server.idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h1.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut h1, Duration::from_secs(10)).await);
    // HTTP/2 (prior knowledge): reqwest keeps the connection and answers pings; it is still
    // closed once idle. The metric request itself is one more, short-lived, connection.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/health", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    // Proxy::metric asks on a fresh connection, closed once answered.
    let open = || proxy.metric("cratere_connections_open ");
    assert!(open().await >= 2.0, "the HTTP/2 connection is open");
    common::wait_until_async(
        || async { open().await <= 1.0 },
        "the idle HTTP/2 connection to close",
    )
    .await;
    // A download that streams for longer than the idle timeout is not cut.
    up.publish("slow", "1.0.0", 64 * 1024);
    up.set_fault(
        Target::Crate,
        Fault::Trickle {
            piece: 8 * 1024,
            pause: Duration::from_millis(150),
        },
    );
    let r = h2
        .get(format!("{}/api/v1/crates/slow/1.0.0/download", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 64 * 1024);
}

/// Sends `GET /health` on a keep-alive connection and reads the answer's head.
async fn health_on(stream: &mut tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn beyond_the_connection_limit_new_connections_wait_for_a_free_slot() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.server.max_connections = Some(2);
    let proxy = Proxy::start_with(cfg).await;
    let mut a = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    assert!(health_on(&mut a).await.starts_with("HTTP/1.1 200"));
    assert!(health_on(&mut b).await.starts_with("HTTP/1.1 200"));
    // A third client connects (the kernel's backlog takes it) but is not served...
    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let waited = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await;
    assert!(waited.is_err(), "served beyond the limit: {waited:?}");
    // ...until one of the two closes; the open ones keep working meanwhile.
    assert!(health_on(&mut b).await.starts_with("HTTP/1.1 200"));
    drop(a);
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let metrics = proxy.state.core.metrics.encode();
    assert!(metrics.contains("cratere_connections_max 2"), "{metrics}");
}
