//! Black-box tests of the sparse index routes: the real server on port 0 against a local fake
//! upstream.

mod common;

use std::time::Duration;

use common::{FakeUpstream, Fault, Proxy, Target, client};
use reqwest::StatusCode;
use reqwest::header::{ETAG, HOST, IF_NONE_MATCH};

#[tokio::test]
async fn config_json_names_the_host_the_client_used_and_never_a_spoofed_one() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.public.alternate_hosts = cratere::config::AlternateHosts(vec![
        cratere::config::HostPort::parse("mirror.lan:9000").unwrap(),
    ]);
    let proxy = Proxy::start_with(cfg).await;
    let get = |host: Option<&'static str>| {
        let mut req = client().get(format!("{}/index/config.json", proxy.url));
        if let Some(h) = host {
            req = req.header(HOST, h);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            serde_json::from_slice::<serde_json::Value>(&resp.bytes().await.unwrap()).unwrap()
        }
    };
    let primary = format!("http://127.0.0.1:{}", proxy.addr.port());
    let v = get(None).await;
    assert_eq!(v["dl"], format!("{primary}/api/v1/crates"));
    assert_eq!(v["api"], primary);
    let v = get(Some("mirror.lan:9000")).await;
    assert_eq!(v["dl"], "http://mirror.lan:9000/api/v1/crates");
    assert_eq!(v["api"], "http://mirror.lan:9000");
    for spoofed in ["evil.example", "evil.example:9000", "mirror.lan:9001"] {
        let v = get(Some(spoofed)).await;
        assert_eq!(v["dl"], format!("{primary}/api/v1/crates"), "{spoofed}");
    }
    assert_eq!(up.total_hits(), 0, "config.json is the proxy's own");
}

#[tokio::test]
async fn index_miss_then_hit_relays_bytes_exactly_with_one_upstream_request() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    up.publish("serde", "1.0.1", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;

    let r = proxy.get("/index/se/rd/serde").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(r.headers()["content-type"], "text/plain");
    let etag = r.headers()[ETAG].to_str().unwrap().to_string();
    let body = r.text().await.unwrap();
    assert_eq!(
        body,
        up.index_file("serde"),
        "byte-for-byte, unknown fields kept"
    );
    assert!(body.contains(r#""future_field": {"x": [1, 2]}"#));
    assert_eq!(etag, format!("\"{}\"", common::sha256_hex(body.as_bytes())));

    let r = proxy.get("/index/se/rd/serde").await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(up.index_hits("serde"), 1);
    assert_eq!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"index\",outcome=\"hit\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"index\",outcome=\"miss\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn strong_etag_and_if_none_match_give_304() {
    let up = FakeUpstream::start().await;
    up.publish("syn", "2.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get("/index/3/s/syn").await;
    let etag = r.headers()[ETAG].clone();
    assert!(!etag.to_str().unwrap().starts_with("W/"));
    let r = client()
        .get(format!("{}/index/3/s/syn", proxy.url))
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()[ETAG], etag);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = client()
        .get(format!("{}/index/3/s/syn", proxy.url))
        .header(IF_NONE_MATCH, "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn missing_crates_are_404_and_bad_paths_never_reach_upstream() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get("/index/no/ne/nonexistent").await;
    assert_eq!(r.status(), 404);
    assert_eq!(up.index_hits("nonexistent"), 1);
    for bad in [
        "/index/se/rd/Serde",
        "/index/SE/RD/serde",
        "/index/xx/yy/serde",
        "/index/se/rd/../../../../etc/passwd",
        "/index/se/rd/%2e%2e%2fserde",
        "/index/se%2Frd%2Fserde",
        "/index/se/rd/serde%00",
        "/index/se/rd/ser%252fde",
        "/index/..%2F..%2Fcrates%2Fx",
        "/index/",
        "/index/3/s/syn/",
    ] {
        let r = proxy.get(bad).await;
        assert!(
            r.status() == 404 || r.status() == 400,
            "{bad}: {}",
            r.status()
        );
    }
    let long = format!("/index/aa/aa/{}", "a".repeat(100));
    assert_eq!(proxy.get(&long).await.status(), 404);
    // `se%2Frd%2Fserde` decodes to the valid path `se/rd/serde`; nothing else went upstream.
    let seen: Vec<String> = up.state_paths();
    assert!(
        seen.iter()
            .all(|p| p == "/no/ne/nonexistent" || p == "/se/rd/serde"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn stale_copies_are_revalidated_with_upstream_validators() {
    let up = FakeUpstream::start().await;
    up.set_etags(true);
    up.publish("tokio", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO; // every request revalidates
    let proxy = Proxy::start_with(cfg).await;

    let first = proxy.get("/index/to/ki/tokio").await;
    assert_eq!(first.headers()["x-cratere-cache"], "miss");
    let first = first.text().await.unwrap();
    let r = proxy.get("/index/to/ki/tokio").await;
    assert_eq!(r.headers()["x-cratere-cache"], "revalidated");
    assert_eq!(r.text().await.unwrap(), first);
    let conds = up.conditionals();
    assert_eq!(conds.len(), 1, "{conds:?}");
    assert_eq!(conds[0].0, "/to/ki/tokio");
    assert!(conds[0].1.starts_with("\"up-"));

    // A new version upstream: the next revalidation serves the new bytes.
    up.publish("tokio", "1.0.1", 10);
    let r = proxy.get("/index/to/ki/tokio").await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(r.text().await.unwrap(), up.index_file("tokio"));
    assert_eq!(up.index_hits("tokio"), 3);
}

#[tokio::test]
async fn upstream_without_validators_is_refetched_and_unchanged_bytes_count_as_revalidated() {
    let up = FakeUpstream::start().await;
    up.publish("rand", "0.8.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg).await;
    proxy.get("/index/ra/nd/rand").await;
    let r = proxy.get("/index/ra/nd/rand").await;
    assert_eq!(r.headers()["x-cratere-cache"], "revalidated");
    assert!(up.conditionals().is_empty());
    assert_eq!(up.index_hits("rand"), 2);
}

#[tokio::test]
async fn upstream_failures_serve_the_stale_copy_marked_as_such() {
    let up = FakeUpstream::start().await;
    up.publish("log", "0.4.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    let good = proxy.get("/index/3/l/log").await.text().await.unwrap();

    for fault in [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Status(429),
        Fault::Hang,
        Fault::HangMidBody,
        Fault::TruncateChunked,
        Fault::Truncate,
    ] {
        up.set_fault(Target::Index, fault.clone());
        let r = proxy.get("/index/3/l/log").await;
        assert_eq!(r.status(), 200, "{fault:?}");
        assert_eq!(r.headers()["x-cratere-cache"], "stale", "{fault:?}");
        assert!(r.headers().contains_key("warning"));
        assert_eq!(r.text().await.unwrap(), good, "{fault:?}");
    }
    up.clear_faults();
    let r = proxy.get("/index/3/l/log").await;
    assert_eq!(r.headers()["x-cratere-cache"], "revalidated");
    assert_eq!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"index\",outcome=\"stale\"}")
            .await,
        7.0
    );
}

#[tokio::test]
async fn unreachable_upstream_serves_stale_after_a_restart() {
    let up = FakeUpstream::start().await;
    up.publish("libc", "0.2.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let good = proxy.get("/index/li/bc/libc").await.text().await.unwrap();
    drop(proxy);

    let mut cfg = Proxy::config("http://127.0.0.1:9/", dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg).await;
    let r = proxy.get("/index/li/bc/libc").await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale");
    assert_eq!(r.text().await.unwrap(), good);
    let r = proxy.get("/index/mi/ss/missing").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("upstream"));
}

#[tokio::test]
async fn without_a_copy_upstream_errors_are_502_and_timeouts_504() {
    let up = FakeUpstream::start().await;
    up.publish("bytes", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    up.set_fault(Target::Index, Fault::Status(500));
    let r = proxy.get("/index/by/te/bytes").await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(r.text().await.unwrap().contains("HTTP 500"));
    up.set_fault(Target::Index, Fault::Hang);
    let r = proxy.get("/index/by/te/bytes").await;
    assert_eq!(r.status(), 504);
    up.clear_faults();
    let r = proxy.get("/index/by/te/bytes").await;
    assert_eq!(r.status(), 200, "nothing bad was cached");
}

#[tokio::test]
async fn deleted_crates_become_404_but_upstream_cannot_wipe_the_cache() {
    let up = FakeUpstream::start().await;
    up.publish("gone", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    let proxy = Proxy::start_with(cfg.clone()).await;
    let good = proxy.get("/index/go/ne/gone").await.text().await.unwrap();
    let file = dir.path().join("index/sparse/go/ne/gone");
    assert!(file.exists());
    up.remove_crate("gone");
    assert_eq!(proxy.get("/index/go/ne/gone").await.status(), 404);
    let r = proxy.get("/api/v1/crates/gone/1.0.0/download").await;
    assert_eq!(r.status(), 404, "nor its downloads");
    // The copy stays on disk (a cleanup removes it once unused), and 404 survives a restart.
    let kept = std::fs::read_to_string(&file).unwrap();
    assert!(kept.ends_with(&good), "{kept}");
    drop(proxy);
    let proxy = Proxy::start_with(cfg).await;
    assert_eq!(proxy.get("/index/go/ne/gone").await.status(), 404);
    // An upstream that answered 404 by mistake (and has the crate again) brings it back.
    up.publish("gone", "1.0.0", 10);
    let r = proxy.get("/index/go/ne/gone").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), good);
}

#[tokio::test]
async fn a_cached_file_from_the_future_is_revalidated_not_fresh_forever() {
    let up = FakeUpstream::start().await;
    up.publish("tardis", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    assert_eq!(proxy.get("/index/ta/rd/tardis").await.status(), 200);
    drop(proxy);
    let file = dir.path().join("index/sparse/ta/rd/tardis");
    let future = std::time::SystemTime::now() + Duration::from_secs(86_400);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(future)
        .unwrap();
    // A TTL of an hour: a copy confirmed "tomorrow" must still not count as fresh.
    let proxy = Proxy::start(&up, dir.path()).await;
    up.publish("tardis", "1.1.0", 10);
    let r = proxy.get("/index/ta/rd/tardis").await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert!(r.text().await.unwrap().contains("1.1.0"));
    assert_eq!(up.index_hits("tardis"), 2);
}

#[tokio::test]
async fn a_torn_cached_index_file_is_never_served() {
    let up = FakeUpstream::start().await;
    up.publish("torn", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let good = proxy.get("/index/to/rn/torn").await.text().await.unwrap();
    drop(proxy);
    // Same length, one byte of the body changed (what a torn write or a bad disk leaves).
    let file = dir.path().join("index/sparse/to/rn/torn");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get("/index/to/rn/torn").await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(r.text().await.unwrap(), good);
    assert_eq!(up.index_hits("torn"), 2);
}

#[tokio::test]
async fn concurrent_requests_for_one_missing_file_make_one_upstream_request() {
    let up = FakeUpstream::start().await;
    up.publish("hyper", "1.0.0", 10);
    up.set_fault(Target::Index, Fault::GateAll);
    let dir = tempfile::tempdir().unwrap();
    let proxy = std::sync::Arc::new(Proxy::start(&up, dir.path()).await);
    const N: usize = 20;
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let p = proxy.clone();
            tokio::spawn(async move { p.get("/index/hy/pe/hyper").await.text().await.unwrap() })
        })
        .collect();
    // Hold upstream until every other request has joined the one in flight.
    up.wait_for_hits("/hy/pe/hyper", 1).await;
    let series = "cratere_coalesced_requests_total{kind=\"index\"}";
    for _ in 0..4000 {
        if proxy.metric(series).await >= (N - 1) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(proxy.metric(series).await, (N - 1) as f64);
    up.release();
    for t in tasks {
        assert_eq!(t.await.unwrap(), up.index_file("hyper"));
    }
    assert_eq!(up.index_hits("hyper"), 1);
}

#[tokio::test]
async fn a_down_upstream_is_not_waited_on_until_a_probe_succeeds() {
    let up = FakeUpstream::start().await;
    up.publish("aaa", "1.0.0", 10);
    up.publish("bbb", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(300);
    cfg.upstream.upstream_failure_threshold = 2;
    cfg.upstream.upstream_backoff = Duration::from_millis(200);
    let proxy = Proxy::start_with(cfg).await;
    proxy.get("/index/3/a/aaa").await.text().await.unwrap();
    proxy.get("/index/3/b/bbb").await.text().await.unwrap();

    up.set_fault(Target::Index, Fault::Hang);
    up.set_fault(Target::Config, Fault::Hang);
    for _ in 0..2 {
        let r = proxy.get("/index/3/a/aaa").await;
        assert_eq!(r.headers()["x-cratere-cache"], "stale");
    }
    assert_eq!(up.index_hits("aaa"), 3);
    // Marked down: stale copies are served without asking upstream at all.
    for _ in 0..5 {
        let r = proxy.get("/index/3/b/bbb").await;
        assert_eq!(r.headers()["x-cratere-cache"], "stale");
    }
    assert_eq!(up.index_hits("bbb"), 1, "not asked while down");
    let r = proxy.get("/index/no/tc/notcached").await;
    assert_eq!(r.status(), 503, "nothing cached, upstream down: at once");
    assert!(
        proxy
            .metric("cratere_upstream_errors_total{kind=\"index\",error=\"down\"}")
            .await
            >= 6.0
    );

    // Upstream recovers: the health probe (config.json) notices and traffic flows again.
    up.clear_faults();
    common::wait_until(|| up.hits("/config.json") >= 1, "a health probe").await;
    common::wait_until_async(
        || async {
            proxy.get("/index/3/b/bbb").await.headers()["x-cratere-cache"] == "revalidated"
        },
        "upstream to be used again",
    )
    .await;
}

#[tokio::test]
async fn hot_index_files_are_served_from_memory() {
    let up = FakeUpstream::start().await;
    up.publish("hot", "1.0.0", 10);
    up.publish("cold", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_memory_cache = 1 << 20;
    let proxy = Proxy::start_with(cfg).await;
    let body = proxy.get("/index/3/h/hot").await.text().await.unwrap();
    // The disk copy disappears (another process cleaned it, say): memory still answers.
    std::fs::remove_file(dir.path().join("index/sparse/3/h/hot")).unwrap();
    let r = proxy.get("/index/3/h/hot").await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(up.index_hits("hot"), 1);

    // Without the memory layer, every hit reads the disk.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir2.path());
    cfg.sparse.index_memory_cache = 0;
    let proxy = Proxy::start_with(cfg).await;
    proxy.get("/index/co/ld/cold").await.text().await.unwrap();
    std::fs::remove_file(dir2.path().join("index/sparse/co/ld/cold")).unwrap();
    let r = proxy.get("/index/co/ld/cold").await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
}

#[tokio::test]
async fn a_trickling_upstream_gets_the_stale_copy_within_one_idle_timeout() {
    let up = FakeUpstream::start().await;
    up.publish("drip", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_ttl = Duration::ZERO;
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(150);
    let proxy = Proxy::start_with(cfg).await;
    let good = proxy.get("/index/dr/ip/drip").await.text().await.unwrap();
    // One byte every 10 ms: never idle for 150 ms, but the whole file takes seconds.
    up.publish("drip", "1.1.0", 10);
    up.set_fault(
        Target::Index,
        Fault::Trickle {
            piece: 1,
            pause: Duration::from_millis(10),
        },
    );
    let started = std::time::Instant::now();
    let r = proxy.get("/index/dr/ip/drip").await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale");
    assert_eq!(r.text().await.unwrap(), good);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The revalidation went on in the background; once it lands, the new file is served.
    up.clear_faults();
    common::wait_until_async(
        || async {
            let r = proxy.get("/index/dr/ip/drip").await;
            r.text().await.unwrap().contains("1.1.0")
        },
        "the new file",
    )
    .await;
}
