//! Cache lifecycle, black-box: usage tracking, cleanup (age rule, size cap, concurrency with
//! downloads, locking), the `cleanup` and `warm` commands. Time is a fake clock moved by the
//! tests: days pass in no time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::cargo::{cargo, cargo_home, cargo_home_for_index, packaged_app};
use common::{FakeUpstream, Fault, Proxy, Target, body_of, index_path, sha256_hex, wait_until};
use cratere::cleanup::{FileKind, Outcome, Pass, Reason};
use cratere::clock::{Clock, FakeClock, days};
use cratere::config::Config;
use tokio_util::sync::CancellationToken;

const DL: &str = "/api/v1/crates";
const BIN: &str = env!("CARGO_BIN_EXE_cratere");

/// Relative path of a crate file in the cache.
fn crate_rel(name: &str, version: &str) -> String {
    format!(
        "{}/{}-{version}.crate",
        index_path(name),
        name.to_ascii_lowercase()
    )
}

fn config(up: &str, dir: &Path, max_days: f64, max_size: Option<u64>) -> Config {
    let mut c = Proxy::config(up, dir);
    c.cleanup.max_unused = days(max_days);
    c.cleanup.max_cache_size = max_size;
    // These tests look at the disk cache; the memory layer in front of the index files (which
    // keeps serving a file cleanup removed until its TTL) has its own test in tests/sparse.rs.
    c.sparse.index_memory_cache = 0;
    c
}

async fn start(
    up: &FakeUpstream,
    dir: &Path,
    clock: &Arc<FakeClock>,
    max_size: Option<u64>,
) -> Proxy {
    Proxy::start_with_clock(config(&up.url, dir, 90.0, max_size), clock.clone()).await
}

/// Downloads a crate through the proxy; returns the cache header and checks the bytes.
async fn fetch(proxy: &Proxy, name: &str, version: &str, expected: &Bytes) -> String {
    let r = proxy.get(&format!("{DL}/{name}/{version}/download")).await;
    assert_eq!(r.status(), 200, "{name} {version}");
    let how = r.headers()["x-cratere-cache"].to_str().unwrap().to_string();
    assert_eq!(&body_of(r).await.unwrap(), expected, "{name} {version}");
    how
}

async fn cleanup(proxy: &Proxy) -> Pass {
    match proxy
        .state
        .core
        .cleanup
        .run_once(false, &CancellationToken::new())
        .await
        .unwrap()
    {
        Outcome::Done(pass) => pass,
        Outcome::Busy => panic!("cleanup busy"),
    }
}

fn removed(pass: &Pass) -> Vec<(FileKind, String)> {
    let mut v: Vec<_> = pass
        .removed
        .iter()
        .map(|r| (r.kind, r.rel.clone()))
        .collect();
    v.sort_by(|a, b| a.1.cmp(&b.1));
    v
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[tokio::test]
async fn recently_used_crates_survive_unused_ones_go_and_come_back() {
    let up = FakeUpstream::start().await;
    let used = up.publish("used", "1.0.0", 10_000);
    let unused = up.publish("unused", "1.0.0", 20_000);
    up.publish("browsed", "1.0.0", 100);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let proxy = start(&up, dir.path(), &clock, None).await;

    assert_eq!(fetch(&proxy, "used", "1.0.0", &used).await, "miss");
    assert_eq!(fetch(&proxy, "unused", "1.0.0", &unused).await, "miss");
    assert_eq!(proxy.get("/index/br/ow/browsed").await.status(), 200);
    clock.advance(days(60.0));
    assert_eq!(fetch(&proxy, "used", "1.0.0", &used).await, "hit");
    assert_eq!(proxy.get("/index/br/ow/browsed").await.status(), 200);
    clock.advance(days(40.0));

    let pass = cleanup(&proxy).await;
    assert_eq!(
        removed(&pass),
        [
            (FileKind::Index, "un/us/unused".to_string()),
            (FileKind::Crate, crate_rel("unused", "1.0.0")),
        ]
    );
    assert!(pass.removed.iter().all(|r| r.reason == Reason::Unused));
    assert_eq!(pass.report.crate_bytes_removed, 20_000);
    assert_eq!(pass.report.crate_files_kept, 1);
    let index = dir.path().join("index/sparse");
    assert!(proxy.crate_path(&crate_rel("used", "1.0.0")).exists());
    assert!(!proxy.crate_path(&crate_rel("unused", "1.0.0")).exists());
    assert!(
        index.join("us/ed/used").exists(),
        "a crate's use keeps its index file"
    );
    assert!(index.join("br/ow/browsed").exists());
    assert!(!index.join("un/us/unused").exists());
    assert!(index.join("config.json").exists(), "never removed");
    let last = proxy.state.core.cleanup.last().unwrap();
    assert_eq!((last.crate_files_removed, last.index_files_removed), (1, 1));
    assert_eq!(last.at, clock.now());

    // A removed crate is simply fetched again.
    assert_eq!(fetch(&proxy, "unused", "1.0.0", &unused).await, "miss");
    assert_eq!(up.crate_hits("unused", "1.0.0"), 2);
    assert_eq!(up.index_hits("unused"), 2);
    assert_eq!(up.crate_hits("used", "1.0.0"), 1);
}

#[tokio::test]
async fn the_size_cap_evicts_least_recently_used_first() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let mut bytes = Vec::new();
    for n in ["aaaa", "bbbb", "cccc", "dddd"] {
        bytes.push(up.publish(n, "1.0.0", 100_000));
    }
    let proxy = start(&up, dir.path(), &clock, Some(250_000)).await;
    for (n, b) in ["aaaa", "bbbb", "cccc", "dddd"].iter().zip(&bytes) {
        fetch(&proxy, n, "1.0.0", b).await;
        clock.advance(days(1.0));
    }
    assert_eq!(fetch(&proxy, "aaaa", "1.0.0", &bytes[0]).await, "hit");

    let pass = cleanup(&proxy).await;
    let order: Vec<_> = pass.removed.iter().map(|r| r.rel.clone()).collect();
    assert_eq!(
        order,
        [crate_rel("bbbb", "1.0.0"), crate_rel("cccc", "1.0.0")],
        "oldest use first"
    );
    assert!(pass.removed.iter().all(|r| r.reason == Reason::OverSize));
    assert_eq!(pass.report.crate_bytes_kept, 200_000);
    assert!(proxy.crate_path(&crate_rel("aaaa", "1.0.0")).exists());
    assert!(proxy.crate_path(&crate_rel("dddd", "1.0.0")).exists());
    // Under the cap now: a second pass removes nothing.
    assert!(cleanup(&proxy).await.removed.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_concurrent_with_downloads_loses_nothing_and_serves_nothing_partial() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let names = ["one1", "two2", "three", "four"];
    let crates: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), up.publish(n, "1.0.0", 150_000 + i * 1000)))
        .collect();
    // A cap of one byte: every pass wants every file gone.
    let proxy = Arc::new(Proxy::start_with(config(&up.url, dir.path(), 90.0, Some(1))).await);
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (proxy, crates) = (proxy.clone(), crates.clone());
            tokio::spawn(async move {
                for round in 0..8 {
                    for i in 0..crates.len() {
                        let (name, bytes) = &crates[(i + c + round) % crates.len()];
                        fetch(&proxy, name, "1.0.0", bytes).await;
                    }
                }
            })
        })
        .collect();
    let cleaner = {
        let (proxy, done) = (proxy.clone(), done.clone());
        tokio::spawn(async move {
            let (mut passes, mut files) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                files += cleanup(&proxy).await.removed.len();
                passes += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (passes, files)
        })
    };
    for c in clients {
        c.await.expect("every response complete and correct");
    }
    done.store(true, Ordering::SeqCst);
    let (passes, files) = cleaner.await.unwrap();
    assert!(
        passes > 0 && files > 0,
        "{passes} passes removed {files} files"
    );
    // Everything that was removed was fetched again; nothing partial was ever cached.
    for (name, bytes) in &crates {
        let path = proxy.crate_path(&crate_rel(name, "1.0.0"));
        if path.exists() {
            assert_eq!(&std::fs::read(&path).unwrap(), bytes);
        }
    }
    let temp_left = std::fs::read_dir(dir.path().join("crates/.tmp"))
        .unwrap()
        .count();
    assert_eq!(temp_left, 0);
}

#[tokio::test]
async fn cleanup_never_touches_a_download_in_progress_and_an_open_file_keeps_streaming() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("big", "1.0.0", 2_000_000);
    up.set_fault(Target::Crate, Fault::Gate);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Arc::new(Proxy::start_with(config(&up.url, dir.path(), 90.0, Some(1))).await);

    let client = {
        let (p, b) = (proxy.clone(), bytes.clone());
        tokio::spawn(async move { fetch(&p, "big", "1.0.0", &b).await })
    };
    up.wait_for_hits("/dl/big/1.0.0/download", 1).await;
    // Half the body is in a temp file; a pass must leave it alone.
    let pass = cleanup(&proxy).await;
    assert!(pass.removed.is_empty(), "{:?}", pass.removed);
    up.release();
    assert_eq!(client.await.unwrap(), "miss");
    let cached = proxy.crate_path(&crate_rel("big", "1.0.0"));
    assert_eq!(std::fs::read(&cached).unwrap(), bytes);

    // A hit has opened the file; the pass removes it (over the cap), the response still
    // completes from the open descriptor; the next request fetches it again.
    up.clear_faults();
    let r = proxy.get(&format!("{DL}/big/1.0.0/download")).await;
    assert_eq!(r.headers()["x-cratere-cache"], "hit");
    assert_eq!(removed(&cleanup(&proxy).await).len(), 1);
    assert!(!cached.exists());
    assert_eq!(body_of(r).await.unwrap(), bytes);
    assert_eq!(fetch(&proxy, "big", "1.0.0", &bytes).await, "miss");
    assert_eq!(up.crate_hits("big", "1.0.0"), 2);
}

#[tokio::test]
async fn usage_survives_a_restart() {
    let up = FakeUpstream::start().await;
    let a = up.publish("alpha", "1.0.0", 1000);
    let b = up.publish("beta", "1.0.0", 1000);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let proxy = start(&up, dir.path(), &clock, None).await;
    fetch(&proxy, "alpha", "1.0.0", &a).await;
    fetch(&proxy, "beta", "1.0.0", &b).await;
    clock.advance(days(50.0));
    assert_eq!(fetch(&proxy, "alpha", "1.0.0", &a).await, "hit");
    let used_at = clock.now();
    // SIGTERM-style stop: the flusher writes the uses it holds.
    proxy.stop().await;
    assert_eq!(
        mtime(&dir.path().join("crates").join(crate_rel("alpha", "1.0.0"))),
        used_at
    );

    let proxy = start(&up, dir.path(), &clock, None).await;
    clock.advance(days(45.0)); // beta: 95 days unused; alpha: 45
    let pass = cleanup(&proxy).await;
    assert_eq!(
        removed(&pass),
        [
            (FileKind::Index, "be/ta/beta".to_string()),
            (FileKind::Crate, crate_rel("beta", "1.0.0")),
        ]
    );
    assert!(proxy.crate_path(&crate_rel("alpha", "1.0.0")).exists());
}

#[tokio::test]
async fn untracked_files_count_as_used_at_startup() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    // A cache left by an older version: files downloaded long ago, no usage records.
    let old = clock.now() - days(400.0);
    let crate_file = dir.path().join("crates").join(crate_rel("legacy", "0.1.0"));
    let index_file = dir.path().join("index/sparse/le/ga/legacy");
    for f in [&crate_file, &index_file] {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"old").unwrap();
        set_mtime(f, old);
    }
    let proxy = start(&up, dir.path(), &clock, None).await;
    // Adopted in the background right after startup (startup itself does not walk the cache).
    wait_until(
        || proxy.state.core.usage.is_tracked(),
        "the adoption of the cache",
    )
    .await;
    clock.advance(days(89.0));
    assert!(cleanup(&proxy).await.removed.is_empty());
    assert!(crate_file.exists() && index_file.exists());
    proxy.stop().await;

    // Adopted once: a later start does not renew them.
    let proxy = start(&up, dir.path(), &clock, None).await;
    clock.advance(days(2.0));
    let pass = cleanup(&proxy).await;
    assert_eq!(pass.report.crate_files_removed, 1);
    assert!(!crate_file.exists());
    // The index file's record was made by the first cleanup (day 89): 2 days old.
    assert!(index_file.exists());
}

/// A cleanup that runs before the background adoption of an untracked cache has finished
/// adopts the cache itself first: an old mtime is never taken for a last use.
#[tokio::test]
async fn a_cleanup_before_the_adoption_adopts_first() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let crate_file = dir.path().join("crates").join(crate_rel("legacy", "0.1.0"));
    std::fs::create_dir_all(crate_file.parent().unwrap()).unwrap();
    std::fs::write(&crate_file, b"old").unwrap();
    set_mtime(&crate_file, clock.now() - days(400.0));
    // The state alone, no server: nothing has adopted the cache.
    let state =
        cratere::http::AppState::with_clock(config(&up.url, dir.path(), 90.0, None), clock.clone())
            .unwrap();
    assert!(!state.core.usage.is_tracked());
    let Outcome::Done(pass) = state
        .core
        .cleanup
        .run_once(false, &CancellationToken::new())
        .await
        .unwrap()
    else {
        panic!("cleanup did not run");
    };
    assert_eq!(pass.report.crate_files_removed, 0);
    assert!(crate_file.exists());
    assert!(state.core.usage.is_tracked());
}

#[tokio::test]
async fn the_server_runs_cleanup_on_its_schedule() {
    let up = FakeUpstream::start().await;
    let bytes = up.publish("sched", "1.0.0", 1000);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::new());
    let mut c = config(&up.url, dir.path(), 90.0, None);
    c.cleanup.cleanup_cache_schedule =
        cratere::config::CleanupSchedule(Some("* * * * * *".parse().unwrap()));
    let proxy = Proxy::start_with_clock(c, clock.clone()).await;
    fetch(&proxy, "sched", "1.0.0", &bytes).await;
    clock.advance(days(91.0));
    let path = proxy.crate_path(&crate_rel("sched", "1.0.0"));
    wait_until(|| !path.exists(), "the scheduled cleanup").await;
    wait_until(
        || proxy.state.core.cleanup.last().is_some(),
        "a cleanup report",
    )
    .await;
}

/// Runs the `cratere` binary on the data directory `data` (`crates/`, `index/`), with only
/// the given `CRATERE_*` settings.
async fn cratere(args: &[&str], data: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("CRATERE_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .env("CRATERE_CACHE", data.join("crates"))
        .env("CRATERE_INDEX", data.join("index"))
        .env("NO_COLOR", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[tokio::test]
async fn cleanup_command_dry_run_prints_and_removes_nothing() {
    let up = FakeUpstream::start().await;
    let old = up.publish("oldie", "1.0.0", 5000);
    let new = up.publish("newbie", "1.0.0", 7000);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    fetch(&proxy, "oldie", "1.0.0", &old).await;
    fetch(&proxy, "newbie", "1.0.0", &new).await;
    proxy.stop().await;
    let old_file = dir.path().join("crates").join(crate_rel("oldie", "1.0.0"));
    set_mtime(&old_file, SystemTime::now() - days(10.0));
    let env = [("CRATERE_MAX_DAYS_UNUSED", "5")];

    let out = cratere(&["cleanup", "--dry-run"], dir.path(), &env).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "would remove crate {}",
            crate_rel("oldie", "1.0.0")
        )),
        "{text}"
    );
    assert!(text.contains("unused for 10.0 days"), "{text}");
    assert!(!text.contains("newbie-"), "{text}");
    assert!(text.contains("would remove 1 crate files"), "{text}");
    assert!(old_file.exists(), "a dry run removes nothing");

    let out = cratere(&["cleanup"], dir.path(), &env).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(
        text.contains(&format!("removed crate {}", crate_rel("oldie", "1.0.0"))),
        "{text}"
    );
    assert!(text.contains("removed 1 crate files"), "{text}");
    assert!(!old_file.exists());
    assert!(
        dir.path()
            .join("crates")
            .join(crate_rel("newbie", "1.0.0"))
            .exists()
    );
}

#[tokio::test]
async fn two_cleanups_never_run_at_once() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&up, dir.path()).await;
    // Another process's pass holds the lock.
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("crates").join(cratere::cleanup::LOCK_FILE))
        .unwrap();
    lock.lock().unwrap();
    let outcome = proxy
        .state
        .core
        .cleanup
        .run_once(false, &CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Busy));
    let out = cratere(&["cleanup"], dir.path(), &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another cleanup is running"));
    drop(lock);

    // Released: both run.
    let out = cratere(&["cleanup"], dir.path(), &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(matches!(
        proxy
            .state
            .core
            .cleanup
            .run_once(false, &CancellationToken::new())
            .await
            .unwrap(),
        Outcome::Done(_)
    ));
}

fn lockfile(packages: &[(&str, &str, String)]) -> String {
    let mut s = "version = 4\n".to_string();
    for (name, version, checksum) in packages {
        s.push_str(&format!(
            "\n[[package]]\nname = \"{name}\"\nversion = \"{version}\"\n\
             source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
             checksum = \"{checksum}\"\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_then_an_offline_proxy_serves_cargo_fetch() {
    let work = tempfile::tempdir().unwrap();
    let (crates, up, project) = packaged_app(work.path()).await;
    // The lockfile, made by cargo straight from the (fake) registry.
    let out = tokio::task::spawn_blocking({
        let (p, h) = (
            project.clone(),
            cargo_home_for_index(&work.path().join("home0"), &up.url),
        );
        move || cargo(&p, &h, &["generate-lockfile"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = project.join("Cargo.lock");
    let lock_arg = lock.to_str().unwrap();

    let data = work.path().join("data");
    let env = [("CRATERE_UPSTREAM_SPARSE", up.url.as_str())];
    let out = cratere(&["warm", lock_arg], &data, &env).await;
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("warming 3 crates.io packages from 1 lockfile(s) (1 packages from other sources skipped)"), "{text}");
    assert!(text.contains("fetched Mixed_Case 1.0.0"), "{text}");
    assert!(text.contains("warm: 3 fetched"), "{text}");
    assert!(text.contains("0 already cached, 0 failed"), "{text}");
    // Again: nothing to fetch.
    let out = cratere(&["warm", lock_arg, lock_arg], &data, &env).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).contains("warm: 0 fetched (0 B), 3 already cached, 0 failed"),
        "{}",
        stdout(&out)
    );
    for (name, version, _) in &crates {
        assert_eq!(up.crate_hits(name, version), 1, "{name}");
    }

    // Upstream unreachable, a cargo with an empty CARGO_HOME.
    drop(up);
    let mut cfg = Proxy::config("http://127.0.0.1:9/", &data);
    cfg.sparse.index_ttl = Duration::ZERO; // every index request tries upstream, and fails
    let proxy = Proxy::start_with(cfg).await;
    let home = cargo_home(&work.path().join("home1"), &proxy.url);
    let out = tokio::task::spawn_blocking({
        let p = project.clone();
        move || cargo(&p, &home, &["fetch", "--locked"])
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
}

#[tokio::test]
async fn warm_reports_failures_and_exits_non_zero() {
    let up = FakeUpstream::start().await;
    let good = up.publish("good", "1.0.0", 3000);
    up.publish("tampered", "1.0.0", 3000);
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("Cargo.lock");
    std::fs::write(
        &lock,
        lockfile(&[
            ("good", "1.0.0", sha256_hex(&good)),
            ("tampered", "1.0.0", "0".repeat(64)),
            ("ghost", "1.0.0", "1".repeat(64)),
            ("good", "9.9.9", "2".repeat(64)),
        ]),
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = cratere(
        &["warm", lock.to_str().unwrap()],
        &data,
        &[("CRATERE_UPSTREAM_SPARSE", up.url.as_str())],
    )
    .await;
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("warm: 1 fetched (2.9 KiB), 0 already cached, 3 failed"),
        "{text}"
    );
    assert!(
        text.contains("FAILED  ghost 1.0.0: upstream has no such crate"),
        "{text}"
    );
    assert!(
        text.contains("FAILED  tampered 1.0.0: cached file has sha256"),
        "{text}"
    );
    assert!(
        text.contains("FAILED  good 9.9.9: the index does not list this version"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed: ghost 1.0.0"), "{err}");
    assert_eq!(
        std::fs::read(data.join("crates").join(crate_rel("good", "1.0.0"))).unwrap(),
        good
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_is_safe_while_a_server_runs_on_the_same_directories() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let crates: Vec<(String, Bytes)> = (0..12)
        .map(|i| {
            let name = format!("pkg{i:02}");
            let bytes = up.publish(&name, "1.0.0", 60_000 + i * 100);
            (name, bytes)
        })
        .collect();
    up.set_fault(
        Target::Crate,
        Fault::Trickle {
            piece: 20_000,
            pause: Duration::from_millis(20),
        },
    );
    let lock = dir.path().join("Cargo.lock");
    let entries: Vec<_> = crates
        .iter()
        .map(|(n, b)| (n.as_str(), "1.0.0", sha256_hex(b)))
        .collect();
    std::fs::write(&lock, lockfile(&entries)).unwrap();
    let proxy = Arc::new(Proxy::start(&up, dir.path()).await);

    let clients: Vec<_> = crates
        .iter()
        .cloned()
        .map(|(n, b)| {
            let p = proxy.clone();
            tokio::spawn(async move { fetch(&p, &n, "1.0.0", &b).await })
        })
        .collect();
    let out = cratere(
        &["warm", lock.to_str().unwrap(), "--jobs", "4"],
        dir.path(),
        &[("CRATERE_UPSTREAM_SPARSE", up.url.as_str())],
    )
    .await;
    for c in clients {
        c.await.unwrap();
    }
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("0 failed"));
    for (n, b) in &crates {
        assert_eq!(
            &std::fs::read(proxy.crate_path(&crate_rel(n, "1.0.0"))).unwrap(),
            b
        );
        assert!(up.crate_hits(n, "1.0.0") <= 2, "{n}");
    }
    let temp_left: Vec<PathBuf> = std::fs::read_dir(dir.path().join("crates/.tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(temp_left.is_empty(), "{temp_left:?}");
}
