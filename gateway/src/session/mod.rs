//! The gateway's side of the session seam (`mtproto_session`): the gRPC
//! client of remote session services, and key lookups through a session.

mod grpc_h2;
mod links;
pub mod remote;
mod send_data;
mod stream_link;
mod unary_link;

use async_trait::async_trait;

use crate::authkey::cache::{KeySource, LookupError};
use mtproto_core::authkey::AuthKeyInfo;
use mtproto_session::{SessionError, SessionService};

/// Keys looked up through the session (teamgram's `session_queryAuthKey`).
#[derive(Debug)]
pub struct SessionKeySource(pub std::sync::Arc<dyn SessionService>);

#[async_trait]
impl KeySource for SessionKeySource {
    async fn lookup(&self, auth_key_id: i64) -> Result<Option<AuthKeyInfo>, LookupError> {
        match self.0.query_auth_key(auth_key_id).await {
            Ok(info) => Ok(Some(info)),
            Err(SessionError::AuthKeyUnregistered) => Ok(None),
            Err(e) => Err(LookupError(e.to_string())),
        }
    }
}
