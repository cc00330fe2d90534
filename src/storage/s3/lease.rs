//! The fleet-wide cleanup lease in the bucket ([`Lease`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};
use tokio_util::sync::CancellationToken;

use super::{from_unix_ms, unix_ms};
use crate::clock::Clock;

/// How long a cleanup lease lasts without renewal; a replica that dies holding it blocks
/// cleanups for at most this long.
pub const LEASE_TTL: Duration = Duration::from_secs(120);

/// The body of the lease object.
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    owner: String,
    expires_unix_ms: u64,
}

struct LeaseState {
    store: Arc<AmazonS3>,
    key: Path,
    owner: String,
    clock: Arc<dyn Clock>,
    /// Version of the lease object this holder last wrote, and when it expires.
    held: Mutex<(UpdateVersion, SystemTime)>,
}

impl LeaseState {
    fn payload(&self) -> (PutPayload, SystemTime) {
        let expires = self.clock.now() + LEASE_TTL;
        let body = LeaseBody {
            owner: self.owner.clone(),
            expires_unix_ms: unix_ms(expires),
        };
        let json = serde_json::to_vec(&body).expect("serializable");
        (PutPayload::from(json), expires)
    }
}

impl LeaseState {
    /// Creates the lease, or takes over an expired one; the version written and its expiry,
    /// `None` while another holder's lease is live (or another replica took it first).
    async fn take(&self) -> anyhow::Result<Option<(UpdateVersion, SystemTime)>> {
        for _ in 0..2 {
            let (payload, expires) = self.payload();
            match self
                .store
                .put_opts(&self.key, payload, PutMode::Create.into())
                .await
            {
                Ok(r) => {
                    return Ok(Some((UpdateVersion::from(r), expires)));
                }
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e).context("taking the cleanup lease"),
            }
            let got = match self.store.get(&self.key).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => continue, // just released
                Err(e) => return Err(e).context("reading the cleanup lease"),
            };
            let current = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            let body = got.bytes().await.context("reading the cleanup lease")?;
            if let Ok(held) = serde_json::from_slice::<LeaseBody>(&body)
                && from_unix_ms(held.expires_unix_ms) > self.clock.now()
            {
                tracing::info!(holder = %held.owner, "the cleanup lease is held");
                return Ok(None);
            }
            // Expired (its holder died) or unreadable: take it over, unless someone else
            // does first.
            let (payload, expires) = self.payload();
            match self
                .store
                .put_opts(&self.key, payload, PutMode::Update(current).into())
                .await
            {
                Ok(r) => {
                    tracing::warn!("took over a stale cleanup lease");
                    return Ok(Some((UpdateVersion::from(r), expires)));
                }
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. }
                    | object_store::Error::NotFound { .. },
                ) => return Ok(None),
                Err(e) => return Err(e).context("taking over the cleanup lease"),
            }
        }
        Ok(None)
    }

    /// Whether the lease object names this holder.
    async fn reads_back_as_ours(&self) -> anyhow::Result<bool> {
        let got = self
            .store
            .get(&self.key)
            .await
            .context("reading the cleanup lease")?;
        let body = got.bytes().await.context("reading the cleanup lease")?;
        Ok(serde_json::from_slice::<LeaseBody>(&body).is_ok_and(|b| b.owner == self.owner))
    }
}

/// A name for this holder, unique across replicas and passes: host, pid, time, sequence.
pub(super) fn owner_id() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{}/{}/{}-{}",
        host.trim(),
        std::process::id(),
        unix_ms(SystemTime::now()),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The fleet-wide cleanup lock: an object created only if absent (`If-None-Match: *`), whose
/// body names the holder and an expiry time. The holder renews it (`If-Match` on the version
/// it wrote) while its pass runs and deletes it at the end; a lease past its expiry (its
/// holder died) is taken over with `If-Match` on the version read, so of two replicas taking
/// over the same stale lease only one wins. As a second guard for stores whose conditional
/// writes are not atomic, the winner reads the lease back and proceeds only if it names it.
/// Replicas' clocks must agree to well within [`LEASE_TTL`].
pub struct Lease {
    state: Arc<LeaseState>,
    /// Cancelled when the lease is lost (or the caller's token is): the pass stops.
    stop: CancellationToken,
    renewal: CancellationToken,
}

impl Lease {
    pub(super) async fn acquire(
        store: Arc<AmazonS3>,
        key: Path,
        clock: Arc<dyn Clock>,
        stop: &CancellationToken,
        every: Duration,
    ) -> anyhow::Result<Option<Lease>> {
        let state = Arc::new(LeaseState {
            store,
            key,
            owner: owner_id(),
            clock,
            held: Mutex::new((
                UpdateVersion {
                    e_tag: None,
                    version: None,
                },
                UNIX_EPOCH,
            )),
        });
        let Some(won) = state.take().await? else {
            return Ok(None);
        };
        // Read back: on a store that does not apply conditions atomically, the last of two
        // concurrent writers is the one that holds it.
        if !state.reads_back_as_ours().await? {
            return Ok(None);
        }
        *state.held.lock().expect("lock poisoned") = won;
        let lease = Lease {
            state,
            stop: stop.child_token(),
            renewal: CancellationToken::new(),
        };
        tokio::spawn(renew(
            lease.state.clone(),
            lease.stop.clone(),
            lease.renewal.clone(),
            every,
        ));
        Ok(Some(lease))
    }

    /// Cancelled when the lease is lost: the pass must stop.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Ends the renewals and deletes the lease if it is still this holder's.
    pub async fn release(self) {
        self.renewal.cancel();
        let ours = self
            .state
            .held
            .lock()
            .expect("lock poisoned")
            .0
            .e_tag
            .clone();
        match self.state.store.head(&self.state.key).await {
            Ok(meta) if meta.e_tag == ours => {
                if let Err(e) = self.state.store.delete(&self.state.key).await {
                    tracing::warn!(error = %e, "cannot release the cleanup lease; it expires by itself");
                }
            }
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot release the cleanup lease; it expires by itself");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.cancel();
    }
}

/// Renews the lease `every` so often until `renewal` is cancelled; cancels `stop` if the
/// lease is lost (taken over, or not renewed before it expired).
async fn renew(
    state: Arc<LeaseState>,
    stop: CancellationToken,
    renewal: CancellationToken,
    every: Duration,
) {
    loop {
        tokio::select! {
            _ = renewal.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let (version, expires) = state.held.lock().expect("lock poisoned").clone();
        let (payload, new_expiry) = state.payload();
        match state
            .store
            .put_opts(&state.key, payload, PutMode::Update(version).into())
            .await
        {
            Ok(r) => {
                *state.held.lock().expect("lock poisoned") = (UpdateVersion::from(r), new_expiry);
            }
            Err(
                e @ (object_store::Error::Precondition { .. }
                | object_store::Error::NotFound { .. }),
            ) => {
                tracing::error!(error = %e, "cleanup lease lost to another replica; stopping the pass");
                stop.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the cleanup lease");
                if state.clock.now() >= expires {
                    tracing::error!("cleanup lease expired; stopping the pass");
                    stop.cancel();
                    return;
                }
            }
        }
    }
}
