//! The gateway's auth key cache in front of a [`KeySource`] (the session's
//! `query_auth_key`, or the stores directly): bounded in bytes, with a TTL,
//! short-lived negative entries for unknown ids, one lookup in flight per id
//! however many connections wait (single-flight), and a re-read of temp keys
//! that were not bound yet — so a key bound through another gateway works
//! here without a restart.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::future::Cache;
use moka::Expiry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::GaugeGuard;
use mtproto_core::authkey::AuthKeyInfo;
use mtproto_session::store::AuthKeyStore;

/// Approximate bytes per entry, for the capacity bound.
const FOUND_WEIGHT: u32 = 512;
const MISSING_WEIGHT: u32 = 64;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// Where keys come from on a miss.
#[async_trait]
pub trait KeySource: Send + Sync + std::fmt::Debug {
    /// `Ok(None)` only when the key is known not to exist.
    async fn lookup(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, LookupError>;
}

#[derive(Debug, Clone)]
enum Entry {
    Found(Arc<AuthKeyInfo>),
    Missing,
}

#[derive(Debug)]
struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<i64, Entry> for EntryExpiry {
    fn expire_after_create(&self, _key: &i64, value: &Entry, _now: Instant) -> Option<Duration> {
        Some(match value {
            Entry::Found(_) => self.ttl,
            Entry::Missing => self.negative_ttl,
        })
    }
}

/// The cache's metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: Counter,
    pub negative_hits: Counter,
    pub misses: Counter,
    pub lookups: Counter,
    pub lookup_errors: Counter,
    pub lookups_in_flight: Gauge,
    /// Sum of lookup durations, for the mean lookup latency.
    pub lookup_seconds: Counter<f64, AtomicU64>,
    /// Transport errors −404 sent (keys every store says are unknown, or expired).
    pub not_found_sent: Counter,
}

impl CacheStats {
    pub fn register(&self, r: &mut Registry) {
        for (name, help, counter) in [
            (
                "mtproto_auth_key_cache_hits",
                "Auth key lookups answered by the cache",
                &self.hits,
            ),
            (
                "mtproto_auth_key_cache_negative_hits",
                "Lookups answered by a cached 'unknown key'",
                &self.negative_hits,
            ),
            (
                "mtproto_auth_key_cache_misses",
                "Lookups the cache could not answer",
                &self.misses,
            ),
            (
                "mtproto_auth_key_lookups",
                "Lookups sent to the key source (after single-flight)",
                &self.lookups,
            ),
            (
                "mtproto_auth_key_lookup_errors",
                "Lookups that failed (store or session down)",
                &self.lookup_errors,
            ),
            (
                "mtproto_transport_404_sent",
                "Transport errors -404 (unknown or expired key) sent",
                &self.not_found_sent,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "mtproto_auth_key_lookups_in_flight",
            "Lookups waiting for the key source now",
            self.lookups_in_flight.clone(),
        );
        r.register(
            "mtproto_auth_key_lookup_seconds",
            "Total time spent in key source lookups",
            self.lookup_seconds.clone(),
        );
    }
}

#[derive(Debug)]
pub struct KeyCache {
    cache: Cache<i64, Entry>,
    pub stats: CacheStats,
}

impl KeyCache {
    pub fn new(capacity_bytes: u64, ttl: Duration, negative_ttl: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_, v: &Entry| match v {
                Entry::Found(_) => FOUND_WEIGHT,
                Entry::Missing => MISSING_WEIGHT,
            })
            .expire_after(EntryExpiry { ttl, negative_ttl })
            .build();
        Self {
            cache,
            stats: CacheStats::default(),
        }
    }

    /// The key, from the cache or (once per id at a time) from `source`.
    /// Errors are not cached: the next connection tries again.
    pub async fn get(
        &self,
        auth_key_id: i64,
        source: &dyn KeySource,
    ) -> Result<Option<Arc<AuthKeyInfo>>, LookupError> {
        match self.cache.get(&auth_key_id).await {
            Some(Entry::Found(info)) if !info.is_unbound_temp() => {
                self.stats.hits.inc();
                return Ok(Some(info));
            }
            Some(Entry::Found(_)) => self.cache.invalidate(&auth_key_id).await,
            Some(Entry::Missing) => {
                self.stats.negative_hits.inc();
                return Ok(None);
            }
            None => {}
        }
        self.stats.misses.inc();
        let entry = self
            .cache
            .try_get_with(auth_key_id, async {
                self.stats.lookups.inc();
                // A guard, so a lookup whose caller went away (an HTTP client
                // that hung up) is not counted forever.
                let in_flight = GaugeGuard::new(&self.stats.lookups_in_flight);
                let started = Instant::now();
                let result = source.lookup(auth_key_id).await;
                drop(in_flight);
                self.stats
                    .lookup_seconds
                    .inc_by(started.elapsed().as_secs_f64());
                match result {
                    Ok(Some(info)) => Ok(Entry::Found(Arc::new(info))),
                    Ok(None) => Ok(Entry::Missing),
                    Err(e) => {
                        self.stats.lookup_errors.inc();
                        Err(e)
                    }
                }
            })
            .await
            .map_err(|e: Arc<LookupError>| (*e).clone())?;
        Ok(match entry {
            Entry::Found(info) => Some(info),
            Entry::Missing => None,
        })
    }

    /// Records a key this gateway just created.
    pub async fn insert(&self, info: AuthKeyInfo) -> Arc<AuthKeyInfo> {
        let info = Arc::new(info);
        self.cache
            .insert(info.id(), Entry::Found(info.clone()))
            .await;
        info
    }

    pub async fn remove(&self, auth_key_id: i64) {
        self.cache.invalidate(&auth_key_id).await;
    }
}

/// Keys read straight from the stores, bypassing the session.
#[derive(Debug)]
pub struct StoreKeySource(pub Arc<dyn AuthKeyStore>);

#[async_trait]
impl KeySource for StoreKeySource {
    async fn lookup(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, LookupError> {
        self.0
            .get(auth_key_id)
            .await
            .map_err(|e| LookupError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtproto_core::authkey::{AuthKey, AuthKeyType};
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    /// A source that counts lookups and answers from a map after a delay.
    #[derive(Debug, Default)]
    struct Counting {
        keys: Mutex<std::collections::HashMap<i64, AuthKeyInfo>>,
        calls: AtomicU64,
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl KeySource for Counting {
        async fn lookup(&self, id: i64) -> Result<Option<AuthKeyInfo>, LookupError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(LookupError("store down".into()));
            }
            Ok(self.keys.lock().unwrap().get(&id).cloned())
        }
    }

    fn cache() -> KeyCache {
        KeyCache::new(1 << 20, Duration::from_secs(60), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_lookup() {
        let cache = Arc::new(cache());
        let source = Arc::new(Counting::default());
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let (cache, source) = (cache.clone(), source.clone());
                tokio::spawn(async move { cache.get(42, source.as_ref()).await })
            })
            .collect();
        for w in waiters {
            assert!(w.await.unwrap().unwrap().is_none());
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.lookups.get(), 1);
        assert_eq!(cache.stats.lookups_in_flight.get(), 0);
        assert!(cache.stats.lookup_seconds.get() >= 0.02);
        // The negative entry answers the next one without a lookup.
        assert!(cache.get(42, source.as_ref()).await.unwrap().is_none());
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.negative_hits.get(), 1);
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let cache = cache();
        let source = Counting::default();
        source.fail.store(true, Ordering::SeqCst);
        assert!(cache.get(7, &source).await.is_err());
        source.fail.store(false, Ordering::SeqCst);
        let info = AuthKeyInfo::new(AuthKey::new([7; 256]), AuthKeyType::Perm, None);
        source.keys.lock().unwrap().insert(7, info.clone());
        assert_eq!(cache.get(7, &source).await.unwrap().as_deref(), Some(&info));
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        cache.get(7, &source).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn unbound_temp_keys_are_read_again() {
        let cache = cache();
        let source = Counting::default();
        let temp = AuthKeyInfo::new(AuthKey::new([9; 256]), AuthKeyType::Temp, Some(i64::MAX));
        let id = temp.id();
        cache.insert(temp.clone()).await;
        let mut bound = temp.clone();
        bound.perm_auth_key_id = 1234;
        source.keys.lock().unwrap().insert(id, bound);
        let got = cache.get(id, &source).await.unwrap().unwrap();
        assert_eq!(got.perm_auth_key_id, 1234);
        // Once bound, it is served from the cache.
        cache.get(id, &source).await.unwrap();
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }
}
