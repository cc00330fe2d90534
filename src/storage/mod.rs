//! Where bytes live. [`FsStore`] ([`fs`]) is a directory of files written through temp files
//! and atomic renames: the sparse index cache, and crate files with `CRATERE_STORAGE=fs`.
//! [`CrateStore`] is the crate-store API that downloads, usage, cleanup and search use; it
//! only dispatches to a backend, one file (or folder) each: the disk ([`fs`]) or an
//! S3-compatible bucket shared by several replicas ([`s3`]). Crates are addressed by
//! [`CrateKey`] throughout; nothing above this module matches on a backend.
//!
//! Only `.crate` files go to the bucket. Every backend downloads into a local temp file under
//! `$CRATERE_CACHE/.tmp/` (clients are served from it while it grows, see
//! [`crate::downloads`]); [`CrateStore::store`] then makes the verified file visible in one
//! step: a rename on disk, a single PUT (or a completed multipart upload) in S3. A reader sees
//! a whole, verified file or nothing.
//!
//! Last use: on disk it is the file's mtime; in S3, objects cannot be touched, so uses are
//! small marker objects ([`s3`] explains their layout).

mod file_body;
pub mod fs;
pub mod s3;

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tempfile::NamedTempFile;
use tokio_util::sync::CancellationToken;

pub use fs::{FsStore, StoredFile, list_files};

use crate::clock::Clock;
use crate::config::{StorageChoice, StorageConfig};
use crate::names::CrateKey;
use file_body::READ_CHUNK;
use s3::{Conditional, S3Crates};

/// Crate files, on disk or in S3. Cheap to clone.
#[derive(Clone)]
pub enum CrateStore {
    Fs(FsStore),
    S3(Arc<S3Crates>),
}

/// A stored crate opened for reading.
pub struct StoredCrate {
    pub len: u64,
    body: StoredBody,
}

enum StoredBody {
    File(tokio::fs::File),
    /// The first chunk, read together with the open (one blocking hop for most crates), and
    /// the file with its length when there is more (read by [`file_body`]).
    Head(Bytes, Option<(Arc<std::fs::File>, u64)>),
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

impl StoredCrate {
    /// The bytes, read as they are consumed (never buffered whole).
    pub fn into_stream(self) -> BoxStream<'static, io::Result<Bytes>> {
        match self.body {
            StoredBody::File(f) => {
                tokio_util::io::ReaderStream::with_capacity(f, READ_CHUNK).boxed()
            }
            StoredBody::Head(head, None) => {
                futures_util::stream::once(async move { Ok(head) }).boxed()
            }
            StoredBody::Head(head, Some((file, len))) if head.is_empty() => {
                file_body::stream_from(file, 0, len).boxed()
            }
            StoredBody::Head(head, Some((file, len))) => {
                let pos = head.len() as u64;
                futures_util::stream::once(async move { Ok(head) })
                    .chain(file_body::stream_from(file, pos, len))
                    .boxed()
            }
            StoredBody::Stream(s) => s,
        }
    }

    fn from_file(len: u64, f: tokio::fs::File) -> StoredCrate {
        StoredCrate {
            len,
            body: StoredBody::File(f),
        }
    }

    fn from_stream(len: u64, s: BoxStream<'static, io::Result<Bytes>>) -> StoredCrate {
        StoredCrate {
            len,
            body: StoredBody::Stream(s),
        }
    }

    /// The first bytes, and the file to read the rest from (`None`: `head` is all of it).
    fn from_head(head: Bytes, rest: Option<(Arc<std::fs::File>, u64)>) -> StoredCrate {
        let len = rest.as_ref().map_or(head.len() as u64, |(_, len)| *len);
        StoredCrate {
            len,
            body: StoredBody::Head(head, rest),
        }
    }
}

/// A stored crate found by [`CrateStore::list`].
#[derive(Debug, Clone)]
pub struct CrateInfo {
    pub key: CrateKey,
    pub len: u64,
    /// Last recorded use.
    pub last_use: SystemTime,
}

/// Whether a cleanup may examine the crate files ([`CrateStore::cleanup_lease`]).
pub enum CleanupLease {
    /// The store is this machine's: the local lock file is all the exclusion needed.
    Local,
    /// Held by this replica until released; its token is cancelled if it is lost.
    Held(s3::Lease),
    /// Another replica holds it: that replica cleans the crates.
    HeldElsewhere,
    /// The bucket cannot hold a lease (it ignores conditional writes) and this replica is the
    /// configured cleanup leader (`CRATERE_CLEANUP_LEADER`): it cleans the crates alone.
    Leader,
    /// The bucket cannot hold a lease and this replica is not the cleanup leader: it leaves
    /// the crates alone.
    NotLeader,
}

impl CrateStore {
    /// The store the configuration names. The local directory `CRATERE_CACHE` is opened in
    /// every case: it holds the temp files of downloads in progress.
    /// `max_unused` (`CRATERE_MAX_DAYS_UNUSED`) sets how finely uses are recorded in S3.
    pub fn open(config: &StorageConfig, max_unused: Duration) -> anyhow::Result<CrateStore> {
        let choice = config.choice().map_err(anyhow::Error::msg)?;
        let local = FsStore::open(&config.cache)
            .with_context(|| format!("CRATERE_CACHE={}", config.cache.display()))?;
        match choice {
            StorageChoice::Fs => Ok(CrateStore::Fs(local)),
            StorageChoice::S3(s3) => {
                let crates = S3Crates::new(&s3, local, max_unused)
                    .with_context(|| format!("CRATERE_CACHE={}", config.cache.display()))?;
                Ok(CrateStore::S3(Arc::new(crates)))
            }
        }
    }

    /// The local directory: the whole store for `fs`, the temp files (and local copies) for
    /// `s3`. Lock files live here.
    pub fn local(&self) -> &FsStore {
        match self {
            CrateStore::Fs(fs) => fs,
            CrateStore::S3(s3) => s3.local(),
        }
    }

    /// Whether crate files are somewhere other than this machine's disk (a store failure is
    /// then no reason to fail a client, and uploads take long enough to release clients
    /// before they end).
    pub fn is_remote(&self) -> bool {
        matches!(self, CrateStore::S3(_))
    }

    /// Where the files are, for messages: a directory or `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        match self {
            CrateStore::Fs(fs) => fs.root().display().to_string(),
            CrateStore::S3(s3) => s3.describe(),
        }
    }

    /// A new local temp file to download into (see [`FsStore::temp_file`]).
    pub fn temp_file(&self) -> io::Result<NamedTempFile> {
        self.local().temp_file()
    }

    /// Opens a stored crate, `None` when absent.
    pub async fn open_read(&self, key: &CrateKey) -> io::Result<Option<StoredCrate>> {
        self.open_to_send(key, false).await
    }

    /// Opens a stored crate to send to a client, `None` when absent. With `zero_copy` (the
    /// client is on a [`crate::sendfile::SendfileStream`]), a file on disk that is in the
    /// page cache comes as one mapping that the connection sends with `sendfile`.
    pub async fn open_to_send(
        &self,
        key: &CrateKey,
        zero_copy: bool,
    ) -> io::Result<Option<StoredCrate>> {
        match self {
            CrateStore::Fs(fs) => fs.open_crate(key, zero_copy).await,
            CrateStore::S3(s3) => s3.open_read(key).await,
        }
    }

    /// Size of a stored crate, `None` when absent.
    pub async fn len(&self, key: &CrateKey) -> io::Result<Option<u64>> {
        match self {
            CrateStore::Fs(fs) => fs.crate_len(key).await,
            CrateStore::S3(s3) => s3.len(key).await,
        }
    }

    /// Makes a complete, verified temp file visible at `key` in one step (replacing an equal
    /// file another process may have stored meanwhile).
    pub async fn store(&self, tmp: NamedTempFile, key: &CrateKey) -> io::Result<()> {
        match self {
            CrateStore::Fs(fs) => fs.store_crate(tmp, key).await,
            CrateStore::S3(s3) => s3.upload(tmp, key).await,
        }
    }

    /// Every stored crate with its size and last use (temp files excluded).
    pub async fn list(&self) -> io::Result<Vec<CrateInfo>> {
        match self {
            CrateStore::Fs(fs) => fs.list_crates().await,
            CrateStore::S3(s3) => s3.list().await,
        }
    }

    /// The last recorded use of a stored crate, as [`CrateStore::list`] reports it; `None`
    /// when the crate is gone.
    pub async fn last_use(&self, key: &CrateKey) -> io::Result<Option<SystemTime>> {
        match self {
            CrateStore::Fs(fs) => fs.crate_last_use(key).await,
            CrateStore::S3(s3) => s3.last_use(key).await,
        }
    }

    /// Removes a stored crate (and, in S3, its usage records). False when it was not there.
    pub async fn remove(&self, key: &CrateKey) -> io::Result<bool> {
        match self {
            CrateStore::Fs(fs) => fs.remove_crate(key).await,
            CrateStore::S3(s3) => s3.remove(key).await,
        }
    }

    /// Writes uses of stored crates (never creating a crate, never moving a last use back).
    /// Returns how many records were written; failures are logged (a lost record only makes
    /// a crate look older than it is).
    pub async fn record_uses(&self, uses: Vec<(CrateKey, SystemTime)>) -> usize {
        match self {
            CrateStore::Fs(fs) => fs.record_crate_uses(uses).await,
            CrateStore::S3(s3) => s3.record_uses(uses).await,
        }
    }

    /// Whether every stored crate has a usage record. Always true in S3, where crates from
    /// before usage tracking cannot exist.
    pub fn is_tracked(&self) -> bool {
        match self {
            CrateStore::Fs(fs) => fs.is_tracked(),
            CrateStore::S3(_) => true,
        }
    }

    /// Gives every crate without a usage record a use at `now` (see
    /// [`crate::usage::Usage::adopt_untracked`]); how many, `None` if there was nothing to
    /// adopt. Blocking.
    pub fn adopt_untracked(&self, now: SystemTime) -> io::Result<Option<usize>> {
        match self {
            CrateStore::Fs(fs) => fs.adopt_untracked(now),
            CrateStore::S3(_) => Ok(None),
        }
    }

    /// How much later than its recorded last use a crate may really have been used, given
    /// that replicas write their uses `flush_interval` apart: uses are written at a coarser
    /// grain to S3, and other replicas write theirs a few seconds late. A cleanup adds it to
    /// `CRATERE_MAX_DAYS_UNUSED`, so that anything used within that time is kept. Zero on disk.
    pub fn use_slack(&self, flush_interval: Duration) -> Duration {
        match self {
            CrateStore::Fs(_) => Duration::ZERO,
            CrateStore::S3(s3) => s3.resolution() + 2 * flush_interval,
        }
    }

    /// The exclusion a cleanup of the crate files needs beyond the local lock file: with a
    /// store shared by replicas, the bucket's lease.
    pub async fn cleanup_lease(
        &self,
        clock: Arc<dyn Clock>,
        stop: &CancellationToken,
    ) -> anyhow::Result<CleanupLease> {
        match self {
            CrateStore::Fs(_) => Ok(CleanupLease::Local),
            CrateStore::S3(s3) => match s3.probe().await {
                Conditional::Honoured => Ok(match s3.lease(clock, stop).await? {
                    Some(lease) => CleanupLease::Held(lease),
                    None => CleanupLease::HeldElsewhere,
                }),
                Conditional::Ignored(_) if s3.is_cleanup_leader() => Ok(CleanupLease::Leader),
                Conditional::Ignored(_) => Ok(CleanupLease::NotLeader),
                Conditional::Unknown => anyhow::bail!(
                    "cannot tell whether the bucket honours conditional writes (it did not \
                     answer the probe), so the cleanup lease cannot be trusted"
                ),
            },
        }
    }

    /// With S3 storage: probes the bucket's conditional writes and tells what they are
    /// (`None` on a local store).
    pub async fn probe_conditional_writes(&self) -> Option<Conditional> {
        match self {
            CrateStore::Fs(_) => None,
            CrateStore::S3(s3) => Some(s3.probe().await),
        }
    }

    /// What the last probe of the bucket's conditional writes found, and whether this replica
    /// is the cleanup leader (`None` on a local store).
    pub fn conditional_writes(&self) -> Option<(Conditional, bool)> {
        match self {
            CrateStore::Fs(_) => None,
            CrateStore::S3(s3) => Some((s3.conditional(), s3.is_cleanup_leader())),
        }
    }

    /// After a cleanup pass that removed crates last used before `cutoff`: drops bookkeeping
    /// they leave behind (superseded usage records in S3). Returns how many objects went.
    pub async fn prune_after_cleanup(&self, cutoff: SystemTime) -> io::Result<usize> {
        match self {
            CrateStore::Fs(_) => Ok(0),
            CrateStore::S3(s3) => s3.prune_records(cutoff).await,
        }
    }

    /// Readiness: the local temp directory accepts writes, and the bucket answers.
    pub async fn check(&self) -> Result<(), String> {
        let local = self.local().clone();
        let what = if self.is_remote() {
            "local temp directory (CRATERE_CACHE)"
        } else {
            "crate cache (CRATERE_CACHE)"
        };
        tokio::task::spawn_blocking(move || local.check_writable())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{what} not writable: {e}"))?;
        if let CrateStore::S3(s3) = self {
            s3.check()
                .await
                .map_err(|e| format!("bucket {} not reachable: {e}", s3.describe()))?;
        }
        Ok(())
    }
}
