//! Metrics owned by the app (no globals), exposed in Prometheus text format at `/metrics`.
//! Labels never carry crate names: their cardinality would be unbounded.

use std::fmt::Write;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Kind {
    Index,
    Crate,
}

/// How a request was answered relative to the cache.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache without asking upstream.
    Hit,
    /// Not cached (or changed upstream): fetched.
    Miss,
    /// Cached copy confirmed unchanged by upstream.
    Revalidated,
    /// Upstream failed; the cached copy was served anyway.
    Stale,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Index => "index",
            Kind::Crate => "crate",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, enc: &mut LabelValueEncoder) -> std::fmt::Result {
        enc.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, enc: &mut LabelValueEncoder) -> std::fmt::Result {
        enc.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    kind: Kind,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

pub struct Metrics {
    registry: Registry,
    cache: Family<CacheLabels, Counter>,
    coalesced: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cratere");
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Requests by cache outcome (hit, miss, revalidated, stale)",
            cache.clone(),
        );
        let coalesced = Family::<KindLabels, Counter>::default();
        registry.register(
            "coalesced_requests",
            "Requests that joined an upstream fetch already in flight",
            coalesced.clone(),
        );
        Metrics {
            registry,
            cache,
            coalesced,
        }
    }

    pub fn cache(&self, kind: Kind, outcome: Outcome) {
        self.cache
            .get_or_create(&CacheLabels { kind, outcome })
            .inc();
    }

    pub fn coalesced(&self, kind: Kind) {
        self.coalesced.get_or_create(&KindLabels { kind }).inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
