//! The auth key stores against real Redis and MariaDB (started by
//! `scripts/services.sh`, URLs in MTPROTO_TEST_REDIS_URL / MTPROTO_TEST_MYSQL_URL)
//! and SQLite in a temp dir. Run with `cargo test --test stores -- --ignored`
//! (scripts/test.sh does); each test uses its own database / key prefix.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mtproto_core::authkey::{AuthKey, AuthKeyInfo, AuthKeyType, FutureSalt};
use mtproto_gateway::authkey::cache::{KeyCache, KeySource, LookupError};
use mtproto_session::metrics::StoreMetrics;
use mtproto_session::store::redis_store::RedisStore;
use mtproto_session::store::sql::SqlStore;
use mtproto_session::store::{self, AuthKeyStore, StoreError, StoreUrls};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run scripts/services.sh up and eval its env")
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}_{}", std::process::id(), rand::random::<u32>())
}

async fn mysql_url() -> String {
    let admin = env("MTPROTO_TEST_MYSQL_URL");
    let db = unique("mtproto_test_");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&admin)
        .await
        .expect("admin connection");
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&pool)
        .await
        .expect("create database");
    format!("{admin}/{db}")
}

async fn redis(prefix: &str) -> RedisStore {
    RedisStore::connect(&env("MTPROTO_TEST_REDIS_URL"), prefix)
        .await
        .expect("redis")
}

fn salt(n: i32) -> FutureSalt {
    FutureSalt {
        valid_since: n,
        valid_until: n + 1800,
        salt: i64::from(n) * 7,
    }
}

fn key(seed: u8, kind: AuthKeyType) -> AuthKeyInfo {
    let bytes: [u8; 256] = std::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed));
    AuthKeyInfo::new(
        AuthKey::new(bytes),
        kind,
        (kind != AuthKeyType::Perm).then_some(1_900_000_000),
    )
}

/// What every store must do.
async fn conformance(store: &dyn AuthKeyStore) {
    let perm = key(1, AuthKeyType::Perm);
    let temp = key(2, AuthKeyType::Temp);
    assert_eq!(store.get(perm.id()).await.unwrap(), None);
    store.insert(perm.clone(), salt(1000)).await.unwrap();
    store.insert(temp.clone(), salt(2000)).await.unwrap();
    assert_eq!(store.get(perm.id()).await.unwrap(), Some(perm.clone()));
    assert_eq!(store.get(temp.id()).await.unwrap(), Some(temp.clone()));
    assert!(matches!(
        store.insert(perm.clone(), salt(1)).await,
        Err(StoreError::Collision(_))
    ));
    assert_eq!(store.salts(perm.id()).await.unwrap(), vec![salt(1000)]);
    store
        .add_salts(perm.id(), &[salt(2800)], 2800)
        .await
        .unwrap();
    let mut salts = store.salts(perm.id()).await.unwrap();
    salts.sort_by_key(|s| s.valid_since);
    assert_eq!(salts, vec![salt(1000), salt(2800)]);
    // get_future_salts writes 63 at once: the salts valid now stay (they
    // used to be pruned against the new salts' start: a bad_server_salt loop).
    let futures: Vec<FutureSalt> = (1..64).map(|i| salt(2800 + i * 1800)).collect();
    store.add_salts(perm.id(), &futures, 2800).await.unwrap();
    let salts = store.salts(perm.id()).await.unwrap();
    assert!(salts.contains(&salt(1000)) && salts.contains(&salt(2800)));
    // Past 2038-01-19 (beyond i32): stored, read back, and pruning compares
    // real times (salt(2000) ended long before).
    let late = FutureSalt::new(1 << 31, (1 << 31) + 1800, 77);
    store.add_salts(temp.id(), &[late], 1 << 31).await.unwrap();
    assert_eq!(store.salts(temp.id()).await.unwrap(), vec![late]);
}

#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn sqlite_conformance_and_persistence() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("keys.sqlite3").display()
    );
    let store = SqlStore::connect(&url).await.unwrap();
    conformance(&store).await;
    drop(store);
    let again = SqlStore::connect(&url).await.unwrap();
    assert!(again
        .get(key(1, AuthKeyType::Perm).id())
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn mysql_conformance_and_corrupt_rows() {
    let url = mysql_url().await;
    let store = SqlStore::connect(&url).await.unwrap();
    conformance(&store).await;
    // Rows teamgram-style tools could leave behind: wrong length, not base64.
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    for (id, body) in [(11i64, "AAAA"), (12, "!!! not base64 !!!")] {
        sqlx::query("INSERT INTO auth_keys (auth_key_id, body) VALUES (?, ?)")
            .bind(id)
            .bind(body)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(
            store.get(id).await.unwrap(),
            None,
            "corrupt row {id} is treated as missing"
        );
    }
    // A key written by teamgram before auth_key_infos existed reads as perm.
    let old = key(3, AuthKeyType::Perm);
    use base64::Engine;
    sqlx::query("INSERT INTO auth_keys (auth_key_id, body) VALUES (?, ?)")
        .bind(old.id())
        .bind(base64::engine::general_purpose::STANDARD_NO_PAD.encode(old.key.bytes()))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(store.get(old.id()).await.unwrap(), Some(old));
}

#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn redis_conformance_legacy_hash_and_corrupt_entries() {
    let prefix = unique("t");
    let store = redis(&prefix).await;
    conformance(&store).await;
    let client = redis::Client::open(env("MTPROTO_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let legacy = key(4, AuthKeyType::Perm);
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}auth_keys_{}", legacy.id()))
        .arg("auth_key_type")
        .arg("0")
        .arg("auth_key")
        .arg(legacy.key.bytes().as_slice())
        .arg("perm_auth_key_id")
        .arg(legacy.id().to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.get(legacy.id()).await.unwrap(), Some(legacy));
    for (id, value) in [
        (21i64, "{not json"),
        (22, "{\"auth_key\":\"AAAA\"}"),
        (23, "*"),
    ] {
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}auth_keys2_{id}"))
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(store.get(id).await.unwrap(), None);
    }
    // A cached miss may be replaced by a real key; a legacy-only key may not.
    let fresh = key(5, AuthKeyType::Perm);
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}auth_keys2_{}", fresh.id()))
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    store.insert(fresh.clone(), salt(1)).await.unwrap();
    assert_eq!(store.get(fresh.id()).await.unwrap(), Some(fresh));
    assert!(matches!(
        store.insert(key(4, AuthKeyType::Perm), salt(1)).await,
        Err(StoreError::Collision(_))
    ));
}

/// Two handshakes that made the same key id race to store it: one wins, the
/// others are told to retry (a read-then-write let several overwrite it).
#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn redis_insert_is_atomic() {
    let prefix = unique("t");
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(redis(&prefix).await);
    }
    for round in 0..20u8 {
        let info = key(100 + round, AuthKeyType::Perm);
        let results = futures::future::join_all(
            stores
                .iter()
                .flat_map(|store| (0..4).map(|_| store.insert(info.clone(), salt(1)))),
        )
        .await;
        let stored = results.iter().filter(|r| r.is_ok()).count();
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(()) | Err(StoreError::Collision(_)))),
            "{results:?}"
        );
        assert_eq!(stored, 1, "round {round}: {stored} inserts stored the key");
    }
}

#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn tiers_read_redis_first_fall_back_to_mysql_and_back_fill() {
    let prefix = unique("t");
    let urls = StoreUrls {
        redis_url: Some(env("MTPROTO_TEST_REDIS_URL")),
        redis_key_prefix: prefix.clone(),
        mysql_url: Some(mysql_url().await),
        sqlite_path: None,
    };
    let metrics = StoreMetrics::default();
    let tiers = store::open(&urls, &metrics).await.unwrap();
    let info = key(5, AuthKeyType::Perm);
    tiers.insert(info.clone(), salt(100)).await.unwrap();
    let redis_only = redis(&prefix).await;
    assert_eq!(redis_only.get(info.id()).await.unwrap(), Some(info.clone()));
    // Flush this test's Redis keys: the MySQL tier answers and Redis is filled again.
    let client = redis::Client::open(env("MTPROTO_TEST_REDIS_URL")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(redis_only.get(info.id()).await.unwrap(), None);
    assert_eq!(tiers.get(info.id()).await.unwrap(), Some(info.clone()));
    assert_eq!(redis_only.get(info.id()).await.unwrap(), Some(info));
    // One read reached each tier: both are timed under their own label.
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("lookup_seconds", "", metrics.lookup_duration.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("lookup_seconds_count{tier=\"redis\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("lookup_seconds_count{tier=\"mysql\"} 1"),
        "{text}"
    );
}

#[tokio::test]
#[ignore = "needs scripts/services.sh"]
async fn a_down_store_is_an_error_not_a_miss() {
    let urls = StoreUrls {
        redis_url: Some("redis://127.0.0.1:1/".into()),
        ..StoreUrls::default()
    };
    let err = store::open(&urls, &StoreMetrics::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    let bad_mysql = StoreUrls {
        mysql_url: Some("mysql://mtproto:wrong@127.0.0.1:1/none".into()),
        ..StoreUrls::default()
    };
    assert!(matches!(
        store::open(&bad_mysql, &StoreMetrics::default()).await,
        Err(StoreError::Unavailable(_))
    ));
}

/// Counts lookups that reach a real store.
#[derive(Debug)]
struct Counted {
    store: Arc<dyn AuthKeyStore>,
    lookups: AtomicU64,
}

#[async_trait]
impl KeySource for Counted {
    async fn lookup(&self, id: i64) -> Result<Option<AuthKeyInfo>, LookupError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.store
            .get(id)
            .await
            .map_err(|e| LookupError(e.to_string()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs scripts/services.sh"]
async fn a_burst_of_1000_lookups_of_one_unknown_key_reaches_mysql_once() {
    let store: Arc<dyn AuthKeyStore> =
        Arc::new(SqlStore::connect(&mysql_url().await).await.unwrap());
    let source = Arc::new(Counted {
        store,
        lookups: AtomicU64::new(0),
    });
    let cache = Arc::new(KeyCache::new(
        1 << 20,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let waiters: Vec<_> = (0..1000)
        .map(|_| {
            let (cache, source) = (cache.clone(), source.clone());
            tokio::spawn(async move { cache.get(0x5eed, source.as_ref()).await })
        })
        .collect();
    for w in waiters {
        assert!(w.await.unwrap().unwrap().is_none());
    }
    assert_eq!(source.lookups.load(Ordering::SeqCst), 1);
}
