//! Crate storage in S3, against a real S3-compatible server (s3s-fs, see
//! `tests/common/s3.rs`): the storage conformance tests run on disk and in the bucket; two
//! replicas share one bucket (real binaries behind a round-robin balancer, real cargo); a
//! replica killed mid-download; cleanup and its fleet-wide lease; the commands.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::cargo::{cargo, cargo_home, package_crates, publish_packaged, write_app_project};
use common::s3::{IgnoringS3, RoundRobin, S3Server};
use common::{FakeUpstream, Fault, Proxy, Target, index_path, sha256_hex};
use cratere::cleanup::{FileKind, Outcome};
use cratere::clock::{FakeClock, days};
use cratere::config::Config;
use cratere::names::CrateKey;
use cratere::storage::s3::{Conditional, LEASE_TTL, LOCK_KEY};
use cratere::storage::{CleanupLease, CrateStore, FsStore};
use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;

const DL: &str = "/api/v1/crates";
const BIN: &str = env!("CARGO_BIN_EXE_cratere");

fn crate_rel(name: &str, version: &str) -> String {
    format!(
        "{}/{}-{version}.crate",
        index_path(name),
        name.to_ascii_lowercase()
    )
}

fn crate_key(name: &str, version: &str) -> CrateKey {
    CrateKey::new(&name.parse().unwrap(), &version.parse().unwrap())
}

async fn read_all(store: &CrateStore, key: &CrateKey) -> Option<Vec<u8>> {
    let stored = store.open_read(key).await.unwrap()?;
    let len = stored.len;
    let mut out = Vec::new();
    let mut s = stored.into_stream();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    assert_eq!(out.len() as u64, len);
    Some(out)
}

fn temp_with(store: &CrateStore, bytes: &[u8]) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut tmp = store.temp_file().unwrap();
    tmp.write_all(bytes).unwrap();
    tmp
}

/// A time the stores keep exactly (whole milliseconds), a day ahead of every real write.
fn tomorrow() -> SystemTime {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    UNIX_EPOCH + Duration::from_millis(ms) + days(1.0)
}

/// The same expectations of every crate store: store, stream back, size, list, last use,
/// remove; nothing visible before it is stored.
async fn conformance(store: CrateStore) {
    let a = crate_key("serde", "1.0.200");
    let b = crate_key("Big_One", "2.0.0+build.5");
    let a_bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    // Over the S3 part size: a multipart upload.
    let b_bytes: Vec<u8> = (0..(cratere::storage::s3::PART_SIZE as u32 + 1_000_003))
        .map(|i| (i % 241) as u8)
        .collect();

    assert!(store.open_read(&a).await.unwrap().is_none());
    assert_eq!(store.len(&a).await.unwrap(), None);
    assert_eq!(store.last_use(&a).await.unwrap(), None);
    assert!(store.list().await.unwrap().is_empty());

    // A temp file is invisible until stored, and gone when dropped.
    let tmp = temp_with(&store, &a_bytes);
    assert_eq!(store.len(&a).await.unwrap(), None);
    drop(tmp);
    assert!(store.list().await.unwrap().is_empty());

    store.store(temp_with(&store, &a_bytes), &a).await.unwrap();
    store.store(temp_with(&store, &b_bytes), &b).await.unwrap();
    // Storing the same crate again (another replica's identical download) is harmless.
    store.store(temp_with(&store, &a_bytes), &a).await.unwrap();
    assert_eq!(store.len(&a).await.unwrap(), Some(a_bytes.len() as u64));
    assert_eq!(read_all(&store, &a).await.unwrap(), a_bytes);
    assert_eq!(read_all(&store, &b).await.unwrap(), b_bytes);

    let mut listed = store.list().await.unwrap();
    listed.sort_by_key(|x| x.key.as_relative());
    let names: Vec<_> = listed
        .iter()
        .map(|f| (f.key.as_relative(), f.len))
        .collect();
    let mut expected = vec![
        (b.as_relative(), b_bytes.len() as u64),
        (a.as_relative(), a_bytes.len() as u64),
    ];
    expected.sort();
    assert_eq!(names, expected);
    for f in &listed {
        assert_eq!(
            store.last_use(&f.key).await.unwrap(),
            Some(f.last_use),
            "last_use and list agree"
        );
        let age = SystemTime::now()
            .duration_since(f.last_use)
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "stored = used now");
    }

    // A recorded use moves the last use forward, never back.
    let later = tomorrow();
    assert_eq!(store.record_uses(vec![(a.clone(), later)]).await, 1);
    store
        .record_uses(vec![(a.clone(), later - days(0.5))])
        .await;
    assert_eq!(store.last_use(&a).await.unwrap(), Some(later));
    let listed = store.list().await.unwrap();
    let la = listed.iter().find(|f| f.key == a).unwrap();
    assert_eq!(la.last_use, later);
    let lb = listed.iter().find(|f| f.key == b).unwrap();
    assert!(lb.last_use < later);

    // A use of a crate that is not stored never makes it appear.
    let ghost = crate_key("ghost", "0.1.0");
    store.record_uses(vec![(ghost.clone(), later)]).await;
    assert_eq!(store.len(&ghost).await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().len(), 2);

    assert!(store.remove(&a).await.unwrap());
    assert_eq!(store.len(&a).await.unwrap(), None);
    assert!(store.open_read(&a).await.unwrap().is_none());
    assert_eq!(store.last_use(&a).await.unwrap(), None);
    store.remove(&a).await.unwrap();
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, b);
    // Stored again after a removal: a fresh last use (old records are gone with it).
    store.store(temp_with(&store, &a_bytes), &a).await.unwrap();
    assert!(store.last_use(&a).await.unwrap().unwrap() < later);
    assert!(store.check().await.is_ok());
}

#[tokio::test]
async fn storage_conformance_fs() {
    let dir = tempfile::tempdir().unwrap();
    conformance(CrateStore::Fs(FsStore::open(dir.path()).unwrap())).await;
}

fn s3_config(s3: &S3Server, up: &str, dir: &std::path::Path) -> Config {
    let mut c = Proxy::config(up, dir);
    s3.configure(&mut c);
    c
}

#[tokio::test]
async fn storage_conformance_s3() {
    let s3 = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let c = s3_config(&s3, "http://127.0.0.1:9/", dir.path());
        CrateStore::open(&c.storage, c.cleanup.max_unused).unwrap()
    };
    conformance(store.clone()).await;
    // Objects use the disk layout as keys; nothing else but usage records is written.
    let keys = s3.crate_keys().await;
    assert_eq!(
        keys,
        [
            "bi/g_/big_one/big_one-2.0.0+build.5.crate",
            "se/rd/serde/serde-1.0.200.crate"
        ]
    );
    // Temp files stay local.
    assert_eq!(
        std::fs::read_dir(dir.path().join("crates/.tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn s3_keys_live_under_the_prefix() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let bytes = up.publish("prefixed", "1.0.0", 5_000);
    let dir = tempfile::tempdir().unwrap();
    let mut c = s3_config(&s3, &up.url, dir.path());
    c.storage.s3_prefix = cratere::config::S3Prefix("team/cratere/".into());
    let proxy = Proxy::start_with(c).await;
    let r = proxy.get(&format!("{DL}/prefixed/1.0.0/download")).await;
    assert_eq!(r.bytes().await.unwrap(), bytes);
    proxy.state.core.usage.flush().await;
    let key = format!("team/cratere/{}", crate_rel("prefixed", "1.0.0"));
    assert_eq!(s3.get(&key).await.unwrap(), bytes);
    assert!(
        s3.keys()
            .await
            .iter()
            .all(|k| k.starts_with("team/cratere/"))
    );
    assert!(
        !dir.path().join("crates/pr").exists(),
        "nothing stored on the local disk"
    );
}

#[tokio::test]
async fn hits_stream_from_the_bucket_and_a_failing_bucket_falls_back_to_upstream() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let bytes = up.publish("hitme", "1.0.0", 300_000);
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(cratere::clock::FakeClock::new());
    let proxy = Proxy::start_with_clock(s3_config(&s3, &up.url, dir.path()), clock.clone()).await;
    let url = format!("{DL}/hitme/1.0.0/download");
    let r = proxy.get(&url).await;
    assert_eq!(r.headers()["x-cratere-cache"], "miss");
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let r = proxy.get(&url).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(r.bytes().await.unwrap(), bytes);
    assert_eq!(up.crate_hits("hitme", "1.0.0"), 1);
    assert_eq!(proxy.get("/ready").await.status(), 200);

    // The bucket goes away: downloads still work (from upstream), readiness says why.
    drop(s3);
    let r = proxy.get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), bytes);
    assert_eq!(up.crate_hits("hitme", "1.0.0"), 2);
    clock.advance(cratere::core::READY_TTL);
    let r = proxy.get("/ready").await;
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("s3://crates/"));
}

/// Two real `cratere` processes on one bucket, behind a round-robin balancer, serve real
/// cargo: every crate is fetched upstream and stored once, and served by both.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_bucket_for_a_cargo_workload() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let work = tempfile::tempdir().unwrap();
    let crates = package_crates(&work.path().join("pkgs"));
    publish_packaged(&up, &crates);

    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb_port = lb.local_addr().unwrap().port();
    let replica = |n: &str| {
        let mut envs = s3.envs();
        envs.extend([
            ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
            ("CRATERE_HOST", "127.0.0.1".into()),
            ("CRATERE_PORT", lb_port.to_string()),
            ("CRATERE_GIT_INDEX", "false".into()),
            (
                "CRATERE_CACHE",
                work.path().join(n).join("crates").display().to_string(),
            ),
            (
                "CRATERE_INDEX",
                work.path().join(n).join("index").display().to_string(),
            ),
        ]);
        common::spawn_server(&envs)
    };
    let (a, b) = (replica("a"), replica("b"));
    let rr = RoundRobin::start(lb, vec![a.addr.clone(), b.addr.clone()]);

    for round in 0..2 {
        let project = work.path().join(format!("app{round}"));
        write_app_project(&project);
        let home = cargo_home(&work.path().join(format!("home{round}")), &rr.url);
        let out = cargo(&project, &home, &["run", "-q"]);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5");
    }
    assert!(rr.count(0) >= 3 && rr.count(1) >= 3, "both replicas served");

    // Each crate once in the bucket, byte for byte; fetched upstream once.
    let keys = s3.crate_keys().await;
    assert_eq!(keys.len(), crates.len(), "{keys:?}");
    for (name, version, bytes) in &crates {
        let got = s3.get(&crate_rel(name, version)).await.unwrap();
        assert_eq!(sha256_hex(&got), sha256_hex(bytes), "{name}");
        assert_eq!(up.crate_hits(name, version), 1, "{name}");
    }
    // Nothing stored on either replica's disk.
    for n in ["a", "b"] {
        let files = cratere::storage::list_files(&work.path().join(n).join("crates")).unwrap();
        assert!(
            files.iter().all(|f| !f.rel.ends_with(".crate")),
            "{n}: {files:?}"
        );
    }
}

/// Two replicas miss the same crate at the same moment: both serve it whole, the stored
/// object is right.
#[tokio::test]
async fn two_replicas_missing_the_same_crate_at_once_both_serve_it() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let bytes = up.publish("racy", "1.0.0", 500_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let a = Proxy::start_with(s3_config(&s3, &up.url, &dir.path().join("a"))).await;
    let b = Proxy::start_with(s3_config(&s3, &up.url, &dir.path().join("b"))).await;
    let url = format!("{DL}/racy/1.0.0/download");
    let (ra, rb) = tokio::join!(a.get(&url), b.get(&url));
    up.wait_for_hits("/dl/racy/1.0.0/download", 2).await;
    up.release();
    let (ba, bb) = tokio::join!(ra.bytes(), rb.bytes());
    assert_eq!(ba.unwrap(), bytes);
    assert_eq!(bb.unwrap(), bytes);
    let key = crate_rel("racy", "1.0.0");
    // The object appears once both uploads are done (they follow the responses).
    common::wait_until_async(|| async { s3.get(&key).await.is_some() }, "the upload").await;
    assert_eq!(s3.get(&key).await.unwrap(), bytes);
    for p in [&a, &b] {
        let r = p.get(&url).await;
        assert_eq!(r.headers()["x-cratere-cache"], "hit");
        assert_eq!(r.bytes().await.unwrap(), bytes);
    }
    assert_eq!(up.crate_hits("racy", "1.0.0"), 2);
}

/// kill -9 of a replica in the middle of a download: nothing of it is in the bucket; another
/// replica then stores it whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_download_leaves_nothing_in_the_bucket() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let bytes = up.publish("crashy", "1.0.0", 400_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let envs = |n: &str| {
        let mut e = s3.envs();
        e.extend([
            ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
            ("CRATERE_GIT_INDEX", "false".into()),
            (
                "CRATERE_CACHE",
                dir.path().join(n).join("crates").display().to_string(),
            ),
            (
                "CRATERE_INDEX",
                dir.path().join(n).join("index").display().to_string(),
            ),
        ]);
        e
    };
    let mut a = common::spawn_server(&envs("a"));
    let url = |addr: &str| format!("http://{addr}{DL}/crashy/1.0.0/download");
    let mut resp = reqwest::get(url(&a.addr)).await.unwrap();
    let got = resp.chunk().await.unwrap().unwrap().len();
    assert!(got > 0 && got < bytes.len(), "half the crate is on its way");
    a.kill_hard();
    assert!(
        resp.bytes().await.is_err(),
        "the client saw the download fail"
    );
    assert!(s3.crate_keys().await.is_empty(), "{:?}", s3.keys().await);

    up.release();
    let b = common::spawn_server(&envs("b"));
    let r = reqwest::get(url(&b.addr)).await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let key = crate_rel("crashy", "1.0.0");
    common::wait_until_async(|| async { s3.get(&key).await.is_some() }, "the upload").await;
    assert_eq!(s3.get(&key).await.unwrap(), bytes);
}

async fn run_cleanup(p: &Proxy) -> Outcome {
    p.state
        .core
        .cleanup
        .run_once(false, &CancellationToken::new())
        .await
        .unwrap()
}

/// A crate used on either replica within CRATERE_MAX_DAYS_UNUSED is kept; one used on
/// neither goes, with its usage records.
#[tokio::test]
async fn cleanup_with_two_replicas_keeps_what_either_used() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let names = ["onlya", "onlyb", "neither"];
    let data: Vec<Bytes> = names
        .iter()
        .map(|n| up.publish(n, "1.0.0", 20_000))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let a = Proxy::start_with_clock(
        s3_config(&s3, &up.url, &dir.path().join("a")),
        clock.clone(),
    )
    .await;
    let b = Proxy::start_with_clock(
        s3_config(&s3, &up.url, &dir.path().join("b")),
        clock.clone(),
    )
    .await;
    for (n, d) in names.iter().zip(&data) {
        let r = a.get(&format!("{DL}/{n}/1.0.0/download")).await;
        assert_eq!(&r.bytes().await.unwrap(), d);
    }
    wait_until_async_count(&s3, 3).await;
    a.state.core.usage.flush().await;

    clock.advance(days(60.0));
    for (p, n) in [(&a, "onlya"), (&b, "onlyb")] {
        let r = p.get(&format!("{DL}/{n}/1.0.0/download")).await;
        assert_eq!(r.headers()["x-cratere-cache"], "hit");
        r.bytes().await.unwrap();
    }
    // Replica b writes its uses every 5 s (here: now); a's pass flushes a's own.
    b.state.core.usage.flush().await;
    clock.advance(days(40.0));

    let Outcome::Done(pass) = run_cleanup(&a).await else {
        panic!("busy")
    };
    let gone: Vec<_> = pass
        .removed
        .iter()
        .filter(|r| r.kind == FileKind::Crate)
        .map(|r| r.rel.clone())
        .collect();
    assert_eq!(gone, [crate_rel("neither", "1.0.0")]);
    assert_eq!(
        s3.crate_keys().await,
        [crate_rel("onlya", "1.0.0"), crate_rel("onlyb", "1.0.0")]
    );
    let keys = s3.keys().await;
    assert!(
        !keys.iter().any(|k| k.contains("neither")),
        "usage records go with the crate: {keys:?}"
    );
    // Superseded records were pruned: one per crate left.
    let records = keys.iter().filter(|k| k.starts_with(".usage/")).count();
    assert_eq!(records, 2, "{keys:?}");

    // Replica b's next cleanup agrees: nothing more to remove.
    let Outcome::Done(pass) = run_cleanup(&b).await else {
        panic!("busy")
    };
    assert!(pass.removed.iter().all(|r| r.kind == FileKind::Index));
    assert_eq!(pass.report.crate_files_kept, 2);
}

async fn wait_until_async_count(s3: &S3Server, n: usize) {
    common::wait_until_async(|| async { s3.crate_keys().await.len() >= n }, "the uploads").await;
}

/// One cleanup at a time across the fleet: the lease object excludes the others; a lease
/// whose holder died is taken over once it has expired.
#[tokio::test]
async fn one_cleanup_at_a_time_across_replicas() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let a = Proxy::start_with_clock(
        s3_config(&s3, &up.url, &dir.path().join("a")),
        clock.clone(),
    )
    .await;
    let b = Proxy::start_with_clock(
        s3_config(&s3, &up.url, &dir.path().join("b")),
        clock.clone(),
    )
    .await;
    let CrateStore::S3(a_store) = a.state.core.crates.clone() else {
        panic!("not s3")
    };
    let CrateStore::S3(b_store) = b.state.core.crates.clone() else {
        panic!("not s3")
    };
    let stop = CancellationToken::new();
    let held = a_store.lease(clock.clone(), &stop).await.unwrap().unwrap();
    assert!(s3.keys().await.contains(&LOCK_KEY.to_string()));
    assert!(b_store.lease(clock.clone(), &stop).await.unwrap().is_none());
    // The others clean only their own index caches, not the bucket.
    for p in [&a, &b] {
        let Outcome::Done(pass) = run_cleanup(p).await else {
            panic!("the local index cache is free")
        };
        assert!(pass.report.crates_skipped);
    }
    // The command, from yet another process, is refused too.
    let out = cratere_cmd(&s3, &["cleanup"], dir.path()).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another cleanup is running"));

    held.release().await;
    assert!(!s3.keys().await.contains(&LOCK_KEY.to_string()));
    let Outcome::Done(pass) = run_cleanup(&b).await else {
        panic!("busy")
    };
    assert!(!pass.report.crates_skipped);
    assert!(
        !s3.keys().await.contains(&LOCK_KEY.to_string()),
        "released after the pass"
    );

    // A holder that dies keeps the lease until it expires; then it is taken over.
    let dead = a_store.lease(clock.clone(), &stop).await.unwrap().unwrap();
    drop(dead); // no release: as if the process died
    assert!(b_store.lease(clock.clone(), &stop).await.unwrap().is_none());
    clock.advance(LEASE_TTL + Duration::from_secs(1));
    let taken = b_store.lease(clock.clone(), &stop).await.unwrap();
    assert!(taken.is_some(), "a stale lease is taken over");
    assert!(a_store.lease(clock.clone(), &stop).await.unwrap().is_none());
    taken.unwrap().release().await;
}

async fn cratere_cmd(s3: &S3Server, args: &[&str], dir: &std::path::Path) -> std::process::Output {
    cratere_cmd_with(s3, args, &dir.join("cmd"), &[]).await
}

/// `cratere warm` fills the bucket (verified against the lockfile); `cratere cleanup` cleans
/// it; a missing bucket setting stops startup naming the variable.
#[tokio::test]
async fn warm_and_cleanup_commands_work_with_s3() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut lock = "version = 4\n".to_string();
    let mut expected = Vec::new();
    for n in ["warma", "warmb"] {
        let bytes = up.publish(n, "1.0.0", 30_000);
        lock.push_str(&format!(
            "\n[[package]]\nname = \"{n}\"\nversion = \"1.0.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"{}\"\n",
            sha256_hex(&bytes)
        ));
        expected.push((n, bytes));
    }
    let lockfile = dir.path().join("Cargo.lock");
    std::fs::write(&lockfile, lock).unwrap();
    let mut cmd_dir = dir.path().to_path_buf();
    cmd_dir.push("w");
    let out = cratere_cmd_with(
        &s3,
        &["warm", lockfile.to_str().unwrap()],
        &cmd_dir,
        &[("CRATERE_UPSTREAM_SPARSE", up.url.as_str())],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 fetched"), "{stdout}");
    assert!(stdout.contains("s3://crates/"), "{stdout}");
    for (n, bytes) in &expected {
        assert_eq!(&s3.get(&crate_rel(n, "1.0.0")).await.unwrap(), bytes);
    }
    // Again: already there (checked by reading back from the bucket).
    let out = cratere_cmd_with(
        &s3,
        &["warm", lockfile.to_str().unwrap()],
        &cmd_dir,
        &[("CRATERE_UPSTREAM_SPARSE", up.url.as_str())],
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 already cached"));

    let out = cratere_cmd(&s3, &["cleanup", "--dry-run"], dir.path()).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 crate files"));
    let out = cratere_cmd(&s3, &["cleanup", "--max-cache-size", "40000"], dir.path()).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("removed crate"), "{stdout}");
    assert_eq!(s3.crate_keys().await.len(), 1);

    let out = tokio::process::Command::new(BIN)
        .env("CRATERE_STORAGE", "s3")
        .env_remove("CRATERE_S3_BUCKET")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CRATERE_S3_BUCKET"));
}

async fn cratere_cmd_with(
    s3: &S3Server,
    args: &[&str],
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> std::process::Output {
    cratere_cmd_on(s3.envs(), args, dir, extra).await
}

/// `cratere ARGS` with the bucket's environment `envs`, the local directories under `dir`,
/// and `extra`.
async fn cratere_cmd_on(
    envs: Vec<(&'static str, String)>,
    args: &[&str],
    dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("CRATERE_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .env("CRATERE_CACHE", dir.join("crates"))
        .env("CRATERE_INDEX", dir.join("index"))
        .env("CRATERE_GIT_INDEX", "false");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

/// A held lease is renewed while its pass runs; a holder whose lease was taken from it stops.
#[tokio::test]
async fn a_held_lease_is_renewed_and_a_lost_one_stops_the_pass() {
    let s3 = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = {
        let c = s3_config(&s3, "http://127.0.0.1:9/", dir.path());
        CrateStore::open(&c.storage, c.cleanup.max_unused).unwrap()
    };
    let CrateStore::S3(store) = store else {
        panic!("not s3")
    };
    let clock = Arc::new(FakeClock::new());
    let stop = CancellationToken::new();
    let lease = store
        .lease_renewed_every(clock.clone(), &stop, Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    let expiry = || async {
        let body = s3.get(LOCK_KEY).await.unwrap();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["expires_unix_ms"]
            .as_u64()
            .unwrap()
    };
    let first = expiry().await;
    clock.advance(Duration::from_secs(10));
    common::wait_until_async(|| async { expiry().await >= first + 10_000 }, "a renewal").await;
    assert!(!lease.stop().is_cancelled());

    // Someone else's write (a takeover after a long stall): the holder notices and stops.
    // (s3s-fs checks If-Match before writing, not atomically with it: a renewal racing the
    // foreign write may land after it, so the write is repeated until it sticks.)
    let foreign = br#"{"owner":"someone else","expires_unix_ms":99999999999999}"#;
    let key = object_store::path::Path::parse(LOCK_KEY).unwrap();
    common::wait_until_async(
        || async {
            if lease.stop().is_cancelled() {
                return true;
            }
            if s3.get(LOCK_KEY).await.as_deref() != Some(&foreign[..]) {
                s3.client()
                    .put(&key, foreign.to_vec().into())
                    .await
                    .unwrap();
            }
            false
        },
        "the holder to stop",
    )
    .await;
    lease.release().await;
    assert!(
        s3.get(LOCK_KEY).await.is_some(),
        "a lost lease is not deleted by its former holder"
    );
}

/// CRATERE_S3_LOCAL_CACHE_SIZE: hits of crates this replica has seen come from its own disk
/// (also with the bucket gone); crates read from the bucket are copied as they stream; the
/// copies stay under the size, least recently used evicted first.
#[tokio::test]
async fn the_local_cache_in_front_of_the_bucket_serves_hits_and_stays_bounded() {
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let names = ["loca", "locb", "locc"];
    let data: Vec<Bytes> = names
        .iter()
        .map(|n| up.publish(n, "1.0.0", 300_000))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let config = |n: &str| {
        let mut c = s3_config(&s3, &up.url, &dir.path().join(n));
        c.storage.s3_local_cache_size = Some(700_000);
        c
    };
    let a = Proxy::start_with(config("a")).await;
    let b = Proxy::start_with(config("b")).await;
    let local = |p: &Proxy, n: &str| p.crate_path(&crate_rel(n, "1.0.0"));
    let get = |p: &Proxy, n: &str| {
        let url = format!("{DL}/{n}/1.0.0/download");
        let p = p.url.clone();
        async move {
            let r = common::client()
                .get(format!("{p}{url}"))
                .send()
                .await
                .unwrap();
            let how = r.headers()["x-cratere-cache"].to_str().unwrap().to_string();
            (how, r.bytes().await.unwrap())
        }
    };

    // A miss on a: uploaded, and kept on a's disk.
    assert_eq!(get(&a, "loca").await, ("miss".to_string(), data[0].clone()));
    common::wait_until(|| local(&a, "loca").exists(), "a's copy").await;
    assert_eq!(std::fs::read(local(&a, "loca")).unwrap(), data[0]);
    // A hit on b reads the bucket and keeps a copy once the whole body went through.
    assert_eq!(get(&b, "loca").await, ("hit".to_string(), data[0].clone()));
    common::wait_until(|| local(&b, "loca").exists(), "b's copy").await;
    assert_eq!(std::fs::read(local(&b, "loca")).unwrap(), data[0]);

    // Over the size: the least recently used copy goes.
    assert_eq!(get(&a, "locb").await.1, data[1]);
    common::wait_until(|| local(&a, "locb").exists(), "a's copy of b").await;
    assert_eq!(get(&a, "loca").await.1, data[0]); // loca is now the most recent
    assert_eq!(get(&a, "locc").await.1, data[2]);
    common::wait_until(
        || local(&a, "locc").exists() && !local(&a, "locb").exists(),
        "the eviction of the least recently used copy",
    )
    .await;
    assert!(local(&a, "loca").exists());
    let CrateStore::S3(store) = a.state.core.crates.clone() else {
        panic!("not s3")
    };
    common::wait_until(
        || store.local_cache().unwrap().used() <= 700_000,
        "copies within the size",
    )
    .await;
    assert_eq!(s3.crate_keys().await.len(), 3, "all in the bucket");

    // Without the bucket, a's copies still serve hits.
    drop(s3);
    assert_eq!(get(&a, "loca").await, ("hit".to_string(), data[0].clone()));
    assert_eq!(get(&a, "locc").await, ("hit".to_string(), data[2].clone()));
    assert_eq!(up.crate_hits("loca", "1.0.0"), 1);
}

/// The bucket's conditional writes are probed, not assumed. s3s-fs refuses a second create and
/// a stale replace: cleanups take the lease. A bucket that accepts both (what Garage 2.5.0 was
/// measured to do) is reported in the log, `/ready`, `/metrics` and the status page; no lease
/// object is ever written to it; only a replica with CRATERE_CLEANUP_LEADER=true cleans its
/// crates, and `cratere cleanup` refuses without the setting.
#[tokio::test]
async fn a_bucket_that_ignores_conditional_writes_never_gets_a_lease() {
    common::init_test_log();
    let s3 = S3Server::start().await;
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = CrateStore::open(
        &s3_config(&s3, &up.url, &dir.path().join("a")).storage,
        days(90.0),
    )
    .unwrap();
    assert_eq!(
        good.probe_conditional_writes().await,
        Some(Conditional::Honoured)
    );
    assert!(
        s3.keys().await.iter().all(|k| !k.contains(".locks/probe")),
        "the probe removes its scratch object: {:?}",
        s3.keys().await
    );
    let stop = CancellationToken::new();
    let clock = Arc::new(FakeClock::new());
    match good.cleanup_lease(clock.clone(), &stop).await.unwrap() {
        CleanupLease::Held(lease) => lease.release().await,
        _ => panic!("a conforming bucket gives the lease"),
    }

    let bad = IgnoringS3::start().await;
    let mut config = Proxy::config(&up.url, &dir.path().join("b"));
    bad.configure(&mut config);
    let store = CrateStore::open(&config.storage, days(90.0)).unwrap();
    let found = store.probe_conditional_writes().await.unwrap();
    assert!(
        matches!(&found, Conditional::Ignored(what) if what.contains("If-None-Match")),
        "{found:?}"
    );
    assert!(matches!(
        store.cleanup_lease(clock.clone(), &stop).await.unwrap(),
        CleanupLease::NotLeader
    ));
    config.storage.cleanup_leader = true;
    let leader = CrateStore::open(&config.storage, days(90.0)).unwrap();
    assert!(matches!(
        leader.cleanup_lease(clock.clone(), &stop).await.unwrap(),
        CleanupLease::Leader
    ));
    assert!(
        !bad.puts().iter().any(|k| k.ends_with(LOCK_KEY)),
        "no lease object is written: {:?}",
        bad.puts()
    );

    // A server on it says so.
    config.storage.cleanup_leader = false;
    let p = Proxy::start_with(config).await;
    common::wait_until_async(
        || async { p.metric("cratere_s3_conditional_writes").await == 0.0 },
        "the startup probe",
    )
    .await;
    let ready = p.get("/ready").await.text().await.unwrap();
    assert!(
        ready.starts_with("ready\n") && ready.contains("does not honour conditional writes"),
        "{ready}"
    );
    assert!(ready.contains("not the cleanup leader"), "{ready}");
    let page = p.get("/").await.text().await.unwrap();
    assert!(page.contains(r#"id="bucket-lease""#), "{page}");
    // A scheduled pass cleans the local index cache only.
    match run_cleanup(&p).await {
        Outcome::Done(pass) => assert!(pass.report.crates_skipped),
        Outcome::Busy => panic!("busy"),
    }
    assert!(!bad.puts().iter().any(|k| k.ends_with(LOCK_KEY)));

    // The command refuses without the leader setting, and runs with it.
    let out = cratere_cmd_on(bad.envs(), &["cleanup"], &dir.path().join("cmd"), &[]).await;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CRATERE_CLEANUP_LEADER=true"), "{stderr}");
    let out = cratere_cmd_on(
        bad.envs(),
        &["cleanup"],
        &dir.path().join("cmd"),
        &[("CRATERE_CLEANUP_LEADER", "true")],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(!bad.puts().iter().any(|k| k.ends_with(LOCK_KEY)));
}
