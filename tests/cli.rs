//! The binary itself: configuration errors, --help, and a real start, health check and
//! SIGTERM shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cratere");

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("CRATERE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn bad_settings_stop_startup_naming_the_variable() {
    for (var, value) in [
        ("CRATERE_PORT", "eighty"),
        ("CRATERE_SCHEME", "gopher"),
        ("CRATERE_ALTERNATE_HOSTS", "not json"),
        ("CRATERE_INDEX_TTL", "forever"),
        ("CRATERE_UPSTREAM_SPARSE", "not a url"),
        ("CRATERE_LISTEN", "localhost"),
        ("CRATERE_GIT_INDEX", "perhaps"),
        ("CRATERE_CLEANUP_CACHE_SCHEDULE", "nightly"),
        ("CRATERE_MAX_DAYS_UNUSED", "-3"),
        ("CRATERE_MAX_CACHE_SIZE", "a lot"),
        ("CRATERE_UPSTREAM_GIT", "ftp://example.com/index"),
        ("CRATERE_INDEX_UPDATE_SCHEDULE", "*/5 * *"),
    ] {
        let out = clean_env(&mut Command::new(BIN))
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}: {err}");
    }
}

#[test]
fn an_unusable_cache_directory_stops_startup_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = clean_env(&mut Command::new(BIN))
        .env("CRATERE_CACHE", file.join("sub"))
        .env("CRATERE_INDEX", dir.path().join("index"))
        .env("CRATERE_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CRATERE_CACHE"));
}

#[test]
fn help_documents_every_variable_with_its_default() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CRATERE_SCHEME",
        "CRATERE_HOST",
        "CRATERE_PORT",
        "CRATERE_CACHE",
        "CRATERE_INDEX",
        "CRATERE_ALTERNATE_HOSTS",
        "CRATERE_LISTEN",
        "CRATERE_UPSTREAM_SPARSE",
        "CRATERE_UPSTREAM_DL",
        "CRATERE_INDEX_TTL",
        "CRATERE_GIT_INDEX",
        "CRATERE_CLEANUP_CACHE_SCHEDULE",
        "CRATERE_MAX_DAYS_UNUSED",
        "CRATERE_MAX_CACHE_SIZE",
        "CRATERE_UPSTREAM_GIT",
        "CRATERE_INDEX_UPDATE_SCHEDULE",
    ] {
        assert!(
            help.contains(&format!("env: {var}=")),
            "{var} missing from --help"
        );
    }
    assert!(help.contains("[default: 8000]"));
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("env: CRATERE_PORT="));
    for sub in ["cleanup", "warm"] {
        let out = Command::new(BIN).args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("env: CRATERE_MAX_DAYS_UNUSED="),
            "{sub}: {help}"
        );
        assert!(help.contains("env: CRATERE_CACHE="), "{sub}: {help}");
    }
}

#[test]
fn serves_without_a_subcommand_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&[][..], &["serve"][..]] {
        let mut child = clean_env(&mut Command::new(BIN))
            .args(args)
            .env("CRATERE_LISTEN", "127.0.0.1:0")
            .env("CRATERE_CACHE", dir.path().join("crates"))
            .env("CRATERE_INDEX", dir.path().join("index"))
            .env("CRATERE_UPSTREAM_SPARSE", "http://127.0.0.1:9/")
            .env("CRATERE_UPSTREAM_GIT", "http://127.0.0.1:9/index.git")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("server exited early").unwrap();
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let body = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                reqwest::get(format!("http://{addr}/health"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            })
        })
        .join()
        .unwrap();
        assert_eq!(body.trim(), "ok");
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = child.wait().unwrap();
        assert!(status.success(), "{args:?}: {status:?}");
    }
}

/// A real server whose upstream trickles a 20 KB crate `name` (1 KB every 50 ms), with a
/// 20 s shutdown grace and `extra` settings; returns the crate's bytes with it.
fn server_with_a_slow_crate(
    up: &common::FakeUpstream,
    dir: &std::path::Path,
    name: &str,
    extra: &[(&str, String)],
) -> (bytes::Bytes, common::Running) {
    let bytes = up.publish(name, "1.0.0", 20_000);
    up.set_fault(
        common::Target::Crate,
        common::Fault::Trickle {
            piece: 1_000,
            pause: std::time::Duration::from_millis(50),
        },
    );
    let mut env = vec![
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        ("CRATERE_CACHE", dir.join("c").display().to_string()),
        ("CRATERE_INDEX", dir.join("i").display().to_string()),
        ("CRATERE_SHUTDOWN_GRACE", "20s".into()),
    ];
    env.extend(extra.iter().cloned());
    (bytes, common::spawn_server(&env))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_slow_download_finish_then_exits_zero() {
    let up = common::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bytes, mut server) = server_with_a_slow_crate(
        &up,
        dir.path(),
        "slowpoke",
        &[("CRATERE_LOG_FORMAT", "json".into())],
    );
    let mut resp = reqwest::get(format!(
        "http://{}/api/v1/crates/slowpoke/1.0.0/download",
        server.addr
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = resp.chunk().await.unwrap().unwrap().to_vec();
    // The download is under way: ask the server to stop.
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    while let Some(c) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got, bytes, "the download completed after SIGTERM");
    let (status, server) = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        (status, server)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");

    // JSON logs, with one access line for the download.
    let log = server.log.lock().unwrap().clone();
    let access: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "cratere::access")
        .collect();
    let dl = access
        .iter()
        .find(|v| v["path"] == "/api/v1/crates/slowpoke/1.0.0/download")
        .unwrap_or_else(|| panic!("no access line in {log:#?}"));
    assert_eq!(dl["method"], "GET");
    assert_eq!(dl["status"], 200);
    assert_eq!(dl["bytes"], 20_000);
    assert_eq!(dl["cache"], "miss");
    assert_eq!(dl["complete"], true);
    assert!(dl["duration_ms"].as_f64().unwrap() > 0.0);
}

/// The same drain for a connection that switched to HTTP/2 by `Upgrade: h2c` (curl's and
/// cargo's way on plain http): the upgraded connection is drained like any other.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_an_h2c_upgraded_download() {
    let up = common::FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (bytes, server) = server_with_a_slow_crate(&up, dir.path(), "slowh2", &[]);
    let out = dir.path().join("slowh2.crate");
    let curl = Command::new("curl")
        .args(["-sS", "-v", "--http2", "--no-buffer", "-o"])
        .arg(&out)
        .arg(format!(
            "http://{}/api/v1/crates/slowh2/1.0.0/download",
            server.addr
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first bytes to reach the client: the download is under way.
    let started = std::time::Instant::now();
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no bytes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (curl, status) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let curl = curl.wait_with_output().unwrap();
        (curl, server.child.wait().unwrap())
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&curl.stderr);
    assert!(curl.status.success(), "{log}");
    assert!(
        log.contains("< HTTP/2 200"),
        "the download went over h2c: {log}"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        bytes,
        "complete after SIGTERM"
    );
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_during_a_git_sync_that_hangs_upstream_exits_promptly() {
    // An upstream that accepts connections and never answers.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/index.git", upstream.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut child = clean_env(&mut Command::new(BIN))
        .env("CRATERE_LISTEN", "127.0.0.1:0")
        .env("CRATERE_CACHE", dir.path().join("crates"))
        .env("CRATERE_INDEX", dir.path().join("index"))
        .env("CRATERE_UPSTREAM_SPARSE", "http://127.0.0.1:9/")
        .env("CRATERE_UPSTREAM_GIT", &url)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The first sync starts at once; its `git fetch` connects and waits.
    let (conn, _) = upstream.accept().unwrap();
    let t0 = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    drop(conn);
}
