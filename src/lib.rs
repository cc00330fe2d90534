//! Cratere: a caching proxy for crates.io.
//!
//! Dependencies point one way: [`commands`] → [`server`] → [`http`] → services ([`core`],
//! [`index_cache`], [`downloads`], [`search`], [`git`], [`warm`], [`cleanup`], [`usage`]) →
//! [`storage`] and [`upstream`] → [`names`]. `scripts/module-cycles.py` checks it.
//!
//! Module map:
//! - [`commands`]: `serve` (bind, signals), `cleanup` and `warm`, each building what it uses.
//! - [`config`]: every option, as a CLI flag and a `CRATERE_*` variable.
//! - [`core`]: the stores, usage, cleanup, upstream client, index cache and downloads, built
//!   once from the settings.
//! - [`server`]: `run(listener, state, shutdown)`: hyper with header limits, timeouts, TLS,
//!   h2c and graceful drain.
//! - [`h2c`]: the `Upgrade: h2c` switch to HTTP/2 on plain connections.
//! - [`sendfile`]: zero-copy crate hits on plain HTTP/1.1 connections.
//! - [`http`]: the router, its state and every route; the one error→status mapping.
//! - [`hosts`]: the public URLs (primary and alternate hosts).
//! - [`names`]: crate names, versions, index paths and crate keys as types (the only way input
//!   becomes a path or a key).
//! - [`upstream`]: the one HTTP client to upstream, its breaker and health probe.
//! - [`storage`]: files on disk, written through temp files and atomic renames; crate files
//!   on disk or in an S3-compatible bucket shared by several replicas.
//! - [`index_cache`]: cached index files: freshness, revalidation, stale serving.
//! - [`downloads`]: hits, coalesced streaming misses, verification.
//! - [`git`]: the git index mirror (sync job) and `git http-backend` driving.
//! - [`search`]: `cargo search` relayed upstream (rate-limited, cached) or answered locally.
//! - [`warm`]: fills the cache from Cargo.lock files.
//! - [`usage`]: last use of every cached file, recorded in batches.
//! - [`cleanup`]: removes unused files and keeps the cache under its size cap.
//! - [`jobs`]: cron schedules and the helper that runs background jobs on them.
//! - [`clock`]: the wall clock, injectable so tests control time.
//! - [`singleflight`]: one computation for concurrent callers of one key.
//! - [`metrics`]: Prometheus metrics owned by the core.
//! - [`telemetry`]: logging setup.

pub mod cleanup;
pub mod clock;
pub mod commands;
pub mod config;
pub mod core;
pub mod downloads;
pub mod git;
mod h2c;
pub mod hosts;
pub mod http;
pub mod index_cache;
pub mod jobs;
pub mod metrics;
pub mod names;
pub mod search;
pub mod sendfile;
pub mod server;
mod singleflight;
pub mod storage;
pub mod telemetry;
pub mod upstream;
pub mod usage;
mod warm;
