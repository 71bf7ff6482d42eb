//! Auth keys in SQL with teamgram's schema: `auth_keys` (body = base64, raw
//! standard alphabet, no padding) and `auth_key_infos`; MySQL/MariaDB for
//! fleets, SQLite for the embedded default. Migrations ship in
//! `gateway/migrations/` and only create what is missing.

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use tracing::warn;

use super::{AuthKeyStore, StoreError, SALT_KEEP_SECS};
use mtproto_core::authkey::{AuthKey, AuthKeyInfo, AuthKeyType, FutureSalt};

static MYSQL_MIGRATIONS: Migrator = sqlx::migrate!("migrations/mysql");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    /// For error messages: which database this is (no credentials).
    name: String,
}

/// A key's rows, one statement per table.
const INSERT_AUTH_KEY: &str = "INSERT INTO auth_keys (auth_key_id, body) VALUES (?, ?)";
const INSERT_AUTH_KEY_INFO: &str = "INSERT INTO auth_key_infos \
     (auth_key_id, auth_key_type, perm_auth_key_id, temp_auth_key_id, media_temp_auth_key_id) \
     VALUES (?, ?, ?, ?, ?)";
const INSERT_EXPIRY: &str =
    "INSERT INTO mtproto_edge_auth_key_expiry (auth_key_id, expires_at) VALUES (?, ?)";
const INSERT_SALT: &str =
    "INSERT INTO mtproto_edge_salts (auth_key_id, salt, valid_since, valid_until) VALUES (?, ?, ?, ?)";

fn unavailable(name: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{name}: {e}"))
}

impl SqlStore {
    /// Connects (`mysql://…` or `sqlite://…`) and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let name = url.split("://").next().unwrap_or("sql").to_string();
        let migrator = match name.as_str() {
            "mysql" | "mariadb" => &MYSQL_MIGRATIONS,
            "sqlite" => &SQLITE_MIGRATIONS,
            other => {
                return Err(StoreError::Unavailable(format!(
                    "unsupported database URL scheme {other:?} (use mysql:// or sqlite://)"
                )))
            }
        };
        let sqlite = name == "sqlite";
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 1 } else { 8 })
            .acquire_timeout(std::time::Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // A handshake's key write commits without fsync (the WAL is
                        // synced at checkpoints): a power cut can lose the newest keys,
                        // whose clients then get -404 and make new ones; the file
                        // itself stays consistent.
                        conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|e| unavailable(&name, e))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| unavailable(&name, format!("migration: {e}")))?;
        Ok(Self { pool, name })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        unavailable(&self.name, e)
    }

    /// A key id that is already stored is a collision: the handshake retries.
    fn insert_err(&self, id: i64, e: sqlx::Error) -> StoreError {
        match e.as_database_error() {
            Some(db) if db.is_unique_violation() => StoreError::Collision(id),
            _ => self.err(e),
        }
    }

    /// [`AuthKeyStore::insert`] as one SQLite query (sqlx binds the
    /// arguments across its statements in order): one trip to sqlx's SQLite
    /// worker thread instead of six. Each trip wakes that thread and then the
    /// caller, which cost about 4% of an embedded handshake's CPU. MySQL
    /// prepares statements one at a time, so it keeps the step-by-step
    /// transaction. The query runs on a task of its own: sqlx's worker stops
    /// between statements when the caller goes away, which would leave the
    /// transaction open on a pooled connection, so a caller that is
    /// cancelled (its client disconnected) does not cancel the query.
    async fn insert_sqlite(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::spawn(async move { store.run_insert_sqlite(info, salt).await })
            .await
            .map_err(|e| self.err(e))?
    }

    /// A failure may leave the query's transaction open, so that connection
    /// is closed (which rolls it back) instead of going back to the pool.
    async fn run_insert_sqlite(
        &self,
        info: AuthKeyInfo,
        salt: FutureSalt,
    ) -> Result<(), StoreError> {
        let id = info.id();
        let mut statements = vec![
            "BEGIN IMMEDIATE",
            INSERT_AUTH_KEY,
            INSERT_AUTH_KEY_INFO,
            INSERT_SALT,
        ];
        if info.expires_at.is_some() {
            statements.push(INSERT_EXPIRY);
        }
        statements.push("COMMIT");
        let sql = statements.join("; ");
        let mut query = sqlx::query(&sql)
            .bind(id)
            .bind(STANDARD_NO_PAD.encode(info.key.bytes()))
            .bind(id)
            .bind(info.key_type as i32)
            .bind(info.perm_auth_key_id)
            .bind(info.temp_auth_key_id)
            .bind(info.media_temp_auth_key_id)
            .bind(id)
            .bind(salt.salt)
            .bind(salt.since())
            .bind(salt.until());
        if let Some(expires_at) = info.expires_at {
            query = query.bind(id).bind(expires_at);
        }
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        match conn.execute(query).await {
            Ok(_) => Ok(()),
            Err(e) => {
                conn.close_on_drop();
                Err(self.insert_err(id, e))
            }
        }
    }
}

/// Decodes a stored `body`; corrupt rows are reported and treated as missing.
fn decode_body(auth_key_id: i64, body: &str) -> Option<AuthKey> {
    let bytes = match STANDARD_NO_PAD.decode(body.trim_end_matches('=')) {
        Ok(bytes) => bytes,
        Err(e) => {
            warn!(
                auth_key_id,
                "auth_keys.body is not base64 ({e}); treating the key as missing"
            );
            return None;
        }
    };
    let Some(key) = AuthKey::from_slice(&bytes) else {
        warn!(
            auth_key_id,
            len = bytes.len(),
            "auth_keys.body is not 256 bytes; treating the key as missing"
        );
        return None;
    };
    if key.id() != auth_key_id {
        warn!(
            auth_key_id,
            "auth_keys.body does not hash to its auth_key_id; treating the key as missing"
        );
        return None;
    }
    Some(key)
}

/// Stored rows with an unknown type predate `auth_key_type` values: perm.
fn key_type(value: i32) -> AuthKeyType {
    AuthKeyType::from_teamgram(value).unwrap_or(AuthKeyType::Perm)
}

/// Salt times are stored as unix seconds in 64 bits (MySQL: BIGINT since
/// migration 0002), not as TL's wrapped `int` dates, so SQL compares them.
fn salt_from_row(row: &AnyRow) -> Result<FutureSalt, sqlx::Error> {
    Ok(FutureSalt::new(
        row.try_get("valid_since")?,
        row.try_get("valid_until")?,
        row.try_get("salt")?,
    ))
}

#[async_trait]
impl AuthKeyStore for SqlStore {
    async fn get(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
        let Some(row) = sqlx::query("SELECT body FROM auth_keys WHERE auth_key_id = ?")
            .bind(auth_key_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let body: String = row.try_get("body").map_err(|e| self.err(e))?;
        let Some(key) = decode_body(auth_key_id, &body) else {
            return Ok(None);
        };
        let infos = sqlx::query(
            "SELECT auth_key_type, perm_auth_key_id, temp_auth_key_id, media_temp_auth_key_id \
             FROM auth_key_infos WHERE auth_key_id = ?",
        )
        .bind(auth_key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        let expires_at: Option<i64> = sqlx::query(
            "SELECT expires_at FROM mtproto_edge_auth_key_expiry WHERE auth_key_id = ?",
        )
        .bind(auth_key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(e))?
        .map(|r| r.try_get("expires_at"))
        .transpose()
        .map_err(|e| self.err(e))?;
        let info = match infos {
            Some(row) => {
                let read = |col: &str| -> Result<i64, StoreError> {
                    row.try_get(col).map_err(|e| self.err(e))
                };
                let kind: i32 = row.try_get("auth_key_type").map_err(|e| self.err(e))?;
                AuthKeyInfo {
                    key,
                    key_type: key_type(kind),
                    perm_auth_key_id: read("perm_auth_key_id")?,
                    temp_auth_key_id: read("temp_auth_key_id")?,
                    media_temp_auth_key_id: read("media_temp_auth_key_id")?,
                    expires_at,
                }
            }
            // Databases from before auth_key_infos held only perm keys.
            None => AuthKeyInfo::new(key, AuthKeyType::Perm, expires_at),
        };
        Ok(Some(info))
    }

    async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
        if self.name == "sqlite" {
            return self.insert_sqlite(info, salt).await;
        }
        let id = info.id();
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        let inserted = sqlx::query(INSERT_AUTH_KEY)
            .bind(id)
            .bind(STANDARD_NO_PAD.encode(info.key.bytes()))
            .execute(&mut *tx)
            .await;
        if let Err(e) = inserted {
            return Err(self.insert_err(id, e));
        }
        sqlx::query(INSERT_AUTH_KEY_INFO)
            .bind(id)
            .bind(info.key_type as i32)
            .bind(info.perm_auth_key_id)
            .bind(info.temp_auth_key_id)
            .bind(info.media_temp_auth_key_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(expires_at) = info.expires_at {
            sqlx::query(INSERT_EXPIRY)
                .bind(id)
                .bind(expires_at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        sqlx::query(INSERT_SALT)
            .bind(id)
            .bind(salt.salt)
            .bind(salt.since())
            .bind(salt.until())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn salts(&self, auth_key_id: i64) -> Result<Vec<FutureSalt>, StoreError> {
        let rows = sqlx::query(
            "SELECT salt, valid_since, valid_until FROM mtproto_edge_salts \
             WHERE auth_key_id = ? ORDER BY valid_since, valid_until LIMIT 128",
        )
        .bind(auth_key_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(salt_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    async fn add_salts(
        &self,
        auth_key_id: i64,
        salts: &[FutureSalt],
        now: i64,
    ) -> Result<(), StoreError> {
        // One transaction: `get_future_salts` writes 63 salts with one commit.
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        sqlx::query("DELETE FROM mtproto_edge_salts WHERE auth_key_id = ? AND valid_until < ?")
            .bind(auth_key_id)
            .bind(now - SALT_KEEP_SECS)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        for salt in salts {
            let inserted = sqlx::query(INSERT_SALT)
                .bind(auth_key_id)
                .bind(salt.salt)
                .bind(salt.since())
                .bind(salt.until())
                .execute(&mut *tx)
                .await;
            match inserted {
                Err(e)
                    if !e
                        .as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) =>
                {
                    return Err(self.err(e));
                }
                _ => {}
            }
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn bind_temp_key(
        &self,
        temp: &AuthKeyInfo,
        perm_auth_key_id: i64,
    ) -> Result<(), StoreError> {
        let column = match temp.key_type {
            AuthKeyType::MediaTemp => "media_temp_auth_key_id",
            _ => "temp_auth_key_id",
        };
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        sqlx::query("UPDATE auth_key_infos SET perm_auth_key_id = ? WHERE auth_key_id = ?")
            .bind(perm_auth_key_id)
            .bind(temp.id())
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(&format!(
            "UPDATE auth_key_infos SET {column} = ? WHERE auth_key_id = ?"
        ))
        .bind(temp.id())
        .bind(perm_auth_key_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file in a fresh directory (kept while the guard lives).
    fn sqlite_url() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("keys.db").display());
        (dir, url)
    }

    #[tokio::test]
    async fn sqlite_keeps_the_current_salt() {
        let (_dir, url) = sqlite_url();
        let store = SqlStore::connect(&url).await.unwrap();
        crate::store::tests::current_salt_survives_future_salts(&store).await;
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_mode_and_keys_survive_a_reopen() {
        let (_dir, url) = sqlite_url();
        let store = SqlStore::connect(&url).await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(mode, "wal");
        let info = AuthKeyInfo::new(AuthKey::new([7; 256]), AuthKeyType::Perm, None);
        let salt = FutureSalt::new(1_800_000_000, 1_800_001_800, 9);
        store.insert(info.clone(), salt).await.unwrap();
        store.pool.close().await;
        let reopened = SqlStore::connect(&url).await.unwrap();
        let got = reopened.get(info.id()).await.unwrap().expect("key kept");
        assert_eq!(got.key.bytes(), info.key.bytes());
        assert_eq!(reopened.salts(info.id()).await.unwrap(), vec![salt]);
    }

    /// A caller that goes away mid-insert (its client disconnected) leaves
    /// the key stored whole and the store working.
    #[tokio::test]
    async fn a_cancelled_sqlite_insert_still_completes() {
        let (_dir, url) = sqlite_url();
        let store = SqlStore::connect(&url).await.unwrap();
        let salt = FutureSalt::new(1_800_000_000, 1_800_001_800, 5);
        let first = AuthKeyInfo::new(AuthKey::new([5; 256]), AuthKeyType::Perm, None);
        // Polled once, then dropped: the caller went away mid-insert.
        let mut insert = store.insert(first.clone(), salt);
        assert!(futures::poll!(&mut insert).is_pending());
        drop(insert);
        let second = AuthKeyInfo::new(AuthKey::new([6; 256]), AuthKeyType::Perm, None);
        store.insert(second.clone(), salt).await.unwrap();
        assert_eq!(store.get(second.id()).await.unwrap(), Some(second));
        for _ in 0..100 {
            if store.get(first.id()).await.unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(store.get(first.id()).await.unwrap(), Some(first.clone()));
        assert_eq!(store.salts(first.id()).await.unwrap(), vec![salt]);
    }

    /// The one-query insert is all or nothing, and its failure leaves no
    /// transaction open for the next caller of the pool.
    #[tokio::test]
    async fn a_failed_sqlite_insert_keeps_nothing_and_the_store_goes_on() {
        let (_dir, url) = sqlite_url();
        let store = SqlStore::connect(&url).await.unwrap();
        let temp = AuthKeyInfo::new(
            AuthKey::new([3; 256]),
            AuthKeyType::Temp,
            Some(1_900_000_000),
        );
        let salt = FutureSalt::new(1_800_000_000, 1_800_001_800, 5);
        // The key's salt row exists already, so the query's last statement
        // fails after the key rows went in.
        store
            .add_salts(temp.id(), &[salt], 1_800_000_000)
            .await
            .unwrap();
        assert!(matches!(
            store.insert(temp.clone(), salt).await,
            Err(StoreError::Collision(id)) if id == temp.id()
        ));
        assert_eq!(store.get(temp.id()).await.unwrap(), None);
        let rows: i64 = sqlx::query("SELECT COUNT(*) FROM auth_key_infos")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(rows, 0);

        let other = AuthKeyInfo::new(
            AuthKey::new([4; 256]),
            AuthKeyType::Temp,
            Some(1_900_000_000),
        );
        store.insert(other.clone(), salt).await.unwrap();
        assert_eq!(store.get(other.id()).await.unwrap(), Some(other.clone()));
        assert_eq!(store.salts(other.id()).await.unwrap(), vec![salt]);
    }
}
