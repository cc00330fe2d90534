//! Crash safety: `kill -9` in the middle of a download leaves nothing partial that is ever
//! served; the leftover temp file is removed at the next start; the crate is fetched again
//! whole.

mod common;

use common::{FakeUpstream, Fault, Target};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_download_leaves_nothing_partial() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("crashy", "1.0.0", 400_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        (
            "CRATERE_CACHE",
            dir.path().join("crates").display().to_string(),
        ),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
    ];
    let mut server = common::spawn_server(&envs);
    let mut resp = reqwest::get(format!(
        "http://{}/api/v1/crates/crashy/1.0.0/download",
        server.addr
    ))
    .await
    .unwrap();
    let mut got = resp.chunk().await.unwrap().unwrap().len(); // half the crate is on its way
    let tmp = dir.path().join("crates/.tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        1,
        "the download's temp file"
    );
    server.kill_hard();
    let final_path = dir.path().join("crates/cr/as/crashy/crashy-1.0.0.crate");
    assert!(!final_path.exists(), "nothing partial in the cache");
    let failed = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(
        failed && got < bytes.len(),
        "the client saw the download fail ({failed}, {got})"
    );

    up.release();
    let server = common::spawn_server(&envs);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the dead process's temp file is removed at startup"
    );
    let r = reqwest::get(format!(
        "http://{}/api/v1/crates/crashy/1.0.0/download",
        server.addr
    ))
    .await
    .unwrap();
    assert_eq!(r.bytes().await.unwrap(), bytes);
    assert_eq!(std::fs::read(&final_path).unwrap(), bytes);
    let mut server = server;
    server.kill_hard();
}
