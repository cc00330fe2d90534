//! Crate files in an S3-compatible bucket (AWS S3, MinIO, Garage, Ceph…), shared by any
//! number of replicas, through the `object_store` crate.
//!
//! Layout under `CRATERE_S3_PREFIX` (`P`):
//! - `P` + the disk layout, e.g. `P/se/rd/serde/serde-1.0.200.crate`: the verified crate.
//!   Uploaded only once complete and verified: one PUT with `If-None-Match: *` (a crate
//!   another replica stored first is left as it is: the bytes are the same), or, above
//!   [`PART_SIZE`], a multipart upload, which becomes visible only when completed.
//! - `P/.usage/<crate key>/<unix ms>`: empty usage records. An object's mtime cannot be
//!   touched cheaply, so each replica's usage flusher writes a record of a use; the newest
//!   record (or the crate's own upload time) is the crate's last use. Times live in the key so
//!   that one listing of the bucket yields every crate's last use (user metadata and bodies
//!   would need a request per object). A replica writes at most one record per crate per
//!   [`S3Crates::use_slack`]-sized step (a PUT costs money; the age rule counts in days), and
//!   a cleanup keeps crates for that much longer than `CRATERE_MAX_DAYS_UNUSED`. Each cleanup
//!   deletes the records a newer one supersedes, and those of crates that are gone.
//! - `P/.locks/cleanup`: the cleanup lease ([`Lease`]): one cleanup at a time in the fleet.
//! - `P/.locks/probe/<replica>`: the scratch object of the conditional-write probe
//!   ([`S3Crates::probe`]), deleted when it ends; the lease is only taken on a bucket that
//!   passed it.
//!
//! Hits stream the object's body as it arrives; a bucket that fails is logged and the
//! download goes to upstream instead (see [`crate::downloads`]).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use tempfile::NamedTempFile;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

mod lease;
mod local_cache;
mod probe;

pub use lease::{LEASE_TTL, Lease};
pub use probe::Conditional;

use super::{CrateInfo, FsStore, StoredCrate};
use crate::clock::Clock;
use crate::config::S3Settings;
use crate::names::CrateKey;
use local_cache::LocalCache;

/// Crates up to this size are uploaded with one PUT (read into memory); larger ones in parts
/// of this size (S3 wants parts of at least 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// Uploads at once per replica (bounds the memory of single-PUT uploads: 16 × 8 MiB).
const UPLOADS: usize = 16;

/// Usage records written at once by a flush.
const RECORD_WRITES: usize = 16;

/// Directory (under the prefix) of the usage records.
pub const USAGE_DIR: &str = ".usage";

/// Key (under the prefix) of the cleanup lease.
pub const LOCK_KEY: &str = ".locks/cleanup";

/// Directory (under the prefix) of the scratch objects of [`S3Crates::probe`], one per
/// probing process.
pub const PROBE_DIR: &str = ".locks/probe";

/// How often a held lease is renewed.
const LEASE_RENEW: Duration = Duration::from_secs(30);

pub struct S3Crates {
    store: Arc<AmazonS3>,
    /// `CRATERE_CACHE`: temp files of downloads in progress.
    local: FsStore,
    bucket: String,
    /// Empty or ending in `/`.
    prefix: String,
    /// A replica writes a crate's usage record at most once per this time.
    resolution: Duration,
    /// The last record this process wrote per crate.
    written: Mutex<HashMap<String, SystemTime>>,
    uploads: Semaphore,
    /// `CRATERE_S3_LOCAL_CACHE_SIZE`: copies of crates on this replica's disk.
    local_cache: Option<Arc<LocalCache>>,
    /// What the last probe of conditional writes found.
    conditional: probe::ProbeState,
    /// `CRATERE_CLEANUP_LEADER`.
    leader: bool,
}

fn to_io(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

pub(super) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// An object's time to the second (listings give milliseconds, HEAD whole seconds).
fn object_time(t: chrono::DateTime<chrono::Utc>) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
}

impl S3Crates {
    /// A client for the configured bucket (no request is made: see [`S3Crates::check`]).
    pub fn new(
        config: &S3Settings,
        local: FsStore,
        max_unused: Duration,
    ) -> anyhow::Result<S3Crates> {
        let bucket = config.bucket.clone();
        // Hits stream for as long as the client takes: no total timeout, but a bound on
        // each wait for bytes.
        let mut options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(30));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if let Some(c) = &config.credentials {
            builder = builder
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(&c.secret_access_key);
        }
        if let Some(endpoint) = &config.endpoint.0 {
            options = options.with_allow_http(endpoint.starts_with("http://"));
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder
            .with_client_options(options)
            .build()
            .context("CRATERE_S3_*: cannot build the S3 client")?;
        // Records at most every 1/100 of the age limit, and at least daily.
        let resolution = (max_unused / 100).min(Duration::from_secs(86_400));
        let local_cache = config
            .local_cache_size
            .map(|max| LocalCache::open(local.clone(), max))
            .transpose()?;
        Ok(S3Crates {
            conditional: probe::ProbeState::default(),
            leader: config.cleanup_leader,
            local_cache,
            store: Arc::new(store),
            local,
            bucket,
            prefix: config.prefix.as_str().to_string(),
            resolution,
            written: Mutex::default(),
            uploads: Semaphore::new(UPLOADS),
        })
    }

    pub fn local(&self) -> &FsStore {
        &self.local
    }

    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The object_store client (tests inspect the bucket through it).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The object key of `rel` under the prefix (`rel` comes from a [`CrateKey`] or is one of
    /// the fixed names above).
    fn key(&self, rel: &str) -> io::Result<Path> {
        Path::parse(format!("{}{rel}", self.prefix))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn records_dir(&self, rel: &str) -> io::Result<Path> {
        self.key(&format!("{USAGE_DIR}/{rel}"))
    }

    fn lock_key(&self) -> Path {
        Path::parse(format!("{}{LOCK_KEY}", self.prefix)).expect("valid key")
    }

    fn prefix_path(&self) -> Option<Path> {
        let p = self.prefix.trim_end_matches('/');
        (!p.is_empty()).then(|| Path::parse(p).expect("prefix checked by config"))
    }

    fn rel_of<'a>(&self, location: &'a Path) -> Option<&'a str> {
        location.as_ref().strip_prefix(&self.prefix)
    }

    /// The local copies, when `CRATERE_S3_LOCAL_CACHE_SIZE` is set.
    pub fn local_cache(&self) -> Option<&Arc<LocalCache>> {
        self.local_cache.as_ref()
    }

    pub(super) async fn open_read(&self, key: &CrateKey) -> io::Result<Option<StoredCrate>> {
        let rel = &key.as_relative();
        if let Some(cache) = &self.local_cache
            && let Some((file, len)) = cache.open_read(rel).await
        {
            return Ok(Some(StoredCrate::from_file(len, file)));
        }
        match self.store.get(&self.key(rel)?).await {
            Ok(got) => {
                let len = got.meta.size;
                let mut stream = got.into_stream().map_err(to_io).boxed();
                if let Some(cache) = &self.local_cache {
                    stream = cache.tee(rel, len, stream);
                }
                Ok(Some(StoredCrate::from_stream(len, stream)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    pub(super) async fn len(&self, key: &CrateKey) -> io::Result<Option<u64>> {
        self.len_of(&key.as_relative()).await
    }

    async fn len_of(&self, rel: &str) -> io::Result<Option<u64>> {
        match self.store.head(&self.key(rel)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Uploads a complete, verified temp file. The object appears only when the upload is
    /// complete; if another replica stored the same crate first, that copy stays. The file
    /// then becomes this replica's local copy, if it keeps copies.
    pub(super) async fn upload(&self, tmp: NamedTempFile, key: &CrateKey) -> io::Result<()> {
        let rel = key.as_relative();
        self.put_file(&tmp, &rel).await?;
        if let Some(cache) = self.local_cache.clone() {
            let _ = tokio::task::spawn_blocking(move || cache.keep(tmp, &rel)).await;
        }
        Ok(())
    }

    async fn put_file(&self, tmp: &NamedTempFile, rel: &str) -> io::Result<()> {
        let key = self.key(rel)?;
        let _permit = self.uploads.acquire().await.map_err(io::Error::other)?;
        let mut file = tmp.reopen()?;
        let len = file.metadata()?.len();
        if len <= PART_SIZE as u64 {
            let bytes = tokio::task::spawn_blocking(move || {
                let mut buf = Vec::with_capacity(len as usize);
                std::io::Read::read_to_end(&mut file, &mut buf).map(|_| buf)
            })
            .await
            .map_err(io::Error::other)??;
            let opts = PutOptions::from(PutMode::Create);
            return match self
                .store
                .put_opts(&key, PutPayload::from(bytes), opts)
                .await
            {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(to_io(e)),
            };
        }
        if self.len_of(rel).await?.is_some() {
            return Ok(()); // stored by another replica meanwhile
        }
        let upload = self.store.put_multipart(&key).await.map_err(to_io)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut file = Some(file);
        loop {
            if let Err(e) = writer.wait_for_capacity(2).await {
                let _ = writer.abort().await;
                return Err(to_io(e));
            }
            let mut f = file.take().expect("file");
            let read = tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut buf = Vec::with_capacity(PART_SIZE);
                (&mut f)
                    .take(PART_SIZE as u64)
                    .read_to_end(&mut buf)
                    .map(|_| (f, buf))
            })
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
            let (f, chunk) = match read {
                Ok(read) => read,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(e);
                }
            };
            if chunk.is_empty() {
                break;
            }
            file = Some(f);
            writer.put(Bytes::from(chunk));
        }
        writer.finish().await.map_err(to_io)?;
        Ok(())
    }

    /// Lists the bucket once: crates with their last use, and usage records by crate (key
    /// and time).
    async fn scan(&self) -> io::Result<Scan> {
        let mut scan = Scan::default();
        let mut listing = self.store.list(self.prefix_path().as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(to_io)?;
            let Some(rel) = self.rel_of(&meta.location) else {
                continue;
            };
            if let Some(record) = rel.strip_prefix(&format!("{USAGE_DIR}/")) {
                if let Some((krate, ms)) = record.rsplit_once('/')
                    && let Ok(ms) = ms.parse::<u64>()
                {
                    scan.records
                        .entry(krate.to_string())
                        .or_default()
                        .push((meta.location.clone(), from_unix_ms(ms)));
                }
                continue;
            }
            // Only what parses as a crate key is a crate (not the lease, not stray objects).
            if let Ok(key) = rel.parse::<CrateKey>() {
                scan.crates
                    .push((key, meta.size, object_time(meta.last_modified)));
            }
        }
        Ok(scan)
    }

    pub(super) async fn list(&self) -> io::Result<Vec<CrateInfo>> {
        let scan = self.scan().await?;
        Ok(scan
            .crates
            .iter()
            .map(|(key, len, stored)| {
                let records = scan.records.get(&key.as_relative());
                CrateInfo {
                    key: key.clone(),
                    len: *len,
                    last_use: newest(records).map_or(*stored, |t| t.max(*stored)),
                }
            })
            .collect())
    }

    /// The keys of a crate's usage records.
    async fn records_of(&self, rel: &str) -> io::Result<Vec<Path>> {
        self.store
            .list(Some(&self.records_dir(rel)?))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(to_io)
    }

    /// The newest usage record of a crate.
    async fn newest_record(&self, rel: &str) -> io::Result<Option<SystemTime>> {
        Ok(self
            .records_of(rel)
            .await?
            .iter()
            .filter_map(|p| p.filename()?.parse::<u64>().ok())
            .max()
            .map(from_unix_ms))
    }

    pub(super) async fn last_use(&self, key: &CrateKey) -> io::Result<Option<SystemTime>> {
        let rel = &key.as_relative();
        let key = self.key(rel)?;
        let (head, record) = tokio::join!(self.store.head(&key), self.newest_record(rel));
        let stored = match head {
            Ok(meta) => object_time(meta.last_modified),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(to_io(e)),
        };
        Ok(Some(record?.map_or(stored, |t| t.max(stored))))
    }

    /// Deletes a crate and its usage records (and this replica's local copy).
    pub(super) async fn remove(&self, key: &CrateKey) -> io::Result<bool> {
        let rel = &key.as_relative();
        if let Some(cache) = &self.local_cache {
            cache.remove(rel);
        }
        match self.store.delete(&self.key(rel)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(to_io(e)),
        }
        let records = self.records_of(rel).await?;
        self.delete_all(records).await?;
        self.written.lock().expect("lock poisoned").remove(rel);
        Ok(true)
    }

    async fn delete_all(&self, keys: Vec<Path>) -> io::Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let n = keys.len();
        let mut results = self
            .store
            .delete_stream(futures_util::stream::iter(keys.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(to_io(e)),
            }
        }
        Ok(n)
    }

    /// Deletes usage records a newer record of the same crate supersedes, and the records of
    /// crates that are gone once they are older than `cutoff`. Returns how many went.
    pub(super) async fn prune_records(&self, cutoff: SystemTime) -> io::Result<usize> {
        let scan = self.scan().await?;
        let stored: std::collections::HashSet<String> = scan
            .crates
            .iter()
            .map(|(key, _, _)| key.as_relative())
            .collect();
        let mut doomed = Vec::new();
        for (rel, mut records) in scan.records {
            records.sort_by_key(|(_, t)| *t);
            let newest = records.last().map(|(_, t)| *t).unwrap_or(UNIX_EPOCH);
            let keep = if stored.contains(&rel) || newest >= cutoff {
                1
            } else {
                0
            };
            let n = records.len() - keep;
            doomed.extend(records.into_iter().take(n).map(|(p, _)| p));
        }
        self.delete_all(doomed).await
    }

    /// Writes a usage record per crate, unless this process wrote one for it less than the
    /// resolution ago.
    pub(super) async fn record_uses(&self, uses: Vec<(CrateKey, SystemTime)>) -> usize {
        let todo: Vec<_> = {
            let written = self.written.lock().expect("lock poisoned");
            uses.into_iter()
                .map(|(key, when)| (key.as_relative(), when))
                .filter(|(rel, when)| {
                    written
                        .get(rel)
                        .is_none_or(|prev| *when >= *prev + self.resolution)
                })
                .collect()
        };
        let results: Vec<_> = futures_util::stream::iter(todo)
            .map(|(rel, when)| async move {
                let key = self.key(&format!("{USAGE_DIR}/{rel}/{}", unix_ms(when)))?;
                self.store
                    .put(&key, PutPayload::new())
                    .await
                    .map_err(to_io)?;
                Ok::<_, io::Error>((rel, when))
            })
            .buffer_unordered(RECORD_WRITES)
            .collect()
            .await;
        let mut written = self.written.lock().expect("lock poisoned");
        let mut n = 0;
        for r in results {
            match r {
                Ok((rel, when)) => {
                    n += 1;
                    let prev = written.entry(rel).or_insert(when);
                    *prev = (*prev).max(when);
                }
                Err(e) => tracing::warn!(error = %e, "cannot record a use in the bucket"),
            }
        }
        n
    }

    /// A replica writes a crate's usage record at most once per this time.
    pub(super) fn resolution(&self) -> Duration {
        self.resolution
    }

    /// The bucket answers (the lease key need not exist).
    pub async fn check(&self) -> Result<(), String> {
        match self.store.head(&self.lock_key()).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Probes whether the bucket honours conditional writes (see [`probe`]) and keeps the
    /// answer; a bucket that does not answer keeps the last one.
    pub async fn probe(&self) -> Conditional {
        let key = Path::parse(format!(
            "{}{PROBE_DIR}/{}",
            self.prefix,
            lease::owner_id().replace('/', "-")
        ))
        .expect("valid key");
        match probe::probe(&self.store, &key).await {
            Ok(c) => {
                if let Conditional::Ignored(what) = &c {
                    tracing::error!(
                        bucket = %self.bucket,
                        what = %what,
                        leader = self.leader,
                        "the bucket does not honour conditional writes: the fleet-wide cleanup \
                         lease cannot be trusted and is never taken; crate cleanups run only \
                         where CRATERE_CLEANUP_LEADER=true"
                    );
                }
                self.conditional.set(c.clone());
                c
            }
            Err(e) => {
                tracing::warn!(bucket = %self.bucket, error = %e,
                    "cannot probe the bucket's conditional writes");
                self.conditional.get()
            }
        }
    }

    /// What the last probe found.
    pub fn conditional(&self) -> Conditional {
        self.conditional.get()
    }

    /// `CRATERE_CLEANUP_LEADER`.
    pub fn is_cleanup_leader(&self) -> bool {
        self.leader
    }

    /// Takes the fleet-wide cleanup lease; `None` while another replica holds it.
    pub async fn lease(
        &self,
        clock: Arc<dyn Clock>,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Lease>> {
        self.lease_renewed_every(clock, stop, LEASE_RENEW).await
    }

    /// [`S3Crates::lease`] with another renewal period (tests).
    pub async fn lease_renewed_every(
        &self,
        clock: Arc<dyn Clock>,
        stop: &CancellationToken,
        every: Duration,
    ) -> anyhow::Result<Option<Lease>> {
        Lease::acquire(self.store.clone(), self.lock_key(), clock, stop, every).await
    }
}

#[derive(Default)]
struct Scan {
    /// (crate, size, upload time)
    crates: Vec<(CrateKey, u64, SystemTime)>,
    /// Usage records by crate key.
    records: HashMap<String, Vec<(Path, SystemTime)>>,
}

fn newest(records: Option<&Vec<(Path, SystemTime)>>) -> Option<SystemTime> {
    records?.iter().map(|(_, t)| *t).max()
}
