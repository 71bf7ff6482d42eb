//! Auth keys in Redis as teamgram keeps them: `auth_keys2_<id>` holds the
//! JSON of an `AuthKeyInfo` (7-day expiry; `"*"` marks a cached miss), the
//! legacy hash `auth_keys_<id>` is read as a fallback, and `salts_<id>` holds
//! a JSON list of future salts.

use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{merge_salts, AuthKeyStore, StoreError};

/// Salts kept per key (teamgram keeps the `salts_<id>` list this short).
const MAX_SALTS: usize = 64;
use mtproto_core::authkey::{AuthKey, AuthKeyInfo, AuthKeyType, FutureSalt};

const KEY_TTL_SECS: u64 = 7 * 24 * 3600;
const SALT_PERIOD_SECS: u64 = 1800;

/// Writes `auth_keys2_<id>` (KEYS[1]) only where no key is stored: absent or
/// a cached miss (`"*"`), and no legacy hash (KEYS[2]). One script, so two
/// handshakes that made the same id cannot both store it. Returns 1 if
/// written, 0 on a collision.
const INSERT_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if (held and held ~= '*') or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
";

/// teamgram's `mtproto.AuthKeyInfo` as Go's encoding/json writes it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InfoJson {
    #[serde(default)]
    predicate_name: String,
    #[serde(default)]
    constructor: i64,
    #[serde(default)]
    auth_key_id: i64,
    #[serde(default)]
    auth_key: String,
    #[serde(default)]
    auth_key_type: i32,
    #[serde(default)]
    perm_auth_key_id: i64,
    #[serde(default)]
    temp_auth_key_id: i64,
    #[serde(default)]
    media_temp_auth_key_id: i64,
    /// Ours: Go readers ignore it; keys teamgram wrote have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SaltJson {
    #[serde(default)]
    valid_since: i32,
    #[serde(default)]
    valid_until: i32,
    #[serde(default)]
    salt: i64,
}

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// Prepended to every key (empty in production; tests isolate with it).
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// Stored rows with an unknown type predate `auth_key_type` values: perm.
fn key_type(value: i32) -> AuthKeyType {
    AuthKeyType::from_teamgram(value).unwrap_or(AuthKeyType::Perm)
}

impl RedisStore {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(3)))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, kind: &str, id: i64) -> String {
        format!("{}{kind}_{id}", self.prefix)
    }

    fn parse_json(id: i64, text: &str) -> Option<AuthKeyInfo> {
        let json: InfoJson = match serde_json::from_str(text) {
            Ok(json) => json,
            Err(e) => {
                warn!(
                    auth_key_id = id,
                    "auth_keys2 entry is not valid JSON ({e}); treating the key as missing"
                );
                return None;
            }
        };
        let bytes = STANDARD.decode(&json.auth_key).ok();
        let Some(key) = bytes
            .as_deref()
            .and_then(AuthKey::from_slice)
            .filter(|k| k.id() == id)
        else {
            warn!(
                auth_key_id = id,
                "auth_keys2 entry has a bad auth_key; treating the key as missing"
            );
            return None;
        };
        Some(AuthKeyInfo {
            key,
            key_type: key_type(json.auth_key_type),
            perm_auth_key_id: json.perm_auth_key_id,
            temp_auth_key_id: json.temp_auth_key_id,
            media_temp_auth_key_id: json.media_temp_auth_key_id,
            expires_at: json.expires_at,
        })
    }

    /// Writes the `auth_keys2_<id>` JSON entry.
    async fn put(&self, info: &AuthKeyInfo) -> Result<(), StoreError> {
        let text = Self::to_json(info)?;
        let mut conn = self.conn.clone();
        let _: () = conn
            .set_ex(self.key("auth_keys2", info.id()), text, KEY_TTL_SECS)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn to_json(info: &AuthKeyInfo) -> Result<String, StoreError> {
        let json = InfoJson {
            predicate_name: "authKeyInfo".into(),
            constructor: i64::from(0xccee_efc0_u32 as i32),
            auth_key_id: info.id(),
            auth_key: STANDARD.encode(info.key.bytes()),
            auth_key_type: info.key_type as i32,
            perm_auth_key_id: info.perm_auth_key_id,
            temp_auth_key_id: info.temp_auth_key_id,
            media_temp_auth_key_id: info.media_temp_auth_key_id,
            expires_at: info.expires_at,
        };
        serde_json::to_string(&json).map_err(unavailable)
    }

    /// The legacy hash `auth_keys_<id>` (raw key bytes in field `auth_key`).
    async fn legacy(&self, id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: std::collections::HashMap<String, Vec<u8>> = conn
            .hgetall(self.key("auth_keys", id))
            .await
            .map_err(unavailable)?;
        let Some(raw) = fields.get("auth_key") else {
            return Ok(None);
        };
        let Some(key) = AuthKey::from_slice(raw).filter(|k| k.id() == id) else {
            warn!(
                auth_key_id = id,
                "legacy auth_keys hash has a bad auth_key; treating the key as missing"
            );
            return Ok(None);
        };
        let int = |name: &str| -> i64 {
            fields
                .get(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        Ok(Some(AuthKeyInfo {
            key,
            key_type: key_type(int("auth_key_type") as i32),
            perm_auth_key_id: int("perm_auth_key_id"),
            temp_auth_key_id: int("temp_auth_key_id"),
            media_temp_auth_key_id: int("media_temp_auth_key_id"),
            expires_at: None,
        }))
    }
}

#[async_trait]
impl AuthKeyStore for RedisStore {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        let mut conn = self.conn.clone();
        let entry: Option<String> = conn
            .get(self.key("auth_keys2", auth_key_id))
            .await
            .map_err(unavailable)?;
        match entry.as_deref() {
            Some("*") => Ok(None),
            Some(text) => Ok(Self::parse_json(auth_key_id, text)),
            None => self.legacy(auth_key_id).await,
        }
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        let id = info.id();
        let mut conn = self.conn.clone();
        // EVAL rather than the redis crate's Script (EVALSHA with a fallback):
        // keys are written once per handshake, and it needs no extra feature.
        let written: i64 = redis::cmd("EVAL")
            .arg(INSERT_SCRIPT)
            .arg(2)
            .arg(self.key("auth_keys2", id))
            .arg(self.key("auth_keys", id))
            .arg(Self::to_json(&info)?)
            .arg(KEY_TTL_SECS)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if written == 0 {
            return Err(StoreError::Collision(id));
        }
        self.add_salts(id, &[salt], salt.since()).await
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn
            .get(self.key("salts", auth_key_id))
            .await
            .map_err(unavailable)?;
        let list: Vec<SaltJson> = text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Ok(list
            .into_iter()
            .map(|s| FutureSalt {
                valid_since: s.valid_since,
                valid_until: s.valid_until,
                salt: s.salt,
            })
            .collect())
    }

    async fn add_salts(
        &self,
        auth_key_id: i64,
        new: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut salts = self.salts(auth_key_id).await?;
        merge_salts(&mut salts, new, now, MAX_SALTS);
        let list: Vec<SaltJson> = salts
            .iter()
            .map(|s| SaltJson {
                valid_since: s.valid_since,
                valid_until: s.valid_until,
                salt: s.salt,
            })
            .collect();
        let text = serde_json::to_string(&list).map_err(unavailable)?;
        // teamgram's TTL: one salt period per salt held.
        let ttl = SALT_PERIOD_SECS * list.len().max(1) as u64;
        let mut conn = self.conn.clone();
        let _: () = conn
            .set_ex(self.key("salts", auth_key_id), text, ttl)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Rewrites both entries; keys only in the legacy hash are left as they are.
    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError> {
        let mut bound = temp.clone();
        bound.perm_auth_key_id = perm_auth_key_id;
        self.put(&bound).await?;
        if let Some(mut perm) = self.get(perm_auth_key_id).await? {
            match temp.key_type {
                AuthKeyType::MediaTemp => perm.media_temp_auth_key_id = temp.id(),
                _ => perm.temp_auth_key_id = temp.id(),
            }
            self.put(&perm).await?;
        }
        Ok(())
    }
}
