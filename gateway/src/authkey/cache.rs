//! The gateway's in-process cache of auth keys, in front of the session's
//! `query_auth_key`. Bounded by entry count.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::AuthKeyInfo;

#[derive(Debug)]
pub struct KeyCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<i64, Arc<AuthKeyInfo>>,
    /// Insertion order, for first-in first-out eviction.
    order: VecDeque<i64>,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, auth_key_id: i64) -> Option<Arc<AuthKeyInfo>> {
        self.lock().map.get(&auth_key_id).cloned()
    }

    pub fn insert(&self, info: AuthKeyInfo) -> Arc<AuthKeyInfo> {
        let info = Arc::new(info);
        let mut inner = self.lock();
        let id = info.id();
        if inner.map.insert(id, info.clone()).is_none() {
            inner.order.push_back(id);
        }
        while inner.map.len() > self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&oldest);
        }
        info
    }

    pub fn remove(&self, auth_key_id: i64) {
        let mut inner = self.lock();
        if inner.map.remove(&auth_key_id).is_some() {
            inner.order.retain(|id| *id != auth_key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authkey::{AuthKey, AuthKeyType};

    #[test]
    fn evicts_oldest_beyond_capacity() {
        let cache = KeyCache::new(2);
        let infos: Vec<_> = (0..3u8)
            .map(|i| AuthKeyInfo::new(AuthKey::new([i; 256]), AuthKeyType::Perm, None))
            .collect();
        for info in &infos {
            cache.insert(info.clone());
        }
        assert!(cache.get(infos[0].id()).is_none());
        assert!(cache.get(infos[2].id()).is_some());
        cache.remove(infos[2].id());
        assert!(cache.get(infos[2].id()).is_none());
    }
}
