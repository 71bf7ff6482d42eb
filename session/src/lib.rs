//! The reference session service and the seam it shares with the gateway.
//!
//! The seam is shaped after teamgram's `session.RPCSession` (gateway →
//! session) and `gateway.RPCGateway` (session → gateway): the traits and
//! types below, their gRPC messages ([`wire`]) and status codes ([`status`]).
//! The reference session ([`embedded`]) implements it in process (the
//! gateway's embedded default) and behind its gRPC server ([`grpc_server`],
//! the `mtproto-session` binary); the gateway's gRPC client implements it over
//! the network. Both sides keep auth keys in the same [`store`]s (teamgram's
//! schema) and agree on ownership through the same [`ring`], fed by
//! EndpointSlice [`discovery`] in Kubernetes.

pub mod discovery;
pub mod embedded;
pub mod grpc_server;
pub mod logging;
pub mod metrics;
pub mod ring;
pub mod status;
pub mod store;
pub mod tls;
pub mod wire;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use thiserror::Error;

use mtproto_core::authkey::AuthKeyInfo;
use mtproto_core::handshake::{NewAuthKey, StoreOutcome};

/// teamgram's `SessionClientData`: one decrypted client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClientData {
    /// This gateway's id (`podIP:grpcPort`), where replies go. Shared, as
    /// the client's address is: one gateway forwards many messages with
    /// the same of each.
    pub server_id: Arc<str>,
    /// 1 when this session id is new to this gateway (asks the session to create it).
    pub conn_type: i32,
    pub auth_key_id: i64,
    pub key_type: i32,
    pub perm_auth_key_id: i64,
    pub session_id: i64,
    pub client_ip: Arc<str>,
    pub quick_ack: i32,
    pub salt: i64,
    /// Plaintext from byte 16: msg_id, seq_no, length, body and padding.
    pub payload: Bytes,
}

/// teamgram's `SessionClientEvent`: the last connection of a session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClientEvent {
    pub server_id: String,
    pub auth_key_id: i64,
    pub key_type: i32,
    pub perm_auth_key_id: i64,
    pub session_id: i64,
    pub client_ip: String,
}

#[derive(Debug, Error)]
pub enum SessionError {
    /// The session does not know this auth key (teamgram: status 401 `AUTH_KEY_UNREGISTERED`).
    #[error("auth key unregistered")]
    AuthKeyUnregistered,
    /// Another session instance owns this key (teamgram: status 700 `REDIRECT_TO_<addr>`).
    #[error("redirect to {0}")]
    Redirect(String),
    #[error("session service unavailable: {0}")]
    Unavailable(String),
}

/// Gateway → session calls.
#[async_trait]
pub trait SessionService: Send + Sync + std::fmt::Debug {
    async fn query_auth_key(&self, auth_key_id: i64) -> Result<AuthKeyInfo, SessionError>;
    async fn set_auth_key(&self, key: &NewAuthKey) -> Result<StoreOutcome, SessionError>;
    async fn send_data(&self, data: SessionClientData) -> Result<(), SessionError>;
    /// Several messages of one connection, in order, with one outcome
    /// each. A session may hand them over together (one lookup, one wait);
    /// by default they go one after another.
    async fn send_data_batch(&self, data: Vec<SessionClientData>) -> Vec<Result<(), SessionError>> {
        let mut outcomes = Vec::with_capacity(data.len());
        for data in data {
            outcomes.push(self.send_data(data).await);
        }
        outcomes
    }
    async fn close_session(&self, event: SessionClientEvent) -> Result<(), SessionError>;
}

/// Session → gateway: deliver a server message (plaintext from the salt on)
/// to a live connection of that session on the gateway named `server_id`.
/// True when it was taken: in process, by a live connection (queued for its
/// client); over the network, by the bounded queue to that gateway. False at
/// once when it cannot be (no such connection, a full outbox or queue): a
/// slow gateway never makes the caller wait, so the call is not `async`.
pub trait GatewayDelivery: Send + Sync + std::fmt::Debug {
    fn send_data_to_gateway(
        &self,
        server_id: &str,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool;
}

/// Time since the Unix epoch (zero if the clock is before it).
pub fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
