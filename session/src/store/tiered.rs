//! Several stores as tiers (Redis in front of MySQL, say): reads try them in
//! order and back-fill the faster tiers; writes go to all.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::{debug, warn};

use super::{AuthKeyStore, StoreError};
use mtproto_core::authkey::{AuthKeyInfo, FutureSalt};

#[derive(Debug)]
pub struct Tier {
    pub name: &'static str,
    pub store: Arc<dyn AuthKeyStore>,
}

#[derive(Debug)]
pub struct TieredStore {
    tiers: Vec<Tier>,
}

impl TieredStore {
    pub fn new(tiers: Vec<Tier>) -> Self {
        Self { tiers }
    }
}

#[async_trait]
impl AuthKeyStore for TieredStore {
    /// The first tier that has the key wins; a miss is only a miss when every
    /// tier answered (a tier that is down makes it an error, never a false −404).
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        let mut failure = None;
        for (i, tier) in self.tiers.iter().enumerate() {
            match tier.store.get(auth_key_id).await {
                Ok(Some(info)) => {
                    debug!(auth_key_id, tier = tier.name, "auth key found");
                    for faster in &self.tiers[..i] {
                        let salts = tier.store.salts(auth_key_id).await.unwrap_or_default();
                        if let Some(first) = salts.first() {
                            if let Err(e) = faster.store.insert(info.clone(), *first).await {
                                debug!(auth_key_id, tier = faster.name, "back-fill skipped: {e}");
                            }
                        }
                    }
                    return Ok(Some(info));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(auth_key_id, tier = tier.name, "auth key lookup failed: {e}");
                    failure = Some(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        for tier in &self.tiers {
            tier.store.insert(info.clone(), salt).await?;
        }
        Ok(())
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        let mut failure = None;
        for tier in &self.tiers {
            match tier.store.salts(auth_key_id).await {
                Ok(salts) if !salts.is_empty() => return Ok(salts),
                Ok(_) => {}
                Err(e) => failure = Some(e),
            }
        }
        failure.map_or(Ok(Vec::new()), Err)
    }

    async fn add_salts(
        &self,
        auth_key_id: i64,
        salts: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError> {
        for tier in &self.tiers {
            tier.store.add_salts(auth_key_id, salts, now).await?;
        }
        Ok(())
    }

    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError> {
        for tier in &self.tiers {
            tier.store.bind_temp_key(temp, perm_auth_key_id).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use mtproto_core::authkey::{AuthKey, AuthKeyType};

    /// A tier that is down.
    #[derive(Debug)]
    struct Down;

    #[async_trait]
    impl AuthKeyStore for Down {
        async fn get(&self, _: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn insert(&self, _: AuthKeyInfo, _: FutureSalt) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn salts(&self, _: i64) -> Result<Vec<FutureSalt>, StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn add_salts(&self, _: i64, _: &[FutureSalt], _: i64) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
        async fn bind_temp_key(&self, _: &AuthKeyInfo, _: i64) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn a_miss_with_a_tier_down_is_an_error_but_a_hit_is_served() {
        let memory = Arc::new(MemoryStore::default());
        let info = AuthKeyInfo::new(AuthKey::new([4; 256]), AuthKeyType::Perm, None);
        let salt = FutureSalt {
            valid_since: 0,
            valid_until: 1800,
            salt: 1,
        };
        memory.insert(info.clone(), salt).await.unwrap();
        let tiers = TieredStore::new(vec![
            Tier {
                name: "down",
                store: Arc::new(Down),
            },
            Tier {
                name: "memory",
                store: memory,
            },
        ]);
        assert_eq!(tiers.get(info.id()).await.unwrap(), Some(info));
        assert!(matches!(
            tiers.get(999).await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
