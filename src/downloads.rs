//! Crate downloads: hits stream from the cache; a miss starts one upstream fetch per file
//! however many clients ask. The fetch writes to a temp file while hashing; every waiting
//! client tails that file as it grows, so bytes reach all of them as they arrive. When the
//! body is complete and its sha256 matches the index `cksum`, the file is renamed into the
//! cache and the last bytes are released to the clients. On truncation, checksum mismatch or
//! an upstream error the temp file is dropped and the clients' responses are aborted, so none
//! of them ever sees a complete-looking 200.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::index_cache::{IndexCache, IndexKey};
use crate::metrics::{Kind, Metrics};
use crate::names::{CrateKey, CrateName, Version};
use crate::storage::CrateStore;
use crate::upstream::{Upstream, UpstreamError, crate_url};
use crate::usage::Usage;

/// Why a crate could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    /// No such crate or version (the index says so, or upstream has no file for it).
    #[error("{0}")]
    NotFound(String),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("the downloaded crate did not match the checksum in the index")]
    Checksum,
    /// The crate store failed (a local disk error; a failing bucket falls back to upstream).
    #[error("crate store: {0}")]
    Store(String),
    /// [`crate::config::UpstreamConfig::max_downloads`] fetches are running or queued.
    #[error("too many crate downloads in progress (CRATERE_MAX_DOWNLOADS); try again shortly")]
    Busy,
    #[error("{0}")]
    Internal(&'static str),
}

impl From<std::io::Error> for DownloadError {
    fn from(e: std::io::Error) -> Self {
        DownloadError::Store(e.to_string())
    }
}

/// Size of reads from a cached or in-flight file.
const READ_CHUNK: usize = 128 * 1024;

/// Progress of one upstream fetch, broadcast to the clients waiting on it.
#[derive(Debug, Clone)]
enum Progress {
    /// Looking up the checksum, connecting upstream.
    Starting,
    /// Upstream answered; `written` bytes are in the temp file. `total` is upstream's
    /// Content-Length, when given.
    Streaming {
        written: u64,
        total: Option<u64>,
    },
    /// Verified: every byte may go to the clients. The crate is still being stored (an
    /// upload to S3 takes a while; clients need not wait for it).
    Verified {
        len: u64,
    },
    /// Verified and stored (or, if the store failed, verified and still readable).
    Done {
        len: u64,
    },
    /// The file turned out to be in the cache already: read it from there.
    AlreadyCached,
    Failed(DownloadError),
}

struct Flight {
    state: watch::Sender<Progress>,
    /// The temp file being written, set once upstream has answered (a fetch that waits on
    /// the index, a slot or upstream holds no descriptor); never set if it could not be
    /// created. Readers use positional reads on it, so they keep working after it has been
    /// renamed into the cache.
    file: std::sync::OnceLock<Arc<std::fs::File>>,
    /// When the disk fills up mid-download, the rest of the body is kept here instead, so
    /// the clients still get the crate (it is then not cached).
    spill: Mutex<Option<Spill>>,
}

/// Bytes past `disk_len` of a download that could not be written to disk.
#[derive(Debug, Default)]
struct Spill {
    /// Bytes safely in the temp file; everything after is in `chunks`.
    disk_len: u64,
    /// (offset in the body, bytes)
    chunks: Vec<(u64, Bytes)>,
}

impl Spill {
    /// Up to `max` bytes starting at body offset `pos` (which must be ≥ `disk_len`).
    fn read(&self, pos: u64, max: u64) -> Option<Bytes> {
        let i = self
            .chunks
            .partition_point(|(off, c)| off + c.len() as u64 <= pos);
        let (off, chunk) = self.chunks.get(i)?;
        let start = (pos - off) as usize;
        let end = (start as u64 + max).min(chunk.len() as u64) as usize;
        Some(chunk.slice(start..end))
    }
}

/// A crate on its way to a client.
pub struct Download {
    /// The bytes, read as they are sent (never buffered whole); an error ends the body early.
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
    pub len: Option<u64>,
    /// True when served from the cache without an upstream fetch.
    pub hit: bool,
}

/// A crate file that [`Downloads::ensure_cached`] made sure is in the cache.
#[derive(Debug, Clone, Copy)]
pub struct Cached {
    /// True when it was fetched from upstream now, false when it was cached already.
    pub fetched: bool,
    pub len: u64,
}

pub struct Downloads {
    store: CrateStore,
    index: Arc<IndexCache>,
    upstream: Upstream,
    /// `CRATERE_UPSTREAM_DL`; when unset, upstream's config.json says.
    dl_override: Option<String>,
    metrics: Arc<Metrics>,
    /// Every hit and every stored miss is recorded as a use (for cleanup).
    usage: Arc<Usage>,
    inflight: Arc<Mutex<HashMap<CrateKey, Arc<Flight>>>>,
    /// `CRATERE_MAX_DOWNLOADS`: the bound on `inflight`.
    max_in_flight: usize,
    /// Versions a revalidation of their index file did not list, for [`UNLISTED_TTL`].
    unlisted: moka::sync::Cache<CrateKey, ()>,
}

/// How long a version upstream's index did not list is answered 404 without asking again.
const UNLISTED_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl Downloads {
    pub fn new(
        store: CrateStore,
        index: Arc<IndexCache>,
        upstream: Upstream,
        dl_override: Option<String>,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
        usage: Arc<Usage>,
    ) -> Downloads {
        Downloads {
            max_in_flight,
            store,
            index,
            upstream,
            dl_override,
            metrics,
            usage,
            inflight: Arc::default(),
            unlisted: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(UNLISTED_TTL)
                .build(),
        }
    }

    pub fn store(&self) -> &CrateStore {
        &self.store
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// A crate for a client: from the cache (a hit), or streamed from upstream while it is
    /// fetched. `zero_copy`: the client's connection can `sendfile` (see [`crate::sendfile`]).
    /// `needs_length`: the client cannot tell an aborted body from a complete one unless it
    /// is given a length (HTTP/1.0 has no chunked encoding: a body ends when the connection
    /// closes), so a miss whose length upstream does not say is verified before it is sent.
    pub async fn get(
        self: &Arc<Self>,
        name: &CrateName,
        version: &Version,
        zero_copy: bool,
        needs_length: bool,
    ) -> Result<Download, DownloadError> {
        let key = CrateKey::new(name, version);
        // Two rounds: if a fetch finds the file already cached (a race with another fetch
        // finishing), read it from the cache.
        for _ in 0..2 {
            match self.store.open_to_send(&key, zero_copy).await {
                Ok(Some(stored)) => {
                    self.usage.record_crate(&key);
                    return Ok(Download {
                        len: Some(stored.len),
                        body: stored.into_stream(),
                        hit: true,
                    });
                }
                Ok(None) => {}
                // A bucket that fails is no reason to fail the client: fetch upstream.
                Err(e) if self.store.is_remote() => {
                    tracing::warn!(krate = %key.as_relative(), error = %e,
                        "cannot read from the crate store; fetching upstream");
                }
                Err(e) => return Err(e.into()),
            }
            let flight = self.join_or_start(&key, name)?;
            let mut rx = flight.state.subscribe();
            // A miss may need the index file and then the crate from a stalling upstream, each
            // allowed the idle timeout: the client gets its answer within one idle timeout
            // (below cargo's 30 s), while the fetch goes on and caches the crate if it can.
            let started = tokio::time::timeout(
                self.upstream.idle_timeout(),
                rx.wait_for(|s| !matches!(s, Progress::Starting)),
            )
            .await
            .map_err(|_| DownloadError::Upstream(UpstreamError::Timeout))?;
            let state = started
                .map_err(|_| DownloadError::Internal("download task vanished"))?
                .clone();
            let mut total = match state {
                Progress::Starting => unreachable!(),
                Progress::AlreadyCached => continue,
                Progress::Failed(f) => return Err(f),
                Progress::Streaming { total, .. } => total,
                Progress::Verified { len } | Progress::Done { len } => Some(len),
            };
            if total.is_none() && needs_length {
                let end = rx
                    .wait_for(|s| {
                        matches!(
                            s,
                            Progress::Verified { .. } | Progress::Done { .. } | Progress::Failed(_)
                        )
                    })
                    .await
                    .map_err(|_| DownloadError::Internal("download task vanished"))?
                    .clone();
                match end {
                    Progress::Failed(f) => return Err(f),
                    Progress::Verified { len } | Progress::Done { len } => total = Some(len),
                    _ => unreachable!(),
                }
            }
            return Ok(Download {
                body: Box::pin(tail(flight.clone(), rx, total)),
                len: total,
                hit: false,
            });
        }
        Err(DownloadError::Internal(
            "crate file vanished right after it was stored",
        ))
    }

    /// Makes sure a crate file is in the cache, fetching it (verified, coalesced with any
    /// download of it already running) if it is not; waits until it is stored. Counts as a use.
    pub async fn ensure_cached(
        self: &Arc<Self>,
        name: &CrateName,
        version: &Version,
    ) -> Result<Cached, DownloadError> {
        let key = CrateKey::new(name, version);
        for _ in 0..2 {
            if let Some(len) = self.store.len(&key).await? {
                self.usage.record_crate(&key);
                return Ok(Cached {
                    fetched: false,
                    len,
                });
            }
            let flight = self.join_or_start(&key, name)?;
            let mut rx = flight.state.subscribe();
            let state = rx
                .wait_for(|s| {
                    matches!(
                        s,
                        Progress::Done { .. } | Progress::AlreadyCached | Progress::Failed(_)
                    )
                })
                .await
                .map_err(|_| DownloadError::Internal("download task vanished"))?
                .clone();
            match state {
                Progress::AlreadyCached => continue,
                Progress::Failed(f) => return Err(f),
                Progress::Done { len } => return Ok(Cached { fetched: true, len }),
                Progress::Starting | Progress::Streaming { .. } | Progress::Verified { .. } => {
                    unreachable!()
                }
            }
        }
        Err(DownloadError::Internal(
            "crate file vanished right after it was stored",
        ))
    }

    fn join_or_start(
        self: &Arc<Self>,
        key: &CrateKey,
        requested: &CrateName,
    ) -> Result<Arc<Flight>, DownloadError> {
        let mut map = self.inflight.lock().expect("lock poisoned");
        if let Some(f) = map.get(key) {
            self.metrics.coalesced(Kind::Crate);
            return Ok(f.clone());
        }
        if map.len() >= self.max_in_flight {
            return Err(DownloadError::Busy);
        }
        let (state, _) = watch::channel(Progress::Starting);
        let flight = Arc::new(Flight {
            state,
            file: std::sync::OnceLock::new(),
            spill: Mutex::new(None),
        });
        map.insert(key.clone(), flight.clone());
        let this = self.clone();
        let (k, f, requested) = (key.clone(), flight.clone(), requested.clone());
        self.metrics.download_started();
        tokio::spawn(async move {
            let end = this.fetch(&k, &requested, &f).await;
            this.metrics.download_ended();
            match &end {
                Err(fail) => {
                    tracing::warn!(krate = %k.as_relative(), error = ?fail, "download failed");
                }
                Ok(Progress::Done { .. }) => this.usage.record_crate(&k),
                Ok(_) => {}
            }
            // Leave the map before telling the waiters, so that a retry after a failure
            // starts a fresh fetch, and after success finds the file in the cache.
            this.inflight.lock().expect("lock poisoned").remove(&k);
            f.state.send_replace(match end {
                Ok(progress) => progress,
                Err(fail) => Progress::Failed(fail),
            });
        });
        Ok(flight)
    }

    /// The whole fetch of one crate file. Returns the final state.
    async fn fetch(
        &self,
        key: &CrateKey,
        requested: &CrateName,
        flight: &Flight,
    ) -> Result<Progress, DownloadError> {
        let rel = key.as_relative();
        if let Ok(Some(_)) = self.store.len(key).await {
            return Ok(Progress::AlreadyCached);
        }
        let (canonical, cksum) = self.checksum(requested, key.version()).await?;
        let template = self.dl_template().await?;
        let url = crate_url(&template, &canonical, key.version(), &cksum)
            .map_err(DownloadError::Upstream)?;
        let Some(mut body) = self.upstream.fetch_crate(url).await? else {
            return Err(DownloadError::NotFound(format!(
                "upstream has no file for {canonical} {}",
                key.version()
            )));
        };
        let tmp = self.temp_file(flight).await;
        let (written, hasher, writer) = self.receive(&mut body, tmp, flight, &rel).await?;
        let got = hex::encode(hasher.finalize());
        if got != cksum {
            tracing::error!(krate = %rel, expected = %cksum, got = %got, "checksum mismatch");
            self.metrics
                .upstream_error(Kind::Crate, "checksum", "checksum mismatch");
            return Err(DownloadError::Checksum);
        }
        let Some(writer) = writer else {
            return Ok(Progress::Done { len: written });
        };
        if self.store.is_remote() {
            // Clients get their last bytes now, from the temp file; the upload follows.
            flight
                .state
                .send_replace(Progress::Verified { len: written });
        }
        match self.store.store(writer, key).await {
            Ok(()) => self.metrics.crate_stored(written),
            Err(e) => {
                tracing::warn!(krate = %rel, error = %e, "crate verified but could not be stored")
            }
        }
        Ok(Progress::Done { len: written })
    }

    /// The temp file a fetch writes to, shared with the flight's readers; `None` (the
    /// download is then served from memory, not cached) if it cannot be created.
    async fn temp_file(&self, flight: &Flight) -> Option<tempfile::NamedTempFile> {
        let store = self.store.clone();
        let created = tokio::task::spawn_blocking(move || {
            let tmp = store.temp_file()?;
            let shared = tmp.as_file().try_clone()?;
            Ok::<_, std::io::Error>((tmp, shared))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match created {
            Ok((tmp, shared)) => {
                let _ = flight.file.set(Arc::new(shared));
                Some(tmp)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a temp file; this download will not be cached");
                *flight.spill.lock().expect("lock poisoned") = Some(Spill::default());
                None
            }
        }
    }

    /// Streams an upstream body into the temp file (or, once the disk fails, into the
    /// flight's spill), hashing it and publishing progress. Returns the length, the hash and
    /// the temp file (`None` when the disk failed: the crate is then served, not cached).
    async fn receive(
        &self,
        body: &mut crate::upstream::CrateBody,
        tmp: Option<tempfile::NamedTempFile>,
        flight: &Flight,
        rel: &str,
    ) -> Result<(u64, Sha256, Option<tempfile::NamedTempFile>), DownloadError> {
        let total = body.len;
        flight
            .state
            .send_replace(Progress::Streaming { written: 0, total });

        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let mut writer = tmp;
        loop {
            let chunk = body
                .chunk()
                .await
                .map_err(|e| DownloadError::Upstream(self.upstream.failed(Kind::Crate, e)))?;
            let Some(chunk) = chunk else { break };
            self.upstream.received(chunk.len());
            hasher.update(&chunk);
            written += chunk.len() as u64;
            if total.is_some_and(|t| written > t) {
                return Err(DownloadError::Upstream(UpstreamError::Body(
                    "longer than its Content-Length".into(),
                )));
            }
            match writer.take() {
                Some(w) => match write_blocking(w, chunk.clone()).await {
                    Ok(w) => writer = Some(w),
                    Err(e) => {
                        // Disk full (or failing): keep serving this download from memory;
                        // the partial temp file is dropped, nothing is cached.
                        tracing::warn!(krate = %rel, error = %e,
                            "cannot write to the cache; serving this download without caching it");
                        let disk_len = written - chunk.len() as u64;
                        *flight.spill.lock().expect("lock poisoned") = Some(Spill {
                            disk_len,
                            chunks: vec![(disk_len, chunk)],
                        });
                    }
                },
                None => {
                    let mut spill = flight.spill.lock().expect("lock poisoned");
                    let spill = spill.get_or_insert_with(Spill::default);
                    spill.chunks.push((written - chunk.len() as u64, chunk));
                }
            }
            flight
                .state
                .send_replace(Progress::Streaming { written, total });
        }
        if total.is_some_and(|t| written != t) {
            let e = UpstreamError::Body("truncated".into());
            return Err(DownloadError::Upstream(
                self.upstream.failed(Kind::Crate, e),
            ));
        }
        Ok((written, hasher, writer))
    }

    /// The canonical name and sha256 of a version, from the index (revalidated once if the
    /// version is not in the cached copy: it may have been published since).
    async fn checksum(
        &self,
        requested: &CrateName,
        version: &Version,
    ) -> Result<(CrateName, String), DownloadError> {
        let key = IndexKey::Crate(requested.index_path());
        let wanted = CrateKey::new(requested, version);
        for force in [false, true] {
            // A version just looked for upstream and not found is not looked for again at
            // once: clients asking for it over and over must not drive upstream traffic.
            if force && self.unlisted.contains_key(&wanted) {
                break;
            }
            let res = self.index.get(&key, force).await;
            match res {
                Ok(Some((entry, served))) => {
                    if let Some(found) = find_version(&entry.body, requested, version) {
                        return Ok(found);
                    }
                    // Upstream could not be asked: the version may exist there. A 404 would
                    // be final for cargo; the upstream error is retried.
                    if let crate::index_cache::Served::Stale(e) = served {
                        return Err(DownloadError::Upstream(e));
                    }
                    if force {
                        self.unlisted.insert(wanted.clone(), ());
                    }
                }
                Ok(None) => {
                    return Err(DownloadError::NotFound(format!(
                        "no crate named {requested}"
                    )));
                }
                Err(e) => return Err(DownloadError::Upstream(e)),
            }
        }
        Err(DownloadError::NotFound(format!(
            "{requested} has no version {version}"
        )))
    }

    async fn dl_template(&self) -> Result<String, DownloadError> {
        if let Some(t) = &self.dl_override {
            return Ok(t.clone());
        }
        let res = self.index.get(&IndexKey::Config, false).await;
        let entry = match res {
            Ok(Some((entry, _))) => entry,
            Ok(None) => {
                return Err(DownloadError::Upstream(UpstreamError::Config(
                    "upstream has no config.json".into(),
                )));
            }
            Err(e) => return Err(DownloadError::Upstream(e)),
        };
        #[derive(Deserialize)]
        struct UpstreamConfig {
            dl: String,
        }
        serde_json::from_slice::<UpstreamConfig>(&entry.body)
            .map(|c| c.dl)
            .map_err(|e| {
                DownloadError::Upstream(UpstreamError::Config(format!(
                    "upstream config.json has no usable dl: {e}"
                )))
            })
    }
}

/// Finds the index line of `version` and returns the crate's canonical name and its cksum.
/// Only the three fields needed are parsed; the line itself is never re-serialized.
pub(crate) fn find_version(
    index: &[u8],
    requested: &CrateName,
    version: &Version,
) -> Option<(CrateName, String)> {
    #[derive(Deserialize)]
    struct Line {
        name: String,
        vers: String,
        cksum: String,
    }
    let needle = version.as_str().as_bytes();
    index
        .split(|&b| b == b'\n')
        .filter(|l| l.windows(needle.len()).any(|w| w == needle))
        .filter_map(|l| serde_json::from_slice::<Line>(l).ok())
        .find(|l| l.vers == version.as_str() && l.name.eq_ignore_ascii_case(requested.as_str()))
        .and_then(|l| {
            let name = l.name.parse().ok()?;
            let valid = l.cksum.len() == 64 && l.cksum.bytes().all(|b| b.is_ascii_hexdigit());
            valid.then(|| (name, l.cksum.to_ascii_lowercase()))
        })
}

async fn write_blocking(
    mut tmp: tempfile::NamedTempFile,
    chunk: Bytes,
) -> std::io::Result<tempfile::NamedTempFile> {
    tokio::task::spawn_blocking(move || tmp.write_all(&chunk).map(|_| tmp))
        .await
        .map_err(std::io::Error::other)?
}

/// Streams an in-flight download to one client: everything written so far, then more as it
/// arrives. When the length is known, the final byte is held back until the file is verified,
/// and without a length the chunked body is only terminated then; a failure aborts the stream.
fn tail(
    flight: Arc<Flight>,
    rx: watch::Receiver<Progress>,
    total: Option<u64>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(
        (flight, rx, 0u64),
        move |(flight, mut rx, pos)| async move {
            loop {
                if pos == u64::MAX {
                    return None; // an error was already sent
                }
                let state = rx.borrow_and_update().clone();
                let (limit, done) = match state {
                    Progress::Streaming { written, .. } => {
                        let held_back = total.map_or(written, |t| written.min(t.saturating_sub(1)));
                        (held_back, false)
                    }
                    Progress::Verified { len } | Progress::Done { len } => (len, true),
                    Progress::Failed(f) => {
                        let err = std::io::Error::other(format!("download failed: {f:?}"));
                        return Some((Err(err), (flight, rx, u64::MAX)));
                    }
                    Progress::Starting | Progress::AlreadyCached => (0, false),
                };
                if pos < limit {
                    let read = read_at(&flight, pos, limit - pos).await;
                    return match read {
                        Ok(buf) => {
                            let next = pos + buf.len() as u64;
                            Some((Ok(buf), (flight, rx, next)))
                        }
                        Err(e) => Some((Err(e), (flight, rx, u64::MAX))),
                    };
                }
                if done {
                    return None;
                }
                if rx.changed().await.is_err() {
                    let err = std::io::Error::other("download task ended unexpectedly");
                    return Some((Err(err), (flight, rx, u64::MAX)));
                }
            }
        },
    )
}

/// Up to `max` (at most [`READ_CHUNK`]) bytes of the body at `pos`: from the temp file, or
/// from the spill past what reached the disk.
async fn read_at(flight: &Arc<Flight>, pos: u64, max: u64) -> std::io::Result<Bytes> {
    let max = max.min(READ_CHUNK as u64);
    let disk_len = {
        let spill = flight.spill.lock().expect("lock poisoned");
        match &*spill {
            Some(s) if pos >= s.disk_len => {
                return s
                    .read(pos, max)
                    .ok_or_else(|| std::io::Error::other("download bytes missing"));
            }
            Some(s) => s.disk_len,
            None => u64::MAX,
        }
    };
    let n = max.min(disk_len - pos) as usize;
    let file = flight
        .file
        .get()
        .cloned()
        .ok_or_else(|| std::io::Error::other("no temp file"))?;
    let buf = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, pos).map(|_| buf)
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spill_reads_cross_chunks() {
        let s = Spill {
            disk_len: 10,
            chunks: vec![
                (10, Bytes::from_static(b"abc")),
                (13, Bytes::from_static(b"defg")),
            ],
        };
        assert_eq!(s.read(10, 100).unwrap(), "abc");
        assert_eq!(s.read(11, 1).unwrap(), "b");
        assert_eq!(s.read(13, 100).unwrap(), "defg");
        assert_eq!(s.read(15, 100).unwrap(), "fg");
        assert!(s.read(17, 100).is_none());
    }

    #[test]
    fn finds_the_line_of_a_version() {
        let index = br#"{"name":"Foo","vers":"1.0.0","deps":[],"cksum":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","features":{},"yanked":false}
{"name": "Foo", "vers": "1.0.1", "deps": [], "cksum": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "features": {}, "yanked": true, "rust_version": "1.70"}
not json 1.0.2
"#;
        let name: CrateName = "foo".parse().unwrap();
        let (n, c) = find_version(index, &name, &"1.0.0".parse().unwrap()).unwrap();
        assert_eq!((n.as_str(), c.as_str()), ("Foo", &*"a".repeat(64)));
        let (_, c) = find_version(index, &name, &"1.0.1".parse().unwrap()).unwrap();
        assert_eq!(c, "b".repeat(64));
        assert!(find_version(index, &name, &"1.0.2".parse().unwrap()).is_none());
        assert!(find_version(index, &name, &"1.0.10".parse().unwrap()).is_none());
        let other: CrateName = "bar".parse().unwrap();
        assert!(find_version(index, &other, &"1.0.0".parse().unwrap()).is_none());
    }
}
