//! The sparse index cache: upstream index files (and upstream's config.json) stored on disk
//! with their validators, served while fresh, revalidated when stale, served stale when
//! upstream fails.
//!
//! Each cached file is one disk file: a JSON header line (validators, sha256 and length of the
//! body) followed by the body exactly as upstream sent it. Header and body are replaced
//! together by one rename, so they always match. The file's mtime is the time it was last
//! confirmed with upstream; a revalidation that finds it unchanged only touches the mtime.

mod ahead;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::HeaderValue;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::metrics::{Kind, Metrics};
use crate::names::IndexPath;
use crate::singleflight::SingleFlight;
use crate::storage::FsStore;
use crate::upstream::{IndexFetch, Upstream, UpstreamError, Validators};
use crate::usage::Usage;

pub use ahead::{dependencies_of_newest, spawn_refresh_ahead};

/// What the cache holds: a crate's index file or upstream's config.json.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexKey {
    Config,
    Crate(IndexPath),
}

impl IndexKey {
    /// Relative path upstream and in the store.
    pub fn relative(&self) -> String {
        match self {
            IndexKey::Config => "config.json".to_string(),
            IndexKey::Crate(p) => p.as_relative(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    sha256: String,
    len: u64,
    #[serde(flatten)]
    validators: Validators,
    /// Upstream last answered 404/410/451: the body is the last copy it gave.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    gone: bool,
}

/// A cached index file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The bytes exactly as upstream sent them.
    pub body: Bytes,
    /// Hex sha256 of `body`.
    pub sha256: Arc<str>,
    /// The strong ETag served to clients: the sha256, quoted (made once, not per request).
    pub etag: HeaderValue,
    pub validators: Arc<Validators>,
    /// When upstream last confirmed these bytes (or, when `gone`, their absence).
    pub fetched: SystemTime,
    /// Upstream said the crate no longer exists. The copy is kept (a misconfigured upstream
    /// must not empty the cache) until a cleanup removes it, but clients get 404.
    pub gone: bool,
}

impl Entry {
    fn new(
        body: Bytes,
        sha256: String,
        validators: Validators,
        fetched: SystemTime,
        gone: bool,
    ) -> Entry {
        let etag = HeaderValue::from_maybe_shared(Bytes::from(format!("\"{sha256}\"")))
            .expect("a hex digest is a valid header value");
        Entry {
            body,
            sha256: sha256.into(),
            etag,
            validators: Arc::new(validators),
            fetched,
            gone,
        }
    }

    /// Time since upstream confirmed it. A time in the future (a clock that jumped back, a
    /// file copied from elsewhere) is no reason to serve it forever: it counts as stale.
    fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fetched).unwrap_or(Duration::MAX)
    }
}

/// Why an index file is revalidated with no client waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// A client got the copy past its TTL ([`Served::Revalidating`]).
    StaleWhileRevalidate,
    /// Used recently and about to expire.
    Ahead,
    /// A dependency of a file just fetched.
    Prefetch,
    /// The git mirror's sync saw it change upstream.
    GitSync,
}

impl Background {
    pub fn as_str(self) -> &'static str {
        match self {
            Background::StaleWhileRevalidate => "stale_while_revalidate",
            Background::Ahead => "ahead",
            Background::Prefetch => "prefetch",
            Background::GitSync => "git_sync",
        }
    }
}

/// How the cache answered.
#[derive(Debug, Clone)]
pub enum Served {
    Hit,
    Miss,
    Revalidated,
    /// Past its TTL but within `CRATERE_INDEX_MAX_STALE`: answered from the cache at once
    /// while a revalidation runs in the background.
    Revalidating,
    /// Upstream failed; this is the last copy it gave.
    Stale(UpstreamError),
}

#[derive(Debug, Clone)]
enum Refreshed {
    Found {
        entry: Entry,
        changed: bool,
    },
    /// Upstream says there is no such file; the tombstone kept for the copy we had, if any.
    NotFound(Option<Entry>),
}

pub struct IndexCache {
    store: FsStore,
    upstream: Upstream,
    ttl: Duration,
    /// `CRATERE_INDEX_MAX_STALE`: how long past its TTL a copy is still answered at once.
    max_stale: Duration,
    metrics: Arc<Metrics>,
    /// Every crate index file served is recorded as a use (for cleanup); the file's mtime
    /// means "last confirmed upstream" and is not touched by a use.
    usage: Arc<Usage>,
    flights: SingleFlight<IndexKey, Result<Refreshed, UpstreamError>>,
    /// The most used index files, in memory: a hit then costs no disk access. Bounded in
    /// bytes (`CRATERE_INDEX_MEMORY_CACHE`); the disk stays the source of truth.
    memory: moka::sync::Cache<IndexKey, Entry>,
    /// Ages and confirmation times are read from it (tests move it).
    clock: Arc<dyn Clock>,
    /// Refresh-ahead and prefetch ([`ahead`]).
    ahead: ahead::Ahead,
}

impl IndexCache {
    pub fn new(
        store: FsStore,
        upstream: Upstream,
        (ttl, max_stale): (Duration, Duration),
        metrics: Arc<Metrics>,
        usage: Arc<Usage>,
        (memory_bytes, prefetch): (u64, bool),
        clock: Arc<dyn Clock>,
    ) -> IndexCache {
        let ahead = ahead::Ahead::new(prefetch, upstream.concurrency());
        let memory = moka::sync::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|k: &IndexKey, e: &Entry| {
                (e.body.len() + e.sha256.len() + k.relative().len() + 128).min(u32::MAX as usize)
                    as u32
            })
            .build();
        IndexCache {
            store,
            upstream,
            ttl,
            max_stale,
            metrics,
            usage,
            flights: SingleFlight::default(),
            memory,
            clock,
            ahead,
        }
    }

    pub fn store(&self) -> &FsStore {
        &self.store
    }

    /// The cached copy of an index file, fresh or not, without asking upstream (none once
    /// upstream said the crate is gone).
    pub async fn cached(&self, key: &IndexKey) -> Option<Entry> {
        read_entry(&self.store, key).await.filter(|e| !e.gone)
    }

    /// Looks up an index file. `Ok(None)`: upstream says it does not exist. `Err`: upstream
    /// failed and nothing is cached. `force` revalidates even a fresh copy. A crate's index
    /// file that is returned counts as used.
    pub async fn get(
        self: &Arc<Self>,
        key: &IndexKey,
        force: bool,
    ) -> Result<Option<(Entry, Served)>, UpstreamError> {
        self.note_client_use(key);
        let res = self.lookup(key, force).await;
        if let (Ok(Some(_)), IndexKey::Crate(path)) = (&res, key) {
            self.usage.record_index(path);
        }
        res
    }

    async fn lookup(
        self: &Arc<Self>,
        key: &IndexKey,
        force: bool,
    ) -> Result<Option<(Entry, Served)>, UpstreamError> {
        let cached = match self.memory.get(key) {
            Some(e) => Some(e),
            None => {
                let e = read_entry(&self.store, key).await;
                if let Some(e) = &e {
                    self.memory.insert(key.clone(), e.clone());
                }
                e
            }
        };
        if let Some(e) = &cached
            && !force
        {
            let age = e.age(self.clock.now());
            if age < self.ttl {
                return Ok((!e.gone).then(|| (e.clone(), Served::Hit)));
            }
            // Stale-while-revalidate: the client does not wait on upstream; the next one
            // finds the revalidated copy.
            if age < self.ttl.saturating_add(self.max_stale) {
                let _background = self.refresh(key, Some(Background::StaleWhileRevalidate));
                return Ok((!e.gone).then(|| (e.clone(), Served::Revalidating)));
            }
        }
        let (flight, joined) = self.refresh(key, None);
        if joined {
            self.metrics.coalesced(Kind::Index);
        }
        // With a copy to fall back on, a client waits at most one idle timeout for upstream
        // (an upstream trickling bytes never trips the idle timeout itself); the revalidation
        // goes on in the background and the next request finds its result.
        let res = match &cached {
            Some(_) => match tokio::time::timeout(self.upstream.idle_timeout(), flight).await {
                Ok(res) => res,
                Err(_) => Some(Err(UpstreamError::Timeout)),
            },
            None => flight.await,
        };
        let res = res.unwrap_or_else(|| Err(UpstreamError::Body("internal task failed".into())));
        match res {
            Ok(Refreshed::Found { entry, changed }) => {
                let how = if changed || cached.is_none() {
                    Served::Miss
                } else {
                    Served::Revalidated
                };
                Ok(Some((entry, how)))
            }
            Ok(Refreshed::NotFound(_)) => Ok(None),
            Err(e) => match cached {
                // Upstream's last word was that it is gone.
                Some(c) if c.gone => Ok(None),
                Some(c) => {
                    tracing::warn!(key = %key.relative(), error = %e, "upstream failed; serving stale index file");
                    Ok(Some((c, Served::Stale(e))))
                }
                None => Err(e),
            },
        }
    }
}

impl IndexCache {
    /// Starts (or joins) the revalidation of `key`: one per file at a time, run in its own
    /// task, its result stored on disk and in the memory layer whether or not anyone waits.
    /// `background`: why it runs when no client waits for it (counted in the metrics).
    fn refresh(
        self: &Arc<Self>,
        key: &IndexKey,
        background: Option<Background>,
    ) -> (
        impl std::future::Future<Output = Option<Result<Refreshed, UpstreamError>>> + use<>,
        bool,
    ) {
        let (store, upstream, k) = (self.store.clone(), self.upstream.clone(), key.clone());
        let (clock, memory) = (self.clock.clone(), self.memory.clone());
        let this = self.clone();
        self.flights.start_or_join(key.clone(), move || async move {
            let res = refresh(store, upstream, k.clone(), clock).await;
            // The memory layer first: once the metrics say a refresh landed, it has.
            match &res {
                Ok(Refreshed::Found { entry, .. }) => memory.insert(k.clone(), entry.clone()),
                Ok(Refreshed::NotFound(Some(tombstone))) => {
                    memory.insert(k.clone(), tombstone.clone())
                }
                Ok(Refreshed::NotFound(None)) => memory.invalidate(&k),
                Err(_) => {}
            }
            let changed = matches!(&res, Ok(Refreshed::Found { changed: true, .. }));
            if let Some(why) = background {
                this.metrics
                    .index_background_refresh(why.as_str(), res.is_ok(), changed);
            }
            if let (true, IndexKey::Crate(path), Ok(Refreshed::Found { entry, .. })) =
                (changed, &k, &res)
            {
                this.prefetch_dependencies(path, &entry.body);
            }
            res
        })
    }
}

impl IndexCache {
    /// The copy in the memory layer, else on disk (put in the memory layer), fresh or not.
    async fn memory_or_disk(&self, key: &IndexKey) -> Option<Entry> {
        if let Some(e) = self.memory.get(key) {
            return Some(e);
        }
        let e = read_entry(&self.store, key).await?;
        self.memory.insert(key.clone(), e.clone());
        Some(e)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn read_entry(store: &FsStore, key: &IndexKey) -> Option<Entry> {
    let path = store.path(&key.relative());
    // One blocking hop for open, stat and read (this is the hot path of every index hit).
    let p = path.clone();
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let meta = f.metadata()?;
        let mut data = Vec::with_capacity(meta.len() as usize + 1);
        f.read_to_end(&mut data)?;
        Ok::<_, std::io::Error>((data, meta))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let (data, meta) = match read {
        Ok(x) => x,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot read cached index file");
            }
            return None;
        }
    };
    let data = Bytes::from(data);
    let parsed = data.iter().position(|&b| b == b'\n').and_then(|nl| {
        let header: Header = serde_json::from_slice(&data[..nl]).ok()?;
        let body = data.slice(nl + 1..);
        (body.len() as u64 == header.len).then_some((header, body))
    });
    // A torn or damaged file (its body no longer hashes to the header's sha256) is never
    // served: it counts as absent and is fetched again.
    let Some((header, body)) = parsed.filter(|(h, body)| sha256_hex(body) == h.sha256) else {
        tracing::warn!(path = %path.display(), "ignoring a corrupt cached index file");
        return None;
    };
    Some(Entry::new(
        body,
        header.sha256,
        header.validators,
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        header.gone,
    ))
}

/// Writes an entry (header line + body) atomically.
fn write_entry(store: &FsStore, key: &IndexKey, entry: &Entry) -> std::io::Result<()> {
    use std::io::Write;
    let header = Header {
        sha256: entry.sha256.to_string(),
        len: entry.body.len() as u64,
        validators: (*entry.validators).clone(),
        gone: entry.gone,
    };
    let mut tmp = store.temp_file()?;
    let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    line.push(b'\n');
    tmp.write_all(&line)?;
    tmp.write_all(&entry.body)?;
    tmp.as_file().set_modified(entry.fetched)?;
    // Durable before it replaces the previous copy: a crash must not leave a torn file in
    // its place.
    tmp.as_file().sync_data()?;
    store.persist(tmp, &key.relative())
}

fn touch(store: &FsStore, key: &IndexKey, when: SystemTime) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(store.path(&key.relative()))?
        .set_modified(when)
}

async fn refresh(
    store: FsStore,
    upstream: Upstream,
    key: IndexKey,
    clock: Arc<dyn Clock>,
) -> Result<Refreshed, UpstreamError> {
    let old = read_entry(&store, &key).await;
    let known = old
        .as_ref()
        .map(|e| e.validators.clone())
        .unwrap_or_default();
    let fetched = upstream.fetch_index(&key.relative(), &known).await?;
    let now = clock.now();
    let store = Arc::new(store);
    let (entry, changed) = match (fetched, old) {
        (IndexFetch::NotFound, None) => return Ok(Refreshed::NotFound(None)),
        (IndexFetch::NotFound, Some(old)) => {
            // Keep the copy, marked: clients get 404; a cleanup removes it once unused.
            let tombstone = Entry {
                fetched: now,
                gone: true,
                ..old
            };
            let (s, k, e) = (store.clone(), key.clone(), tombstone.clone());
            run_blocking(move || write_entry(&s, &k, &e)).await;
            return Ok(Refreshed::NotFound(Some(tombstone)));
        }
        (IndexFetch::NotModified, Some(old)) => {
            let was_gone = old.gone;
            (Entry { gone: false, ..old }, was_gone)
        }
        (IndexFetch::NotModified, None) => {
            // Upstream answered 304 to an unconditional request: a broken upstream.
            return Err(UpstreamError::Status(304));
        }
        (IndexFetch::Modified { body, validators }, old) => {
            if let IndexKey::Crate(path) = &key
                && !crate::upstream::looks_like_index_of(&body, path.name().as_str())
            {
                tracing::warn!(key = %key.relative(), len = body.len(), "upstream sent a malformed index file; not caching it");
                return Err(upstream.failed(crate::metrics::Kind::Index, UpstreamError::NotAnIndex));
            }
            let sha256 = sha256_hex(&body);
            match old {
                Some(old)
                    if !old.gone && *old.sha256 == *sha256 && *old.validators == validators =>
                {
                    (old, false)
                }
                _ => (Entry::new(body, sha256, validators, now, false), true),
            }
        }
    };
    let entry = Entry {
        fetched: now,
        ..entry
    };
    let (s, k, e) = (store.clone(), key.clone(), entry.clone());
    if changed {
        run_blocking(move || write_entry(&s, &k, &e)).await;
    } else {
        run_blocking(move || touch(&s, &k, now)).await;
    }
    Ok(Refreshed::Found { entry, changed })
}

/// Runs a blocking store write; a failure (disk full, permissions) is logged, not fatal: the
/// bytes are still served, just not cached.
async fn run_blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot update the index cache"),
        Err(e) => tracing::error!(error = %e, "index cache write task failed"),
    }
}
