//! The reference session as a network service (`mtproto-session`): serves
//! teamgram's `session.RPCSession` and `session.RPCSessionStream` over the
//! embedded session, checks ring ownership (`REDIRECT_TO_<owner>`), and sends
//! replies back through the gateway named in each message
//! (`gateway.RPCGatewayStream`, or unary `gateway.RPCGateway` calls to a
//! gateway that does not serve the stream), or on the gateway's own
//! `SessionDataStream` when it asked for that (`STREAM_REPLIES_HEADER`, our
//! extension). With mutual TLS, a message's `server_id` must be the calling
//! gateway's own (see [`Peer::may_claim_host`]), so no caller can have
//! replies sent elsewhere; a stream carries the messages of a `server_id`
//! only if its caller is that gateway (see [`Peer::may_receive_for`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use mtproto_edge_proto::gateway::rpc_gateway_client::RpcGatewayClient;
use mtproto_edge_proto::gateway::rpc_gateway_stream_client::RpcGatewayStreamClient;
use mtproto_edge_proto::gateway::{self as gpb};
use mtproto_edge_proto::mtproto as pb;
use mtproto_edge_proto::session::rpc_session_server::{RpcSession, RpcSessionServer};
use mtproto_edge_proto::session::rpc_session_stream_server::{
    RpcSessionStream, RpcSessionStreamServer,
};
use mtproto_edge_proto::session::{
    self as spb, session_stream_request::Payload as StreamRequest,
    session_stream_response::Payload as StreamResponse, STREAM_REPLIES_HEADER,
    STREAM_REPLIES_VALUE,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::embedded::EmbeddedSession;
use crate::ring::Ring;
use crate::status::{
    teamgram_status, DropStatusDetails, TeamgramStatus, REDIRECT_CODE, UNREGISTERED_CODE,
};
use crate::tls::{
    Connector, Peer, TlsFiles, KEEPALIVE_INTERVAL, KEEPALIVE_RETRIES, KEEPALIVE_TIME,
};
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
    /// Where gateways' streams are attached when they ask for their server
    /// messages on them; unset, no stream carries any.
    gateways: Option<Arc<RemoteGateways>>,
}

impl SessionGrpc {
    pub fn new(session: Arc<EmbeddedSession>, ring: Ring, me: String) -> Self {
        Self {
            session,
            ring: RwLock::new(ring),
            me,
            gateways: None,
        }
    }

    /// Gateway streams that ask for their server messages on themselves
    /// are attached to `gateways`, which the embedded session delivers
    /// through.
    pub fn with_stream_replies(self, gateways: Arc<RemoteGateways>) -> Self {
        Self {
            gateways: Some(gateways),
            ..self
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
                server_id: data.server_id.into(),
                conn_type: data.conn_type,
                auth_key_id: data.auth_key_id,
                key_type: data.key_type,
                perm_auth_key_id: data.perm_auth_key_id,
                session_id: data.session_id,
                client_ip: data.client_ip.into(),
                quick_ack: data.quick_ack,
                salt: data.salt,
                payload: data.payload,
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
    let host = server_id_host(server_id);
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

/// The host part of a gateway's `server_id` (`host:port`, `[v6]:port`).
fn server_id_host(server_id: &str) -> &str {
    server_id
        .rsplit_once(':')
        .map_or(server_id, |(host, _)| host)
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

    /// Requests of one stream are answered one at a time, in order (as
    /// teamgram does). A stream that asks for its gateway's server messages
    /// carries them between the answers once a message on it names the
    /// gateway (`server_id`) and the caller proves it is that gateway.
    async fn session_data_stream(
        &self,
        request: Request<Streaming<spb::SessionStreamRequest>>,
    ) -> Result<Response<Self::SessionDataStreamStream>, Status> {
        let peer = request.extensions().get::<Peer>().cloned();
        let asks_for_replies = request
            .metadata()
            .get(STREAM_REPLIES_HEADER)
            .is_some_and(|v| v.as_bytes() == STREAM_REPLIES_VALUE.as_bytes());
        let route = match (&self.0.gateways, asks_for_replies) {
            (Some(gateways), true) => Some(StreamRoute::new(gateways.clone())),
            _ => None,
        };
        let inbound = request.into_inner();
        let service = self.0.clone();
        let attach = route.as_ref().map(|(route, _)| route.clone());
        let responses = inbound.then(move |item| {
            let (service, peer, attach) = (service.clone(), peer.clone(), attach.clone());
            async move {
                let request = item?;
                if let (Some(route), Some(StreamRequest::SendData(req))) =
                    (attach.filter(|r| !r.is_attached()), &request.payload)
                {
                    if let Some(data) = &req.data {
                        route.offer(peer.as_ref(), &data.server_id);
                    }
                }
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
        Ok(Response::new(match route {
            Some((route, replies)) => Box::pin(WithReplies {
                answers: Box::pin(responses),
                replies,
                replies_first: false,
                _route: route,
            }),
            None => Box::pin(responses),
        }))
    }
}

/// A gateway's session stream that asked for its server messages: attached
/// to [`RemoteGateways`] under the gateway's `server_id` once a message
/// proves it, detached when the stream ends.
#[derive(Debug)]
struct StreamRoute {
    gateways: Arc<RemoteGateways>,
    replies: mpsc::Sender<spb::SessionStreamResponse>,
    /// The `server_id` attached under; set once.
    attached: OnceLock<String>,
}

impl StreamRoute {
    /// A route and the receiving end of its messages.
    fn new(
        gateways: Arc<RemoteGateways>,
    ) -> (Arc<Self>, mpsc::Receiver<spb::SessionStreamResponse>) {
        let (replies, queue) = mpsc::channel(LINK_QUEUE);
        let route = Self {
            gateways,
            replies,
            attached: OnceLock::new(),
        };
        (Arc::new(route), queue)
    }

    fn is_attached(&self) -> bool {
        self.attached.get().is_some()
    }

    /// Attaches the stream for `server_id` if the caller is that gateway
    /// (else its messages keep going through the gateway's reverse path).
    fn offer(&self, peer: Option<&Peer>, server_id: &str) {
        let host = server_id_host(server_id);
        if !peer.is_some_and(|peer| peer.may_receive_for(host)) {
            return;
        }
        if self.attached.set(server_id.to_string()).is_ok() {
            debug!(
                server_id,
                "server messages go on the gateway's session stream"
            );
            self.gateways.attach_stream(server_id, self.replies.clone());
        }
    }
}

impl Drop for StreamRoute {
    fn drop(&mut self) {
        if let Some(server_id) = self.attached.get() {
            self.gateways.detach_stream(server_id, &self.replies);
        }
    }
}

/// A stream's answers with its route's server messages between them, the
/// two taken in turn when both are ready; over when the answers are.
struct WithReplies {
    answers: ResponseStream,
    replies: mpsc::Receiver<spb::SessionStreamResponse>,
    replies_first: bool,
    _route: Arc<StreamRoute>,
}

impl Stream for WithReplies {
    type Item = Result<spb::SessionStreamResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.replies_first = !this.replies_first;
        if this.replies_first {
            if let Poll::Ready(Some(reply)) = this.replies.poll_recv(cx) {
                return Poll::Ready(Some(Ok(reply)));
            }
        }
        match this.answers.as_mut().poll_next(cx) {
            Poll::Pending if !this.replies_first => match this.replies.poll_recv(cx) {
                Poll::Ready(Some(reply)) => Poll::Ready(Some(Ok(reply))),
                _ => Poll::Pending,
            },
            answer => answer,
        }
    }
}

/// The services `mtproto-session` serves: `session.RPCSession`, whose
/// unknown-key and redirect errors carry teamgram's `grpc-status` 401 and 700,
/// and `session.RPCSessionStream` (codes in `SessionStreamError`).
pub fn routes(service: Arc<SessionGrpc>) -> Routes {
    Routes::new(TeamgramStatus(RpcSessionServer::from_arc(service.clone())))
        .add_service(RpcSessionStreamServer::new(SessionStreamGrpc(service)))
}

/// Replies waiting for one gateway; past this they are dropped at once (the
/// client resends what is not acknowledged) rather than wait on that gateway.
const LINK_QUEUE: usize = 1024;
/// Replies to one gateway on the wire and not yet answered.
const LINK_IN_FLIGHT: usize = 64;
/// A link with nothing to deliver for this long ends; its gateway may be gone.
const LINK_IDLE: Duration = Duration::from_secs(60);
/// Gateways with a live link at once: made-up `server_id`s stop here.
const MAX_LINKS: usize = 1024;

type Delivery = gpb::TlGatewaySendDataToGateway;

/// Delivers replies to gateways, addressed by the `server_id` each gateway
/// put in its messages. Each gateway has its own bounded queue and task, so
/// a gateway that stalls (draining, hung, gone) delays and drops only its
/// own replies, never the session's workers.
#[derive(Debug)]
pub struct RemoteGateways {
    links: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    /// Gateways' own session streams that carry their messages, by
    /// `server_id`: used before `links` (the newest stream of a gateway).
    streams: Mutex<HashMap<String, mpsc::Sender<spb::SessionStreamResponse>>>,
    timeout: Duration,
    /// Gateways are dialled with mutual TLS when set.
    tls: Option<Arc<TlsFiles>>,
}

impl RemoteGateways {
    /// `timeout` bounds each delivery call (and dialling a gateway).
    pub fn new(timeout: Duration) -> Self {
        Self {
            links: Mutex::default(),
            streams: Mutex::default(),
            timeout,
            tls: None,
        }
    }

    pub fn with_tls(self, tls: Option<Arc<TlsFiles>>) -> Self {
        Self { tls, ..self }
    }

    /// Sends `server_id`'s messages on `stream` from now on.
    fn attach_stream(&self, server_id: &str, stream: mpsc::Sender<spb::SessionStreamResponse>) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(server_id.to_string(), stream);
    }

    /// Stops sending `server_id`'s messages on `stream`, unless a newer
    /// stream of that gateway took its place.
    fn detach_stream(&self, server_id: &str, stream: &mpsc::Sender<spb::SessionStreamResponse>) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if streams
            .get(server_id)
            .is_some_and(|attached| attached.same_channel(stream))
        {
            streams.remove(server_id);
        }
    }

    /// Queues `delivery` on `server_id`'s own stream if it has a live one
    /// (true once queued); gives it back if not.
    fn send_on_stream(&self, server_id: &str, delivery: Delivery) -> Result<bool, Delivery> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stream) = streams.get(server_id).filter(|s| !s.is_closed()) else {
            return Err(delivery);
        };
        let reply = spb::SessionStreamResponse {
            request_id: String::new(),
            payload: Some(StreamResponse::SendData(delivery)),
        };
        match stream.try_send(reply) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(server_id, "gateway stream full; reply dropped");
                Ok(false)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!(server_id, "gateway stream ended; reply dropped");
                Ok(false)
            }
        }
    }

    /// The queue to `server_id`'s link, started on first use (and again
    /// after it ended idle); needs a tokio runtime.
    fn link(&self, server_id: &str) -> Option<mpsc::Sender<Delivery>> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = links.get(server_id).filter(|link| !link.is_closed()) {
            return Some(link.clone());
        }
        links.retain(|_, link| !link.is_closed());
        if links.len() >= MAX_LINKS {
            debug!(server_id, "{MAX_LINKS} gateway links open; reply dropped");
            return None;
        }
        let Ok(endpoint) = Endpoint::from_shared(format!("http://{server_id}")) else {
            warn!(server_id, "not a gateway address");
            return None;
        };
        let endpoint = endpoint
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(KEEPALIVE_TIME))
            .tcp_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .tcp_keepalive_retries(Some(KEEPALIVE_RETRIES));
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(Connector(tls.clone())),
            None => endpoint.connect_lazy(),
        };
        let (link, queue) = mpsc::channel(LINK_QUEUE);
        tokio::spawn(run_link(
            server_id.to_string(),
            channel,
            self.timeout,
            queue,
        ));
        links.insert(server_id.to_string(), link.clone());
        Some(link)
    }
}

/// Sends one gateway's queued replies over `gateway.RPCGatewayStream`, or,
/// when the gateway does not serve it (teamgram's gnetway), as unary
/// `sendDataToGateway` calls.
async fn run_link(
    server_id: String,
    channel: Channel,
    timeout: Duration,
    mut queue: mpsc::Receiver<Delivery>,
) {
    if let Some(first) = stream_link(&server_id, channel.clone(), timeout, &mut queue).await {
        debug!(
            server_id,
            "the gateway serves no delivery stream; using unary calls"
        );
        let client = RpcGatewayClient::new(DropStatusDetails(channel));
        unary_link(&server_id, client, first, queue).await;
    }
}

/// The next queued reply; after [`LINK_IDLE`] without one the queue is
/// closed (senders then start a new link), and what was queued still comes.
/// `None`: the queue is closed and empty, the link is done.
async fn next_reply(queue: &mut mpsc::Receiver<Delivery>) -> Option<Delivery> {
    loop {
        if let Ok(reply) = tokio::time::timeout(LINK_IDLE, queue.recv()).await {
            return reply;
        }
        queue.close();
    }
}

/// Delivers over one stream at a time, at most [`LINK_IN_FLIGHT`] replies
/// unanswered on it. A stream that breaks, or leaves replies unanswered for
/// `timeout`, is dropped and opened again for the next reply (what was on it
/// is lost, and the client resends it). Returns the reply in hand when the
/// gateway answers `Unimplemented`.
async fn stream_link(
    server_id: &str,
    channel: Channel,
    timeout: Duration,
    queue: &mut mpsc::Receiver<Delivery>,
) -> Option<Delivery> {
    let mut client = RpcGatewayStreamClient::new(DropStatusDetails(channel));
    let mut request_id = 0u64;
    loop {
        let first = next_reply(queue).await?;
        // The stream is opened with nothing in it, so a refusal loses no reply.
        let (tx, rx) = mpsc::channel(LINK_IN_FLIGHT);
        let mut responses = match client.gateway_data_stream(ReceiverStream::new(rx)).await {
            Ok(responses) => responses.into_inner(),
            Err(status) if status.code() == Code::Unimplemented => return Some(first),
            Err(status) => {
                debug!(
                    server_id,
                    "delivery stream not opened: {status}; reply dropped"
                );
                continue;
            }
        };
        let mut unanswered = 0;
        let mut pending = Some(first);
        let stalled = tokio::time::sleep(timeout);
        tokio::pin!(stalled);
        loop {
            if let Some(reply) = pending.take() {
                request_id += 1;
                let request = gpb::GatewayStreamRequest {
                    request_id: request_id.to_string(),
                    send_data: Some(reply),
                };
                // At most LINK_IN_FLIGHT are unanswered, so there is room.
                if tx.try_send(request).is_err() {
                    break;
                }
                if unanswered == 0 {
                    stalled.as_mut().reset(Instant::now() + timeout);
                }
                unanswered += 1;
            }
            tokio::select! {
                () = &mut stalled, if unanswered > 0 => {
                    debug!(server_id, unanswered, "delivery stream unanswered for {timeout:?}; dropped");
                    break;
                }
                answer = responses.message() => match answer {
                    Ok(Some(answer)) => {
                        unanswered -= 1;
                        stalled.as_mut().reset(Instant::now() + timeout);
                        if !answer.success {
                            debug!(server_id, "no live connection took the reply");
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(server_id, unanswered, "delivery stream broke: {status}");
                        break;
                    }
                },
                next = next_reply(queue), if unanswered < LINK_IN_FLIGHT => match next {
                    Some(reply) => pending = Some(reply),
                    None => {
                        drop(tx);
                        let answers = async { while let Ok(Some(_)) = responses.message().await {} };
                        let _ = tokio::time::timeout(timeout, answers).await;
                        return None;
                    }
                },
            }
        }
    }
}

/// Sends replies as unary calls, up to [`LINK_IN_FLIGHT`] at once, started
/// in queue order.
async fn unary_link(
    server_id: &str,
    client: RpcGatewayClient<DropStatusDetails<Channel>>,
    first: Delivery,
    mut queue: mpsc::Receiver<Delivery>,
) {
    let deliver = |request: Delivery| {
        let mut client = client.clone();
        async move { client.gateway_send_data_to_gateway(request).await }
    };
    let mut in_flight = FuturesUnordered::new();
    in_flight.push(deliver(first));
    loop {
        let request = if in_flight.is_empty() {
            next_reply(&mut queue).await
        } else if in_flight.len() >= LINK_IN_FLIGHT {
            report(server_id, in_flight.next().await);
            continue;
        } else {
            tokio::select! {
                done = in_flight.next() => {
                    report(server_id, done);
                    continue;
                }
                request = queue.recv() => request,
            }
        };
        match request {
            Some(request) => in_flight.push(deliver(request)),
            None => break,
        }
    }
    while let Some(done) = in_flight.next().await {
        report(server_id, Some(done));
    }
}

fn report(server_id: &str, done: Option<Result<Response<pb::Bool>, Status>>) {
    match done {
        Some(Ok(reply)) if reply.get_ref().value() => {}
        Some(Ok(_)) => debug!(server_id, "no live connection took the reply"),
        Some(Err(status)) => debug!(server_id, "sendDataToGateway failed: {status}"),
        None => {}
    }
}

impl GatewayDelivery for RemoteGateways {
    /// True once the reply is queued for its gateway; whether a connection
    /// there took it is known later, and logged.
    fn send_data_to_gateway(
        &self,
        server_id: &str,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool {
        let request = Delivery {
            constructor: gpb::SEND_DATA_TO_GATEWAY,
            auth_key_id,
            session_id,
            payload,
        };
        let mut request = match self.send_on_stream(server_id, request) {
            Ok(queued) => return queued,
            Err(request) => request,
        };
        // A link that just ended idle is replaced once.
        for _ in 0..2 {
            let Some(link) = self.link(server_id) else {
                return false;
            };
            match link.try_send(request) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(server_id, "gateway queue full; reply dropped");
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => request = back,
            }
        }
        false
    }
}

fn unix_now() -> i64 {
    crate::unix_time().as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use mtproto_edge_proto::gateway::rpc_gateway_server::{RpcGateway, RpcGatewayServer};
    use mtproto_edge_proto::gateway::rpc_gateway_stream_server::{
        RpcGatewayStream, RpcGatewayStreamServer,
    };
    use tokio::net::TcpListener;

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

    /// How a test gateway took a reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Path {
        Unary,
        Stream,
    }

    /// A gateway that takes the replies it is sent and reports their session
    /// ids and path; with `streams`, it also serves the delivery stream,
    /// leaving its first stream unanswered when `hold_first`.
    #[derive(Debug, Clone)]
    struct Recording {
        taken: mpsc::UnboundedSender<(Path, i64)>,
        hold_first: Arc<std::sync::atomic::AtomicBool>,
    }

    #[async_trait]
    impl RpcGateway for Recording {
        async fn gateway_send_data_to_gateway(
            &self,
            request: Request<gpb::TlGatewaySendDataToGateway>,
        ) -> Result<Response<pb::Bool>, Status> {
            let _ = self
                .taken
                .send((Path::Unary, request.into_inner().session_id));
            Ok(Response::new(pb::Bool::from_bool(true)))
        }
    }

    type Answers = Pin<Box<dyn Stream<Item = Result<gpb::GatewayStreamResponse, Status>> + Send>>;

    #[async_trait]
    impl RpcGatewayStream for Recording {
        type GatewayDataStreamStream = Answers;

        async fn gateway_data_stream(
            &self,
            request: Request<Streaming<gpb::GatewayStreamRequest>>,
        ) -> Result<Response<Answers>, Status> {
            let mut requests = request.into_inner();
            if self
                .hold_first
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                tokio::spawn(async move { while let Some(Ok(_)) = requests.next().await {} });
                return Ok(Response::new(Box::pin(futures::stream::pending())));
            }
            let taken = self.taken.clone();
            let answers = requests.map(move |request| {
                let request = request?;
                let session_id = request.send_data.map_or(0, |d| d.session_id);
                let _ = taken.send((Path::Stream, session_id));
                Ok(gpb::GatewayStreamResponse {
                    request_id: request.request_id,
                    success: true,
                })
            });
            Ok(Response::new(Box::pin(answers)))
        }
    }

    async fn recording_gateway(
        streams: bool,
        hold_first: bool,
    ) -> (String, mpsc::UnboundedReceiver<(Path, i64)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (taken, rx) = mpsc::unbounded_channel();
        let gateway = Recording {
            taken,
            hold_first: Arc::new(hold_first.into()),
        };
        let mut server =
            tonic::transport::Server::builder().add_service(RpcGatewayServer::new(gateway.clone()));
        if streams {
            server = server.add_service(RpcGatewayStreamServer::new(gateway));
        }
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(server.serve_with_incoming(incoming));
        (addr, rx)
    }

    /// Sends replies for `session_ids` and returns how the gateway took each.
    async fn deliver_all(
        gateways: &RemoteGateways,
        gateway: &str,
        taken: &mut mpsc::UnboundedReceiver<(Path, i64)>,
        session_ids: std::ops::Range<i64>,
    ) -> Vec<(Path, i64)> {
        let count = session_ids.clone().count();
        for session_id in session_ids {
            assert!(gateways.send_data_to_gateway(
                gateway,
                1,
                session_id,
                Bytes::from_static(b"r")
            ));
        }
        let mut got = Vec::new();
        while got.len() < count {
            let next = tokio::time::timeout(Duration::from_secs(30), taken.recv()).await;
            got.push(next.ok().flatten().expect("the gateway took every reply"));
        }
        got
    }

    /// A session service on loopback whose replies go through `gateways`.
    async fn serve_session(gateways: Arc<RemoteGateways>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = listener.local_addr().unwrap().to_string();
        let session = Arc::new(EmbeddedSession::new(
            Arc::new(MemoryStore::default()),
            gateways.clone(),
        ));
        let service = Arc::new(
            SessionGrpc::new(session, Ring::new([me.clone()]), me.clone())
                .with_stream_replies(gateways),
        );
        let server = tonic::transport::Server::builder().add_routes(routes(service));
        tokio::spawn(server.serve_with_incoming(crate::tls::incoming(listener, None)));
        me
    }

    /// Opens a `SessionDataStream` (asking for server messages on it when
    /// `asks`) and sends one message naming `server_id`; the stream's
    /// request side and responses, once that message is answered.
    async fn gateway_stream(
        session: &str,
        asks: bool,
        server_id: &str,
    ) -> (
        mpsc::Sender<spb::SessionStreamRequest>,
        Streaming<spb::SessionStreamResponse>,
    ) {
        use mtproto_edge_proto::session::rpc_session_stream_client::RpcSessionStreamClient;
        let mut client = RpcSessionStreamClient::connect(format!("http://{session}"))
            .await
            .expect("connect");
        let (requests, outbound) = mpsc::channel(4);
        let mut call = Request::new(ReceiverStream::new(outbound));
        if asks {
            call.metadata_mut().insert(
                STREAM_REPLIES_HEADER,
                tonic::metadata::MetadataValue::from_static(STREAM_REPLIES_VALUE),
            );
        }
        let message = spb::SessionStreamRequest {
            request_id: "1".into(),
            payload: Some(StreamRequest::SendData(spb::TlSessionSendDataToSession {
                constructor: spb::SEND_DATA_TO_SESSION,
                data: Some(spb::SessionClientData {
                    server_id: server_id.into(),
                    auth_key_id: 1,
                    perm_auth_key_id: 1,
                    session_id: 7,
                    payload: Bytes::from_static(&[0; 64]),
                    ..Default::default()
                }),
            })),
        };
        requests.send(message).await.expect("queued");
        let mut responses = client
            .session_data_stream(call)
            .await
            .expect("stream")
            .into_inner();
        let answer = responses.message().await.expect("answer").expect("one");
        assert_eq!(answer.request_id, "1");
        (requests, responses)
    }

    /// The session id of the next reply the recording gateway takes that
    /// is not one of the session's own for the message [`gateway_stream`]
    /// sends (session 7).
    async fn next_taken(taken: &mut mpsc::UnboundedReceiver<(Path, i64)>) -> i64 {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), taken.recv()).await;
            match next.ok().flatten().expect("the gateway took the reply") {
                (_, 7) => continue,
                (_, session_id) => return session_id,
            }
        }
    }

    #[tokio::test]
    async fn a_gateway_stream_that_asks_carries_its_gateways_server_messages() {
        let gateways = Arc::new(RemoteGateways::new(Duration::from_secs(5)));
        let session = serve_session(gateways.clone()).await;
        let (gateway, mut taken) = recording_gateway(true, false).await;
        let send = |session_id| {
            assert!(gateways.send_data_to_gateway(
                &gateway,
                1,
                session_id,
                Bytes::from_static(b"m")
            ));
        };

        let (_requests, _responses) = gateway_stream(&session, false, &gateway).await;
        send(8);
        assert_eq!(
            next_taken(&mut taken).await,
            8,
            "not asked: the reverse path"
        );

        let (requests, mut responses) = gateway_stream(&session, true, &gateway).await;
        send(9);
        let delivery = loop {
            let on_stream = tokio::time::timeout(Duration::from_secs(30), responses.message())
                .await
                .expect("in time")
                .expect("no error")
                .expect("a message");
            assert_eq!(on_stream.request_id, "");
            match on_stream.payload {
                Some(StreamResponse::SendData(delivery)) if delivery.session_id == 7 => {}
                Some(StreamResponse::SendData(delivery)) => break delivery,
                other => panic!("not a server message: {other:?}"),
            }
        };
        assert_eq!((delivery.auth_key_id, delivery.session_id), (1, 9));
        assert_eq!(delivery.payload, &b"m"[..]);

        drop((requests, responses));
        let detached = async {
            while gateways.streams.lock().unwrap().contains_key(&gateway) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), detached)
            .await
            .expect("the ended stream is detached");
        send(10);
        assert_eq!(
            next_taken(&mut taken).await,
            10,
            "nothing went the reverse path while the stream was attached; after it, the reverse path again"
        );
    }

    #[tokio::test]
    async fn a_stream_naming_another_gateway_is_not_given_its_messages() {
        let gateways = Arc::new(RemoteGateways::new(Duration::from_secs(5)));
        let session = serve_session(gateways.clone()).await;
        let (_requests, _responses) = gateway_stream(&session, true, "10.9.9.9:20450").await;
        assert!(gateways.streams.lock().unwrap().is_empty());
        let (_requests, _responses) = gateway_stream(&session, true, "127.0.0.1:20450").await;
        assert!(gateways
            .streams
            .lock()
            .unwrap()
            .contains_key("127.0.0.1:20450"));
    }

    #[tokio::test]
    async fn replies_go_over_the_stream_in_order() {
        let gateways = RemoteGateways::new(Duration::from_secs(5));
        let (gateway, mut taken) = recording_gateway(true, false).await;
        let got = deliver_all(&gateways, &gateway, &mut taken, 0..200).await;
        let expected: Vec<_> = (0..200).map(|id| (Path::Stream, id)).collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn a_gateway_without_the_stream_gets_every_reply_as_unary_calls() {
        let gateways = RemoteGateways::new(Duration::from_secs(5));
        let (gateway, mut taken) = recording_gateway(false, false).await;
        let mut got = deliver_all(&gateways, &gateway, &mut taken, 0..100).await;
        got.sort_by_key(|&(_, id)| id);
        let expected: Vec<_> = (0..100).map(|id| (Path::Unary, id)).collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn an_unanswered_stream_is_replaced_after_the_timeout() {
        let timeout = Duration::from_millis(500);
        let gateways = RemoteGateways::new(timeout);
        let (gateway, mut taken) = recording_gateway(true, true).await;
        assert!(gateways.send_data_to_gateway(&gateway, 1, 1, Bytes::from_static(b"lost")));
        tokio::time::sleep(3 * timeout).await;
        let got = deliver_all(&gateways, &gateway, &mut taken, 2..4).await;
        assert_eq!(got, vec![(Path::Stream, 2), (Path::Stream, 3)]);
    }

    /// A gateway that accepts connections and never answers on them.
    async fn stalled_gateway() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stalled_gateway_delays_only_its_own_replies() {
        let gateways = RemoteGateways::new(Duration::from_secs(300));
        let stalled = stalled_gateway().await;
        let (live, mut taken) = recording_gateway(true, false).await;
        // The stalled gateway's calls stay pending for 300 s; neither queuing
        // them nor the live gateway's reply may wait on them.
        let run = async {
            for session_id in 0..2 * LINK_IN_FLIGHT as i64 {
                let queued = gateways.send_data_to_gateway(
                    &stalled,
                    1,
                    session_id,
                    Bytes::from_static(b"r"),
                );
                assert!(
                    queued,
                    "reply {session_id} to the stalled gateway was not queued"
                );
            }
            assert!(gateways.send_data_to_gateway(&live, 1, 7, Bytes::from_static(b"r")));
            taken.recv().await
        };
        let got = tokio::time::timeout(Duration::from_secs(120), run).await;
        assert_eq!(got.ok().flatten(), Some((Path::Stream, 7)));
    }

    #[tokio::test]
    async fn a_full_gateway_queue_refuses_at_once() {
        let gateways = RemoteGateways::new(Duration::from_secs(300));
        let stalled = stalled_gateway().await;
        let mut queued = 0;
        for session_id in 0..2 * (LINK_QUEUE + LINK_IN_FLIGHT) as i64 {
            if gateways.send_data_to_gateway(&stalled, 1, session_id, Bytes::from_static(b"r")) {
                queued += 1;
            }
        }
        assert!(
            (LINK_QUEUE..=LINK_QUEUE + LINK_IN_FLIGHT).contains(&queued),
            "{queued} replies queued for a gateway that answers none"
        );
    }
}
