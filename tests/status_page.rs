//! The status page as a person sees it: rendered by headless Chromium (installed by
//! scripts/test.sh), checked for the cargo snippet with this proxy's URL and live figures,
//! and screenshotted.

mod common;

use std::path::Path;
use std::process::Command;

use common::{FakeUpstream, Proxy};

fn chromium(args: &[&str], profile: &Path) -> std::process::Output {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new("which")
                .arg(b)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is installed (scripts/test.sh installs it)");
    Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_page_in_headless_chromium() {
    let up = FakeUpstream::start().await;
    up.publish("demo", "1.0.0", 5000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, &dir.path().join("data")).await;
    for _ in 0..3 {
        let r = proxy.get("/api/v1/crates/demo/1.0.0/download").await;
        r.bytes().await.unwrap();
    }
    common::wait_until_async(
        || async { proxy.metric("cratere_cache_files").await == 1.0 },
        "cache scan",
    )
    .await;

    let url = format!("{}/", proxy.url);
    let profile = dir.path().join("profile");
    let (u, p) = (url.clone(), profile.clone());
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom", &u], &p))
        .await
        .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).to_string();
    let text = html_escape::decode_html_entities(&dom).to_string();
    let base = proxy.url.clone();
    assert!(
        text.contains(&format!("registry = \"sparse+{base}/index/\"")),
        "sparse snippet with this proxy's URL:\n{text}"
    );
    assert!(text.contains(&format!("registry = \"{base}/crates.io-index\"")));
    assert!(text.contains("replace-with = \"cratere\""));
    // 1 miss then 2 hits.
    assert!(text.contains("66.7% (2 of 3)"), "live hit ratio:\n{text}");
    assert!(
        text.contains("1 crate files, 4.9 KiB"),
        "cache size:\n{text}"
    );
    assert!(text.contains("<svg id=\"traffic\""), "traffic chart");
    assert!(
        !text.contains("http://") || !text.contains("src=\"http"),
        "no external assets"
    );
    assert!(!dom.contains("<script"), "no scripts needed");

    let shot = dir.path().join("status.png");
    let arg = format!("--screenshot={}", shot.display());
    let p = profile.clone();
    let out =
        tokio::task::spawn_blocking(move || chromium(&[&arg, "--window-size=1000,1400", &url], &p))
            .await
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 20_000,
        "a rendered page, not a blank one ({} bytes)",
        png.len()
    );
    if let Ok(keep) = std::env::var("CRATERE_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
