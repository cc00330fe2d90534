//! The optional bounded local copy of crates kept in S3 (`CRATERE_S3_LOCAL_CACHE_SIZE`): hits
//! of crates this replica has seen are served from its own disk, without a request to the
//! bucket.
//!
//! Files use the disk layout under `$CRATERE_CACHE` and enter it whole: a crate this replica
//! downloaded and verified (moved here after its upload), or a crate read from the bucket,
//! copied while it streams to the client and kept only if every byte arrived. The mtime of a
//! copy is its last local use; when the copies exceed the size, the least recently used go
//! until they take 90% of it. A copy never counts as a use in the bucket by itself: only
//! requests do (see [`crate::usage`]). A crate a cleanup removed from the bucket may live on in
//! other replicas' copies until they are evicted; it is still the verified file.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tempfile::NamedTempFile;

use crate::storage::fs::{FsStore, crate_files};

pub struct LocalCache {
    store: FsStore,
    max: u64,
    /// Bytes of copies (approximate between evictions, which recount).
    used: AtomicU64,
    evicting: AtomicBool,
}

impl LocalCache {
    /// The copies in `store` (walked once, at startup), bounded to `max` bytes.
    pub fn open(store: FsStore, max: u64) -> io::Result<Arc<LocalCache>> {
        let used = crate_files(store.root())?.iter().map(|(_, f)| f.len).sum();
        let cache = Arc::new(LocalCache {
            store,
            max,
            used: AtomicU64::new(used),
            evicting: AtomicBool::new(false),
        });
        cache.clone().added(0);
        Ok(cache)
    }

    /// Bytes of copies now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The local copy of a crate, if there is one (it then counts as used locally).
    pub async fn open_read(&self, rel: &str) -> Option<(tokio::fs::File, u64)> {
        let (file, len) = self.store.open_read(rel).await.ok()??;
        let file = file.into_std().await;
        // LRU order for eviction; best effort.
        let _ = file.set_modified(SystemTime::now());
        Some((tokio::fs::File::from_std(file), len))
    }

    /// Keeps a complete, verified temp file as the copy of `rel`. Blocking.
    pub fn keep(self: &Arc<Self>, tmp: NamedTempFile, rel: &str) {
        let len = tmp.as_file().metadata().map(|m| m.len()).unwrap_or(0);
        match self.store.persist(tmp, rel) {
            Ok(()) => self.clone().added(len),
            Err(e) => tracing::debug!(krate = %rel, error = %e, "no local copy"),
        }
    }

    /// Copies a body read from the bucket into a temp file as it streams; once `len` bytes
    /// have passed, the copy is kept. A body that fails or is dropped early leaves nothing.
    pub fn tee(
        self: &Arc<Self>,
        rel: &str,
        len: u64,
        body: BoxStream<'static, io::Result<Bytes>>,
    ) -> BoxStream<'static, io::Result<Bytes>> {
        let Ok(tmp) = self.store.temp_file() else {
            return body;
        };
        let state = Mutex::new(Some((tmp, 0u64)));
        let (this, rel) = (self.clone(), rel.to_string());
        body.map(move |chunk| {
            let mut st = state.lock().expect("lock poisoned");
            match (&chunk, st.as_mut()) {
                // Page-cache writes of at most a chunk: not worth a thread hop each.
                (Ok(c), Some((tmp, n))) => match tmp.write_all(c) {
                    Ok(()) => *n += c.len() as u64,
                    Err(_) => *st = None,
                },
                (Err(_), _) => *st = None,
                (Ok(_), None) => {}
            }
            if st.as_ref().is_some_and(|(_, n)| *n == len)
                && let Some((tmp, _)) = st.take()
            {
                let (this, rel) = (this.clone(), rel.clone());
                tokio::task::spawn_blocking(move || this.keep(tmp, &rel));
            }
            chunk
        })
        .boxed()
    }

    /// Drops the copy of `rel`.
    pub fn remove(&self, rel: &str) {
        if let Ok(m) = std::fs::metadata(self.store.path(rel))
            && self.store.remove(rel).is_ok()
        {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(m.len()))
                });
        }
    }

    /// Counts `n` new bytes; over the size, starts an eviction (one at a time).
    fn added(self: Arc<Self>, n: u64) {
        let used = self.used.fetch_add(n, Ordering::Relaxed) + n;
        if used <= self.max || self.evicting.swap(true, Ordering::SeqCst) {
            return;
        }
        let evict = move || {
            if let Err(e) = self.evict() {
                tracing::warn!(error = %e, "cannot evict local copies");
            }
            self.evicting.store(false, Ordering::SeqCst);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(evict)),
            Err(_) => evict(),
        }
    }

    /// Removes the least recently used copies until they take 90% of the size. Blocking.
    fn evict(&self) -> io::Result<()> {
        let mut files: Vec<_> = crate_files(self.store.root())?
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        files.sort_by_key(|f| f.modified);
        let target = self.max / 10 * 9;
        let mut total: u64 = files.iter().map(|f| f.len).sum();
        let mut removed = 0;
        for f in files {
            if total <= target {
                break;
            }
            if self.store.remove(&f.rel).is_ok() {
                total -= f.len;
                removed += 1;
            }
        }
        self.used.store(total, Ordering::Relaxed);
        tracing::debug!(removed, bytes = total, "local copies evicted");
        Ok(())
    }
}
