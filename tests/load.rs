//! Load: 500 concurrent connections (wrk) on cached crates and index files, then the same
//! while misses stream from a slow upstream; zero errors, and the server's memory stays
//! bounded. Duration per phase: CRATERE_LOAD_SECS (default 30). Prints the figures that
//! docs/RELIABILITY.md records.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{FakeUpstream, Fault, Target};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[derive(Debug)]
struct WrkResult {
    requests: u64,
    rps: f64,
    errors: String,
}

/// Runs wrk with 500 connections over `paths` (chosen at random per request).
fn wrk(base: &str, paths: &[String], secs: u64, dir: &std::path::Path) -> WrkResult {
    let script = dir.join("paths.lua");
    let list = paths
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(
        &script,
        format!(
            "local paths = {{{list}}}\nmath.randomseed(os.time())\n\
             request = function() return wrk.format(\"GET\", paths[math.random(#paths)]) end\n"
        ),
    )
    .unwrap();
    let out = Command::new("wrk")
        .args(["-t", "2", "-c", "500", "--timeout", "30s", "-d"])
        .arg(format!("{secs}s"))
        .arg("-s")
        .arg(&script)
        .arg(base)
        .output()
        .expect("wrk is installed (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .collect::<Vec<_>>()
        .join("\n");
    WrkResult {
        requests,
        rps,
        errors,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_connections_without_errors_and_bounded_memory() {
    let secs: u64 = std::env::var("CRATERE_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let up = FakeUpstream::start().await;
    let mut crates = Vec::new();
    let mut index = Vec::new();
    for i in 0..50 {
        let name = format!("load{i:02}");
        up.publish(&name, "1.0.0", 20_000 + i * 1_000);
        crates.push(format!("/api/v1/crates/{name}/1.0.0/download"));
        index.push(format!("/index/lo/ad/{name}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_server(&[
        ("CRATERE_UPSTREAM_SPARSE", up.url.clone()),
        (
            "CRATERE_CACHE",
            dir.path().join("crates").display().to_string(),
        ),
        (
            "CRATERE_INDEX",
            dir.path().join("index").display().to_string(),
        ),
        ("RUST_LOG", "warn,cratere=info,cratere::access=warn".into()),
        ("CRATERE_INDEX_TTL", "1h".into()),
    ]);
    let base = format!("http://{}", server.addr);
    let client = common::client();
    for p in crates.iter().chain(&index) {
        let r = client.get(format!("{base}{p}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let pid = server.child.id();
    let idle = rss_kib(pid);

    // Phase 1: cached crates and index files only.
    let (b, paths, d) = (
        base.clone(),
        [crates.clone(), index.clone()].concat(),
        dir.path().to_path_buf(),
    );
    let sampler = tokio::spawn(peak_rss(pid));
    let hits = tokio::task::spawn_blocking(move || wrk(&b, &paths, secs, &d))
        .await
        .unwrap();
    let peak_hits = sampler.await.unwrap();
    assert!(hits.errors.is_empty(), "errors under load: {}", hits.errors);
    assert_eq!(
        up.total_hits(),
        100 + 1,
        "all served from the cache (+ config.json)"
    );

    // Phase 2: the same, while misses stream from a slow upstream.
    up.set_fault(
        Target::Crate,
        Fault::Trickle {
            piece: 4_000,
            pause: Duration::from_millis(20),
        },
    );
    let mut mixed = [crates.clone(), index.clone()].concat();
    for i in 0..200 {
        let name = format!("miss{i:03}");
        up.publish(&name, "1.0.0", 40_000);
        mixed.push(format!("/api/v1/crates/{name}/1.0.0/download"));
    }
    let (b, d) = (base.clone(), dir.path().to_path_buf());
    let sampler = tokio::spawn(peak_rss(pid));
    let misses = tokio::task::spawn_blocking(move || wrk(&b, &mixed, secs, &d))
        .await
        .unwrap();
    let peak_misses = sampler.await.unwrap();
    assert!(
        misses.errors.is_empty(),
        "errors under load: {}",
        misses.errors
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // let the process settle before sampling
    let after = rss_kib(pid);

    println!(
        "LOAD RESULTS ({secs} s per phase, 500 connections)\n\
         cached only:        {} requests, {:.0} req/s, 0 errors, peak RSS {} MiB\n\
         with slow misses:   {} requests, {:.0} req/s, 0 errors, peak RSS {} MiB\n\
         RSS idle {} MiB, after load {} MiB",
        hits.requests,
        hits.rps,
        peak_hits / 1024,
        misses.requests,
        misses.rps,
        peak_misses / 1024,
        idle / 1024,
        after / 1024
    );
    // Bounded: no growth with the number of requests served (hundreds of thousands).
    assert!(
        peak_hits.max(peak_misses) < 512 * 1024,
        "peak RSS {} KiB",
        peak_hits.max(peak_misses)
    );
    server.kill_hard();
}

/// Highest RSS seen while sampling every 100 ms for as long as the process is busy (until
/// the caller awaits the handle after the load ends).
async fn peak_rss(pid: u32) -> u64 {
    let mut peak = 0;
    let mut quiet = 0;
    let mut last_cpu = cpu_ticks(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
        let cpu = cpu_ticks(pid);
        // Stop after ~1 s without CPU use: the load is over.
        if cpu == last_cpu {
            quiet += 1;
            if quiet >= 10 {
                return peak;
            }
        } else {
            quiet = 0;
        }
        last_cpu = cpu;
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
