//! Metrics of the key stores, registered by the process that opens them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `redis`, `mysql`, `sqlite` or `memory`.
    pub tier: &'static str,
}

/// Auth-key store lookups, per tier.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    pub lookup_duration: Family<TierLabels, Histogram, fn() -> Histogram>,
}

/// Latency buckets from 100 µs to ~13 s (doubling): a cache-warm lookup or
/// RPC and a handshake on a loaded pod alike. The gateway's latency
/// histograms use them too, so the two processes' percentiles compare.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            lookup_duration: Family::new_with_constructor(latency),
        }
    }
}

impl StoreMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mtproto_auth_key_store_lookup_duration_seconds",
            "Auth-key reads, by store tier",
            self.lookup_duration.clone(),
        );
    }
}
