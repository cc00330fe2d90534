//! End to end with the real `cargo`: crates built by `cargo package`, served by the fake
//! upstream, fetched and built through the proxy with a fresh `CARGO_HOME`; then served again
//! with upstream unreachable.

mod common;

use std::process::Command;

use common::Proxy;
use common::cargo::{cargo, cargo_home, packaged_app};

#[tokio::test(flavor = "multi_thread")]
async fn cargo_fetches_and_builds_through_the_proxy_and_again_with_upstream_down() {
    let work = tempfile::tempdir().unwrap();
    let (crates, up, project) = packaged_app(work.path()).await;

    let data = work.path().join("proxy-data");
    std::fs::create_dir_all(&data).unwrap();
    let proxy = Proxy::start(&up, &data).await;
    let home = cargo_home(&work.path().join("home1"), &proxy.url);
    let out = tokio::task::spawn_blocking({
        let (p, h) = (project.clone(), home.clone());
        move || cargo(&p, &h, &["build"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(project.join("target/debug/app"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "5");
    let lock = std::fs::read_to_string(project.join("Cargo.lock")).unwrap();
    for (name, version, bytes) in &crates {
        assert!(
            lock.contains(&format!("name = \"{name}\"\nversion = \"{version}\"")),
            "{lock}"
        );
        assert!(
            lock.contains(&common::sha256_hex(bytes)),
            "{name}: checksum in Cargo.lock"
        );
        assert_eq!(up.crate_hits(name, version), 1, "{name}");
    }
    drop(proxy);

    // Same directories, upstream unreachable, a cargo with an empty CARGO_HOME.
    let mut cfg = Proxy::config("http://127.0.0.1:9/", &data);
    cfg.sparse.index_ttl = std::time::Duration::ZERO; // force revalidation: upstream is down
    let proxy = Proxy::start_with(cfg).await;
    let home = cargo_home(&work.path().join("home2"), &proxy.url);
    std::fs::remove_dir_all(project.join("target")).unwrap();
    let out = tokio::task::spawn_blocking({
        let (p, h) = (project.clone(), home.clone());
        move || cargo(&p, &h, &["build", "--locked"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"crate\",outcome=\"hit\"}")
            .await,
        3.0
    );
    assert!(
        proxy
            .metric("cratere_cache_requests_total{kind=\"index\",outcome=\"stale\"}")
            .await
            >= 3.0
    );
}
