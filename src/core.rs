//! What every command shares, built once from the settings: the stores and their lifecycle
//! ([`Lifecycle`]: what `cratere cleanup` needs), and on top of them the upstream client, the
//! index cache and the downloads ([`Core`]: what `cratere warm` and the server need). The
//! server adds the public hosts, search, the git mirror and the HTTP layer
//! ([`crate::http::AppState`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cleanup::{Cleanup, Rules};
use crate::clock::Clock;
use crate::config::Config;
use crate::downloads::Downloads;
use crate::index_cache::IndexCache;
use crate::jobs::Schedule;
use crate::metrics::Metrics;
use crate::storage::{CrateStore, FsStore};
use crate::upstream::Upstream;
use crate::usage::Usage;

/// The caches on disk (or in the bucket), the record of their use and their cleanup.
pub struct Lifecycle {
    pub crates: CrateStore,
    /// The sparse index cache, `$CRATERE_INDEX/sparse`.
    pub index_store: FsStore,
    pub usage: Arc<Usage>,
    pub cleanup: Arc<Cleanup>,
}

impl Lifecycle {
    /// Opens the stores (creating directories, clearing abandoned temp files). Crate files
    /// without a usage record yet are adopted by [`crate::usage::spawn_jobs`] in the
    /// background, or by the first cleanup, whichever comes first.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Lifecycle> {
        let dirs = &config.storage;
        let crates = CrateStore::open(dirs, config.cleanup.max_unused)?;
        let index_store = FsStore::open(&dirs.index.join("sparse"))
            .with_context(|| format!("CRATERE_INDEX={}", dirs.index.display()))?;
        let usage = Arc::new(Usage::new(crates.clone(), index_store.root(), clock));
        let cleanup = Arc::new(Cleanup::new(
            crates.clone(),
            index_store.root(),
            usage.clone(),
            Rules::from_config(&config.cleanup),
        ));
        Ok(Lifecycle {
            crates,
            index_store,
            usage,
            cleanup,
        })
    }
}

/// The caching proxy without its HTTP side. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    pub crates: CrateStore,
    pub usage: Arc<Usage>,
    pub cleanup: Arc<Cleanup>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub index: Arc<IndexCache>,
    pub downloads: Arc<Downloads>,
    pub clock: Arc<dyn Clock>,
    readiness: Arc<Readiness>,
}

/// How long a readiness answer is reused: probes hit `/ready` every few seconds from every
/// kubelet and load balancer, and each check is an fsync and (with S3) a bucket request.
pub const READY_TTL: Duration = Duration::from_secs(2);

/// How often the server probes the bucket's conditional writes (S3 storage).
pub const BUCKET_PROBE_EVERY: Duration = Duration::from_secs(3600);

/// The last readiness answer, and the lock that makes concurrent callers share one check.
#[derive(Default)]
struct Readiness {
    last: tokio::sync::Mutex<Option<(SystemTime, Result<(), String>)>>,
}

impl Core {
    /// [`Lifecycle::open`], plus the upstream client, the index cache and the downloads.
    pub fn open(config: &Config, clock: Arc<dyn Clock>) -> anyhow::Result<Core> {
        let Lifecycle {
            crates,
            index_store,
            usage,
            cleanup,
        } = Lifecycle::open(config, clock.clone())?;
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(&config.upstream, metrics.clone())
            .context("building the upstream HTTP client")?;
        let index = Arc::new(IndexCache::new(
            index_store,
            upstream.clone(),
            (config.sparse.index_ttl, config.sparse.index_max_stale),
            metrics.clone(),
            usage.clone(),
            (
                config.sparse.index_memory_cache,
                config.sparse.index_prefetch,
            ),
            clock.clone(),
        ));
        let downloads = Arc::new(Downloads::new(
            crates.clone(),
            index.clone(),
            upstream.clone(),
            config.upstream.upstream_dl.clone(),
            config.upstream.max_downloads,
            metrics.clone(),
            usage.clone(),
        ));
        Ok(Core {
            crates,
            usage,
            cleanup,
            metrics,
            upstream,
            index,
            downloads,
            clock,
            readiness: Arc::default(),
        })
    }

    /// Whether the stores accept writes and the bucket (with S3 storage) answers: `Err` says
    /// which does not. Checked at most once per [`READY_TTL`] (by the injected clock);
    /// callers in between, and callers waiting on a check, get its answer.
    pub async fn ready(&self) -> Result<(), String> {
        let mut last = self.readiness.last.lock().await;
        let now = self.clock.now();
        if let Some((at, answer)) = last.as_ref()
            && now.duration_since(*at).is_ok_and(|age| age < READY_TTL)
        {
            return answer.clone();
        }
        self.metrics.count_ready_check();
        let answer = self.check_stores().await;
        *last = Some((now, answer.clone()));
        answer
    }

    async fn check_stores(&self) -> Result<(), String> {
        self.crates.check().await?;
        let index = self.index.store().clone();
        tokio::task::spawn_blocking(move || {
            index
                .check_writable()
                .map_err(|e| format!("index cache (CRATERE_INDEX) not writable: {e}"))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }

    /// With S3 storage: probes the bucket's conditional writes at startup and every
    /// [`BUCKET_PROBE_EVERY`] (a cleanup also probes before it decides how to run), and
    /// publishes the answer in `/metrics`.
    fn spawn_bucket_probe(&self, jobs: &TaskTracker, shutdown: &CancellationToken) {
        if self.crates.conditional_writes().is_none() {
            return;
        }
        let (crates, metrics, stop) = (self.crates.clone(), self.metrics.clone(), shutdown.clone());
        jobs.spawn(async move {
            loop {
                if let Some(c) = crates.probe_conditional_writes().await {
                    metrics.set_s3_conditional(c.gauge());
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BUCKET_PROBE_EVERY) => {}
                }
            }
        });
    }

    /// What `/ready` adds to its answer: the bucket's conditional writes (S3 storage only).
    pub fn ready_details(&self) -> Option<String> {
        let (c, leader) = self.crates.conditional_writes()?;
        let leader = if leader {
            "this replica is the cleanup leader"
        } else {
            "this replica is not the cleanup leader"
        };
        Some(format!("{}; {leader}", c.describe()))
    }

    /// The background jobs of the core, each spawned by the feature that owns it: the health
    /// probe of a down upstream, usage adoption and flushing, the cache-size walk and the
    /// scheduled cleanup (`None`: never).
    pub fn spawn_jobs(
        &self,
        cleanup_schedule: Option<Schedule>,
        jobs: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        crate::upstream::spawn_probe(self.upstream.clone(), jobs, shutdown);
        self.spawn_bucket_probe(jobs, shutdown);
        crate::usage::spawn_jobs(self.usage.clone(), jobs, shutdown);
        crate::index_cache::spawn_refresh_ahead(self.index.clone(), jobs, shutdown);
        crate::cleanup::spawn_jobs(
            self.cleanup.clone(),
            self.metrics.clone(),
            cleanup_schedule,
            jobs,
            shutdown,
        );
    }
}
