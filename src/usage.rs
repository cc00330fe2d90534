//! Last use of every cached file, recorded by the proxy itself (not the filesystem's atime,
//! which `noatime` disables and `relatime` coarsens to a day).
//!
//! Where the record lives:
//! - **Crate files**: the file's own mtime. A `.crate` never changes once stored, so its mtime
//!   carries no other meaning; writing it is one `futimens`, reading it one `stat`.
//!   With `CRATERE_STORAGE=s3` crate uses are usage records in the bucket instead
//!   ([`crate::storage::s3`]), shared by every replica.
//! - **Index files**: their mtime already means "last confirmed with upstream" (see
//!   [`crate::index_cache`]), so each has an empty marker file at the same relative path under
//!   `$CRATERE_INDEX/sparse/.used/`, whose mtime is the last use.
//!
//! Why files rather than an embedded database: `cratere cleanup` and `cratere warm` run as
//! separate processes on the same directories as a live server. Timestamps on files are read
//! and written by any number of processes without coordination and need no recovery after a
//! crash; an embedded store such as redb holds an exclusive lock on its database file, so a
//! second process could not even read it while the server runs.
//!
//! Writes are batched: a use only goes into an in-memory map; [`Usage::flush`] (every
//! [`FLUSH_INTERVAL`] from a background task, before every cleanup, and at shutdown) applies
//! them with one `futimens` per file, no fsync. A crash loses at most the uses of the last
//! interval, never a cached file: the file itself is untouched.
//!
//! Files that were on disk before usage was tracked (a cache from an older version) have an
//! mtime that only says when they were downloaded. [`Usage::adopt_untracked`] sets every crate
//! file's mtime to now and then writes a marker file, so they count as used at that start: the
//! server runs it in the background right after starting, and a cleanup runs it first if it
//! has not finished. An index file without a marker counts as used
//! when a cleanup first sees it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::names::{CrateKey, IndexPath};
use crate::storage::CrateStore;
use crate::storage::fs::set_mtime;

/// How often recorded uses are written to disk: the most a crash can lose.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// In the sparse index cache: the tree of last-use markers of index files.
pub const INDEX_MARKS_DIR: &str = ".used";

/// One recorded use of a cached file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Use {
    Crate(CrateKey),
    Index(IndexPath),
}

pub struct Usage {
    crates: CrateStore,
    index_root: PathBuf,
    clock: Arc<dyn Clock>,
    pending: Mutex<Pending>,
}

/// Uses recorded and not yet written. A file used again before the flush only has its time
/// moved (no key copied): this is on the path of every hit.
#[derive(Default)]
struct Pending {
    crates: HashMap<CrateKey, SystemTime>,
    index: HashMap<IndexPath, SystemTime>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.crates.is_empty() && self.index.is_empty()
    }
}

impl Usage {
    /// Usage records of the crate store and the sparse index cache at `index_root`
    /// (`$CRATERE_INDEX/sparse`).
    pub fn new(crates: CrateStore, index_root: &Path, clock: Arc<dyn Clock>) -> Usage {
        Usage {
            crates,
            index_root: index_root.to_path_buf(),
            clock,
            pending: Mutex::default(),
        }
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Whether crate mtimes are last-use times (the marker exists). Always true in S3, where
    /// crates from before usage tracking cannot exist.
    pub fn is_tracked(&self) -> bool {
        self.crates.is_tracked()
    }

    /// On a cache whose crate files have no usage record yet, records a use of each of them
    /// now and writes the marker. Returns how many files were adopted, `None` if the cache was
    /// already tracked. A crash halfway leaves no marker, so the next start does it again.
    pub fn adopt_untracked(&self) -> io::Result<Option<usize>> {
        let adopted = self.crates.adopt_untracked(self.clock.now())?;
        if let Some(n) = adopted {
            tracing::info!(
                files = n,
                "crate files without a usage record count as used now"
            );
        }
        Ok(adopted)
    }

    /// Records a use of a crate file. Its index file counts as used too: a proxy that has lost
    /// upstream needs the index file to serve the crate to a client with an empty cache.
    pub fn record_crate(&self, key: &CrateKey) {
        let now = self.clock.now();
        let mut p = self.pending.lock().expect("lock poisoned");
        if let Some(t) = p.crates.get_mut(key) {
            // Its index file was recorded with it; the flush moves that to the latest use.
            *t = now;
            return;
        }
        p.crates.insert(key.clone(), now);
        p.index.insert(key.name().index_path(), now);
    }

    /// Records a use of an index file.
    pub fn record_index(&self, path: &IndexPath) {
        let now = self.clock.now();
        let mut p = self.pending.lock().expect("lock poisoned");
        match p.index.get_mut(path) {
            Some(t) => *t = now,
            None => {
                p.index.insert(path.clone(), now);
            }
        }
    }

    /// The time of a use recorded in this process and not yet flushed.
    pub fn pending(&self, u: &Use) -> Option<SystemTime> {
        let p = self.pending.lock().expect("lock poisoned");
        match u {
            Use::Crate(key) => p.crates.get(key).copied(),
            Use::Index(path) => p.index.get(path).copied(),
        }
    }

    /// Writes the recorded uses (crate uses to the crate store, index uses to disk). Returns
    /// how many records were written. Errors are logged: a lost record only makes a file look
    /// older than it is.
    pub async fn flush(&self) -> usize {
        let batch = std::mem::take(&mut *self.pending.lock().expect("lock poisoned"));
        if batch.is_empty() {
            return 0;
        }
        let Pending {
            crates,
            index: mut index_uses,
        } = batch;
        // A crate's use is its index file's use too, up to the latest one.
        for (key, when) in &crates {
            let t = index_uses.entry(key.name().index_path()).or_insert(*when);
            *t = (*t).max(*when);
        }
        let crates: Vec<_> = crates.into_iter().collect();
        let index: Vec<_> = index_uses
            .into_iter()
            .map(|(path, when)| (path.as_relative(), when))
            .collect();
        let index_root = self.index_root.clone();
        let index_task = tokio::task::spawn_blocking(move || {
            let mut written = 0;
            for (rel, when) in index {
                match set_mtime(&index_mark_path(&index_root, &rel), when, true) {
                    Ok(true) => written += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(file = %rel, error = %e, "cannot record a use"),
                }
            }
            written
        });
        let crates_written = self.crates.record_uses(crates).await;
        let index_written = index_task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "usage flush task failed");
            0
        });
        crates_written + index_written
    }

    /// Last recorded use of an index file (`None`: no record).
    pub fn index_last_use(&self, path: &IndexPath) -> io::Result<Option<SystemTime>> {
        match std::fs::metadata(index_mark_path(&self.index_root, &path.as_relative())) {
            Ok(m) => Ok(Some(m.modified()?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records a use of an index file directly on disk (used by cleanup to adopt a file it
    /// finds without a record).
    pub fn mark_index(&self, path: &IndexPath, when: SystemTime) -> io::Result<()> {
        let mark = index_mark_path(&self.index_root, &path.as_relative());
        set_mtime(&mark, when, true).map(|_| ())
    }

    pub fn index_marks_root(&self) -> PathBuf {
        self.index_root.join(INDEX_MARKS_DIR)
    }

    pub fn remove_index_mark(&self, path: &IndexPath) -> io::Result<()> {
        match std::fs::remove_file(index_mark_path(&self.index_root, &path.as_relative())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn index_mark_path(index_root: &Path, rel: &str) -> PathBuf {
    index_root.join(INDEX_MARKS_DIR).join(rel)
}

/// The jobs of usage tracking: the adoption of a cache from before usage tracking (or from
/// another tool), in the background so that startup does not grow with the cache (a cleanup
/// that comes first adopts it itself); and the flusher.
pub fn spawn_jobs(usage: Arc<Usage>, tracker: &TaskTracker, shutdown: &CancellationToken) {
    let (adopting, stop) = (usage.clone(), shutdown.clone());
    tracker.spawn(async move {
        if adopting.is_tracked() {
            return;
        }
        let adopt = tokio::task::spawn_blocking(move || adopting.adopt_untracked());
        tokio::select! {
            _ = stop.cancelled() => {}
            res = adopt => match res {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot record uses of the cached crates"),
                Err(e) => tracing::warn!(error = %e, "adopting the cache failed"),
            },
        }
    });
    spawn_flusher(usage, tracker, shutdown.clone());
}

/// Flushes recorded uses every [`FLUSH_INTERVAL`] until `shutdown`, then once more.
fn spawn_flusher(usage: Arc<Usage>, tracker: &TaskTracker, shutdown: CancellationToken) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    usage.flush().await;
                }
            }
        }
        usage.flush().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, FakeClock, days};
    use crate::storage::FsStore;

    fn setup() -> (tempfile::TempDir, Arc<FakeClock>, Usage) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("crates")).unwrap();
        std::fs::create_dir_all(dir.path().join("sparse")).unwrap();
        let clock = Arc::new(FakeClock::new());
        let usage = Usage::new(
            CrateStore::Fs(FsStore::open(&dir.path().join("crates")).unwrap()),
            &dir.path().join("sparse"),
            clock.clone(),
        );
        (dir, clock, usage)
    }

    fn mtime(p: &Path) -> SystemTime {
        std::fs::metadata(p).unwrap().modified().unwrap()
    }

    #[tokio::test]
    async fn uses_are_batched_and_written_as_mtimes() {
        let (dir, clock, usage) = setup();
        let key = CrateKey::new(&"serde".parse().unwrap(), &"1.0.0".parse().unwrap());
        let file = dir.path().join("crates").join(key.as_relative());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let written = mtime(&file);

        clock.advance(days(3.0));
        usage.record_crate(&key);
        assert_eq!(mtime(&file), written, "nothing is written before a flush");
        assert_eq!(usage.pending(&Use::Crate(key.clone())), Some(clock.now()));
        assert_eq!(usage.flush().await, 2);
        assert_eq!(mtime(&file), clock.now());
        assert_eq!(
            usage
                .index_last_use(&"se/rd/serde".parse().unwrap())
                .unwrap(),
            Some(clock.now()),
            "a crate's use is also a use of its index file"
        );
        assert_eq!(usage.pending(&Use::Crate(key.clone())), None);
        assert_eq!(usage.flush().await, 0);
    }

    #[tokio::test]
    async fn a_use_never_moves_a_file_back_in_time_and_never_creates_a_crate() {
        let (dir, clock, usage) = setup();
        let key = CrateKey::new(&"itoa".parse().unwrap(), &"1.0.0".parse().unwrap());
        usage.record_crate(&key);
        usage.flush().await;
        assert!(!dir.path().join("crates").join(key.as_relative()).exists());

        let path: IndexPath = "3/r/ryu".parse().unwrap();
        clock.advance(days(1.0));
        let later = clock.now();
        usage.mark_index(&path, later).unwrap();
        clock.set(later - days(2.0));
        usage.record_index(&path);
        usage.flush().await;
        assert_eq!(
            usage.index_last_use(&"3/r/ryu".parse().unwrap()).unwrap(),
            Some(later)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_flusher_writes_every_interval_and_at_shutdown() {
        let (dir, clock, usage) = setup();
        let usage = Arc::new(usage);
        let key = CrateKey::new(&"ryu".parse().unwrap(), &"1.0.0".parse().unwrap());
        let file = dir.path().join("crates").join(key.as_relative());
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let (tracker, token) = (TaskTracker::new(), CancellationToken::new());
        spawn_flusher(usage.clone(), &tracker, token.clone());
        tracker.close();

        clock.advance(days(1.0));
        usage.record_crate(&key);
        tokio::time::sleep(FLUSH_INTERVAL + Duration::from_millis(10)).await;
        // The write itself runs on the blocking pool, in real time.
        for _ in 0..200 {
            if mtime(&file) == clock.now() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(mtime(&file), clock.now(), "written within one interval");

        clock.advance(days(1.0));
        usage.record_crate(&key);
        token.cancel();
        tracker.wait().await;
        assert_eq!(mtime(&file), clock.now(), "written at shutdown");
    }

    #[tokio::test]
    async fn untracked_files_are_adopted_once() {
        let (dir, clock, usage) = setup();
        let file = dir.path().join("crates/3/r/ryu/ryu-1.0.0.crate");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let old = clock.now() - days(400.0);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(!usage.is_tracked());
        assert_eq!(usage.adopt_untracked().unwrap(), Some(1));
        assert!(usage.is_tracked());
        assert_eq!(mtime(&file), clock.now());
        clock.advance(days(1.0));
        assert_eq!(usage.adopt_untracked().unwrap(), None);
        assert_eq!(mtime(&file), clock.now() - days(1.0));
    }
}
