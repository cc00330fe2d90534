//! Where crate files live: the local directory `CRATERE_CACHE` (the default), or an
//! S3-compatible bucket shared by several replicas ([`super::s3`]).
//!
//! Only `.crate` files go to the bucket. Every backend downloads into a local temp file under
//! `$CRATERE_CACHE/.tmp/` (clients are served from it while it grows, see
//! [`crate::downloads`]); [`CrateStore::store`] then makes the verified file visible in one
//! step: a rename on disk, a single PUT (or a completed multipart upload) in S3. A reader sees
//! a whole, verified file or nothing.
//!
//! Last use: on disk it is the file's mtime ([`crate::usage`]); in S3, objects cannot be
//! touched, so uses are small marker objects ([`super::s3`] explains their layout).

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tempfile::NamedTempFile;

use super::FsStore;
use super::s3::S3Crates;
use crate::config::{Config, StorageKind};
use crate::names::CrateKey;

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
    /// the file with its length when there is more (read by [`super::file_body`]).
    Head(Bytes, Option<(std::fs::File, u64)>),
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

use super::file_body::READ_CHUNK;

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
            StoredBody::Head(head, Some((file, len))) => {
                let pos = head.len() as u64;
                futures_util::stream::once(async move { Ok(head) })
                    .chain(super::file_body::stream_from(file, pos, len))
                    .boxed()
            }
            StoredBody::Stream(s) => s,
        }
    }

    pub(super) fn from_file(len: u64, f: tokio::fs::File) -> StoredCrate {
        StoredCrate {
            len,
            body: StoredBody::File(f),
        }
    }

    pub(super) fn from_stream(len: u64, s: BoxStream<'static, io::Result<Bytes>>) -> StoredCrate {
        StoredCrate {
            len,
            body: StoredBody::Stream(s),
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

impl CrateStore {
    /// The store the configuration names. The local directory `CRATERE_CACHE` is opened in
    /// every case: it holds the temp files of downloads in progress.
    pub fn open(config: &Config) -> anyhow::Result<CrateStore> {
        let local = FsStore::open(&config.cache)
            .with_context(|| format!("CRATERE_CACHE={}", config.cache.display()))?;
        match config.storage {
            StorageKind::Fs => Ok(CrateStore::Fs(local)),
            StorageKind::S3 => Ok(CrateStore::S3(Arc::new(S3Crates::new(config, local)?))),
        }
    }

    /// The local directory: the whole store for `fs`, the temp files for `s3`.
    pub fn local(&self) -> &FsStore {
        match self {
            CrateStore::Fs(fs) => fs,
            CrateStore::S3(s3) => s3.local(),
        }
    }

    /// Whether crate files are somewhere other than this machine's disk.
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
    pub async fn open_read(&self, rel: &str) -> io::Result<Option<StoredCrate>> {
        self.open_to_send(rel, false).await
    }

    /// Opens a stored crate to send to a client, `None` when absent. With `zero_copy` (the
    /// client is on a [`crate::sendfile::SendfileStream`]), a file in the page cache comes as
    /// one mapping that the connection sends with `sendfile`.
    pub async fn open_to_send(
        &self,
        rel: &str,
        zero_copy: bool,
    ) -> io::Result<Option<StoredCrate>> {
        match self {
            CrateStore::Fs(fs) => {
                if zero_copy && let Some(whole) = crate::sendfile::cached(&fs.path(rel)) {
                    return Ok(Some(StoredCrate {
                        len: whole.len() as u64,
                        body: StoredBody::Head(whole, None),
                    }));
                }
                Ok(fs
                    .open_with_head(rel, READ_CHUNK, zero_copy)
                    .await?
                    .map(|(f, len, head)| {
                        let rest = (head.len() as u64) < len;
                        StoredCrate {
                            len,
                            body: StoredBody::Head(head, rest.then_some((f, len))),
                        }
                    }))
            }
            CrateStore::S3(s3) => s3.open_read(rel).await,
        }
    }

    /// Size of a stored crate, `None` when absent.
    pub async fn len(&self, rel: &str) -> io::Result<Option<u64>> {
        match self {
            CrateStore::Fs(fs) => match tokio::fs::metadata(fs.path(rel)).await {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            CrateStore::S3(s3) => s3.len(rel).await,
        }
    }

    /// Makes a complete, verified temp file visible at `rel` in one step (replacing an equal
    /// file another process may have stored meanwhile).
    pub async fn store(&self, tmp: NamedTempFile, rel: &str) -> io::Result<()> {
        match self {
            CrateStore::Fs(fs) => {
                let (fs, rel) = (fs.clone(), rel.to_string());
                tokio::task::spawn_blocking(move || {
                    tmp.as_file().sync_data()?;
                    fs.persist(tmp, &rel)?;
                    crate::sendfile::forget(&fs.path(&rel));
                    Ok(())
                })
                .await
                .map_err(io::Error::other)?
            }
            CrateStore::S3(s3) => s3.upload(tmp, rel).await,
        }
    }

    /// Every stored crate with its size and last use (temp files excluded).
    pub async fn list(&self) -> io::Result<Vec<CrateInfo>> {
        match self {
            CrateStore::Fs(fs) => {
                let root = fs.root().to_path_buf();
                let files = tokio::task::spawn_blocking(move || super::list_files(&root))
                    .await
                    .map_err(io::Error::other)??;
                Ok(files
                    .into_iter()
                    .filter_map(|f| {
                        Some(CrateInfo {
                            key: f.rel.parse().ok()?,
                            len: f.len,
                            last_use: f.modified,
                        })
                    })
                    .collect())
            }
            CrateStore::S3(s3) => s3.list().await,
        }
    }

    /// The last recorded use of a stored crate, as [`CrateStore::list`] reports it; `None`
    /// when the crate is gone.
    pub async fn last_use(&self, rel: &str) -> io::Result<Option<SystemTime>> {
        match self {
            CrateStore::Fs(fs) => match tokio::fs::metadata(fs.path(rel)).await {
                Ok(m) => Ok(Some(m.modified()?)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            CrateStore::S3(s3) => s3.last_use(rel).await,
        }
    }

    /// Removes a stored crate (and, in S3, its usage records). False when it was not there.
    pub async fn remove(&self, rel: &str) -> io::Result<bool> {
        match self {
            CrateStore::Fs(fs) => {
                let path = fs.path(rel);
                crate::sendfile::forget(&path);
                let removed = tokio::fs::remove_file(&path).await;
                // A hit that opened the file just before the unlink may have kept a mapping.
                crate::sendfile::forget(&path);
                match removed {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(e),
                }
            }
            CrateStore::S3(s3) => s3.remove(rel).await,
        }
    }

    /// Writes uses of stored crates (never creating a crate, never moving a last use back).
    /// Returns how many records were written; failures are logged (a lost record only makes
    /// a crate look older than it is).
    pub async fn record_uses(&self, uses: Vec<(String, SystemTime)>) -> usize {
        match self {
            CrateStore::Fs(fs) => {
                let root = fs.root().to_path_buf();
                let res = tokio::task::spawn_blocking(move || {
                    let mut written = 0;
                    for (rel, when) in uses {
                        match crate::usage::set_mtime(&root.join(&rel), when, false) {
                            Ok(true) => written += 1,
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(file = %rel, error = %e, "cannot record a use");
                            }
                        }
                    }
                    written
                })
                .await;
                res.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "usage flush task failed");
                    0
                })
            }
            CrateStore::S3(s3) => s3.record_uses(uses).await,
        }
    }

    /// How much later than its recorded last use a crate may really have been used (uses
    /// are written at a coarser grain to S3, and other replicas write theirs a few seconds
    /// late). A cleanup adds it to `CRATERE_MAX_DAYS_UNUSED`, so that anything used within
    /// that time is kept. Zero on disk.
    pub fn use_slack(&self) -> Duration {
        match self {
            CrateStore::Fs(_) => Duration::ZERO,
            CrateStore::S3(s3) => s3.use_slack(),
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
