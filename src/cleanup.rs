//! Cache cleanup: one pass ([`Cleanup::run_once`]) removes crate files and index files not
//! used for `CRATERE_MAX_DAYS_UNUSED`, then, if `CRATERE_MAX_CACHE_SIZE` is set, the least
//! recently used crate files until the rest fits. The server runs it on
//! `CRATERE_CLEANUP_CACHE_SCHEDULE`; `cratere cleanup` runs it once from the command line.
//!
//! Safety with a live server on the same directories:
//! - Only finished files are candidates: the `.tmp/` directories of files being written (and
//!   every other dot-entry: markers, the lock file) are never looked at, and `config.json`
//!   of the index cache is never removed.
//! - A file is re-checked just before it is removed: if it was used since the scan (a use
//!   recorded in this process, or a newer last-use time on disk from another process) it is
//!   kept. A response already streaming a file keeps its open descriptor, which an unlink does
//!   not disturb. A file removed anyway is simply fetched again on its next request.
//! - Passes never overlap, across processes too: each holds an exclusive `flock` on
//!   `$CRATERE_CACHE/.cleanup.lock` (with S3 storage: the fleet-wide lease object of
//!   [`crate::storage::s3::Lease`]); a pass that cannot take it does nothing and says so.
//!   A dry run changes nothing and takes no lock.
//! - With S3 storage, crates are kept [`CrateStore::use_slack`] longer than the age limit:
//!   replicas record uses at a coarser grain there, and a few seconds late.
//!
//! Empty directories are left in place: removing one could race with a download creating
//! its file there.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::jobs::{FirstRun, Schedule, spawn_scheduled};
use crate::metrics::Metrics;

use crate::config::CleanupConfig;
use crate::names::IndexPath;
use crate::storage::fs::LockFile;
use crate::storage::{CleanupLease, CrateInfo, CrateStore, list_files};
use crate::usage::{Usage, Use};

/// Name of the lock file in the crate cache.
pub const LOCK_FILE: &str = ".cleanup.lock";

/// What a pass removes.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Files not used for this long are removed.
    pub max_unused: Duration,
    /// Then the least recently used crate files are removed until their total size fits.
    pub max_size: Option<u64>,
}

impl Rules {
    pub fn from_config(c: &CleanupConfig) -> Rules {
        Rules {
            max_unused: c.max_unused,
            max_size: c.max_cache_size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Crate,
    Index,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Not used for the configured time.
    Unused,
    /// Among the least recently used while the cache was over its size cap.
    OverSize,
}

/// One file a pass removed (or, in a dry run, would remove).
#[derive(Debug, Clone)]
pub struct Removal {
    pub kind: FileKind,
    /// Path relative to its cache directory.
    pub rel: String,
    pub bytes: u64,
    pub last_use: SystemTime,
    pub reason: Reason,
}

/// The numbers of one pass, kept in [`Cleanup::last`] for metrics.
#[derive(Debug, Clone)]
pub struct CleanupReport {
    /// When the pass started (by the injected clock).
    pub at: SystemTime,
    pub duration: Duration,
    pub dry_run: bool,
    pub crate_files_removed: u64,
    pub crate_bytes_removed: u64,
    pub index_files_removed: u64,
    pub index_bytes_removed: u64,
    /// Crate files left in the cache, and their size.
    pub crate_files_kept: u64,
    pub crate_bytes_kept: u64,
    /// Candidates kept because they were used between the scan and their removal.
    pub skipped_in_use: u64,
    /// Files that could not be removed (logged).
    pub errors: u64,
    /// Crate files were not examined: another replica held the bucket's cleanup lease, or
    /// the bucket cannot hold one and this replica is not the cleanup leader (the crate
    /// figures are then zero).
    pub crates_skipped: bool,
}

/// A finished pass.
#[derive(Debug, Clone)]
pub struct Pass {
    pub report: CleanupReport,
    pub removed: Vec<Removal>,
}

/// What became of a crate a pass meant to remove.
enum Candidate {
    Removed,
    /// Someone else removed it meanwhile.
    Gone,
    /// Used since the scan, or it could not be checked or removed (counted in the report).
    Kept,
}

#[derive(Debug)]
pub enum Outcome {
    Done(Pass),
    /// Another pass (in this or another process) holds the lock; nothing was done.
    Busy,
}

pub struct Cleanup {
    crates: CrateStore,
    index_root: PathBuf,
    usage: Arc<Usage>,
    rules: Rules,
    last: Mutex<Option<CleanupReport>>,
    /// One pass at a time in this process, and the lock file against other processes,
    /// opened by the first pass and kept open (see [`LockFile`]).
    running: tokio::sync::Mutex<Option<LockFile>>,
}

impl Cleanup {
    /// A cleaner of the crate store and the sparse index cache at `index_root`
    /// (`$CRATERE_INDEX/sparse`).
    pub fn new(crates: CrateStore, index_root: &Path, usage: Arc<Usage>, rules: Rules) -> Cleanup {
        Cleanup {
            crates,
            index_root: index_root.to_path_buf(),
            usage,
            rules,
            last: Mutex::default(),
            running: tokio::sync::Mutex::new(None),
        }
    }

    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// The report of the last pass that was not a dry run.
    pub fn last(&self) -> Option<CleanupReport> {
        self.last.lock().expect("lock poisoned").clone()
    }

    /// One pass. `stop` ends it early (between two files) at shutdown.
    pub async fn run_once(
        self: &Arc<Self>,
        dry_run: bool,
        stop: &CancellationToken,
    ) -> anyhow::Result<Outcome> {
        // The local lock: the whole cache on disk, this replica's index cache with S3.
        let mut running = None;
        let mut local = None;
        if !dry_run {
            let Ok(guard) = self.running.try_lock() else {
                tracing::info!("cleanup skipped: another cleanup is running in this process");
                return Ok(Outcome::Busy);
            };
            let guard = running.insert(guard);
            if guard.is_none() {
                **guard = Some(LockFile::open(&self.crates.local().root().join(LOCK_FILE))?);
            }
            match guard.as_ref().expect("opened").try_lock()? {
                Some(held) => local = Some(held),
                None => {
                    tracing::info!("cleanup skipped: another cleanup is running on this cache");
                    return Ok(Outcome::Busy);
                }
            }
        }
        // A cache from before usage tracking that the server is still adopting in the
        // background: adopt it first, so no file's old mtime is taken for its last use.
        if !dry_run && !self.usage.is_tracked() {
            let usage = self.usage.clone();
            tokio::task::spawn_blocking(move || usage.adopt_untracked())
                .await
                .map_err(|e| anyhow::anyhow!("adopting the cache: {e}"))??;
        }
        // The bucket's lease. Held by another replica, that replica cleans the crates; this
        // one still cleans its own index cache.
        let lease = if dry_run {
            CleanupLease::Local
        } else {
            self.crates
                .cleanup_lease(self.usage.clock().clone(), stop)
                .await?
        };
        match lease {
            CleanupLease::HeldElsewhere => tracing::info!(
                "another replica is cleaning the bucket: only the local index cache is cleaned"
            ),
            CleanupLease::NotLeader => tracing::warn!(
                "the bucket cannot hold the cleanup lease and this replica is not the cleanup \
                 leader (CRATERE_CLEANUP_LEADER): only the local index cache is cleaned"
            ),
            CleanupLease::Leader => tracing::warn!(
                "the bucket cannot hold the cleanup lease: cleaning its crates as the \
                 configured cleanup leader, without a lease"
            ),
            CleanupLease::Local | CleanupLease::Held(_) => {}
        }
        let crates = !matches!(lease, CleanupLease::HeldElsewhere | CleanupLease::NotLeader);
        let stop = match &lease {
            CleanupLease::Held(lease) => lease.stop().clone(),
            _ => stop.clone(),
        };
        // Uses recorded in this process count before anything is judged.
        self.usage.flush().await;
        let pass = self.pass(dry_run, crates, &stop).await;
        if let CleanupLease::Held(lease) = lease {
            lease.release().await;
        }
        drop(local);
        drop(running);
        let pass = pass?;
        let r = &pass.report;
        tracing::info!(
            dry_run,
            crate_files_removed = r.crate_files_removed,
            crate_bytes_removed = r.crate_bytes_removed,
            index_files_removed = r.index_files_removed,
            index_bytes_removed = r.index_bytes_removed,
            crate_files_kept = r.crate_files_kept,
            crate_bytes_kept = r.crate_bytes_kept,
            skipped_in_use = r.skipped_in_use,
            errors = r.errors,
            duration_ms = r.duration.as_millis() as u64,
            "cleanup finished"
        );
        if !dry_run {
            *self.last.lock().expect("lock poisoned") = Some(pass.report.clone());
        }
        Ok(Outcome::Done(pass))
    }

    /// A pass over the crate store (unless `crates` is false) and the index cache.
    async fn pass(
        self: &Arc<Self>,
        dry_run: bool,
        crates: bool,
        stop: &CancellationToken,
    ) -> anyhow::Result<Pass> {
        let started = Instant::now();
        let now = self.usage.now();
        let cutoff = now
            .checked_sub(self.rules.max_unused)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut report = CleanupReport {
            at: now,
            duration: Duration::ZERO,
            dry_run,
            crate_files_removed: 0,
            crate_bytes_removed: 0,
            index_files_removed: 0,
            index_bytes_removed: 0,
            crate_files_kept: 0,
            crate_bytes_kept: 0,
            skipped_in_use: 0,
            errors: 0,
            crates_skipped: !crates,
        };
        let mut removed = Vec::new();
        if crates {
            self.crates_pass(dry_run, stop, now, cutoff, &mut report, &mut removed)
                .await
                .with_context(|| format!("cleaning {}", self.crates.describe()))?;
        }
        let (this, stop) = (self.clone(), stop.clone());
        let (report, removed) = tokio::task::spawn_blocking(move || {
            this.index_pass(dry_run, &stop, now, cutoff, &mut report, &mut removed)
                .with_context(|| format!("cleaning {}", this.index_root.display()))
                .map(|()| (report, removed))
        })
        .await
        .context("cleanup task failed")??;
        let mut report = report;
        report.duration = started.elapsed();
        Ok(Pass { report, removed })
    }

    async fn crates_pass(
        &self,
        dry_run: bool,
        stop: &CancellationToken,
        now: SystemTime,
        cutoff: SystemTime,
        report: &mut CleanupReport,
        removed: &mut Vec<Removal>,
    ) -> io::Result<()> {
        // Without the marker (only possible in a dry run: everything else adopts the cache
        // first) no mtime is a last-use time yet, and every file counts as used now.
        let tracked = self.usage.is_tracked();
        let cutoff = cutoff
            .checked_sub(self.crates.use_slack(crate::usage::FLUSH_INTERVAL))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut files: Vec<_> = self
            .crates
            .list()
            .await?
            .into_iter()
            .map(|f| {
                let last_use = if tracked { f.last_use } else { now };
                (last_use, f)
            })
            .collect();
        files.sort_by_cached_key(|(last_use, f)| (*last_use, f.key.as_relative()));
        let mut kept_files = files.len() as u64;
        let mut kept_bytes: u64 = files.iter().map(|(_, f)| f.len).sum();
        for (last_use, f) in files {
            if stop.is_cancelled() {
                break;
            }
            let reason = if last_use < cutoff {
                Reason::Unused
            } else if self.rules.max_size.is_some_and(|max| kept_bytes > max) {
                Reason::OverSize
            } else {
                break; // sorted oldest first: every later file is newer and fits
            };
            if !dry_run {
                match self.remove_if_unused(&f, report).await {
                    Candidate::Removed => {}
                    Candidate::Gone => {
                        kept_files -= 1;
                        kept_bytes -= f.len;
                        continue;
                    }
                    Candidate::Kept => continue,
                }
            }
            kept_files -= 1;
            kept_bytes -= f.len;
            report.crate_files_removed += 1;
            report.crate_bytes_removed += f.len;
            removed.push(Removal {
                kind: FileKind::Crate,
                rel: f.key.as_relative(),
                bytes: f.len,
                last_use,
                reason,
            });
        }
        report.crate_files_kept = kept_files;
        report.crate_bytes_kept = kept_bytes;
        if !dry_run && !stop.is_cancelled() {
            match self.crates.prune_after_cleanup(cutoff).await {
                Ok(n) => tracing::debug!(records = n, "superseded usage records removed"),
                Err(e) => tracing::warn!(error = %e, "cannot prune usage records"),
            }
        }
        Ok(())
    }

    /// Removes a crate the scan found unused, unless a use was recorded since (in this
    /// process, or by any process or replica) or it cannot be checked.
    async fn remove_if_unused(&self, f: &CrateInfo, report: &mut CleanupReport) -> Candidate {
        if self.usage.pending(&Use::Crate(f.key.clone())).is_some() {
            report.skipped_in_use += 1;
            return Candidate::Kept;
        }
        match self.crates.last_use(&f.key).await {
            Ok(Some(t)) if t == f.last_use => {}
            Ok(Some(_)) => {
                report.skipped_in_use += 1;
                return Candidate::Kept;
            }
            Ok(None) => return Candidate::Gone,
            Err(e) => {
                report.errors += 1;
                tracing::warn!(file = %f.key, error = %e, "cannot check a crate file");
                return Candidate::Kept;
            }
        }
        match self.crates.remove(&f.key).await {
            Ok(true) => Candidate::Removed,
            Ok(false) => Candidate::Gone,
            Err(e) => {
                report.errors += 1;
                tracing::warn!(file = %f.key, error = %e, "cannot remove a crate file");
                Candidate::Kept
            }
        }
    }

    fn index_pass(
        &self,
        dry_run: bool,
        stop: &CancellationToken,
        now: SystemTime,
        cutoff: SystemTime,
        report: &mut CleanupReport,
        removed: &mut Vec<Removal>,
    ) -> io::Result<()> {
        for f in list_files(&self.index_root)? {
            if stop.is_cancelled() {
                return Ok(());
            }
            // Only crates' index files; upstream's config.json is needed as long as the
            // cache is.
            let Ok(path) = f.rel.parse::<IndexPath>() else {
                continue;
            };
            let last_use = match self.usage.index_last_use(&path)? {
                Some(t) => t,
                None => {
                    if !dry_run {
                        self.usage.mark_index(&path, now)?;
                    }
                    now
                }
            };
            if last_use >= cutoff {
                continue;
            }
            if !dry_run {
                if self.usage.pending(&Use::Index(path.clone())).is_some()
                    || self.usage.index_last_use(&path)? != Some(last_use)
                {
                    report.skipped_in_use += 1;
                    continue;
                }
                let file = self.index_root.join(&f.rel);
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        report.errors += 1;
                        tracing::warn!(path = %file.display(), error = %e, "cannot remove an index file");
                        continue;
                    }
                }
                self.usage.remove_index_mark(&path)?;
            }
            report.index_files_removed += 1;
            report.index_bytes_removed += f.len;
            removed.push(Removal {
                kind: FileKind::Index,
                rel: f.rel,
                bytes: f.len,
                last_use,
                reason: Reason::Unused,
            });
        }
        // Marks whose index file is gone (upstream deleted the crate, or a crash between the
        // two removals above) go once they are old.
        if !dry_run {
            for m in list_files(&self.usage.index_marks_root())? {
                if let Ok(path) = m.rel.parse::<IndexPath>()
                    && m.modified < cutoff
                    && !self.index_root.join(&m.rel).exists()
                {
                    self.usage.remove_index_mark(&path)?;
                }
            }
        }
        Ok(())
    }
}

/// The jobs of the cache lifecycle: the crate cache's size for `/metrics` and the status
/// page (a walk at startup and every 10 minutes, in the background, so startup does not grow
/// with the cache; stores in between are added as they happen), and the scheduled cleanup.
pub fn spawn_jobs(
    cleanup: Arc<Cleanup>,
    metrics: Arc<Metrics>,
    schedule: Option<Schedule>,
    jobs: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let (crates, m, stop) = (cleanup.crates.clone(), metrics.clone(), shutdown.clone());
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "cache-size",
        "*/10 * * * *".parse().expect("valid schedule"),
        FirstRun::Immediately,
        move || {
            let (crates, metrics, stop) = (crates.clone(), m.clone(), stop.clone());
            async move {
                // Shutdown does not wait for a walk of a big cache.
                let listed = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    listed = crates.list() => listed?,
                };
                let bytes = listed.iter().map(|c| c.len).sum();
                metrics.set_cache_size(listed.len() as u64, bytes);
                Ok(())
            }
        },
    );
    let Some(schedule) = schedule else { return };
    let stop = shutdown.clone();
    spawn_scheduled(
        jobs,
        shutdown.clone(),
        "cleanup",
        schedule,
        FirstRun::OnSchedule,
        move || {
            let (cleanup, stop, metrics) = (cleanup.clone(), stop.clone(), metrics.clone());
            async move {
                if let Outcome::Done(pass) = cleanup.run_once(false, &stop).await? {
                    // The pass counted what is left: exact figures for the gauges.
                    let r = &pass.report;
                    if !r.crates_skipped {
                        metrics.set_cache_size(r.crate_files_kept, r.crate_bytes_kept);
                    }
                }
                Ok(())
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, FakeClock, days};

    struct Fixture {
        dir: tempfile::TempDir,
        clock: Arc<FakeClock>,
        usage: Arc<Usage>,
        crates: CrateStore,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("crates/.tmp")).unwrap();
            std::fs::create_dir_all(dir.path().join("sparse/.tmp")).unwrap();
            let clock = Arc::new(FakeClock::new());
            let crates =
                CrateStore::Fs(crate::storage::FsStore::open(&dir.path().join("crates")).unwrap());
            let usage = Arc::new(Usage::new(
                crates.clone(),
                &dir.path().join("sparse"),
                clock.clone(),
            ));
            usage.adopt_untracked().unwrap();
            Fixture {
                dir,
                clock,
                usage,
                crates,
            }
        }

        fn cleanup(&self, max_days: f64, max_size: Option<u64>) -> Arc<Cleanup> {
            Arc::new(Cleanup::new(
                self.crates.clone(),
                &self.dir.path().join("sparse"),
                self.usage.clone(),
                Rules {
                    max_unused: days(max_days),
                    max_size,
                },
            ))
        }

        /// A crate file of `size` bytes, last used now.
        fn put(&self, name: &str, size: usize) -> String {
            let rel = format!(
                "{}/{name}-1.0.0.crate",
                name.parse::<crate::names::CrateName>()
                    .unwrap()
                    .index_path()
            );
            let path = self.dir.path().join("crates").join(&rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, vec![0u8; size]).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(self.clock.now())
                .unwrap();
            rel
        }

        fn exists(&self, rel: &str) -> bool {
            self.dir.path().join("crates").join(rel).exists()
        }

        async fn run(&self, c: &Arc<Cleanup>, dry_run: bool) -> Pass {
            match c
                .run_once(dry_run, &CancellationToken::new())
                .await
                .unwrap()
            {
                Outcome::Done(p) => p,
                Outcome::Busy => panic!("busy"),
            }
        }
    }

    #[tokio::test]
    async fn size_cap_removes_least_recently_used_first() {
        let f = Fixture::new();
        let a = f.put("aaaa", 100);
        f.clock.advance(days(1.0));
        let b = f.put("bbbb", 100);
        f.clock.advance(days(1.0));
        let c = f.put("cccc", 100);
        f.clock.advance(days(1.0));
        // A use of `a` makes it the most recent.
        f.usage.record_crate(&crate::names::CrateKey::new(
            &"aaaa".parse().unwrap(),
            &"1.0.0".parse().unwrap(),
        ));
        let cleanup = f.cleanup(90.0, Some(250));
        let dry = f.run(&cleanup, true).await;
        assert_eq!(dry.removed.len(), 1);
        assert!(f.exists(&b), "a dry run removes nothing");
        let pass = f.run(&cleanup, false).await;
        let gone: Vec<_> = pass.removed.iter().map(|r| r.rel.as_str()).collect();
        assert_eq!(gone, [b.as_str()]);
        assert_eq!(pass.removed[0].reason, Reason::OverSize);
        assert!(f.exists(&a) && f.exists(&c) && !f.exists(&b));
        assert_eq!(pass.report.crate_bytes_kept, 200);
        assert_eq!(cleanup.last().unwrap().crate_bytes_removed, 100);
    }

    #[tokio::test]
    async fn cleanups_never_overlap() {
        let f = Fixture::new();
        let file = LockFile::open(&f.dir.path().join("crates").join(LOCK_FILE)).unwrap();
        let held = file.try_lock().unwrap().unwrap();
        let cleanup = f.cleanup(90.0, None);
        let outcome = cleanup
            .run_once(false, &CancellationToken::new())
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Busy));
        assert!(cleanup.last().is_none());
        drop(held);
        f.run(&cleanup, false).await;
        assert!(cleanup.last().is_some());
    }

    #[tokio::test]
    async fn files_being_written_and_non_crate_files_are_never_touched() {
        let f = Fixture::new();
        let tmp = f.dir.path().join("crates/.tmp/w-123");
        std::fs::write(&tmp, b"partial").unwrap();
        let config = f.dir.path().join("sparse/config.json");
        std::fs::write(&config, b"{}").unwrap();
        let index_tmp = f.dir.path().join("sparse/.tmp/w-1");
        std::fs::write(&index_tmp, b"x").unwrap();
        for p in [&tmp, &config, &index_tmp] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(f.clock.now() - days(1000.0))
                .unwrap();
        }
        f.clock.advance(days(1000.0));
        let pass = f.run(&f.cleanup(1.0, Some(1)), false).await;
        assert!(pass.removed.is_empty(), "{:?}", pass.removed);
        assert!(tmp.exists() && config.exists() && index_tmp.exists());
    }
}
