//! `cargo search` through the proxy: relayed to a local fake crates.io API (counted,
//! failing on demand), rate-limited, cached, and answered locally when upstream is down.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{FakeUpstream, Fault, Proxy, Target};

fn cargo_search(proxy_url: &str, home: &Path, query: &str) -> (bool, String, String) {
    std::fs::create_dir_all(home).unwrap();
    std::fs::write(
        home.join("config.toml"),
        format!(
            "[registries.mirror]\nindex = \"sparse+{proxy_url}/index/\"\n\n\
             [source.crates-io]\nreplace-with = \"mirror\"\n\n[net]\nretry = 0\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["search", "--registry", "mirror", query])
        .current_dir(home)
        .env("CARGO_HOME", home)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn start(up: &FakeUpstream, dir: &Path) -> Proxy {
    let mut cfg = Proxy::config(&up.url, dir);
    cfg.search.upstream_api = up.url.parse().unwrap();
    cfg.search.search_interval = Duration::from_millis(300);
    Proxy::start_with(cfg).await
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_search_online_then_offline() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.100", 100);
    up.publish("serde", "1.0.200", 100);
    up.publish("serde_json", "1.0.0", 100);
    up.publish("tokio", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&up, &dir.path().join("data")).await;

    let url = proxy.url.clone();
    let home = dir.path().join("home");
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || cargo_search(&url, &home, "serde"))
            .await
            .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("serde = \"9.9.9\""), "{stdout}");
    assert!(stdout.contains("Upstream says serde is great"), "{stdout}");
    assert!(!stdout.contains("tokio"));
    assert_eq!(up.api_times().len(), 1);

    // Cache a couple of crates, then lose the upstream.
    for p in [
        "/api/v1/crates/serde/1.0.200/download",
        "/api/v1/crates/serde_json/1.0.0/download",
        "/index/to/ki/tokio",
    ] {
        proxy.get(p).await.bytes().await.unwrap();
    }
    up.set_fault(Target::Api, Fault::Status(503));
    let url = proxy.url.clone();
    let home = dir.path().join("home2");
    // A query not asked before (an identical one would come from the proxy's answer cache).
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || cargo_search(&url, &home, "erde"))
            .await
            .unwrap();
    assert!(ok, "{stderr}");
    assert!(stdout.contains("serde = \"1.0.200\""), "{stdout}");
    assert!(stdout.contains("serde_json = \"1.0.0\""), "{stdout}");
    assert!(!stdout.contains("tokio"), "{stdout}");

    // The same query answered locally carries the marker header.
    let r = proxy.get("/api/v1/crates?q=TOKIO&per_page=5").await;
    assert_eq!(r.headers()["x-cratere-search"], "local");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["meta"]["total"], 1);
    assert_eq!(v["crates"][0]["name"], "tokio");
    assert_eq!(v["crates"][0]["max_version"], "1.0.0");
}

#[tokio::test]
async fn upstream_json_is_relayed_as_is_and_identical_queries_are_cached() {
    let up = FakeUpstream::start().await;
    up.publish("anyhow", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&up, dir.path()).await;
    let r = proxy.get("/api/v1/crates?q=any&per_page=3").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["x-cratere-search"], "upstream");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("\"future_field\":true"),
        "unknown fields kept: {body}"
    );
    assert!(body.contains("\"next_page\":null"));
    let r = proxy.get("/api/v1/crates?q=any&per_page=3").await;
    assert_eq!(r.headers()["x-cratere-search"], "cache");
    assert_eq!(r.text().await.unwrap(), body);
    assert_eq!(up.api_times().len(), 1);
    // A different page size is a different query.
    proxy.get("/api/v1/crates?q=any&per_page=4").await;
    assert_eq!(up.api_times().len(), 2);
}

#[tokio::test]
async fn a_burst_of_queries_reaches_upstream_at_the_configured_rate() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = std::sync::Arc::new(start(&up, dir.path()).await);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let p = proxy.clone();
            tokio::spawn(async move { p.get(&format!("/api/v1/crates?q=burst{i}")).await.status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let mut times = up.api_times();
    times.sort();
    assert_eq!(times.len(), 6);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(290),
            "upstream requests {gap:?} apart"
        );
    }
}

#[tokio::test]
async fn errors_use_cargos_json_format() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&up, dir.path()).await;
    let client = common::client();
    for (method, path, status) in [
        ("GET", "/api/v1/crates", 400),
        ("GET", "/api/v1/crates?q=", 400),
        ("GET", "/api/v1/crates?per_page=abc&q=x", 400),
        ("GET", "/api/v1/crates/serde", 404),
        ("GET", "/api/v1/me", 404),
        ("PUT", "/api/v1/crates/new", 404),
        ("DELETE", "/api/v1/crates/serde/1.0.0/yank", 404),
        ("POST", "/api/v1/crates", 404),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("{}{path}", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(
            v["errors"][0]["detail"].as_str().unwrap().len() > 5,
            "{method} {path}"
        );
    }
    assert!(up.api_times().is_empty());
}

#[tokio::test]
async fn a_failing_search_api_does_not_take_downloads_or_the_index_down() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.search.upstream_api = up.url.parse().unwrap();
    cfg.search.search_interval = Duration::from_millis(1);
    cfg.upstream.upstream_failure_threshold = 2;
    let proxy = Proxy::start_with(cfg).await;
    // An API outage (or an air-gapped API) while the index and the downloads are fine.
    up.set_fault(Target::Api, Fault::Status(503));
    for q in ["a", "b", "c", "d"] {
        let r = proxy.get(&format!("/api/v1/crates?q={q}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cratere-search"], "local");
    }
    let r = proxy.get("/api/v1/crates/serde/1.0.0/download").await;
    assert_eq!(r.status(), 200, "the download breaker is not the API's");
    assert_eq!(proxy.metric("cratere_upstream_up").await, 1.0);
    // Page numbers from the client cannot overflow the local answer's arithmetic.
    let r = proxy
        .get("/api/v1/crates?q=serde&page=4294967295&per_page=100")
        .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["crates"].as_array().unwrap().len(), 0);
    assert_eq!(v["meta"]["total"], 1);
}

#[tokio::test]
async fn clients_waiting_on_one_failing_query_share_one_local_answer() {
    let up = FakeUpstream::start().await;
    up.publish("tokio", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let proxy = std::sync::Arc::new(start(&up, dir.path()).await);
    proxy.get("/index/to/ki/tokio").await.bytes().await.unwrap();
    up.set_fault(Target::Api, Fault::Status(503));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let p = proxy.clone();
            tokio::spawn(async move {
                let r = p.get("/api/v1/crates?q=tok").await;
                (
                    r.headers()["x-cratere-search"].clone(),
                    r.text().await.unwrap(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (source, body) = t.await.unwrap();
        assert_eq!(source, "local");
        assert!(body.contains("tokio"), "{body}");
    }
    // One upstream attempt for the eight clients, and the local answer is reused.
    assert_eq!(up.api_times().len(), 1);
    let r = proxy.get("/api/v1/crates?q=tok").await;
    assert_eq!(r.headers()["x-cratere-search"], "local");
    assert_eq!(up.api_times().len(), 1);
}
