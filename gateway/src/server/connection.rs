//! One client connection: read bytes, let the transport cut frames, run the
//! handshake or decrypt, forward to the session, and write what comes back.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

use super::limiter::{Refused, Slot};
use super::registry::{ConnectionId, Outbox, Outgoing};
use super::websocket::{self, Prefixed};
use super::{Endpoint, Shared};
use crate::config::ProxyProtocol;
use crate::metrics::{
    Metrics, OpenLabels, OutcomeLabels, ReasonLabels, StepLabels, StepOutcomeLabels,
};
use crate::session::{SessionClientData, SessionClientEvent, SessionError};
use mtproto_core::authkey::AuthKeyInfo;
use mtproto_core::handshake::{Handshake, HandshakeError, Step, StoreOutcome};
use mtproto_core::message::{self, MessageError};
use mtproto_core::proxy::{self, Detected, ProxyError};
use mtproto_core::tl::id;
use mtproto_core::transport::{error_code, InboundFrame, Transport, TransportError};

/// Bytes asked of the socket per read; the buffer grows only as frames need.
const READ_CHUNK: usize = 16 * 1024;
/// Read buffer of a connection with no partial frame pending.
const IDLE_CHUNK: usize = 1024;

/// Why a connection (or, on HTTP, a request) ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum Close {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("write failed or timed out")]
    Write,
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("message: {0}")]
    Message(#[from] MessageError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("auth key {0} is unknown")]
    UnknownKey(i64),
    #[error("auth key {0} has expired")]
    ExpiredKey(i64),
    #[error("connection bound to auth key {bound} got a message for {got}")]
    KeyChanged { bound: i64, got: i64 },
    #[error("session service: {0}")]
    Session(SessionError),
    /// Not −404: the key may exist, the store just did not answer.
    #[error("auth key lookup failed: {0}")]
    KeyLookup(String),
    #[error("more than {0} sessions on one connection")]
    TooManySessions(usize),
    #[error("no auth key within the handshake deadline")]
    HandshakeTimeout,
    #[error("idle")]
    IdleTimeout,
    #[error("server shutting down")]
    Shutdown,
    #[error("{0}")]
    ProxyHeader(ProxyError),
    #[error("no PROXY header on a listener that requires one")]
    ProxyHeaderMissing,
    #[error("too many connections from this client address")]
    ClientLimit,
    #[error("too many handshakes from this client address")]
    HandshakeFlood,
}

impl Close {
    /// The `reason` label of `mtproto_connections_closed_total`.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Close::ClientClosed => "client_closed",
            Close::Read(_) => "read_error",
            Close::Write => "write_failed",
            Close::Transport(_) => "transport_error",
            Close::Message(_) => "bad_message",
            Close::Handshake(_) => "handshake_error",
            Close::UnknownKey(_) => "unknown_key",
            Close::ExpiredKey(_) => "expired_key",
            Close::KeyChanged { .. } => "key_changed",
            Close::Session(_) => "session_error",
            Close::KeyLookup(_) => "key_lookup_failed",
            Close::TooManySessions(_) => "too_many_sessions",
            Close::HandshakeTimeout => "handshake_timeout",
            Close::IdleTimeout => "idle_timeout",
            Close::Shutdown => "shutdown",
            Close::ProxyHeader(_) => "proxy_header_invalid",
            Close::ProxyHeaderMissing => "proxy_header_missing",
            Close::ClientLimit => "client_limit",
            Close::HandshakeFlood => "handshake_flood",
        }
    }

    /// The transport error code to send before closing, where MTProto has one.
    pub(super) fn code(&self) -> Option<i32> {
        match self {
            Close::UnknownKey(_) | Close::ExpiredKey(_) => Some(error_code::AUTH_KEY_NOT_FOUND),
            Close::Session(SessionError::AuthKeyUnregistered) => {
                Some(error_code::AUTH_KEY_NOT_FOUND)
            }
            Close::HandshakeFlood => Some(error_code::FLOOD),
            _ => None,
        }
    }
}

/// Holds the connection's place in `mtproto_connections_open`, under its
/// transport's name once the first bytes tell it.
pub(super) struct OpenGauge {
    metrics: Arc<Metrics>,
    labels: OpenLabels,
}

impl OpenGauge {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        listener: &'static str,
        transport: &'static str,
    ) -> Self {
        let labels = OpenLabels {
            listener,
            transport,
        };
        metrics.connections_open.get_or_create(&labels).inc();
        Self { metrics, labels }
    }

    fn set_transport(&mut self, transport: &'static str) {
        if self.labels.transport != transport {
            self.metrics
                .connections_open
                .get_or_create(&self.labels)
                .dec();
            self.labels.transport = transport;
            self.metrics
                .connections_open
                .get_or_create(&self.labels)
                .inc();
        }
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .get_or_create(&self.labels)
            .dec();
    }
}

struct Connection {
    id: ConnectionId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    open: OpenGauge,
    transport: Transport,
    handshake: Option<Handshake>,
    /// When this connection's current handshake sent `req_pq`.
    handshake_started: Option<Instant>,
    key: Option<Arc<AuthKeyInfo>>,
    sessions: Vec<i64>,
    outbox: Outbox,
    out: BytesMut,
    /// Server messages in `out`, acknowledged once `out` is written.
    written_acks: Vec<oneshot::Sender<()>>,
    last_plain_msg_id: i64,
}

/// Serves one accepted connection. `slot` holds its place under the
/// listener's cap; the per-client cap is applied once the client address is
/// known (after the PROXY header, if any).
pub async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    endpoint: &Endpoint,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let id = shared.connection_ids.next();
    let (outbox, inbox) = mpsc::channel(shared.limits.outbox_capacity);
    let handshake_deadline = Instant::now() + shared.limits.handshake_timeout;
    let mut conn = Connection {
        id,
        peer,
        transport: Transport::new(shared.limits.max_frame_bytes),
        open: OpenGauge::new(shared.metrics.clone(), endpoint.kind(), "undetected"),
        shared,
        handshake: None,
        handshake_started: None,
        key: None,
        sessions: Vec::new(),
        outbox,
        out: BytesMut::new(),
        written_acks: Vec::new(),
        last_plain_msg_id: 0,
    };
    let mut buf = BytesMut::new();
    let admitted = admit(
        &conn.shared,
        id,
        &mut conn.peer,
        &mut stream,
        &mut buf,
        &mut slot,
        endpoint.proxy_protocol,
        handshake_deadline,
    )
    .await;
    if let Err(close) = admitted {
        conn.finish(&mut stream, close).await;
        return;
    }
    let Some(ws) = &endpoint.websocket else {
        let close = conn
            .serve(&mut stream, buf, handshake_deadline, inbox, shutdown)
            .await;
        conn.finish(&mut stream, close).await;
        return;
    };
    // TLS and the upgrade count against the handshake deadline too. Their
    // state is boxed so that the tasks of plain TCP connections, which are
    // most of the idle ones, stay small (rustls' handshake state is large).
    let stream = Prefixed::new(buf, stream);
    let Some(tls) = &endpoint.tls else {
        Box::pin(conn.serve_websocket(stream, ws, handshake_deadline, inbox, shutdown)).await;
        return;
    };
    match tokio::time::timeout_at(handshake_deadline, Box::pin(tls.0.accept(stream))).await {
        Ok(Ok(stream)) => {
            Box::pin(conn.serve_websocket(stream, ws, handshake_deadline, inbox, shutdown)).await
        }
        Ok(Err(e)) => {
            count_closed(&conn.shared, "tls_handshake_failed");
            let total = Refused::count(&conn.shared.admission.refused.tls_handshake);
            info!(conn = id, peer = %conn.peer, refused_total = total, "closed: TLS handshake failed: {e}");
        }
        Err(_) => {
            count_closed(&conn.shared, Close::HandshakeTimeout.reason());
            info!(conn = id, peer = %conn.peer, "closed: {}", Close::HandshakeTimeout);
        }
    }
}

/// Reads the PROXY header the listener expects, then counts the connection
/// against its client address (`peer`, replaced by the header's source).
/// Bytes after the header stay in `buf`.
#[allow(clippy::too_many_arguments)] // one connection's admission state, used once per connection
pub(super) async fn admit(
    shared: &Shared,
    id: ConnectionId,
    peer: &mut SocketAddr,
    reader: &mut TcpStream,
    buf: &mut BytesMut,
    slot: &mut Slot,
    mode: ProxyProtocol,
    deadline: Instant,
) -> Result<(), Close> {
    if mode != ProxyProtocol::Off {
        let detected = loop {
            match proxy::detect(buf) {
                Ok(Detected::NeedMore) => {}
                Ok(detected) => break detected,
                Err(e) => return Err(proxy_refused(shared, id, Close::ProxyHeader(e))),
            }
            let read = tokio::select! {
                read = reader.read_buf(buf) => read,
                _ = sleep_until(deadline) => return Err(Close::HandshakeTimeout),
            };
            match read {
                Ok(0) => return Err(Close::ClientClosed),
                Ok(_) => {}
                Err(e) => return Err(Close::Read(e)),
            }
        };
        match detected {
            Detected::Header(header) => {
                buf.advance(header.len);
                if let Some(source) = header.source {
                    debug!(conn = id, socket_peer = %peer, client = %source, "PROXY header");
                    *peer = source;
                }
            }
            _ if mode == ProxyProtocol::Required => {
                return Err(proxy_refused(shared, id, Close::ProxyHeaderMissing))
            }
            _ => {}
        }
    }
    shared
        .admission
        .enter_client(slot, peer.ip())
        .map_err(|_| Close::ClientLimit)
}

/// Counts a refused PROXY header; the reason is logged when the connection closes.
fn proxy_refused(shared: &Shared, id: ConnectionId, close: Close) -> Close {
    let total = Refused::count(&shared.admission.refused.proxy_header);
    debug!(conn = id, refused_total = total, "PROXY header refused");
    close
}

/// An unencrypted handshake reply, with a server msg_id after `last_msg_id`.
pub(super) fn plain_reply(last_msg_id: &mut i64, body: &[u8]) -> Vec<u8> {
    let now = unix_now();
    *last_msg_id =
        message::next_server_msg_id(*last_msg_id, now.as_secs() as i64, now.subsec_nanos(), true);
    message::encode_plain(*last_msg_id, body)
}

/// Counts and logs a −404 sent for `close`.
pub(super) fn count_404(shared: &Shared, id: ConnectionId, peer: SocketAddr, close: &Close) {
    shared
        .keys
        .cache
        .stats
        .not_found_sent
        .fetch_add(1, Ordering::Relaxed);
    info!(conn = id, %peer, "sent -404: {close}");
}

/// Adds one to `mtproto_connections_closed_total{reason}`.
pub(super) fn count_closed(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .connections_closed
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// Adds one to `mtproto_handshakes_total{outcome}`.
fn count_handshake(shared: &Shared, outcome: &'static str) {
    shared
        .metrics
        .handshakes
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// Runs one unencrypted handshake message through `handshake`: the per-address
/// handshake rate on `req_pq`, RSA and DH off the async workers, the step
/// metrics, and storing a new key. `started` is when this handshake's
/// `req_pq` came. Returns the TL body to answer with, if any.
pub(super) async fn handshake_step(
    shared: &Shared,
    id: ConnectionId,
    peer: SocketAddr,
    handshake: &mut Handshake,
    started: &mut Option<Instant>,
    body: Vec<u8>,
) -> Result<Option<Vec<u8>>, Close> {
    let constructor = Handshake::constructor(&body);
    if matches!(constructor, Some(id::REQ_PQ | id::REQ_PQ_MULTI))
        && !shared
            .admission
            .allow_handshake(peer.ip(), Instant::now().into_std())
    {
        let total = Refused::count(&shared.admission.refused.handshake_flood);
        debug!(conn = id, %peer, refused_total = total, "handshake rate exceeded");
        count_handshake(shared, "flood");
        return Err(Close::HandshakeFlood);
    }
    let step_name = match constructor {
        Some(id::REQ_PQ | id::REQ_PQ_MULTI) => {
            *started = Some(Instant::now());
            "req_pq"
        }
        Some(id::REQ_DH_PARAMS) => "req_DH_params",
        Some(id::SET_CLIENT_DH_PARAMS) => "set_client_DH_params",
        _ => "other",
    };
    let step_started = Instant::now();
    let heavy = matches!(
        constructor,
        Some(id::REQ_DH_PARAMS | id::SET_CLIENT_DH_PARAMS)
    );
    let now = unix_now().as_secs() as i64;
    let step = if heavy {
        // RSA and 2048-bit modpow: keep them off the async workers.
        let mut owned = std::mem::replace(handshake, Handshake::new(shared.handshake.clone()));
        let (owned, step) = tokio::task::spawn_blocking(move || {
            let step = owned.on_message(&body, now, &mut rand::thread_rng());
            (owned, step)
        })
        .await
        .map_err(|_| Close::Handshake(HandshakeError::OutOfOrder("blocking task", "aborted")))?;
        *handshake = owned;
        step
    } else {
        handshake.on_message(&body, now, &mut rand::thread_rng())
    };
    let metrics = &shared.metrics;
    metrics
        .handshake_step_duration
        .get_or_create(&StepLabels { step: step_name })
        .observe(step_started.elapsed().as_secs_f64());
    if let Some(rsa) = handshake.take_rsa_decrypt_time() {
        metrics.rsa_decrypt_duration.observe(rsa.as_secs_f64());
    }
    metrics
        .handshake_steps
        .get_or_create(&StepOutcomeLabels {
            step: step_name,
            outcome: step.as_ref().map_or_else(HandshakeError::reason, |_| "ok"),
        })
        .inc();
    match step {
        Err(e) => {
            debug!(
                conn = id,
                state = handshake.state_name(),
                "handshake failed: {e}"
            );
            count_handshake(shared, "failed");
            Err(e.into())
        }
        Ok(Step::Nothing) => Ok(None),
        Ok(Step::Reply(reply)) => Ok(Some(reply)),
        Ok(Step::StoreKey(new_key)) => {
            let stored = match &shared.keys.writer {
                Some(store) => match store.insert(new_key.info.clone(), new_key.first_salt).await {
                    Ok(()) => Ok(StoreOutcome::Stored),
                    Err(crate::authkey::store::StoreError::Collision(_)) => {
                        Ok(StoreOutcome::Collision)
                    }
                    Err(e) => Err(e.to_string()),
                },
                None => shared
                    .session
                    .set_auth_key(&new_key)
                    .await
                    .map_err(|e| e.to_string()),
            };
            let outcome = match stored {
                Ok(outcome) => outcome,
                Err(e) => {
                    warn!(
                        conn = id,
                        auth_key_id = new_key.info.id(),
                        "storing new auth key failed: {e}"
                    );
                    StoreOutcome::Failed
                }
            };
            count_handshake(
                shared,
                match outcome {
                    StoreOutcome::Stored => "created",
                    StoreOutcome::Collision => "retry",
                    StoreOutcome::Failed => "store_failed",
                },
            );
            if outcome == StoreOutcome::Stored {
                if let Some(started) = started.take() {
                    metrics
                        .handshake_duration
                        .observe(started.elapsed().as_secs_f64());
                }
                info!(
                    conn = id,
                    %peer,
                    auth_key_id = new_key.info.id(),
                    key_type = ?new_key.info.key_type,
                    "auth key created"
                );
                shared.keys.cache.insert(new_key.info).await;
            }
            Ok(Some(handshake.on_store_result(outcome)?))
        }
    }
}

/// Finds an auth key by id (cache, then the key source); unknown and expired
/// keys are refused with −404.
pub(super) async fn lookup_key(
    shared: &Shared,
    auth_key_id: i64,
) -> Result<Arc<AuthKeyInfo>, Close> {
    let info = match shared
        .keys
        .cache
        .get(auth_key_id, shared.keys.source.as_ref())
        .await
    {
        Ok(Some(info)) => info,
        Ok(None) => return Err(Close::UnknownKey(auth_key_id)),
        Err(e) => return Err(Close::KeyLookup(e.0)),
    };
    if info.is_expired(unix_now().as_secs() as i64) {
        shared.keys.cache.remove(auth_key_id).await;
        return Err(Close::ExpiredKey(auth_key_id));
    }
    Ok(info)
}

/// teamgram's `SessionClientData` for a decrypted message: `payload` is the
/// whole decrypted frame, of which the plaintext from byte 16 (msg_id
/// onwards, padding included) is forwarded without copying.
#[allow(clippy::too_many_arguments)] // the fields of one SessionClientData
pub(super) fn client_data(
    shared: &Shared,
    info: &AuthKeyInfo,
    conn_type: i32,
    client_ip: std::net::IpAddr,
    salt: i64,
    session_id: i64,
    mut payload: BytesMut,
    plaintext_len: usize,
) -> SessionClientData {
    payload.advance(24 + 16);
    payload.truncate(plaintext_len - 16);
    SessionClientData {
        server_id: shared.server_id.clone(),
        conn_type,
        auth_key_id: info.id(),
        key_type: info.key_type as i32,
        perm_auth_key_id: info.perm_auth_key_id,
        session_id,
        client_ip: client_ip.to_string(),
        quick_ack: 0,
        salt,
        payload: payload.freeze(),
    }
}

impl Connection {
    /// Runs the WebSocket upgrade on `stream`, then serves the connection inside it.
    async fn serve_websocket<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: S,
        ws: &websocket::WsOptions,
        handshake_deadline: Instant,
        inbox: mpsc::Receiver<Outgoing>,
        shutdown: watch::Receiver<bool>,
    ) {
        let upgrade = websocket::accept(stream, ws);
        match tokio::time::timeout_at(handshake_deadline, upgrade).await {
            Ok(Ok(mut ws)) => {
                let close = self
                    .serve(
                        &mut ws,
                        BytesMut::new(),
                        handshake_deadline,
                        inbox,
                        shutdown,
                    )
                    .await;
                self.finish(&mut ws, close).await;
            }
            Ok(Err(e)) => {
                count_closed(&self.shared, "websocket_upgrade_refused");
                let total = Refused::count(&self.shared.admission.refused.websocket_upgrade);
                info!(conn = self.id, peer = %self.peer, refused_total = total, "closed: WebSocket upgrade refused: {e}");
            }
            Err(_) => {
                count_closed(&self.shared, Close::HandshakeTimeout.reason());
                info!(conn = self.id, peer = %self.peer, "closed: {}", Close::HandshakeTimeout);
            }
        }
    }

    /// Logs why the connection ends, sends the transport error code where
    /// there is one, and leaves the registry.
    async fn finish<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, close: Close) {
        let (id, peer) = (self.id, self.peer);
        count_closed(&self.shared, close.reason());
        if matches!(close, Close::HandshakeTimeout) && self.handshake_started.is_some() {
            count_handshake(&self.shared, "timeout");
        }
        match &close {
            Close::ClientClosed | Close::Shutdown => debug!(conn = id, %peer, "closed: {close}"),
            Close::ClientLimit => {
                let total = self
                    .shared
                    .admission
                    .refused
                    .client_full
                    .load(Ordering::Relaxed);
                debug!(conn = id, %peer, refused_total = total, "closed: {close}");
            }
            _ => info!(conn = id, %peer, transport = ?self.transport.framing(), "closed: {close}"),
        }
        if let Some(code) = close.code() {
            if code == error_code::AUTH_KEY_NOT_FOUND {
                count_404(&self.shared, id, peer, &close);
            }
            self.transport
                .encode_error(code, &mut self.out, &mut rand::thread_rng());
        }
        let write_timeout = self.shared.limits.write_timeout;
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let written = timeout(write_timeout, async {
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await;
            if matches!(written, Ok(Ok(()))) {
                self.shared.metrics.bytes_sent.inc_by(out.len() as u64);
            }
        }
        let _ = timeout(write_timeout, stream.shutdown()).await;
        self.detach_sessions().await;
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        mut buf: BytesMut,
        handshake_deadline: Instant,
        mut inbox: mpsc::Receiver<Outgoing>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        let limits = self.shared.limits.clone();
        let mut idle_deadline = Instant::now() + limits.idle_timeout;
        // Bytes that came with a PROXY header are decoded before the first read.
        if let Err(close) = self.decode_all(&mut buf).await {
            return close;
        }
        loop {
            if !self.out.is_empty() {
                let write = async {
                    stream.write_all(&self.out).await?;
                    stream.flush().await
                };
                if timeout(limits.write_timeout, write)
                    .await
                    .map_or(true, |r| r.is_err())
                {
                    return Close::Write;
                }
                let metrics = &self.shared.metrics;
                metrics.bytes_sent.inc_by(self.out.len() as u64);
                metrics.messages_sent.inc_by(self.written_acks.len() as u64);
                self.out.clear();
                if self.out.capacity() > READ_CHUNK {
                    self.out = BytesMut::new();
                }
                for ack in self.written_acks.drain(..) {
                    let _ = ack.send(());
                }
            }
            // An idle connection holds only a small read buffer; a partial
            // frame gets room to grow.
            let want = if buf.is_empty() {
                IDLE_CHUNK
            } else {
                READ_CHUNK
            };
            if buf.capacity() - buf.len() < want / 4 {
                buf.reserve(want);
            }
            tokio::select! {
                read = stream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) => return Close::ClientClosed,
                        Ok(n) => {
                            self.shared.metrics.bytes_received.inc_by(n as u64);
                        }
                        Err(e) => return Close::Read(e),
                    }
                    idle_deadline = Instant::now() + limits.idle_timeout;
                    if let Err(close) = self.decode_all(&mut buf).await {
                        return close;
                    }
                    if buf.is_empty() && buf.capacity() > IDLE_CHUNK {
                        // Give back what a large frame needed.
                        buf = BytesMut::new();
                    }
                }
                Some(outgoing) = inbox.recv() => {
                    self.on_server_message(&outgoing.payload);
                    self.written_acks.push(outgoing.written);
                    idle_deadline = Instant::now() + limits.idle_timeout;
                }
                _ = sleep_until(handshake_deadline), if self.key.is_none() => return Close::HandshakeTimeout,
                _ = sleep_until(idle_deadline) => return Close::IdleTimeout,
                _ = shutdown.changed() => return Close::Shutdown,
            }
        }
    }

    /// Handles every complete frame in `buf`.
    async fn decode_all(&mut self, buf: &mut BytesMut) -> Result<(), Close> {
        let decoded = self.transport.decode(buf);
        if let Some(name) = self.transport.name() {
            self.open.set_transport(name);
        }
        let mut next = decoded?;
        while let Some(frame) = next {
            self.on_frame(frame).await?;
            next = self.transport.decode(buf)?;
        }
        Ok(())
    }

    async fn on_frame(&mut self, frame: InboundFrame) -> Result<(), Close> {
        let auth_key_id = message::auth_key_id(&frame.payload)?;
        if auth_key_id == 0 {
            self.on_plain(frame).await
        } else {
            self.on_encrypted(auth_key_id, frame).await
        }
    }

    async fn on_plain(&mut self, frame: InboundFrame) -> Result<(), Close> {
        let plain = message::parse_plain(&frame.payload, frame.padded)?;
        let body = plain.body.to_vec();
        let mut handshake = self
            .handshake
            .take()
            .unwrap_or_else(|| Handshake::new(self.shared.handshake.clone()));
        let reply = handshake_step(
            &self.shared,
            self.id,
            self.peer,
            &mut handshake,
            &mut self.handshake_started,
            body,
        )
        .await?;
        self.handshake = Some(handshake);
        if let Some(reply) = reply {
            let msg = plain_reply(&mut self.last_plain_msg_id, &reply);
            self.transport
                .encode_frame(&msg, &mut self.out, &mut rand::thread_rng());
        }
        Ok(())
    }

    /// Finds the key for this connection: once, then it is bound.
    /// A temp key that is still unbound is read again for every message
    /// (through the cache, which asks the store for unbound keys), so the
    /// connection that sent `auth.bindTempAuthKey` forwards the perm key id
    /// as soon as the binding is stored. A failed re-read keeps what the
    /// connection has: a store blip does not end a working connection.
    async fn bind_key(&mut self, auth_key_id: i64) -> Result<Arc<AuthKeyInfo>, Close> {
        let held = match &self.key {
            Some(key) if key.id() != auth_key_id => {
                return Err(Close::KeyChanged {
                    bound: key.id(),
                    got: auth_key_id,
                })
            }
            Some(key) if !key.is_unbound_temp() => return Ok(key.clone()),
            held => held.clone(),
        };
        let info = match (lookup_key(&self.shared, auth_key_id).await, held) {
            (Ok(info), _) => info,
            (Err(Close::KeyLookup(e)), Some(held)) => {
                debug!(
                    conn = self.id,
                    auth_key_id, "re-reading an unbound temp key failed: {e}"
                );
                return Ok(held);
            }
            (Err(close), _) => return Err(close),
        };
        self.key = Some(info.clone());
        self.handshake = None;
        Ok(info)
    }

    async fn on_encrypted(&mut self, auth_key_id: i64, frame: InboundFrame) -> Result<(), Close> {
        let info = self.bind_key(auth_key_id).await?;
        let InboundFrame {
            mut payload,
            quick_ack,
            padded,
        } = frame;
        let decrypted = message::decrypt(&info.key, &mut payload, padded)?;
        if quick_ack {
            self.transport
                .encode_quick_ack(decrypted.quick_ack_token, &mut self.out);
            self.shared.metrics.quick_acks_sent.inc();
        }
        let (salt, session_id) = (decrypted.salt, decrypted.session_id);
        let plaintext_len = decrypted.plaintext.len();
        let conn_type = if self.sessions.contains(&session_id) {
            0
        } else {
            if self.sessions.len() >= self.shared.limits.max_sessions_per_connection {
                return Err(Close::TooManySessions(self.sessions.len()));
            }
            self.sessions.push(session_id);
            i32::from(
                self.shared
                    .registry
                    .attach(auth_key_id, session_id, self.id, &self.outbox),
            )
        };
        let data = client_data(
            &self.shared,
            &info,
            conn_type,
            self.peer.ip(),
            salt,
            session_id,
            payload,
            plaintext_len,
        );
        self.shared
            .session
            .send_data(data)
            .await
            .map_err(Close::Session)?;
        self.shared.metrics.messages_forwarded.inc();
        Ok(())
    }

    /// Encrypts one server message for this connection's key and frames it.
    fn on_server_message(&mut self, plaintext: &[u8]) {
        let Some(info) = &self.key else { return };
        let mut rng = rand::thread_rng();
        let mut frame = BytesMut::with_capacity(plaintext.len() + 64);
        message::encrypt(&info.key, plaintext, &mut frame, &mut rng);
        self.transport.encode_frame(&frame, &mut self.out, &mut rng);
    }

    /// Leaves the registry; tells the session about sessions whose last
    /// connection this was (awaited, so a draining gateway reports them all).
    async fn detach_sessions(&mut self) {
        let Some(info) = &self.key else { return };
        for &session_id in &self.sessions {
            if self.shared.registry.detach(info.id(), session_id, self.id) {
                let event = SessionClientEvent {
                    server_id: self.shared.server_id.clone(),
                    auth_key_id: info.id(),
                    key_type: info.key_type as i32,
                    perm_auth_key_id: info.perm_auth_key_id,
                    session_id,
                    client_ip: self.peer.ip().to_string(),
                };
                match timeout(
                    Duration::from_secs(2),
                    self.shared.session.close_session(event),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!("close_session failed: {e}"),
                    Err(_) => debug!("close_session timed out"),
                }
            }
        }
    }
}

fn unix_now() -> Duration {
    crate::unix_time()
}
