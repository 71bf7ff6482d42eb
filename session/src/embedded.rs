//! The embedded reference session: keeps auth keys in an [`AuthKeyStore`],
//! answers MTProto service messages and refuses API calls with a clear
//! `rpc_error`, delivering replies through [`GatewayDelivery`] exactly as a
//! remote session does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rand::{Rng, RngCore};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{AuthKeyStore, StoreError};
use crate::{GatewayDelivery, SessionClientData, SessionClientEvent, SessionError, SessionService};
use mtproto_core::authkey::{AuthKeyInfo, AuthKeyType, FutureSalt};
use mtproto_core::bind::{self, BindRequest, Outer};
use mtproto_core::handshake::{NewAuthKey, StoreOutcome};
use mtproto_core::message::{next_server_msg_id, plaintext_message};
use mtproto_core::reference::{self, MsgWindow, Reply, SALT_PERIOD_SECS};
use mtproto_core::tl::{msg_container, TlWrite};

/// TL `boolTrue`.
const BOOL_TRUE: u32 = 0x9972_75b5;
/// A salt stays acceptable this long after its window ends, for messages in flight.
const SALT_GRACE_SECS: i64 = 1800;
/// Upper bound on tracked sessions; the oldest is forgotten beyond it.
const MAX_SESSIONS: usize = 1_000_000;

#[derive(Debug, Default)]
struct SessionState {
    content_messages_sent: i32,
    last_msg_id: i64,
    /// The gateway (`server_id`) that last carried this session: replies go there.
    gateway: Arc<str>,
    /// `new_session_created` was sent. Not the same as the state existing:
    /// a first message refused for its salt creates the state (its
    /// `bad_server_salt` needs a msg_id) but not the announcement.
    announced: bool,
    /// The client's recent msg_ids and seq_nos.
    window: MsgWindow,
}

impl SessionState {
    fn seq_no(&mut self, content_related: bool) -> i32 {
        if content_related {
            self.content_messages_sent += 1;
            self.content_messages_sent * 2 - 1
        } else {
            self.content_messages_sent * 2
        }
    }

    fn msg_id(&mut self, response: bool) -> i64 {
        let now = crate::unix_time();
        self.last_msg_id = next_server_msg_id(
            self.last_msg_id,
            now.as_secs() as i64,
            now.subsec_nanos(),
            response,
        );
        self.last_msg_id
    }
}

/// Messages of one session are handled in order by one of these workers.
const WORKERS: usize = 16;
/// Messages queued per worker before `send_data` waits (back-pressure).
const WORKER_QUEUE: usize = 1024;

/// The reference session. `send_data` queues the message and returns, like
/// teamgram's session; workers answer it, one session's messages in order.
#[derive(Debug)]
pub struct EmbeddedSession {
    core: Arc<Core>,
    workers: Vec<mpsc::Sender<SessionClientData>>,
}

#[derive(Debug)]
struct Core {
    store: Arc<dyn AuthKeyStore>,
    gateway: Arc<dyn GatewayDelivery>,
    sessions: Mutex<HashMap<(i64, i64), SessionState>>,
    /// See [`reference::Context::max_unpacked_bytes`].
    max_unpacked_bytes: u64,
    salts: SaltCache,
}

impl EmbeddedSession {
    /// Starts the workers; needs a tokio runtime.
    pub fn new(store: Arc<dyn AuthKeyStore>, gateway: Arc<dyn GatewayDelivery>) -> Self {
        Self::with_unpack_budget(store, gateway, reference::DEFAULT_MAX_UNPACKED_BYTES)
    }

    /// As [`EmbeddedSession::new`]; the `gzip_packed` of one client message
    /// inflate to at most `max_unpacked_bytes` (the gateway's frame limit).
    pub fn with_unpack_budget(
        store: Arc<dyn AuthKeyStore>,
        gateway: Arc<dyn GatewayDelivery>,
        max_unpacked_bytes: u64,
    ) -> Self {
        let core = Arc::new(Core {
            store,
            gateway,
            sessions: Mutex::new(HashMap::new()),
            max_unpacked_bytes,
            salts: SaltCache::default(),
        });
        let workers = (0..WORKERS)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<SessionClientData>(WORKER_QUEUE);
                let core = core.clone();
                tokio::spawn(async move {
                    while let Some(data) = rx.recv().await {
                        let (auth_key_id, session_id) = (data.auth_key_id, data.session_id);
                        if let Err(e) = core.process(data).await {
                            warn!(auth_key_id, session_id, "message not processed: {e}");
                        }
                    }
                });
                tx
            })
            .collect();
        Self { core, workers }
    }

    /// Queues a message for the worker of its session.
    async fn queue(&self, data: SessionClientData) -> Result<(), SessionError> {
        let shard =
            (data.auth_key_id ^ data.session_id).unsigned_abs() as usize % self.workers.len();
        self.workers[shard]
            .send(data)
            .await
            .map_err(|_| SessionError::Unavailable("reference session stopped".into()))
    }

    pub fn store(&self) -> &Arc<dyn AuthKeyStore> {
        &self.core.store
    }
}

impl Core {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), SessionState>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The salt clients should use now, and whether the message's salt is
    /// acceptable. Answered from the salt cache when it can be (no store read
    /// per message); a salt the cache does not accept is checked against the
    /// store before it is refused, so a salt another gateway handed out (from
    /// the same store) is accepted as soon as it is stored.
    async fn check_salt(
        &self,
        auth_key_id: i64,
        salt: i64,
        now: i64,
    ) -> Result<(i64, bool), SessionError> {
        if let Some((current, true)) = self.salts.check(auth_key_id, salt, now) {
            return Ok((current, true));
        }
        let (current, salts) = self.read_salts(auth_key_id, now).await?;
        let accepted = salt_accepted(&salts, salt, now);
        self.salts.put(auth_key_id, salts, now);
        Ok((current, accepted))
    }

    /// The key's salts from the store, with a current one created (and
    /// stored) when none is valid now.
    async fn read_salts(
        &self,
        auth_key_id: i64,
        now: i64,
    ) -> Result<(i64, Vec<FutureSalt>), SessionError> {
        let mut salts = self.store.salts(auth_key_id).await.map_err(unavailable)?;
        if let Some(current) = current_salt(&salts, now) {
            return Ok((current.salt, salts));
        }
        let salt = FutureSalt::new(now, now + SALT_PERIOD_SECS, rand::thread_rng().gen());
        self.store
            .add_salts(auth_key_id, &[salt], now)
            .await
            .map_err(unavailable)?;
        salts.push(salt);
        Ok((salt.salt, salts))
    }

    /// Wraps replies (in a container when there are several) and hands them to the gateway.
    fn deliver(&self, data: &SessionClientData, salt: i64, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let (auth_key_id, session_id) = (data.auth_key_id, data.session_id);
        let plaintext = {
            let mut sessions = self.sessions();
            let state = sessions.entry((auth_key_id, session_id)).or_default();
            if state.gateway != data.server_id {
                state.gateway = data.server_id.clone();
            }
            if replies.len() == 1 {
                let reply = &replies[0];
                let msg_id = state.msg_id(reply.is_response);
                let seq_no = state.seq_no(reply.content_related);
                plaintext_message(salt, session_id, msg_id, seq_no, &reply.body)
            } else {
                let messages: Vec<(i64, i32, &[u8])> = replies
                    .iter()
                    .map(|reply| {
                        let msg_id = state.msg_id(reply.is_response);
                        (msg_id, state.seq_no(reply.content_related), &reply.body[..])
                    })
                    .collect();
                let container = msg_container(&messages);
                let msg_id = state.msg_id(false);
                let seq_no = state.seq_no(false);
                plaintext_message(salt, session_id, msg_id, seq_no, &container)
            }
        };
        if !self.gateway.send_data_to_gateway(
            &data.server_id,
            auth_key_id,
            session_id,
            Bytes::from(plaintext),
        ) {
            debug!(auth_key_id, session_id, gateway = %data.server_id, "reply not taken for delivery");
        }
    }

    /// Verifies and records `auth.bindTempAuthKey` (teamgram's authsession
    /// checked none of the inner fields).
    async fn bind(&self, data: &SessionClientData, msg_id: i64, body: &[u8]) -> Reply {
        const INVALID: &str = "ENCRYPTED_MESSAGE_INVALID";
        let Some(request) = BindRequest::parse(body) else {
            return reference::rpc_error(msg_id, 400, INVALID);
        };
        let outer = Outer {
            msg_id,
            temp_auth_key_id: data.auth_key_id,
            session_id: data.session_id,
        };
        let (temp, perm) = match (
            self.store.get(data.auth_key_id).await,
            self.store.get(request.perm_auth_key_id).await,
        ) {
            (Ok(Some(temp)), Ok(Some(perm))) => (temp, perm),
            (Err(e), _) | (_, Err(e)) => {
                warn!(
                    auth_key_id = data.auth_key_id,
                    "bindTempAuthKey: store unavailable: {e}"
                );
                return reference::rpc_error(msg_id, 500, "INTERNAL_SERVER_ERROR");
            }
            _ => return reference::rpc_error(msg_id, 400, INVALID),
        };
        if temp.key_type == AuthKeyType::Perm || perm.key_type != AuthKeyType::Perm {
            return reference::rpc_error(msg_id, 400, "TEMP_AUTH_KEY_EMPTY");
        }
        if let Err(e) = bind::verify(&request, &perm.key, &outer) {
            warn!(
                auth_key_id = data.auth_key_id,
                perm_auth_key_id = request.perm_auth_key_id,
                "bindTempAuthKey refused: {e}"
            );
            return reference::rpc_error(msg_id, 400, INVALID);
        }
        if let Err(e) = self.store.bind_temp_key(&temp, perm.id()).await {
            warn!(
                auth_key_id = data.auth_key_id,
                "bindTempAuthKey: could not record the binding: {e}"
            );
            return reference::rpc_error(msg_id, 500, "INTERNAL_SERVER_ERROR");
        }
        debug!(
            temp_auth_key_id = temp.id(),
            perm_auth_key_id = perm.id(),
            "temp key bound"
        );
        let mut bool_true = Vec::new();
        bool_true.put_u32(BOOL_TRUE);
        reference::rpc_result(msg_id, &bool_true)
    }

    /// Answers one client message.
    async fn process(&self, data: SessionClientData) -> Result<(), SessionError> {
        let payload = &data.payload[..];
        if payload.len() < 16 {
            warn!(
                auth_key_id = data.auth_key_id,
                "payload shorter than a message header"
            );
            return Ok(());
        }
        let msg_id = i64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
        let seq_no = i32::from_le_bytes(payload[8..12].try_into().unwrap_or([0; 4]));
        let len = u32::from_le_bytes(payload[12..16].try_into().unwrap_or([0; 4])) as usize;
        let Some(body) = payload.get(16..16 + len) else {
            warn!(
                auth_key_id = data.auth_key_id,
                "message length exceeds payload"
            );
            return Ok(());
        };
        let now = unix_now();
        let (salt, salt_ok) = self.check_salt(data.auth_key_id, data.salt, now).await?;
        if !salt_ok {
            let reply = reference::bad_server_salt(msg_id, seq_no, salt);
            self.deliver(&data, salt, vec![reply]);
            return Ok(());
        }
        if let Err(code) = reference::check_msg_id(msg_id, now) {
            let reply = reference::bad_msg_notification(msg_id, seq_no, code);
            self.deliver(&data, salt, vec![reply]);
            return Ok(());
        }
        let mut replies = Vec::new();
        let key = (data.auth_key_id, data.session_id);
        let (is_new, mut window) = {
            let mut sessions = self.sessions();
            if !sessions.contains_key(&key) && sessions.len() >= MAX_SESSIONS {
                if let Some(&evict) = sessions.keys().next() {
                    sessions.remove(&evict);
                }
            }
            let state = sessions.entry(key).or_default();
            (
                !std::mem::replace(&mut state.announced, true),
                std::mem::take(&mut state.window),
            )
        };
        if is_new {
            debug!(
                auth_key_id = data.auth_key_id,
                session_id = data.session_id,
                client_ip = %data.client_ip,
                gateway = %data.server_id,
                "new session"
            );
            let unique_id = rand::thread_rng().next_u64() as i64;
            replies.push(reference::new_session_created(msg_id, unique_id, salt));
        }
        let ctx = reference::Context {
            session_id: data.session_id,
            now,
            current_salt: salt,
            unbound_temp_key: data.key_type != AuthKeyType::Perm as i32
                && data.perm_auth_key_id == 0,
            max_unpacked_bytes: self.max_unpacked_bytes,
        };
        // The window is taken out so inflating gzip_packed does not hold the
        // lock; this session's messages are handled by this worker only.
        let outcome = reference::respond(
            msg_id,
            seq_no,
            body,
            &ctx,
            &mut window,
            &mut rand::thread_rng(),
        );
        if let Some(state) = self.sessions().get_mut(&key) {
            state.window = window;
        }
        if !outcome.new_salts.is_empty() {
            self.store
                .add_salts(data.auth_key_id, &outcome.new_salts, now)
                .await
                .map_err(unavailable)?;
            self.salts.forget(data.auth_key_id);
        }
        for (bind_msg_id, body) in &outcome.binds {
            replies.push(self.bind(&data, *bind_msg_id, body).await);
        }
        for &(destroy_msg_id, target) in &outcome.destroy_sessions {
            let existed = self
                .sessions()
                .remove(&(data.auth_key_id, target))
                .is_some();
            replies.push(reference::destroy_session_result(
                destroy_msg_id,
                target,
                existed,
            ));
        }
        if replies.is_empty() {
            replies = outcome.replies;
        } else {
            replies.extend(outcome.replies);
        }
        self.deliver(&data, salt, replies);
        Ok(())
    }
}

/// The salt valid at `now` that ends last: the one clients are told to use.
fn current_salt(salts: &[FutureSalt], now: i64) -> Option<FutureSalt> {
    salts
        .iter()
        .filter(|s| s.since() <= now && now < s.until())
        .max_by_key(|s| s.until())
        .copied()
}

/// Whether a message may carry `salt` at `now`: a salt of the key, from a
/// minute before its window (clock skew) to [`SALT_GRACE_SECS`] after it.
fn salt_accepted(salts: &[FutureSalt], salt: i64, now: i64) -> bool {
    salts
        .iter()
        .any(|s| s.salt == salt && s.since() - 60 <= now && now <= s.until() + SALT_GRACE_SECS)
}

/// How long cached salts are used before the store is read again, at most.
const SALT_CACHE_SECS: i64 = 60;
/// Keys whose salts are cached; beyond it an arbitrary entry goes.
const SALT_CACHE_KEYS: usize = 100_000;

/// The salts of recently active keys, so that a message costs no store read.
///
/// The store stays the truth that gateways sharing it agree on; the cache
/// only saves reads, with these rules:
/// - an entry is used until its current salt ends or for
///   [`SALT_CACHE_SECS`], whichever is first, then read again, so a salt
///   another gateway made current is announced here within that time;
/// - a salt the entry does not accept is looked up in the store before it is
///   refused (salts another gateway handed out are accepted at once; a client
///   with a wrong salt costs one read per message, as before the cache);
/// - this session's own writes (`get_future_salts`) drop the entry, so the
///   next message reads what was stored.
#[derive(Debug, Default)]
struct SaltCache {
    entries: Mutex<HashMap<i64, CachedSalts>>,
}

#[derive(Debug)]
struct CachedSalts {
    salts: Vec<FutureSalt>,
    fresh_until: i64,
}

impl SaltCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<i64, CachedSalts>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current salt and whether `salt` is accepted, from a fresh entry
    /// that has a current salt; `None` when the store must be read.
    fn check(&self, auth_key_id: i64, salt: i64, now: i64) -> Option<(i64, bool)> {
        let entries = self.entries();
        let entry = entries.get(&auth_key_id).filter(|e| now < e.fresh_until)?;
        let current = current_salt(&entry.salts, now)?;
        Some((current.salt, salt_accepted(&entry.salts, salt, now)))
    }

    /// Caches salts just read from the store (which hold one valid at `now`),
    /// keeping only those that can be accepted while the entry is fresh.
    fn put(&self, auth_key_id: i64, mut salts: Vec<FutureSalt>, now: i64) {
        let Some(current) = current_salt(&salts, now) else {
            return;
        };
        let fresh_until = (now + SALT_CACHE_SECS).min(current.until());
        salts.retain(|s| s.until() + SALT_GRACE_SECS >= now && s.since() - 60 < fresh_until);
        let mut entries = self.entries();
        if entries.len() >= SALT_CACHE_KEYS && !entries.contains_key(&auth_key_id) {
            if let Some(&evict) = entries.keys().next() {
                entries.remove(&evict);
            }
        }
        entries.insert(auth_key_id, CachedSalts { salts, fresh_until });
    }

    fn forget(&self, auth_key_id: i64) {
        self.entries().remove(&auth_key_id);
    }
}

fn unavailable(e: StoreError) -> SessionError {
    SessionError::Unavailable(e.to_string())
}

fn unix_now() -> i64 {
    crate::unix_time().as_secs() as i64
}

#[async_trait]
impl SessionService for EmbeddedSession {
    async fn query_auth_key(&self, auth_key_id: i64) -> Result<AuthKeyInfo, SessionError> {
        match self.core.store.get(auth_key_id).await {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(SessionError::AuthKeyUnregistered),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn set_auth_key(&self, key: &NewAuthKey) -> Result<StoreOutcome, SessionError> {
        match self
            .core
            .store
            .insert(key.info.clone(), key.first_salt)
            .await
        {
            Ok(()) => Ok(StoreOutcome::Stored),
            Err(StoreError::Collision(_)) => Ok(StoreOutcome::Collision),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn send_data(&self, data: SessionClientData) -> Result<(), SessionError> {
        self.queue(data).await
    }

    /// One after another, as the default does, but without a boxed call per
    /// message.
    async fn send_data_batch(&self, data: Vec<SessionClientData>) -> Vec<Result<(), SessionError>> {
        let mut outcomes = Vec::with_capacity(data.len());
        for data in data {
            outcomes.push(self.queue(data).await);
        }
        outcomes
    }

    async fn close_session(&self, event: SessionClientEvent) -> Result<(), SessionError> {
        debug!(
            auth_key_id = event.auth_key_id,
            session_id = event.session_id,
            client_ip = %event.client_ip,
            gateway = %event.server_id,
            "session closed by its gateway"
        );
        self.core
            .sessions()
            .remove(&(event.auth_key_id, event.session_id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::MemoryStore;

    fn salt(salt: i64, valid_since: i32, valid_until: i32) -> FutureSalt {
        FutureSalt {
            valid_since,
            valid_until,
            salt,
        }
    }

    #[test]
    fn cached_salts_serve_until_the_current_salt_ends_or_the_entry_ages() {
        let cache = SaltCache::default();
        let now = 1_800_000_000;
        let t = now as i32;
        cache.put(7, vec![salt(1, t - 100, t + 30)], now);
        assert_eq!(cache.check(7, 1, now), Some((1, true)));
        assert_eq!(cache.check(7, 2, now), Some((1, false)));
        assert_eq!(cache.check(7, 1, now + 30), None, "the current salt ended");
        assert_eq!(cache.check(8, 1, now), None, "another key");

        cache.put(7, vec![salt(1, t - 100, t + 1700)], now);
        assert_eq!(
            cache.check(7, 1, now + SALT_CACHE_SECS - 1),
            Some((1, true))
        );
        assert_eq!(cache.check(7, 1, now + SALT_CACHE_SECS), None, "aged");
        cache.forget(7);
        assert_eq!(cache.check(7, 1, now), None);
    }

    /// The cache answers as the full list does while the entry is fresh: a
    /// future salt that starts meanwhile is current and accepted (from a
    /// minute early), an old one within its grace is accepted, and salts
    /// that cannot matter before the entry ages are not kept.
    #[test]
    fn cached_salts_answer_as_the_stored_list() {
        let cache = SaltCache::default();
        let now = 1_800_000_000;
        let t = now as i32;
        let stored = vec![
            salt(1, t - 2000, t - 200),
            salt(2, t - 200, t + 20),
            salt(3, t + 10, t + 1810),
            salt(4, t + 1810, t + 3610),
            salt(5, t - 9000, t - 8000),
        ];
        cache.put(7, stored.clone(), now);
        let kept: Vec<i64> = cache.entries()[&7].salts.iter().map(|s| s.salt).collect();
        assert_eq!(kept, vec![1, 2, 3]);
        for at in [now, now + 9, now + 10, now + 19] {
            for candidate in 1..=5 {
                let expected = (
                    current_salt(&stored, at)
                        .map(|s| s.salt)
                        .unwrap_or_default(),
                    salt_accepted(&stored, candidate, at),
                );
                assert_eq!(
                    cache.check(7, candidate, at),
                    Some(expected),
                    "{candidate} at {at}"
                );
            }
        }
    }

    /// A store that counts reads of salts.
    #[derive(Debug, Default)]
    struct Counting {
        inner: MemoryStore,
        salt_reads: AtomicUsize,
    }

    #[async_trait]
    impl AuthKeyStore for Counting {
        async fn get(&self, id: i64) -> Result<Option<AuthKeyInfo>, StoreError> {
            self.inner.get(id).await
        }
        async fn insert(&self, info: AuthKeyInfo, salt: FutureSalt) -> Result<(), StoreError> {
            self.inner.insert(info, salt).await
        }
        async fn salts(&self, id: i64) -> Result<Vec<FutureSalt>, StoreError> {
            self.salt_reads.fetch_add(1, Ordering::Relaxed);
            self.inner.salts(id).await
        }
        async fn add_salts(&self, id: i64, s: &[FutureSalt], now: i64) -> Result<(), StoreError> {
            self.inner.add_salts(id, s, now).await
        }
        async fn bind_temp_key(&self, t: &AuthKeyInfo, perm: i64) -> Result<(), StoreError> {
            self.inner.bind_temp_key(t, perm).await
        }
    }

    #[derive(Debug)]
    struct Nowhere;

    impl GatewayDelivery for Nowhere {
        fn send_data_to_gateway(&self, _: &str, _: i64, _: i64, _: Bytes) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn messages_read_salts_once_and_salts_from_elsewhere_are_accepted() {
        let store = Arc::new(Counting::default());
        let core = Core {
            store: store.clone(),
            gateway: Arc::new(Nowhere),
            sessions: Mutex::new(HashMap::new()),
            max_unpacked_bytes: reference::DEFAULT_MAX_UNPACKED_BYTES,
            salts: SaltCache::default(),
        };
        let now = unix_now();
        let (current, accepted) = core.check_salt(9, 0, now).await.unwrap();
        assert!(!accepted, "0 is not a salt of the key");
        assert_eq!(store.inner.salts(9).await.unwrap()[0].salt, current);
        for _ in 0..100 {
            assert_eq!(
                core.check_salt(9, current, now).await.unwrap(),
                (current, true)
            );
        }
        assert_eq!(store.salt_reads.load(Ordering::Relaxed), 1);

        // Another gateway sharing the store hands out a salt valid now.
        let elsewhere = salt(42, now as i32 - 5, now as i32 + 1000);
        store.inner.add_salts(9, &[elsewhere], now).await.unwrap();
        let (_, accepted) = core.check_salt(9, 42, now).await.unwrap();
        assert!(accepted);
        assert_eq!(store.salt_reads.load(Ordering::Relaxed), 2);
        assert!(core.check_salt(9, 42, now).await.unwrap().1);
        assert_eq!(store.salt_reads.load(Ordering::Relaxed), 2, "cached since");
    }
}
