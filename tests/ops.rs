//! Operations: /metrics after real traffic, /health and /ready.

mod common;

use common::{FakeUpstream, Fault, Proxy, Target};

#[tokio::test]
async fn metrics_count_what_happened() {
    let up = FakeUpstream::start().await;
    up.publish("alpha", "1.0.0", 1000);
    up.publish("beta", "1.0.0", 2000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;

    // 2 index misses, 3 index hits; 2 crate misses, 4 crate hits; 1 upstream failure.
    for p in ["/index/al/ph/alpha", "/index/be/ta/beta"] {
        assert_eq!(proxy.get(p).await.status(), 200);
    }
    for _ in 0..3 {
        proxy.get("/index/al/ph/alpha").await.bytes().await.unwrap();
    }
    for c in ["alpha", "beta"] {
        let r = proxy
            .get(&format!("/api/v1/crates/{c}/1.0.0/download"))
            .await;
        r.bytes().await.unwrap();
    }
    for _ in 0..4 {
        let r = proxy.get("/api/v1/crates/beta/1.0.0/download").await;
        r.bytes().await.unwrap();
    }
    up.set_fault(Target::Index, Fault::Status(503));
    assert_eq!(proxy.get("/index/ga/mm/gamma").await.status(), 502);
    assert_eq!(proxy.get("/nowhere").await.status(), 404);

    let m = |s: &'static str| proxy.metric(s);
    assert_eq!(
        m("cratere_cache_requests_total{kind=\"index\",outcome=\"miss\"}").await,
        2.0
    );
    assert_eq!(
        m("cratere_cache_requests_total{kind=\"index\",outcome=\"hit\"}").await,
        3.0
    );
    assert_eq!(
        m("cratere_cache_requests_total{kind=\"crate\",outcome=\"miss\"}").await,
        2.0
    );
    assert_eq!(
        m("cratere_cache_requests_total{kind=\"crate\",outcome=\"hit\"}").await,
        4.0
    );
    assert_eq!(
        m("cratere_http_requests_total{route=\"/api/v1/crates/{crate}/{version}/download\",status=\"200\"}").await,
        6.0
    );
    assert_eq!(
        m("cratere_http_requests_total{route=\"/index/{*path}\",status=\"200\"}").await,
        5.0
    );
    assert_eq!(
        m("cratere_http_requests_total{route=\"/index/{*path}\",status=\"502\"}").await,
        1.0
    );
    assert_eq!(
        m("cratere_http_requests_total{route=\"unmatched\",status=\"404\"}").await,
        1.0
    );
    assert_eq!(
        m("cratere_upstream_errors_total{kind=\"index\",error=\"status_5xx\"}").await,
        1.0
    );
    assert_eq!(
        m("cratere_bytes_total{source=\"cache\"}").await,
        4.0 * 2000.0 + 3.0 * up.index_file("alpha").len() as f64
    );
    assert!(m("cratere_bytes_total{source=\"upstream\"}").await >= 3000.0);
    assert_eq!(m("cratere_downloads_in_flight").await, 0.0);
    assert!(m("cratere_upstream_response_seconds_count{kind=\"crate\"}").await >= 2.0);
    common::wait_until_async(
        || async { proxy.metric("cratere_cache_files").await == 2.0 },
        "cache size",
    )
    .await;
    assert_eq!(m("cratere_cache_size_bytes").await, 3000.0);
    let text = proxy.get("/metrics").await.text().await.unwrap();
    assert!(
        !text.contains("alpha") && !text.contains("beta"),
        "no crate names in labels"
    );
}

#[tokio::test]
async fn health_and_readiness_with_answers_reused_briefly() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(cratere::clock::FakeClock::new());
    let proxy = Proxy::start_with_clock(Proxy::config(&up.url, dir.path()), clock.clone()).await;
    assert_eq!(proxy.get("/health").await.status(), 200);
    // Probes in a burst, concurrent and one after another, share one check of the stores.
    let burst = (0..20).map(|_| proxy.get("/ready"));
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.status(), 200);
    }
    assert_eq!(proxy.get("/ready").await.status(), 200);
    assert_eq!(proxy.metric("cratere_ready_checks_total").await, 1.0);
    // Break the crate store: its temp directory becomes a file, so nothing can be written.
    let tmp = dir.path().join("crates/.tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "not a directory").unwrap();
    assert_eq!(
        proxy.get("/ready").await.status(),
        200,
        "the answer is reused"
    );
    clock.advance(cratere::core::READY_TTL);
    let r = proxy.get("/ready").await;
    assert_eq!(r.status(), 503, "checked again once the answer is old");
    assert!(r.text().await.unwrap().contains("CRATERE_CACHE"));
    assert_eq!(proxy.metric("cratere_ready_checks_total").await, 2.0);
    assert_eq!(proxy.get("/health").await.status(), 200, "still alive");
}

#[tokio::test]
async fn cleanup_results_reach_the_metrics_and_the_status_page() {
    let up = FakeUpstream::start().await;
    up.publish("old", "1.0.0", 1000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.cleanup.max_cache_size = Some(1); // everything goes
    let proxy = Proxy::start_with(cfg).await;
    proxy
        .get("/api/v1/crates/old/1.0.0/download")
        .await
        .bytes()
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    proxy
        .state
        .core
        .cleanup
        .run_once(false, &stop)
        .await
        .unwrap();
    assert_eq!(
        proxy
            .metric("cratere_cleanup_last_removed_files{kind=\"crate\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("cratere_cleanup_last_removed_bytes{kind=\"crate\"}")
            .await,
        1000.0
    );
    assert!(
        proxy
            .metric("cratere_cleanup_last_run_timestamp_seconds")
            .await
            > 1.7e9
    );
    assert_eq!(proxy.metric("cratere_upstream_up").await, 1.0);
    let page = proxy.get("/").await.text().await.unwrap();
    assert!(page.contains("removed 1 crate files (1000 B)"), "{page}");
}
