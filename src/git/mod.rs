//! The git index: a mirror of the upstream git index with `config.json` rewritten for each
//! public host ([`mirror`]), served over git smart HTTP through `git http-backend` ([`backend`]).
//!
//! Layout: ONE bare repository, `$CRATERE_INDEX/git/crates.io-index.git`, so every host shares
//! one object store (the crates.io index is well over 1 GB; the per-host part is one commit,
//! one root tree and one blob). Refs:
//!
//! - `refs/cratere/upstream`: upstream's head as last fetched (force-updated).
//! - `refs/namespaces/<ns>/refs/heads/master`: the host's commit: upstream's tree with that
//!   host's `config.json`, parent = upstream's head. `<ns>` is the host's `host[:port]`
//!   percent-encoded ([`namespace_of`]).
//! - `refs/namespaces/<ns>/HEAD`: symbolic ref to the master above.
//! - `refs/namespaces/<ns>/refs/cratere/previous`: the commit served before the last sync,
//!   hidden from clients, kept so that a protocol v0 client that saw the old ref
//!   advertisement can still fetch it (see [`mirror`]).
//!
//! `git http-backend` runs with `GIT_NAMESPACE=<ns>`, so each host sees only its own refs.
//! See docs/GIT_INDEX.md for the whole design.

pub mod backend;
mod mirror;
mod process;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{GitConfig, GitRemote};
use crate::hosts::PublicHosts;
use crate::jobs::{FirstRun, Schedule, spawn_scheduled};
use crate::storage::fs::LockFile;

/// Directory name of the mirror repository under `$CRATERE_INDEX/git/`.
pub const REPO_DIR: &str = "crates.io-index.git";

/// One public host's view of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// `scheme://authority`, as in the sparse config.json.
    pub base_url: String,
    /// Its git namespace.
    pub namespace: String,
    /// The bytes of its config.json.
    pub config_json: String,
}

impl HostView {
    pub fn new(base_url: &str) -> HostView {
        let authority = base_url
            .split_once("://")
            .map(|(_, a)| a)
            .unwrap_or(base_url);
        HostView {
            base_url: base_url.to_string(),
            namespace: namespace_of(authority),
            config_json: config_json(base_url),
        }
    }

    pub fn master_ref(&self) -> String {
        format!("refs/namespaces/{}/refs/heads/master", self.namespace)
    }

    pub fn head_ref(&self) -> String {
        format!("refs/namespaces/{}/HEAD", self.namespace)
    }

    pub fn previous_ref(&self) -> String {
        format!("refs/namespaces/{}/refs/cratere/previous", self.namespace)
    }
}

/// A host's `config.json`, formatted like crates.io's (pretty, `dl` first, final newline).
pub fn config_json(base_url: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    format!(
        "{{\n  \"dl\": {},\n  \"api\": {}\n}}\n",
        q(&format!("{base_url}/api/v1/crates")),
        q(base_url)
    )
}

/// The git namespace of a `host[:port]`: bytes other than `[a-z0-9-]` percent-encoded, which
/// is injective and always a valid ref component (no `:`, `[`, leading `.`, `.lock`, ...).
pub fn namespace_of(authority: &str) -> String {
    let mut out = String::with_capacity(authority.len());
    for b in authority.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What the last sync did, for /metrics and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Upstream's head commit after the fetch.
    pub upstream_head: String,
    /// Whether any host's served commit moved.
    pub changed: bool,
    /// Upstream's new head does not descend from the previous one (a squash).
    pub history_rewritten: bool,
    /// Unreachable objects were pruned in this sync.
    pub pruned: bool,
    /// Index files that changed upstream since the previous sync (0 after a squash, when
    /// the whole tree is new).
    pub files_changed: usize,
}

/// Told the index files (`se/rd/serde`) that changed upstream in a sync.
pub type FilesChanged = Arc<dyn Fn(Vec<String>) + Send + Sync>;

/// One sync attempt.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub started: DateTime<Utc>,
    pub duration: Duration,
    /// The report, or the error (logged in full; this is its one-line form).
    pub result: Result<SyncReport, String>,
}

/// The mirror's state, published on a watch channel.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    /// Every host's refs are published: set by a successful sync, or at the start of the first
    /// sync when the mirror on disk already serves every host's current config.json.
    pub ready: bool,
    /// A sync is running.
    pub running: bool,
    /// The last attempt.
    pub last: Option<SyncRecord>,
    /// The last successful attempt.
    pub last_success: Option<SyncRecord>,
    pub attempts: u64,
    pub failures: u64,
}

/// Why the git index cannot answer a request.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// Before the first sync has published every host's refs.
    #[error(
        "the git index is not ready: the first sync from upstream has not completed yet; \
         use the sparse index at /index/ meanwhile"
    )]
    NotReady { retry_after_secs: u64 },
    /// [`GitConfig::git_max_processes`] backends are running.
    #[error("too many git requests at once (CRATERE_GIT_MAX_PROCESSES); try again shortly")]
    Busy { retry_after_secs: u64 },
    #[error("bad request: {0}")]
    BadRequest(String),
    /// `git http-backend` could not be started or answered nonsense.
    #[error("{0}")]
    Backend(String),
}

/// The git index mirror and its server side.
pub struct GitIndex {
    /// `$CRATERE_INDEX/git`: `GIT_PROJECT_ROOT` for http-backend, home of the sync lock.
    root: PathBuf,
    /// The bare repository.
    repo: PathBuf,
    upstream: GitRemote,
    schedule: Schedule,
    /// Primary first.
    hosts: Vec<HostView>,
    /// Held for a whole sync: syncs never overlap, whoever starts them. Holds the lock file
    /// against other processes once a sync has opened it.
    sync_lock: tokio::sync::Mutex<Option<LockFile>>,
    status: watch::Sender<SyncStatus>,
    /// Process ids of running `git http-backend`s.
    backends: Arc<Mutex<HashSet<u32>>>,
    /// One permit per running backend (`CRATERE_GIT_MAX_PROCESSES`).
    processes: Arc<tokio::sync::Semaphore>,
    /// `CRATERE_GIT_BODY_TIMEOUT`, `CRATERE_GIT_MAX_BODY`.
    body_timeout: Duration,
    max_body: u64,
    /// `CRATERE_GIT_SEND_TIMEOUT`.
    send_timeout: Duration,
    /// How often each of those limits ended a request.
    limits: Arc<LimitCounts>,
    /// Set by the server: refreshes the sparse files a sync found changed.
    on_files_changed: std::sync::OnceLock<FilesChanged>,
}

/// How often a git request was refused or cut off, by limit (for `/metrics`).
#[derive(Debug, Default)]
pub struct LimitCounts {
    /// Refused with 503: `CRATERE_GIT_MAX_PROCESSES` backends were running.
    pub busy: AtomicU64,
    /// Request body cut off beyond `CRATERE_GIT_MAX_BODY` (counted after gzip inflation).
    pub body_too_large: AtomicU64,
    /// Request body cut off after `CRATERE_GIT_BODY_TIMEOUT`.
    pub body_too_slow: AtomicU64,
    /// git killed: the client left its answer unread for `CRATERE_GIT_SEND_TIMEOUT`.
    pub client_stopped_reading: AtomicU64,
}

impl LimitCounts {
    /// (label, count) of each limit.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("busy", get(&self.busy)),
            ("body_too_large", get(&self.body_too_large)),
            ("body_too_slow", get(&self.body_too_slow)),
            ("client_stopped_reading", get(&self.client_stopped_reading)),
        ]
    }

    pub(crate) fn hit(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl GitIndex {
    /// The mirror under `$CRATERE_INDEX/git` (`index_dir`), for these hosts.
    pub fn new(config: &GitConfig, index_dir: &Path, hosts: &PublicHosts) -> GitIndex {
        let root = index_dir.join("git");
        GitIndex {
            repo: root.join(REPO_DIR),
            root,
            upstream: config.upstream_git.clone(),
            schedule: config.index_update_schedule.clone(),
            hosts: hosts
                .all_base_urls()
                .iter()
                .map(|b| HostView::new(b))
                .collect(),
            sync_lock: tokio::sync::Mutex::new(None),
            status: watch::channel(SyncStatus::default()).0,
            backends: Arc::new(Mutex::new(HashSet::new())),
            processes: Arc::new(tokio::sync::Semaphore::new(config.git_max_processes)),
            body_timeout: config.git_body_timeout,
            max_body: config.git_max_body,
            send_timeout: config.git_send_timeout,
            limits: Arc::default(),
            on_files_changed: std::sync::OnceLock::new(),
        }
    }

    /// The bare mirror repository.
    pub fn repo_path(&self) -> &Path {
        &self.repo
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn hosts(&self) -> &[HostView] {
        &self.hosts
    }

    /// The view of the host with this base URL (from [`PublicHosts::base_url_for`]), or the
    /// primary's.
    pub fn host(&self, base_url: &str) -> &HostView {
        self.hosts
            .iter()
            .find(|h| h.base_url == base_url)
            .unwrap_or(&self.hosts[0])
    }

    /// The current status.
    pub fn status(&self) -> SyncStatus {
        self.status.borrow().clone()
    }

    /// Status updates (tests wait on these instead of sleeping).
    pub fn subscribe(&self) -> watch::Receiver<SyncStatus> {
        self.status.subscribe()
    }

    /// Calls `hook` after each sync with the index files that changed upstream (at most
    /// once: the first hook set stays).
    pub fn on_files_changed(&self, hook: FilesChanged) {
        let _ = self.on_files_changed.set(hook);
    }

    /// How often git requests met each limit since start.
    pub fn limits(&self) -> &LimitCounts {
        &self.limits
    }

    /// Counts a request refused for being one too many (here or per connection).
    pub fn count_busy(&self) {
        LimitCounts::hit(&self.limits.busy);
    }

    /// Process ids of the `git http-backend`s serving requests right now.
    pub fn running_backends(&self) -> Vec<u32> {
        self.backends.lock().unwrap().iter().copied().collect()
    }

    /// `Ok` once the mirror serves every host (see [`SyncStatus::ready`]).
    pub fn check_ready(&self) -> Result<(), GitError> {
        if self.status.borrow().ready {
            Ok(())
        } else {
            Err(GitError::NotReady {
                retry_after_secs: self.retry_after_secs(),
            })
        }
    }

    /// Seconds a client should wait before retrying while the mirror is not ready: until the
    /// next scheduled sync, within 5 s..5 min.
    pub fn retry_after_secs(&self) -> u64 {
        let now = Utc::now();
        self.schedule
            .next_after(now)
            .map(|t| (t - now).num_seconds())
            .unwrap_or(60)
            .clamp(5, 300) as u64
    }
}

/// The sync job: at startup, then on `CRATERE_INDEX_UPDATE_SCHEDULE`. Shutdown does not wait
/// for a long fetch: dropping the sync kills git.
pub fn spawn_sync(git: Arc<GitIndex>, jobs: &TaskTracker, shutdown: &CancellationToken) {
    let token = shutdown.clone();
    let schedule = git.schedule().clone();
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "git-index-sync",
        schedule,
        FirstRun::Immediately,
        move || {
            let (git, token) = (git.clone(), token.clone());
            async move {
                tokio::select! {
                    res = git.sync() => res.map(|_| ()),
                    _ = token.cancelled() => Ok(()),
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_valid_and_distinct() {
        assert_eq!(namespace_of("localhost:8000"), "localhost%3A8000");
        assert_eq!(namespace_of("alt.example"), "alt%2Eexample");
        let names = [
            "a:80",
            "a_80",
            "a%3A80",
            "[::1]:8000",
            "x.lock",
            ".a",
            "a..b",
            "b.",
        ];
        let encoded: HashSet<String> = names.iter().map(|n| namespace_of(n)).collect();
        assert_eq!(encoded.len(), names.len());
        for ns in &encoded {
            let out = std::process::Command::new("git")
                .args(["check-ref-format", &format!("refs/namespaces/{ns}/HEAD")])
                .status()
                .unwrap();
            assert!(out.success(), "{ns}");
        }
    }

    #[test]
    fn config_json_is_like_crates_ios() {
        let c = config_json("http://proxy.example:8000");
        assert_eq!(
            c,
            "{\n  \"dl\": \"http://proxy.example:8000/api/v1/crates\",\n  \"api\": \"http://proxy.example:8000\"\n}\n"
        );
        let v: serde_json::Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["dl"], "http://proxy.example:8000/api/v1/crates");
        let h = HostView::new("https://mirror.internal");
        assert_eq!(h.namespace, "mirror%2Einternal");
        assert_eq!(
            h.master_ref(),
            "refs/namespaces/mirror%2Einternal/refs/heads/master"
        );
    }
}
