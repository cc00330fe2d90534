//! Black-box tests of the crate download route: the real server on port 0 against a local
//! fake upstream that counts requests and injects faults.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeUpstream, Fault, Proxy, Target, body_of, sha256_hex, wait_until};

const DL: &str = "/api/v1/crates";

#[tokio::test]
async fn miss_streams_and_caches_then_hits_come_from_disk() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("serde", "1.0.200", 300_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;

    let r = proxy.get(&format!("{DL}/serde/1.0.200/download")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/gzip");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(body_of(r).await.unwrap(), bytes);

    let on_disk = proxy.crate_path("se/rd/serde/serde-1.0.200.crate");
    assert_eq!(std::fs::read(&on_disk).unwrap(), bytes);

    let r = proxy.get(&format!("{DL}/serde/1.0.200/download")).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.headers()["content-length"], "300000");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(body_of(r).await.unwrap(), bytes);
    assert_eq!(up.crate_hits("serde", "1.0.200"), 1);
    assert_eq!(
        up.hits("/config.json"),
        1,
        "dl came from upstream's config.json"
    );
    let temp_left = std::fs::read_dir(dir.path().join("crates/.tmp"))
        .unwrap()
        .count();
    assert_eq!(temp_left, 0);
}

/// On plain HTTP a hit is sent with sendfile from the page cache, with the right bytes; a crate
/// the proxy removes is fetched again, never sent from the mapping it kept of the old file.
#[tokio::test]
async fn plain_http_hits_use_sendfile_and_removed_crates_are_not_served_from_a_kept_mapping() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("zerocopy", "1.0.0", 300_000);
    let small = up.publish("tiny", "1.0.0", 300);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    for (name, body) in [("zerocopy", &bytes), ("tiny", &small)] {
        let r = proxy.get(&format!("{DL}/{name}/1.0.0/download")).await;
        assert_eq!(r.headers()["x-cratere-cache"], "miss");
        assert_eq!(&body_of(r).await.unwrap(), body);
        for _ in 0..2 {
            let before = cratere::sendfile::BYTES_SENT.get();
            let r = proxy.get(&format!("{DL}/{name}/1.0.0/download")).await;
            assert_eq!(r.headers()["x-cratere-cache"], "hit");
            assert_eq!(&body_of(r).await.unwrap(), body);
            // Other tests in this binary send too: at least this body went by sendfile.
            let sent = cratere::sendfile::BYTES_SENT.get() - before;
            assert!(
                sent >= body.len() as u64,
                "{name}: {sent} bytes by sendfile"
            );
        }
    }
    let text = proxy.state.core.metrics.encode();
    assert!(text.contains("cratere_sendfile_bytes_total"), "{text}");

    let key = "ze/ro/zerocopy/zerocopy-1.0.0.crate".parse().unwrap();
    assert!(proxy.state.core.crates.remove(&key).await.unwrap());
    let r = proxy.get(&format!("{DL}/zerocopy/1.0.0/download")).await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(body_of(r).await.unwrap(), bytes);
    assert_eq!(up.crate_hits("zerocopy", "1.0.0"), 2);
}

/// Hits never write the cached file's inode: usage flushes move mtimes past atimes, and with
/// `relatime` every read would then update the atime (a journal write on the async worker).
#[tokio::test]
async fn hits_leave_the_access_time_alone() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("noatime", "1.0.0", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/noatime/1.0.0/download")).await;
    assert_eq!(body_of(r).await.unwrap(), bytes);
    let path = proxy.crate_path("no/at/noatime/noatime-1.0.0.crate");
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_times(
            std::fs::FileTimes::new()
                .set_accessed(long_ago)
                .set_modified(std::time::SystemTime::now()),
        )
        .unwrap();
    // HTTP/1.1 (sendfile) and HTTP/2 (reads) hits.
    let r = proxy.get(&format!("{DL}/noatime/1.0.0/download")).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(body_of(r).await.unwrap(), bytes);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}{DL}/noatime/1.0.0/download", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let atime = std::fs::metadata(&path).unwrap().accessed().unwrap();
    assert_eq!(atime, long_ago);
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch_and_get_bytes_before_it_ends() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("tokio", "1.40.0", 1_000_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Arc::new(Proxy::start(&up, dir.path()).await);
    const N: usize = 10;
    let (tx, mut first_bytes) = tokio::sync::mpsc::channel(N);
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let (p, tx) = (proxy.clone(), tx.clone());
            tokio::spawn(async move {
                let mut r = p.get(&format!("{DL}/tokio/1.40.0/download")).await;
                assert_eq!(r.status(), 200);
                let mut got = Vec::new();
                let first = r.chunk().await.unwrap().unwrap();
                got.extend_from_slice(&first);
                tx.send(()).await.unwrap();
                while let Some(c) = r.chunk().await.unwrap() {
                    got.extend_from_slice(&c);
                }
                got
            })
        })
        .collect();
    // Upstream has sent only the first half and waits for the gate: every client receiving
    // bytes now proves they stream while the download is still running.
    for _ in 0..N {
        first_bytes.recv().await.unwrap();
    }
    assert_eq!(up.crate_hits("tokio", "1.40.0"), 1);
    up.release();
    for t in tasks {
        assert_eq!(t.await.unwrap(), bytes);
    }
    assert_eq!(
        up.crate_hits("tokio", "1.40.0"),
        1,
        "one upstream fetch for all"
    );
    assert_eq!(
        proxy
            .metric("cratere_coalesced_requests_total{kind=\"crate\"}")
            .await,
        (N - 1) as f64
    );
    assert_eq!(
        std::fs::read(proxy.crate_path("to/ki/tokio/tokio-1.40.0.crate")).unwrap(),
        bytes
    );
}

/// Faults that must never leave a file in the cache nor give a client a complete 200.
async fn assert_fault_is_not_cached(fault: Fault) {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("rand", "0.8.5", 200_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    up.set_fault(Target::Crate, fault.clone());
    let r = proxy.get(&format!("{DL}/rand/0.8.5/download")).await;
    if r.status() == 200 {
        let body = body_of(r).await;
        assert!(
            body.is_err(),
            "{fault:?}: a 200 must be cut off, got a whole body"
        );
    } else {
        assert!(
            r.status() == 502 || r.status() == 504,
            "{fault:?}: {}",
            r.status()
        );
    }
    assert!(
        !proxy.crate_path("ra/nd/rand/rand-0.8.5.crate").exists(),
        "{fault:?}"
    );

    // The next request tries upstream again and succeeds.
    up.clear_faults();
    let r = proxy.get(&format!("{DL}/rand/0.8.5/download")).await;
    assert_eq!(r.status(), 200, "{fault:?}");
    assert_eq!(body_of(r).await.unwrap(), bytes, "{fault:?}");
    assert_eq!(up.crate_hits("rand", "0.8.5"), 2, "{fault:?}");
    assert!(proxy.crate_path("ra/nd/rand/rand-0.8.5.crate").exists());
    let temp_left = std::fs::read_dir(dir.path().join("crates/.tmp"))
        .unwrap()
        .count();
    assert_eq!(temp_left, 0, "{fault:?}");
}

#[tokio::test]
async fn checksum_mismatch_is_never_cached_nor_served_whole() {
    assert_fault_is_not_cached(Fault::Corrupt).await;
}

#[tokio::test]
async fn truncated_body_with_length_is_never_cached() {
    assert_fault_is_not_cached(Fault::Truncate).await;
}

#[tokio::test]
async fn truncated_chunked_body_is_never_cached() {
    assert_fault_is_not_cached(Fault::TruncateChunked).await;
}

#[tokio::test]
async fn upstream_5xx_is_a_502_and_nothing_is_cached() {
    assert_fault_is_not_cached(Fault::Status(500)).await;
}

#[tokio::test]
async fn upstream_hanging_mid_body_is_cut_off_and_not_cached() {
    assert_fault_is_not_cached(Fault::HangMidBody).await;
}

#[tokio::test]
async fn upstream_hang_before_headers_is_a_504() {
    let up = FakeUpstream::start().await;
    up.publish("log", "0.4.22", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    up.set_fault(Target::Crate, Fault::Hang);
    let r = proxy.get(&format!("{DL}/log/0.4.22/download")).await;
    assert_eq!(r.status(), 504);
}

/// A slow index file and then a hanging crate fetch would each get the idle timeout; the
/// client still gets its answer within one (cargo gives up after 30 s), while the index is
/// still arriving and before the crate was even asked for.
#[tokio::test]
async fn a_miss_answers_within_one_idle_timeout_however_slow_upstream_is() {
    let up = FakeUpstream::start().await;
    up.publish("slowidx", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_idle_timeout = Duration::from_millis(500);
    let proxy = Proxy::start_with(cfg).await;
    // Each piece well within the idle timeout, the whole file several times over it.
    up.set_fault(
        Target::Index,
        Fault::Trickle {
            piece: 10,
            pause: Duration::from_millis(200),
        },
    );
    up.set_fault(Target::Crate, Fault::Hang);
    let r = proxy.get(&format!("{DL}/slowidx/1.0.0/download")).await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        up.crate_hits("slowidx", "1.0.0"),
        0,
        "answered before the crate fetch"
    );
    assert_eq!(up.index_hits("slowidx"), 1);
}

#[tokio::test]
async fn a_trickling_upstream_still_streams_through() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("slow", "1.0.0", 4_000);
    up.set_fault(
        Target::Crate,
        Fault::Trickle {
            piece: 500,
            pause: Duration::from_millis(20),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/slow/1.0.0/download")).await;
    assert_eq!(body_of(r).await.unwrap(), bytes);
}

#[tokio::test]
async fn unknown_crates_and_versions_are_404() {
    let up = FakeUpstream::start().await;
    up.publish("known", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/unknown/1.0.0/download")).await;
    assert_eq!(r.status(), 404);
    let r = proxy.get(&format!("{DL}/known/9.9.9/download")).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no version 9.9.9"));
    // The missing version made the proxy revalidate the cached index once.
    assert_eq!(up.index_hits("known"), 2);
    assert_eq!(
        up.total_hits() - up.index_hits("known") - up.index_hits("unknown"),
        0
    );
}

#[tokio::test]
async fn upstream_404_for_the_file_is_a_404() {
    let up = FakeUpstream::start().await;
    up.publish("lost", "1.0.0", 100);
    up.set_fault(Target::Crate, Fault::Status(404));
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/lost/1.0.0/download")).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_version_published_after_the_index_was_cached_is_found() {
    let up = FakeUpstream::start().await;
    up.publish("fresh", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await; // TTL of an hour
    assert_eq!(proxy.get("/index/fr/es/fresh").await.status(), 200);
    let bytes = up.publish("fresh", "1.1.0", 100);
    let r = proxy.get(&format!("{DL}/fresh/1.1.0/download")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_of(r).await.unwrap(), bytes);
}

#[tokio::test]
async fn names_are_case_insensitive_and_upstream_gets_the_canonical_name() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("Inflector", "0.11.4", 1000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/inflector/0.11.4/download")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_of(r).await.unwrap(), bytes);
    let r = proxy.get(&format!("{DL}/Inflector/0.11.4/download")).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(up.crate_hits("Inflector", "0.11.4"), 1);
    assert!(
        proxy
            .crate_path("in/fl/inflector/inflector-0.11.4.crate")
            .exists()
    );
}

#[tokio::test]
async fn build_metadata_versions_work() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("meta", "1.0.0+build.7", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    for path in ["1.0.0+build.7", "1.0.0%2Bbuild.7"] {
        let r = proxy.get(&format!("{DL}/meta/{path}/download")).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(body_of(r).await.unwrap(), bytes);
    }
    assert_eq!(up.crate_hits("meta", "1.0.0+build.7"), 1);
}

#[tokio::test]
async fn the_download_template_can_be_overridden() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("serde_json", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_dl = Some(format!("{}dl/{{crate}}/{{version}}/download", up.url));
    up.set_dl("http://127.0.0.1:9/never-used");
    let proxy = Proxy::start_with(cfg).await;
    let r = proxy.get(&format!("{DL}/serde_json/1.0.0/download")).await;
    assert_eq!(body_of(r).await.unwrap(), bytes);
    assert_eq!(up.hits("/config.json"), 0);
}

#[tokio::test]
async fn hostile_paths_get_4xx_and_touch_nothing() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    // What startup wrote (the usage marker) is not the requests' doing.
    let at_start = walk(dir.path());
    let long_name = "a".repeat(65);
    let long_version = format!("1.0.0-{}", "a".repeat(150));
    for bad in [
        "/api/v1/crates/..%2F..%2Fetc/1.0.0/download".to_string(),
        "/api/v1/crates/%2e%2e/1.0.0/download".to_string(),
        "/api/v1/crates/serde/..%2F..%2F..%2Fetc%2Fpasswd/download".to_string(),
        "/api/v1/crates/serde/1.0.0%2F..%2F..%2Fx/download".to_string(),
        "/api/v1/crates/ser%00de/1.0.0/download".to_string(),
        "/api/v1/crates/serde/1.0.0%00/download".to_string(),
        "/api/v1/crates/ser%252Fde/1.0.0/download".to_string(),
        "/api/v1/crates/serde/not-a-version/download".to_string(),
        format!("/api/v1/crates/{long_name}/1.0.0/download"),
        format!("/api/v1/crates/serde/{long_version}/download"),
        "/api/v1/crates/serde/1.0.0/download/extra".to_string(),
        "/api/v1/crates/serde/download".to_string(),
    ] {
        let r = proxy.get(&bad).await;
        assert!(
            r.status() == 400 || r.status() == 404,
            "{bad}: {}",
            r.status()
        );
    }
    assert_eq!(up.total_hits(), 0);
    let files = walk(dir.path());
    assert_eq!(files, at_start);
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[tokio::test]
async fn a_client_that_disconnects_does_not_stop_the_download() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("bigdep", "2.0.0", 500_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let mut r = proxy.get(&format!("{DL}/bigdep/2.0.0/download")).await;
    r.chunk().await.unwrap().unwrap();
    drop(r); // the only client goes away mid-download
    up.release();
    let path = proxy.crate_path("bi/gd/bigdep/bigdep-2.0.0.crate");
    wait_until(|| path.exists(), "the crate to be stored").await;
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(
        sha256_hex(&bytes),
        sha256_hex(&std::fs::read(&path).unwrap())
    );
}

#[tokio::test]
async fn unlisted_versions_do_not_drive_upstream_traffic() {
    let up = FakeUpstream::start().await;
    up.publish("serde", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/serde/9.9.9/download")).await;
    assert_eq!(r.status(), 404);
    // The first miss revalidates the index file once (the version may be new)...
    assert_eq!(up.index_hits("serde"), 2);
    // ...and clients asking again right away are answered without upstream.
    for _ in 0..5 {
        let r = proxy.get(&format!("{DL}/serde/9.9.9/download")).await;
        assert_eq!(r.status(), 404);
    }
    assert_eq!(up.index_hits("serde"), 2);
    let r = proxy.get(&format!("{DL}/serde/1.0.0/download")).await;
    assert_eq!(r.status(), 200);
}

/// A raw HTTP/1.0 request; the whole answer (the server closes the connection).
async fn http10(proxy: &Proxy, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn an_http10_client_never_gets_a_bad_body_that_looks_complete() {
    let up = FakeUpstream::start().await;
    up.publish("chunky", "1.0.0", 50_000);
    up.publish("fine", "1.0.0", 50_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    // Upstream sends a chunked body (no length) and cuts it off: HTTP/1.0 has no chunked
    // encoding, so a body streamed as it came would end with the connection and look whole.
    up.set_fault(Target::Crate, Fault::GateThenCut);
    let p = Arc::new(proxy);
    let q = p.clone();
    let answer =
        tokio::spawn(async move { http10(&q, &format!("{DL}/chunky/1.0.0/download")).await });
    up.wait_for_hits("/dl/chunky/1.0.0/download", 1).await;
    up.release();
    let answer = answer.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 502"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    let proxy = p;
    up.clear_faults();
    let answer = http10(&proxy, &format!("{DL}/fine/1.0.0/download")).await;
    assert!(
        answer.starts_with("HTTP/1.0 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-length: 50000")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_in_flight_are_bounded_and_hold_no_temp_file_before_upstream_answers() {
    let up = FakeUpstream::start().await;
    let a = up.publish("alpha", "1.0.0", 50_000);
    let b = up.publish("beta", "1.0.0", 50_000);
    let c = up.publish("gamma", "1.0.0", 50_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.max_downloads = 2;
    let proxy = Arc::new(Proxy::start_with(cfg).await);
    // Index files first, so that only the crate fetches wait.
    for name in ["alpha", "beta", "gamma"] {
        let path = format!("/index/{}", common::index_path(name));
        assert_eq!(proxy.get(&path).await.status(), 200);
    }
    up.set_fault(Target::Crate, Fault::GateAll);
    let get = |name: &'static str| {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.get(&format!("{DL}/{name}/1.0.0/download")).await })
    };
    let (first, second) = (get("alpha"), get("beta"));
    up.wait_for_hits("/dl/alpha/1.0.0/download", 1).await;
    up.wait_for_hits("/dl/beta/1.0.0/download", 1).await;
    // Both wait on upstream's headers: neither holds a temp file yet.
    let temps = std::fs::read_dir(dir.path().join("crates/.tmp"))
        .unwrap()
        .count();
    assert_eq!(temps, 0, "no temp file before upstream answers");
    // A third distinct crate is one too many; a second client of `alpha` joins its fetch.
    let r = proxy.get(&format!("{DL}/gamma/1.0.0/download")).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().await.unwrap().contains("CRATERE_MAX_DOWNLOADS"));
    let joined = get("alpha");
    up.release();
    for (req, bytes) in [(first, &a), (second, &b), (joined, &a)] {
        let r = req.await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(&body_of(r).await.unwrap(), bytes);
    }
    assert_eq!(up.crate_hits("alpha", "1.0.0"), 1);
    // Once they are done there is room again.
    up.clear_faults();
    let r = proxy.get(&format!("{DL}/gamma/1.0.0/download")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body_of(r).await.unwrap(), c);
}

#[tokio::test]
async fn a_version_missing_from_a_stale_index_is_an_upstream_error_not_a_404() {
    let up = FakeUpstream::start().await;
    up.publish("fresh", "1.0.0", 1_000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    let r = proxy.get(&format!("{DL}/fresh/1.0.0/download")).await;
    assert_eq!(r.status(), 200);
    // 1.0.1 is published while the index upstream fails: the cached file cannot be
    // revalidated, so nobody knows whether 1.0.1 exists. A 404 would be final for cargo.
    let newer = up.publish("fresh", "1.0.1", 1_000);
    up.set_fault(Target::Index, Fault::Status(503));
    let r = proxy.get(&format!("{DL}/fresh/1.0.1/download")).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    up.clear_faults();
    let r = proxy.get(&format!("{DL}/fresh/1.0.1/download")).await;
    assert_eq!(r.status(), 200, "not remembered as unlisted");
    assert_eq!(body_of(r).await.unwrap(), newer);
}

#[tokio::test]
async fn a_download_host_marked_down_comes_back_through_one_trial_download() {
    let up = FakeUpstream::start().await;
    let names = ["one", "two", "three", "four"];
    for n in names {
        up.publish(n, "1.0.0", 1_000);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Proxy::config(&up.url, dir.path());
    cfg.upstream.upstream_failure_threshold = 2;
    cfg.upstream.upstream_backoff = Duration::from_millis(100);
    let proxy = Proxy::start_with(cfg).await;
    up.set_fault(Target::Crate, Fault::Status(503));
    for n in &names[..2] {
        let r = proxy.get(&format!("{DL}/{n}/1.0.0/download")).await;
        assert!(r.status().is_server_error());
    }
    // Marked down: the next miss is refused without asking upstream.
    let r = proxy.get(&format!("{DL}/three/1.0.0/download")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(up.crate_hits("three", "1.0.0"), 0);
    // Upstream recovers: once the back-off has passed, one download goes through as the
    // trial, and its success closes the breaker for everyone.
    up.clear_faults();
    common::wait_until_async(
        || async {
            proxy
                .get(&format!("{DL}/three/1.0.0/download"))
                .await
                .status()
                == 200
        },
        "the trial download to succeed",
    )
    .await;
    let r = proxy.get(&format!("{DL}/four/1.0.0/download")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.crate_hits("four", "1.0.0"), 1);
}
