//! Whether the bucket honours conditional writes, found out rather than assumed: the cleanup
//! lease ([`super::Lease`]) is only safe on a store that refuses a second create
//! (`If-None-Match: *`) and a replace with a stale ETag (`If-Match`). Engines differ, and
//! change between versions (Garage 2.5 answers `200` to both and overwrites the object).

use std::sync::Mutex;

use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

/// What the last probe of the bucket found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Not probed yet, or the bucket did not answer the probe.
    Unknown,
    /// A second create and a stale replace were both refused: the lease can be trusted.
    Honoured,
    /// The bucket accepted a write it should have refused; what it did.
    Ignored(String),
}

impl Conditional {
    /// `cratere_s3_conditional_writes`: 1 honoured, 0 ignored, -1 unknown.
    pub fn gauge(&self) -> i64 {
        match self {
            Conditional::Honoured => 1,
            Conditional::Ignored(_) => 0,
            Conditional::Unknown => -1,
        }
    }

    /// One line for `/ready` and the status page.
    pub fn describe(&self) -> String {
        match self {
            Conditional::Honoured => {
                "the bucket honours conditional writes: cleanups take the fleet-wide lease".into()
            }
            Conditional::Ignored(what) => format!(
                "the bucket does not honour conditional writes ({what}): no lease; crate \
                 cleanups run only where CRATERE_CLEANUP_LEADER=true"
            ),
            Conditional::Unknown => "conditional writes of the bucket not probed yet".into(),
        }
    }
}

/// The last probe's answer, shared by the store's users.
#[derive(Debug)]
pub struct ProbeState(Mutex<Conditional>);

impl Default for ProbeState {
    fn default() -> Self {
        ProbeState(Mutex::new(Conditional::Unknown))
    }
}

impl ProbeState {
    pub fn get(&self) -> Conditional {
        self.0.lock().expect("lock poisoned").clone()
    }

    pub fn set(&self, c: Conditional) {
        *self.0.lock().expect("lock poisoned") = c;
    }
}

/// Probes on the scratch object `key` (removed afterwards): create it with `If-None-Match: *`
/// twice (the second must be refused), then replace it with `If-Match` and a wrong ETag (must
/// be refused). `Err` when the bucket failed to answer (the answer stays unknown).
pub async fn probe(store: &AmazonS3, key: &Path) -> object_store::Result<Conditional> {
    let create = || store.put_opts(key, PutPayload::from_static(b"1"), PutMode::Create.into());
    // A scratch object left by a probe that died halfway: start clean.
    match store.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    let first = create().await?;
    let verdict = match create().await {
        Ok(_) => Conditional::Ignored(
            "a second PUT with If-None-Match: * on the same key succeeded and replaced the object"
                .into(),
        ),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => {
            let wrong = UpdateVersion {
                e_tag: Some(format!(
                    "\"not-{}\"",
                    first.e_tag.as_deref().unwrap_or("x").trim_matches('"')
                )),
                version: None,
            };
            match store
                .put_opts(
                    key,
                    PutPayload::from_static(b"2"),
                    PutMode::Update(wrong).into(),
                )
                .await
            {
                Ok(_) => Conditional::Ignored(
                    "a PUT with If-Match and a wrong ETag succeeded and replaced the object".into(),
                ),
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => Conditional::Honoured,
                Err(e) => {
                    let _ = store.delete(key).await;
                    return Err(e);
                }
            }
        }
        Err(e) => {
            let _ = store.delete(key).await;
            return Err(e);
        }
    };
    if let Err(e) = store.delete(key).await {
        tracing::warn!(key = %key, error = %e, "cannot remove the probe's scratch object");
    }
    Ok(verdict)
}
