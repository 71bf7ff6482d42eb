//! Where auth keys live. The embedded default keeps them in memory; the
//! Redis, MySQL and SQLite tiers implement the same trait.

pub mod redis_store;
pub mod sql;
pub mod tiered;

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use thiserror::Error;

use crate::metrics::{StoreMetrics, TierLabels};
use mtproto_core::authkey::{AuthKeyInfo, FutureSalt};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("auth key id {0} already exists")]
    Collision(i64),
    #[error("auth key store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait AuthKeyStore: Send + Sync + std::fmt::Debug {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError>;
    /// Stores a new key with its first salt; refuses an id that already exists.
    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError>;
    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError>;
    /// Adds salts (one write, however many) and drops those that ended more
    /// than [`SALT_KEEP_SECS`] before `now`. A salt valid at `now` is never
    /// dropped: clients that lose theirs get `bad_server_salt` forever.
    async fn add_salts(
        &self,
        auth_key_id: i64,
        salts: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError>;
    /// Records a verified binding: the temp key's perm id, and the perm key's
    /// temp (or media temp) id.
    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError>;
}

/// Where keys are kept: any of Redis (first), MySQL, SQLite, as tiers; with
/// none, in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreUrls {
    pub redis_url: Option<String>,
    /// Prepended to Redis keys (tests isolate with it).
    pub redis_key_prefix: String,
    pub mysql_url: Option<String>,
    pub sqlite_path: Option<std::path::PathBuf>,
}

/// Connects the configured stores and stacks them; reads of each tier are
/// timed into `metrics`.
pub async fn open(
    urls: &StoreUrls,
    metrics: &StoreMetrics,
) -> Result<std::sync::Arc<dyn AuthKeyStore>, StoreError> {
    use redis_store::RedisStore;
    use sql::SqlStore;
    use std::sync::Arc;
    use tiered::{Tier, TieredStore};

    let mut tiers = Vec::new();
    if let Some(url) = &urls.redis_url {
        let store = RedisStore::connect(url, &urls.redis_key_prefix).await?;
        tiers.push(Tier {
            name: "redis",
            store: Arc::new(store),
        });
    }
    if let Some(url) = &urls.mysql_url {
        tiers.push(Tier {
            name: "mysql",
            store: Arc::new(SqlStore::connect(url).await?),
        });
    }
    if let Some(path) = &urls.sqlite_path {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("sqlite: cannot create {}: {e}", dir.display()))
            })?;
        }
        let url = format!("sqlite://{}?mode=rwc", path.display());
        tiers.push(Tier {
            name: "sqlite",
            store: Arc::new(SqlStore::connect(&url).await?),
        });
    }
    for tier in &mut tiers {
        tier.store = Arc::new(Timed {
            tier: TierLabels { tier: tier.name },
            inner: tier.store.clone(),
            metrics: metrics.clone(),
        });
    }
    Ok(match tiers.len() {
        0 => Arc::new(MemoryStore::default()),
        1 => tiers.remove(0).store,
        _ => Arc::new(TieredStore::new(tiers)),
    })
}

/// A tier whose reads are timed.
#[derive(Debug)]
struct Timed {
    tier: TierLabels,
    inner: std::sync::Arc<dyn AuthKeyStore>,
    metrics: StoreMetrics,
}

#[async_trait]
impl AuthKeyStore for Timed {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        let started = std::time::Instant::now();
        let found = self.inner.get(auth_key_id).await;
        self.metrics
            .lookup_duration
            .get_or_create(&self.tier)
            .observe(started.elapsed().as_secs_f64());
        found
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        self.inner.insert(info, salt).await
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        self.inner.salts(auth_key_id).await
    }

    async fn add_salts(
        &self,
        auth_key_id: i64,
        salts: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError> {
        self.inner.add_salts(auth_key_id, salts, now).await
    }

    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError> {
        self.inner.bind_temp_key(temp, perm_auth_key_id).await
    }
}

/// Salts kept per key in memory; beyond it the ones that start last go (a
/// client that wanted them asks for future salts again).
const MAX_SALTS_PER_KEY: usize = 128;

/// How long a salt is kept after it ended (messages in flight may carry it).
pub const SALT_KEEP_SECS: i64 = 7200;

/// Adds `new` to `salts`, drops the expired ones, and keeps at most `max`:
/// those that start first (the one valid now among them).
pub fn merge_salts(salts: &mut Vec<FutureSalt>, new: &[FutureSalt], now: i64, max: usize) {
    salts.retain(|s| s.until() >= now - SALT_KEEP_SECS);
    salts.extend_from_slice(new);
    salts.sort_by_key(|s| (s.since(), s.until()));
    salts.truncate(max);
}

/// In-process store: keys vanish with the process. Salts are kept apart from
/// keys (as teamgram keeps `salts_<id>` apart from `auth_keys`), so a session
/// can hand out salts for a key another component holds.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Maps>,
}

#[derive(Debug, Default)]
struct Maps {
    keys: HashMap<i64, AuthKeyInfo>,
    salts: HashMap<i64, Vec<FutureSalt>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A poisoned lock only means another thread panicked mid-update of a
        // plain map; the data is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl AuthKeyStore for MemoryStore {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        Ok(self.lock().keys.get(&auth_key_id).cloned())
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        let mut maps = self.lock();
        let id = info.id();
        if maps.keys.contains_key(&id) {
            return Err(StoreError::Collision(id));
        }
        maps.keys.insert(id, info);
        maps.salts.insert(id, vec![salt]);
        Ok(())
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        Ok(self
            .lock()
            .salts
            .get(&auth_key_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError> {
        let mut maps = self.lock();
        if let Some(info) = maps.keys.get_mut(&temp.id()) {
            info.perm_auth_key_id = perm_auth_key_id;
        }
        if let Some(perm) = maps.keys.get_mut(&perm_auth_key_id) {
            match temp.key_type {
                mtproto_core::authkey::AuthKeyType::MediaTemp => {
                    perm.media_temp_auth_key_id = temp.id()
                }
                _ => perm.temp_auth_key_id = temp.id(),
            }
        }
        Ok(())
    }

    async fn add_salts(
        &self,
        auth_key_id: i64,
        new: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut maps = self.lock();
        let salts = maps.salts.entry(auth_key_id).or_default();
        merge_salts(salts, new, now, MAX_SALTS_PER_KEY);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mtproto_core::authkey::{AuthKey, AuthKeyType};

    fn salt(n: i32) -> FutureSalt {
        FutureSalt {
            valid_since: n,
            valid_until: n + 1800,
            salt: i64::from(n),
        }
    }

    #[tokio::test]
    async fn keys_collide_and_salts_live_apart_from_keys() {
        let store = MemoryStore::default();
        let info = AuthKeyInfo::new(AuthKey::new([1; 256]), AuthKeyType::Perm, None);
        store.insert(info.clone(), salt(0)).await.unwrap();
        assert!(matches!(
            store.insert(info.clone(), salt(0)).await,
            Err(StoreError::Collision(_))
        ));
        assert_eq!(store.get(info.id()).await.unwrap(), Some(info.clone()));
        // A key this store never saw still gets its salts kept.
        store.add_salts(77, &[salt(5)], 0).await.unwrap();
        assert_eq!(store.salts(77).await.unwrap(), vec![salt(5)]);
        for n in 0..200 {
            store
                .add_salts(info.id(), &[salt(n * 10)], 0)
                .await
                .unwrap();
        }
        let salts = store.salts(info.id()).await.unwrap();
        assert_eq!(salts.len(), MAX_SALTS_PER_KEY);
        // The cap drops the salts that start last, never the current one
        // (salt(0) is there twice: from `insert` and from the loop).
        assert_eq!(salts.first(), Some(&salt(0)));
        assert_eq!(salts.last(), Some(&salt(1260)));
    }

    /// What `get_future_salts` does to a store: a current salt, then 63
    /// future ones in one write. The current one must stay (it used to be
    /// pruned against the new salts' start, so the client's next message got
    /// `bad_server_salt`, it asked for future salts again, and so on forever:
    /// grammers' first message after a handshake is `get_future_salts`).
    pub(crate) async fn current_salt_survives_future_salts(store: &dyn AuthKeyStore) {
        let now = 1_800_000_000;
        let current = FutureSalt {
            valid_since: now as i32 - 10,
            valid_until: now as i32 + 1790,
            salt: 1,
        };
        store.add_salts(5, &[current], now).await.unwrap();
        let futures: Vec<FutureSalt> = (1..64)
            .map(|i| FutureSalt {
                valid_since: current.valid_since + i * 1800,
                valid_until: current.valid_until + i * 1800,
                salt: i64::from(i) + 1,
            })
            .collect();
        store.add_salts(5, &futures, now).await.unwrap();
        let salts = store.salts(5).await.unwrap();
        assert!(salts.contains(&current), "the current salt is gone");
        assert_eq!(salts.len(), 64);
        // An expired one goes once it is old enough.
        let later = now + 1800 + SALT_KEEP_SECS + 1;
        store.add_salts(5, &[], later).await.unwrap();
        assert!(!store.salts(5).await.unwrap().contains(&current));
    }

    #[tokio::test]
    async fn memory_store_keeps_the_current_salt() {
        current_salt_survives_future_salts(&MemoryStore::default()).await;
    }
}
