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
use mtproto_core::tl::{id, TlWrite};

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
    gateway: String,
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

    pub fn store(&self) -> &Arc<dyn AuthKeyStore> {
        &self.core.store
    }
}

impl Core {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), SessionState>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The salt clients should use now, creating one when none is current.
    async fn current_salt(
        &self,
        auth_key_id: i64,
        now: i64,
    ) -> Result<(i64, Vec<FutureSalt>), SessionError> {
        let salts = self.store.salts(auth_key_id).await.map_err(unavailable)?;
        let current = salts
            .iter()
            .filter(|s| s.since() <= now && now < s.until())
            .max_by_key(|s| s.until())
            .map(|s| s.salt);
        if let Some(salt) = current {
            return Ok((salt, salts));
        }
        let salt = FutureSalt::new(now, now + SALT_PERIOD_SECS, rand::thread_rng().gen());
        self.store
            .add_salts(auth_key_id, &[salt], now)
            .await
            .map_err(unavailable)?;
        let mut salts = salts;
        salts.push(salt);
        Ok((salt.salt, salts))
    }

    /// Wraps replies (in a container when there are several) and hands them to the gateway.
    async fn deliver(&self, data: &SessionClientData, salt: i64, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let (auth_key_id, session_id) = (data.auth_key_id, data.session_id);
        let plaintext = {
            let mut sessions = self.sessions();
            let state = sessions.entry((auth_key_id, session_id)).or_default();
            state.gateway.clone_from(&data.server_id);
            if replies.len() == 1 {
                let reply = &replies[0];
                let msg_id = state.msg_id(reply.is_response);
                let seq_no = state.seq_no(reply.content_related);
                plaintext_message(salt, session_id, msg_id, seq_no, &reply.body)
            } else {
                let mut container = Vec::new();
                container.put_u32(id::MSG_CONTAINER);
                container.put_u32(replies.len() as u32);
                for reply in &replies {
                    container.put_i64(state.msg_id(reply.is_response));
                    container.put_i32(state.seq_no(reply.content_related));
                    container.put_u32(reply.body.len() as u32);
                    container.put_raw(&reply.body);
                }
                let msg_id = state.msg_id(false);
                let seq_no = state.seq_no(false);
                plaintext_message(salt, session_id, msg_id, seq_no, &container)
            }
        };
        if !self
            .gateway
            .send_data_to_gateway(
                &data.server_id,
                auth_key_id,
                session_id,
                Bytes::from(plaintext),
            )
            .await
        {
            debug!(auth_key_id, session_id, gateway = %data.server_id, "no live connection took the reply");
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
        let (salt, salts) = self.current_salt(data.auth_key_id, now).await?;
        let salt_ok = salts.iter().any(|s| {
            s.salt == data.salt && s.since() - 60 <= now && now <= s.until() + SALT_GRACE_SECS
        });
        if !salt_ok {
            let reply = reference::bad_server_salt(msg_id, seq_no, salt);
            self.deliver(&data, salt, vec![reply]).await;
            return Ok(());
        }
        if let Err(code) = reference::check_msg_id(msg_id, now) {
            let reply = reference::bad_msg_notification(msg_id, seq_no, code);
            self.deliver(&data, salt, vec![reply]).await;
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
        replies.extend(outcome.replies);
        self.deliver(&data, salt, replies).await;
        Ok(())
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
        let shard =
            (data.auth_key_id ^ data.session_id).unsigned_abs() as usize % self.workers.len();
        self.workers[shard]
            .send(data)
            .await
            .map_err(|_| SessionError::Unavailable("reference session stopped".into()))
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
