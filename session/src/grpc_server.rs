//! The reference session as a network service (`mtproto-session`): serves
//! teamgram's `session.RPCSession` and `session.RPCSessionStream` over the
//! embedded session, checks ring ownership (`REDIRECT_TO_<owner>`), and sends
//! replies back through the gateway named in each message
//! (`gateway.RPCGateway/gateway_sendDataToGateway`). With mutual TLS, a
//! message's `server_id` must be the calling gateway's own (see
//! [`Peer::may_claim_host`]), so no caller can have replies sent elsewhere.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use mtproto_edge_proto::gateway::rpc_gateway_client::RpcGatewayClient;
use mtproto_edge_proto::gateway::{self as gpb};
use mtproto_edge_proto::mtproto as pb;
use mtproto_edge_proto::session::rpc_session_server::{RpcSession, RpcSessionServer};
use mtproto_edge_proto::session::rpc_session_stream_server::{
    RpcSessionStream, RpcSessionStreamServer,
};
use mtproto_edge_proto::session::{
    self as spb, session_stream_request::Payload as StreamRequest,
    session_stream_response::Payload as StreamResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::embedded::EmbeddedSession;
use crate::ring::Ring;
use crate::status::{teamgram_status, TeamgramStatus, REDIRECT_CODE, UNREGISTERED_CODE};
use crate::tls::{Connector, Peer, TlsFiles};
use crate::wire::{info_from_proto, info_to_proto, AUTH_KEY_UNREGISTERED, REDIRECT_PREFIX};
use crate::{GatewayDelivery, SessionClientData, SessionClientEvent, SessionError, SessionService};
use mtproto_core::authkey::{AuthKeyType, FutureSalt};
use mtproto_core::handshake::{NewAuthKey, StoreOutcome};

/// The session service: the embedded session plus ring ownership.
#[derive(Debug)]
pub struct SessionGrpc {
    session: Arc<EmbeddedSession>,
    /// Swapped whole when membership changes (discovery), read per message.
    ring: RwLock<Ring>,
    /// This instance's member string on the ring.
    me: String,
}

impl SessionGrpc {
    pub fn new(session: Arc<EmbeddedSession>, ring: Ring, me: String) -> Self {
        Self {
            session,
            ring: RwLock::new(ring),
            me,
        }
    }

    /// Replaces the ring membership (from EndpointSlice discovery).
    pub fn set_members(&self, members: Vec<String>) {
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Ring::new(members);
    }

    /// teamgram's ownership check on `perm_auth_key_id`.
    fn check_owner(&self, perm_auth_key_id: i64) -> Result<(), ServiceError> {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        match ring.owner_of_id(perm_auth_key_id) {
            Some(owner) if owner != self.me => Err(ServiceError::Redirect(owner.to_string())),
            _ => Ok(()),
        }
    }

    async fn query(
        &self,
        req: spb::TlSessionQueryAuthKey,
    ) -> Result<pb::AuthKeyInfo, ServiceError> {
        let info = self.session.query_auth_key(req.auth_key_id).await?;
        Ok(info_to_proto(&info))
    }

    async fn set(&self, req: spb::TlSessionSetAuthKey) -> Result<bool, ServiceError> {
        let info = req
            .auth_key
            .as_ref()
            .ok_or(ServiceError::BadRequest("setAuthKey without auth_key"))?;
        let salt = req
            .future_salt
            .as_ref()
            .ok_or(ServiceError::BadRequest("setAuthKey without future_salt"))?;
        let mut info =
            info_from_proto(info).map_err(|_| ServiceError::BadRequest("corrupt auth key"))?;
        if info.key_type != AuthKeyType::Perm && req.expires_in > 0 {
            info.expires_at = Some(unix_now() + i64::from(req.expires_in));
        }
        let key = NewAuthKey {
            info,
            first_salt: FutureSalt {
                valid_since: salt.valid_since,
                valid_until: salt.valid_until,
                salt: salt.salt,
            },
            expires_in: req.expires_in,
            dc: None,
        };
        Ok(self.session.set_auth_key(&key).await? == StoreOutcome::Stored)
    }

    async fn send(
        &self,
        peer: Option<&Peer>,
        req: spb::TlSessionSendDataToSession,
    ) -> Result<bool, ServiceError> {
        let data = req
            .data
            .ok_or(ServiceError::BadRequest("sendDataToSession without data"))?;
        check_server_id(peer, &data.server_id)?;
        self.check_owner(data.perm_auth_key_id)?;
        debug!(
            auth_key_id = data.auth_key_id,
            perm_auth_key_id = data.perm_auth_key_id,
            session_id = data.session_id,
            conn_type = data.conn_type,
            gateway = %data.server_id,
            "sendDataToSession: message accepted"
        );
        self.session
            .send_data(SessionClientData {
                server_id: data.server_id,
                conn_type: data.conn_type,
                auth_key_id: data.auth_key_id,
                key_type: data.key_type,
                perm_auth_key_id: data.perm_auth_key_id,
                session_id: data.session_id,
                client_ip: data.client_ip,
                quick_ack: data.quick_ack,
                salt: data.salt,
                payload: Bytes::from(data.payload),
            })
            .await?;
        Ok(true)
    }

    async fn close(
        &self,
        peer: Option<&Peer>,
        client: Option<spb::SessionClientEvent>,
    ) -> Result<bool, ServiceError> {
        let event = client.ok_or(ServiceError::BadRequest("closeSession without client"))?;
        check_server_id(peer, &event.server_id)?;
        self.check_owner(event.perm_auth_key_id)?;
        self.session
            .close_session(SessionClientEvent {
                server_id: event.server_id,
                auth_key_id: event.auth_key_id,
                key_type: event.key_type,
                perm_auth_key_id: event.perm_auth_key_id,
                session_id: event.session_id,
                client_ip: event.client_ip,
            })
            .await?;
        Ok(true)
    }
}

/// Refuses a `server_id` the calling gateway cannot prove is its own.
/// Served without [`crate::tls::incoming`] there is no [`Peer`]: plaintext.
fn check_server_id(peer: Option<&Peer>, server_id: &str) -> Result<(), ServiceError> {
    let host = server_id
        .rsplit_once(':')
        .map_or(server_id, |(host, _)| host);
    match peer {
        Some(peer) if !peer.may_claim_host(host) => {
            warn!(server_id, peer = ?peer.addr, "refused: server_id is not the calling gateway's");
            Err(ServiceError::Forbidden(format!(
                "server_id {server_id} is not the calling gateway's address or certificate name"
            )))
        }
        _ => Ok(()),
    }
}

/// Errors as teamgram reports them.
#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error("{AUTH_KEY_UNREGISTERED}")]
    Unregistered,
    #[error("{REDIRECT_PREFIX}{0}")]
    Redirect(String),
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
}

impl From<SessionError> for ServiceError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::AuthKeyUnregistered => ServiceError::Unregistered,
            SessionError::Redirect(to) => ServiceError::Redirect(to),
            SessionError::Unavailable(msg) => ServiceError::Internal(msg),
        }
    }
}

impl ServiceError {
    /// teamgram's numeric codes (401, 700, 400, 500), as in the stream mode's
    /// `SessionStreamError.code`.
    fn code(&self) -> i32 {
        match self {
            ServiceError::Unregistered => i32::from(UNREGISTERED_CODE),
            ServiceError::Redirect(_) => i32::from(REDIRECT_CODE),
            ServiceError::BadRequest(_) => 400,
            ServiceError::Forbidden(_) => 403,
            ServiceError::Internal(_) => 500,
        }
    }

    /// Unary mode: 401 and 700 go out as raw `grpc-status` numbers, as
    /// teamgram's sessions send them (see [`routes`]); the others as the
    /// standard codes closest to teamgram's 400/500.
    fn status(&self) -> Status {
        match self {
            ServiceError::Unregistered | ServiceError::Redirect(_) => {
                teamgram_status(self.code() as u16, self.to_string())
            }
            ServiceError::BadRequest(_) => Status::invalid_argument(self.to_string()),
            ServiceError::Forbidden(_) => Status::permission_denied(self.to_string()),
            ServiceError::Internal(_) => Status::internal(self.to_string()),
        }
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not served by the reference session"))
}

#[async_trait]
impl RpcSession for SessionGrpc {
    async fn session_query_auth_key(
        &self,
        request: Request<spb::TlSessionQueryAuthKey>,
    ) -> Result<Response<pb::AuthKeyInfo>, Status> {
        self.query(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn session_set_auth_key(
        &self,
        request: Request<spb::TlSessionSetAuthKey>,
    ) -> Result<Response<pb::Bool>, Status> {
        self.set(request.into_inner())
            .await
            .map(|ok| Response::new(pb::Bool::from_bool(ok)))
            .map_err(|e| e.status())
    }

    async fn session_create_session(
        &self,
        _request: Request<spb::TlSessionCreateSession>,
    ) -> Result<Response<pb::Bool>, Status> {
        // New sessions are signalled in-band (conn_type = 1); nothing to do.
        Ok(Response::new(pb::Bool::from_bool(true)))
    }

    async fn session_send_data_to_session(
        &self,
        request: Request<spb::TlSessionSendDataToSession>,
    ) -> Result<Response<pb::Bool>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        self.send(peer.as_ref(), request.into_inner())
            .await
            .map(|ok| Response::new(pb::Bool::from_bool(ok)))
            .map_err(|e| e.status())
    }

    async fn session_send_http_data_to_session(
        &self,
        _request: Request<spb::TlSessionSendHttpDataToSession>,
    ) -> Result<Response<spb::HttpSessionData>, Status> {
        Err(unimplemented("the HTTP transport"))
    }

    async fn session_close_session(
        &self,
        request: Request<spb::TlSessionCloseSession>,
    ) -> Result<Response<pb::Bool>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        self.close(peer.as_ref(), request.into_inner().client)
            .await
            .map(|ok| Response::new(pb::Bool::from_bool(ok)))
            .map_err(|e| e.status())
    }

    async fn session_push_updates_data(
        &self,
        _request: Request<spb::TlSessionPushUpdatesData>,
    ) -> Result<Response<pb::Bool>, Status> {
        Err(unimplemented("pushing updates"))
    }

    async fn session_push_session_updates_data(
        &self,
        _request: Request<spb::TlSessionPushSessionUpdatesData>,
    ) -> Result<Response<pb::Bool>, Status> {
        Err(unimplemented("pushing updates"))
    }

    async fn session_push_rpc_result_data(
        &self,
        _request: Request<spb::TlSessionPushRpcResultData>,
    ) -> Result<Response<pb::Bool>, Status> {
        Err(unimplemented("pushing rpc results"))
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<spb::SessionStreamResponse, Status>> + Send>>;

/// The stream service, backed by the same handlers as the unary one.
#[derive(Debug, Clone)]
pub struct SessionStreamGrpc(pub Arc<SessionGrpc>);

impl SessionGrpc {
    async fn handle_stream(
        &self,
        peer: Option<&Peer>,
        payload: Option<StreamRequest>,
    ) -> Result<StreamResponse, ServiceError> {
        let ack = |ok: bool| StreamResponse::Ack(spb::SessionStreamAck { success: ok });
        match payload {
            Some(StreamRequest::SendData(req)) => self.send(peer, req).await.map(ack),
            Some(StreamRequest::CloseSession(req)) => self.close(peer, req.client).await.map(ack),
            Some(StreamRequest::CreateSession(_)) => Ok(ack(true)),
            Some(StreamRequest::QueryAuthKey(req)) => {
                self.query(req).await.map(StreamResponse::AuthKey)
            }
            Some(StreamRequest::SetAuthKey(req)) => self.set(req).await.map(ack),
            Some(_) | None => Err(ServiceError::BadRequest("unknown payload type")),
        }
    }
}

#[async_trait]
impl RpcSessionStream for SessionStreamGrpc {
    type SessionDataStreamStream = ResponseStream;

    /// Requests of one stream are answered one at a time, in order (as teamgram does).
    async fn session_data_stream(
        &self,
        request: Request<Streaming<spb::SessionStreamRequest>>,
    ) -> Result<Response<Self::SessionDataStreamStream>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        let inbound = request.into_inner();
        let service = self.0.clone();
        let responses = inbound.then(move |item| {
            let (service, peer) = (service.clone(), peer.clone());
            async move {
                let request = item?;
                let payload = match service.handle_stream(peer.as_ref(), request.payload).await {
                    Ok(payload) => payload,
                    Err(e) => StreamResponse::Error(spb::SessionStreamError {
                        code: e.code(),
                        message: e.to_string(),
                    }),
                };
                Ok(spb::SessionStreamResponse {
                    request_id: request.request_id,
                    payload: Some(payload),
                })
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// The services `mtproto-session` serves: `session.RPCSession`, whose
/// unknown-key and redirect errors carry teamgram's `grpc-status` 401 and 700,
/// and `session.RPCSessionStream` (codes in `SessionStreamError`).
pub fn routes(service: Arc<SessionGrpc>) -> Routes {
    Routes::new(TeamgramStatus(RpcSessionServer::from_arc(service.clone())))
        .add_service(RpcSessionStreamServer::new(SessionStreamGrpc(service)))
}

/// Delivers replies to gateways over `gateway.RPCGateway`, addressed by the
/// `server_id` each gateway put in its messages.
#[derive(Debug)]
pub struct RemoteGateways {
    channels: Mutex<HashMap<String, Channel>>,
    timeout: Duration,
    /// Gateways are dialled with mutual TLS when set.
    tls: Option<Arc<TlsFiles>>,
}

impl RemoteGateways {
    pub fn new(timeout: Duration) -> Self {
        Self {
            channels: Mutex::default(),
            timeout,
            tls: None,
        }
    }

    pub fn with_tls(self, tls: Option<Arc<TlsFiles>>) -> Self {
        Self { tls, ..self }
    }

    fn channel(&self, server_id: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(server_id) {
            return Some(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{server_id}")).ok()?;
        let endpoint = endpoint
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(Connector(tls.clone())),
            None => endpoint.connect_lazy(),
        };
        channels.insert(server_id.to_string(), channel.clone());
        Some(channel)
    }
}

#[async_trait]
impl GatewayDelivery for RemoteGateways {
    async fn send_data_to_gateway(
        &self,
        server_id: &str,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool {
        let Some(channel) = self.channel(server_id) else {
            warn!(server_id, "not a gateway address");
            return false;
        };
        let request = gpb::TlGatewaySendDataToGateway {
            constructor: gpb::SEND_DATA_TO_GATEWAY,
            auth_key_id,
            session_id,
            payload: payload.to_vec(),
        };
        match RpcGatewayClient::new(channel)
            .gateway_send_data_to_gateway(request)
            .await
        {
            Ok(reply) => reply.into_inner().value(),
            Err(status) => {
                debug!(server_id, "sendDataToGateway failed: {status}");
                false
            }
        }
    }
}

fn unix_now() -> i64 {
    crate::unix_time().as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn ownership_follows_a_membership_change() {
        let session = Arc::new(EmbeddedSession::new(
            Arc::new(MemoryStore::default()),
            Arc::new(RemoteGateways::new(Duration::from_secs(1))),
        ));
        let me = "10.0.0.1:20120".to_string();
        let other = "10.0.0.2:20120".to_string();
        let service = SessionGrpc::new(session, Ring::new([me.clone()]), me.clone());
        let both = Ring::new([me.clone(), other.clone()]);
        let moved = (0..10_000)
            .find(|id| both.owner_of_id(*id) == Some(other.as_str()))
            .expect("the other member owns some key");
        assert!(service.check_owner(moved).is_ok());

        service.set_members(vec![me.clone(), other.clone()]);
        match service.check_owner(moved) {
            Err(ServiceError::Redirect(to)) => assert_eq!(to, other),
            r => panic!("expected a redirect to {other}, got {r:?}"),
        }

        service.set_members(vec![me]);
        assert!(service.check_owner(moved).is_ok());
    }
}
