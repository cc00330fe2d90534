//! Freshness of the sparse index without making clients wait: stale-while-revalidate within
//! `CRATERE_INDEX_MAX_STALE`, with the real server, a fake upstream that can hold its answers,
//! the test clock, and the real cargo.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::cargo::{assert_ok, cargo, cargo_home, packaged_app};
use common::{FakeUpstream, Fault, Proxy, Target, index_path};
use cratere::clock::FakeClock;

const TTL: Duration = Duration::from_secs(120);
const MAX_STALE: Duration = Duration::from_secs(600);

async fn proxy_with_clock(up: &FakeUpstream, dir: &std::path::Path) -> (Proxy, Arc<FakeClock>) {
    let mut cfg = Proxy::config(&up.url, dir);
    cfg.sparse.index_ttl = TTL;
    cfg.sparse.index_max_stale = MAX_STALE;
    let clock = Arc::new(FakeClock::new());
    (Proxy::start_with_clock(cfg, clock.clone()).await, clock)
}

/// The series `cratere_index_background_{what}_total` of `reason`.
fn background(what: &str, reason: &str) -> String {
    format!("cratere_index_background_{what}_total{{reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_past_its_ttl_is_answered_at_once_and_revalidated_in_the_background() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let (proxy, clock) = proxy_with_clock(&up, dir.path()).await;
    let path = format!("/index/{}", index_path("serde"));
    let upstream_path = format!("/{}", index_path("serde"));
    assert_eq!(proxy.get(&path).await.headers()["x-cratere-cache"], "miss");

    // Past the TTL, with upstream holding every answer: the client gets the copy at once.
    clock.advance(TTL + Duration::from_secs(1));
    up.publish("serde", "1.0.1", 100);
    up.set_fault(Target::Index, Fault::GateAll);
    let r = proxy.get(&path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cratere-cache"], "stale-while-revalidate");
    assert!(!r.text().await.unwrap().contains("1.0.1"));
    up.wait_for_hits(&upstream_path, 2).await;
    // Clients meanwhile still get the copy, and join the one revalidation.
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale-while-revalidate");
    up.release();
    common::wait_until_async(
        || async {
            proxy
                .metric(&background("refreshes_changed", "stale_while_revalidate"))
                .await
                == 1.0
        },
        "the background revalidation to land",
    )
    .await;
    assert_eq!(
        up.hits(&upstream_path),
        2,
        "one revalidation for two clients"
    );
    assert_eq!(
        proxy
            .metric(&background("refreshes", "stale_while_revalidate"))
            .await,
        1.0
    );
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert!(
        r.text().await.unwrap().contains("1.0.1"),
        "the new version is visible"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_max_stale_bound_and_for_unlisted_versions_the_client_waits_for_upstream() {
    let up = FakeUpstream::start().await;
    up.publish("rand", "0.8.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let (proxy, clock) = proxy_with_clock(&up, dir.path()).await;
    let path = format!("/index/{}", index_path("rand"));
    proxy.get(&path).await.bytes().await.unwrap();

    // Within the bound, a download of a version the copy does not list revalidates at once.
    clock.advance(TTL + Duration::from_secs(1));
    let fresh = up.publish("rand", "0.8.1", 300);
    let r = proxy.get("/api/v1/crates/rand/0.8.1/download").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), fresh);

    // Past TTL + MAX_STALE the client waits for the revalidation, and sees its result.
    clock.advance(TTL + MAX_STALE + Duration::from_secs(1));
    up.publish("rand", "0.8.2", 100);
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert!(r.text().await.unwrap().contains("0.8.2"));
    // Past the bound with upstream failing: the stale copy, as before.
    clock.advance(TTL + MAX_STALE + Duration::from_secs(1));
    up.set_fault(Target::Index, Fault::Status(503));
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cratere-cache"], "stale");
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_resolves_from_a_stale_cache_while_upstream_holds_every_answer() {
    let work = tempfile::tempdir().unwrap();
    let (_crates, up, project) = packaged_app(work.path()).await;
    let (proxy, clock) = proxy_with_clock(&up, &work.path().join("data")).await;
    let lockfile = |home: &str| {
        let (p, h) = (
            project.clone(),
            cargo_home(&work.path().join(home), &proxy.url),
        );
        tokio::task::spawn_blocking(move || cargo(&p, &h, &["generate-lockfile"]))
    };
    let out = lockfile("home1").await.unwrap();
    assert_ok(&out, "cargo");

    // Every file is past its TTL and upstream answers nothing until released: cargo (a
    // fresh CARGO_HOME) still resolves, from the copies, without waiting.
    clock.advance(TTL + Duration::from_secs(1));
    up.set_fault(Target::Index, Fault::GateAll);
    let out = lockfile("home2").await.unwrap();
    assert_ok(&out, "cargo");
    assert_eq!(
        proxy
            .metric(
                "cratere_cache_requests_total{kind=\"index\",outcome=\"stale_while_revalidate\"}"
            )
            .await,
        3.0,
        "alpha, beta and Mixed_Case"
    );
    up.release();
}

/// An index `deps` array: (name, kind).
fn deps(list: &[(&str, &str)]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|(name, kind)| {
            format!(
                r#"{{"name": "{name}", "req": "^1", "features": [], "optional": false, "default_features": true, "target": null, "kind": "{kind}"}}"#
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// `top` → `mid` (normal) → `leaf`; `top` → `tool` (build); `top` → `testonly` (dev).
fn publish_tree(up: &FakeUpstream) {
    let b = bytes::Bytes::from_static(b"x");
    up.publish_bytes("leaf", "1.0.0", b.clone(), "[]");
    up.publish_bytes("mid", "1.0.0", b.clone(), &deps(&[("leaf", "normal")]));
    up.publish_bytes("tool", "1.0.0", b.clone(), "[]");
    up.publish_bytes("testonly", "1.0.0", b.clone(), "[]");
    let top = deps(&[("mid", "normal"), ("tool", "build"), ("testonly", "dev")]);
    up.publish_bytes("top", "1.0.0", b, &top);
}

fn index_hits(up: &FakeUpstream, name: &str) -> usize {
    up.hits(&format!("/{}", index_path(name)))
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_fills_the_next_levels_for_cargo_with_one_upstream_request_per_file() {
    let work = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    publish_tree(&up);
    let (proxy, _clock) = proxy_with_clock(&up, &work.path().join("data")).await;
    // The first wave: top alone. Its dependencies are fetched before cargo asks.
    let r = proxy.get(&format!("/index/{}", index_path("top"))).await;
    assert_eq!(r.status(), 200);
    let prefetched = "cratere_index_prefetched_total";
    common::wait_until_async(
        || async { proxy.metric(prefetched).await == 3.0 },
        "mid, tool and then leaf to be prefetched",
    )
    .await;
    for name in ["top", "mid", "tool", "leaf"] {
        assert_eq!(index_hits(&up, name), 1, "{name}");
    }
    assert_eq!(
        index_hits(&up, "testonly"),
        0,
        "dev dependencies are not prefetched"
    );

    // Real cargo resolving a project on top finds every file cached.
    let project = work.path().join("app");
    common::cargo::write(
        &project.join("Cargo.toml"),
        "[package]\nname = \"app\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
         [dependencies]\ntop = \"1\"\n",
    );
    common::cargo::write(&project.join("src/main.rs"), "fn main() {}\n");
    let home = cargo_home(&work.path().join("home"), &proxy.url);
    let out = tokio::task::spawn_blocking(move || cargo(&project, &home, &["generate-lockfile"]))
        .await
        .unwrap();
    assert_ok(&out, "cargo");
    for name in ["top", "mid", "tool", "leaf"] {
        assert_eq!(
            index_hits(&up, name),
            1,
            "{name}: no second upstream request"
        );
    }
    assert_eq!(index_hits(&up, "testonly"), 0);
    assert_eq!(proxy.metric("cratere_index_prefetch_used_total").await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_off_fetches_only_what_clients_ask_for() {
    let up = FakeUpstream::start().await;
    publish_tree(&up);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.sparse.index_prefetch = false;
    let proxy = Proxy::start_with(cfg).await;
    let r = proxy.get(&format!("/index/{}", index_path("top"))).await;
    assert_eq!(r.status(), 200);
    let r = proxy.get(&format!("/index/{}", index_path("mid"))).await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss", "not fetched ahead");
    assert_eq!(proxy.metric("cratere_index_prefetched_total").await, 0.0);
    for (name, n) in [
        ("top", 1),
        ("mid", 1),
        ("tool", 0),
        ("leaf", 0),
        ("testonly", 0),
    ] {
        assert_eq!(index_hits(&up, name), n, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_used_recently_are_revalidated_before_they_expire() {
    let up = FakeUpstream::start().await;
    up.publish("hot", "1.0.0", 10);
    let dir = tempfile::tempdir().unwrap();
    let (proxy, clock) = proxy_with_clock(&up, dir.path()).await;
    let index = proxy.state.core.index.clone();
    let path = format!("/index/{}", index_path("hot"));
    proxy.get(&path).await.bytes().await.unwrap();

    // Before 3/4 of the TTL nothing is due.
    clock.advance(TTL / 2);
    assert_eq!(index.refresh_ahead_once().await, 0);
    // After it, the file is revalidated in the background, before any client finds it stale.
    clock.advance(TTL / 4 + Duration::from_secs(1));
    up.publish("hot", "1.0.1", 10);
    assert_eq!(index.refresh_ahead_once().await, 1);
    common::wait_until_async(
        || async {
            proxy
                .metric(&background("refreshes_changed", "ahead"))
                .await
                == 1.0
        },
        "the refresh ahead to land",
    )
    .await;
    assert_eq!(index_hits(&up, "hot"), 2);
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert!(r.text().await.unwrap().contains("1.0.1"));

    // A file nobody asked for in two TTLs is left to expire.
    clock.advance(TTL * 2 + Duration::from_secs(1));
    assert_eq!(index.refresh_ahead_once().await, 0);
    assert_eq!(index_hits(&up, "hot"), 2);
}
