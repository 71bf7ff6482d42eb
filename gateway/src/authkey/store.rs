//! Where auth keys live. The embedded default keeps them in memory; the
//! Redis, MySQL and SQLite tiers implement the same trait.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use thiserror::Error;

use super::{AuthKeyInfo, FutureSalt};

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
    async fn add_salt(&self, auth_key_id: i64, salt: FutureSalt) -> Result<(), StoreError>;
}

/// Salts kept per key; the ones that expire first are dropped beyond it.
const MAX_SALTS_PER_KEY: usize = 128;

/// In-process store: keys vanish with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<HashMap<i64, (AuthKeyInfo, Vec<FutureSalt>)>>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (AuthKeyInfo, Vec<FutureSalt>)>> {
        // A poisoned lock only means another thread panicked mid-update of a
        // plain map; the data is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl AuthKeyStore for MemoryStore {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        Ok(self.lock().get(&auth_key_id).map(|(info, _)| info.clone()))
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        let mut map = self.lock();
        let id = info.id();
        if map.contains_key(&id) {
            return Err(StoreError::Collision(id));
        }
        map.insert(id, (info, vec![salt]));
        Ok(())
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        Ok(self
            .lock()
            .get(&auth_key_id)
            .map(|(_, salts)| salts.clone())
            .unwrap_or_default())
    }

    async fn add_salt(&self, auth_key_id: i64, salt: FutureSalt) -> Result<(), StoreError> {
        if let Some((_, salts)) = self.lock().get_mut(&auth_key_id) {
            salts.push(salt);
            if salts.len() > MAX_SALTS_PER_KEY {
                salts.sort_by_key(|s| s.valid_until);
                let excess = salts.len() - MAX_SALTS_PER_KEY;
                salts.drain(..excess);
            }
        }
        Ok(())
    }
}
