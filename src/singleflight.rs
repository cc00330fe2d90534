//! Single-flight: concurrent callers asking for the same key share one computation.
//!
//! The computation runs in its own task, so it completes (and fills the cache) even if every
//! caller goes away; no lock is held while it runs.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

/// A computation in flight; `None` if it panicked.
type Flight<V> = Shared<BoxFuture<'static, Option<V>>>;

pub struct SingleFlight<K, V: Clone> {
    inflight: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Starts `make()` unless a computation for `key` is already in flight, in which case
    /// that one is joined. Returns the shared result (`None` only if the computation
    /// panicked) and, at once, whether this caller joined another's flight.
    pub fn start_or_join<F, Fut>(
        &self,
        key: K,
        make: F,
    ) -> (impl Future<Output = Option<V>> + use<K, V, F, Fut>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        {
            let mut map = self.inflight.lock().expect("lock poisoned");
            if let Some(f) = map.get(&key) {
                (f.clone(), true)
            } else {
                let fut = make();
                let map_ref = self.inflight.clone();
                let k = key.clone();
                let handle = tokio::spawn(async move {
                    let v = fut.await;
                    // Removed after the work is done (and, for caches, after the result is
                    // stored), so a caller arriving later finds the stored result.
                    map_ref.lock().expect("lock poisoned").remove(&k);
                    v
                });
                let f = handle.map(|r| r.ok()).boxed().shared();
                map.insert(key, f.clone());
                (f, false)
            }
        }
    }

    /// [`SingleFlight::start_or_join`] and wait for the result.
    pub async fn run<F, Fut>(&self, key: K, make: F) -> (Option<V>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (fut, joined) = self.start_or_join(key, make);
        (fut.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let sf = Arc::new(SingleFlight::<u32, u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = Arc::new(Mutex::new(Some(rx)));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (sf, runs, rx) = (sf.clone(), runs.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                sf.run(1, move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let rx = rx.lock().unwrap().take().unwrap();
                    async move {
                        rx.await.unwrap();
                        42
                    }
                })
                .await
            }));
        }
        // On the single-threaded test runtime, yielding lets every spawned caller run until it
        // parks on the flight; then let the flight finish.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tx.send(()).unwrap();
        let mut joined = 0;
        for t in tasks {
            let (v, j) = t.await.unwrap();
            assert_eq!(v, Some(42));
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 9);
        // The next call after completion runs again.
        let (v, j) = sf.run(1, || async { 7 }).await;
        assert_eq!((v, j), (Some(7), false));
    }
}
