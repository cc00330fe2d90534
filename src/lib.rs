//! Cratere: a caching proxy for crates.io.
//!
//! Module map:
//! - [`config`]: every option, as a CLI flag and a `CRATERE_*` variable.
//! - [`app`]: shared state, the router, the server loop and shutdown.
//! - [`names`]: crate names, versions and index paths as types (the only way input becomes a
//!   path or a key).
//! - [`upstream`]: the one HTTP client to upstream.
//! - [`storage`]: files on disk, written through temp files and atomic renames; crate files
//!   on disk or in an S3-compatible bucket shared by several replicas.
//! - [`index_cache`]: cached index files: freshness, revalidation, stale serving.
//! - [`sparse`]: sparse index routes and the proxy's own config.json.
//! - [`downloads`]: the crate route: hits, coalesced streaming misses, verification.
//! - [`git`]: the git index mirror (sync job) and its smart-HTTP server.
//! - [`jobs`]: cron schedules and the helper that runs background jobs on them.
//! - [`search`]: `cargo search` relayed upstream (rate-limited, cached) or answered locally.
//! - [`server`]: the accept loop: hyper with header limits, timeouts and graceful drain.
//! - [`clock`]: the wall clock, injectable so tests control time.
//! - [`usage`]: last use of every cached file, recorded in batches.
//! - [`cleanup`]: removes unused files and keeps the cache under its size cap.
//! - [`warm`]: fills the cache from Cargo.lock files (`cratere warm`).
//! - [`singleflight`]: one computation for concurrent callers of one key.
//! - [`metrics`]: Prometheus metrics owned by the app.
//! - [`error`]: the HTTP-edge error type.
//! - [`status`]: the status page at `/`.
//! - [`telemetry`]: logging setup and the access log.

pub mod app;
pub mod cleanup;
pub mod clock;
pub mod config;
pub mod downloads;
pub mod error;
pub mod git;
pub mod h2c;
pub mod index_cache;
pub mod jobs;
pub mod metrics;
pub mod names;
pub mod search;
pub mod sendfile;
pub mod server;
pub mod singleflight;
pub mod sparse;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod upstream;
pub mod usage;
pub mod warm;
