//! MTProto's HTTP transport: `POST /api` (and the web variants) carrying one
//! MTProto message per body, answered with one message per response.
//!
//! There is no connection to hang state on, so state is keyed by what the
//! messages carry: handshakes by their `nonce` (any request of this gateway
//! continues one, whichever TCP connection it comes on), and each
//! (auth_key_id, session_id) gets a *virtual connection* in the reverse-path
//! registry that queues server messages (bounded in bytes) until a request
//! of that session collects them, long-polling per `http_wait`. A virtual
//! connection that sees no request for `limits.idle_timeout_secs` expires
//! (the session is told, as when a TCP connection closes).
//!
//! Both kinds of state live in this process: behind several gateway pods,
//! HTTP clients need affinity (by client address or a cookie) so that a
//! handshake's three requests, and the long-polls that collect replies, reach
//! the pod that holds them.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::{debug, info};

use super::limiter::{Refusal, Slot};
use super::outbox::{self, Inbox};
use super::registry::ConnectionId;
use super::shell::{self, GatewayHost, Held, OpenGauge};
use super::websocket::Prefixed;
use super::{Endpoint, Shared};
use crate::metrics::OutcomeLabels;
use mtproto_core::authkey::AuthKeyInfo;
use mtproto_core::connection::{
    open, resolve_key, Attached, Close, Forward, Forwarded, HandshakeAction, HandshakeFlow,
};
use mtproto_core::handshake::{Handshake, HandshakeError};
use mtproto_core::longpoll::{self, HttpWait, Sequence};
use mtproto_core::message::{self, MessageError};
use mtproto_core::tl::id;
use mtproto_core::transport::error_code;
use mtproto_session::SessionClientEvent;

/// teamgram's `conn_type` for messages that came over HTTP (`TRANSPORT_HTTP`).
pub const CONN_TYPE_HTTP: i32 = 2;

/// Request paths: Telegram's `/api(w)(_test)` (`w`: the browser variant,
/// same protocol here) and webogram's `/apiw1`.
const PATHS: [&str; 6] = [
    "/api",
    "/apiw",
    "/apiw1",
    "/api_test",
    "/apiw_test",
    "/apiw1_test",
];

/// Handshakes in progress at once (each holds a DH secret until it ends or
/// `limits.handshake_timeout_secs` passes).
const MAX_PENDING_HANDSHAKES: usize = 65_536;

/// Metrics of the HTTP transport.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: Counter,
    /// 502/503: the session or key store failed, or the gateway is full or stopping.
    pub unavailable: Counter,
    /// Server messages dropped because a session's queue was full.
    pub queue_dropped: Counter,
    /// Virtual connections closed after `limits.idle_timeout_secs` without a request.
    pub sessions_expired: Counter,
    /// Virtual connections open now.
    pub sessions: Gauge,
    /// Handshakes waiting for their next request.
    pub handshakes_pending: Gauge,
}

impl HttpStats {
    pub fn register(&self, r: &mut Registry) {
        for (name, help, counter) in [
            ("mtproto_http_requests", "HTTP transport requests", &self.requests),
            ("mtproto_http_unavailable", "HTTP requests answered 502/503 (session or key store failed, gateway full or stopping)", &self.unavailable),
            ("mtproto_http_queue_dropped", "Server messages an HTTP session's queue could not hold (reported undelivered) or lost when it expired", &self.queue_dropped),
            ("mtproto_http_sessions_expired", "HTTP virtual connections closed after limits.idle_timeout_secs without a request", &self.sessions_expired),
        ] {
            r.register(name, help, counter.clone());
        }
        r.register(
            "mtproto_http_sessions",
            "HTTP virtual connections (auth key and session) open now",
            self.sessions.clone(),
        );
        r.register(
            "mtproto_http_handshakes_pending",
            "HTTP handshakes waiting for their next request",
            self.handshakes_pending.clone(),
        );
    }
}

/// The HTTP transport's state, shared by every HTTP listener.
#[derive(Debug)]
pub struct Hub {
    handshakes: Mutex<HashMap<[u8; 16], PendingHandshake>>,
    /// When abandoned handshakes were last dropped (ms on the gateway's clock).
    handshakes_swept_ms: AtomicU64,
    sessions: Mutex<Sessions>,
    pub stats: HttpStats,
}

impl Default for Hub {
    fn default() -> Self {
        let stats = HttpStats::default();
        Self {
            handshakes: Mutex::default(),
            handshakes_swept_ms: AtomicU64::default(),
            sessions: Mutex::new(Sessions {
                open: stats.sessions.clone(),
                ..Sessions::default()
            }),
            stats,
        }
    }
}

/// The virtual connections, and how many each auth key has (capped like one
/// TCP connection's sessions: the client chooses session ids freely).
#[derive(Debug, Default)]
struct Sessions {
    by_session: HashMap<(i64, i64), Arc<VirtualConn>>,
    per_key: HashMap<i64, usize>,
    /// `mtproto_http_sessions`.
    open: Gauge,
}

impl Sessions {
    fn insert(&mut self, key: (i64, i64), vc: Arc<VirtualConn>) {
        if self.by_session.insert(key, vc).is_none() {
            *self.per_key.entry(key.0).or_default() += 1;
        }
        self.open.set(self.by_session.len() as i64);
    }

    /// Removes `vc` if it is still the one registered for `key`.
    fn remove(&mut self, key: (i64, i64), vc: &Arc<VirtualConn>) {
        if !self
            .by_session
            .get(&key)
            .is_some_and(|current| Arc::ptr_eq(current, vc))
        {
            return;
        }
        self.by_session.remove(&key);
        self.open.set(self.by_session.len() as i64);
        if let Some(n) = self.per_key.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.per_key.remove(&key.0);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// Updates `mtproto_http_handshakes_pending` after `handshakes` changed.
    fn handshakes_changed(&self, handshakes: &HashMap<[u8; 16], PendingHandshake>) {
        self.stats.handshakes_pending.set(handshakes.len() as i64);
    }
}

#[derive(Debug)]
struct PendingHandshake {
    flow: HandshakeFlow,
    expires: Instant,
    /// Its slot among the gateway's handshakes in progress.
    held: Held,
}

/// One (auth_key_id, session_id) as the registry sees it: server messages
/// wait here for the next request of the session.
#[derive(Debug)]
struct VirtualConn {
    id: ConnectionId,
    state: Mutex<VcState>,
    /// A server message was queued.
    arrived: Notify,
    /// A request of this session finished (a draining gateway then closes it).
    request_done: Notify,
}

#[derive(Debug)]
struct VcState {
    queue: VecDeque<(Bytes, Instant)>,
    queued_bytes: usize,
    seq: Sequence,
    /// Requests being served now; the connection does not expire under them.
    requests: usize,
    last_request: Instant,
    client_ip: IpAddr,
    closed: bool,
}

impl VirtualConn {
    /// A new virtual connection with its first request in progress.
    fn new(id: ConnectionId, client_ip: IpAddr) -> Self {
        Self {
            id,
            state: Mutex::new(VcState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                seq: Sequence::default(),
                requests: 1,
                last_request: Instant::now(),
                client_ip,
                closed: false,
            }),
            arrived: Notify::new(),
            request_done: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, VcState> {
        lock(&self.state)
    }

    /// Queues a server message unless it would exceed `max_bytes` (a message
    /// always fits an empty queue; its size is bounded by the frame limit).
    fn push(&self, payload: Bytes, max_bytes: usize) -> bool {
        let mut st = self.state();
        if st.closed || (!st.queue.is_empty() && st.queued_bytes + payload.len() > max_bytes) {
            return false;
        }
        st.queued_bytes += payload.len();
        st.queue.push_back((payload, Instant::now()));
        drop(st);
        self.arrived.notify_waiters();
        true
    }
}

/// Counts a request against its virtual connection while it is served.
#[derive(Debug)]
struct RequestGuard(Arc<VirtualConn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.requests -= 1;
        st.last_request = Instant::now();
        drop(st);
        self.0.request_done.notify_one();
    }
}

/// What the requests of one TCP connection share.
#[derive(Debug)]
struct ConnCx {
    id: ConnectionId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// Flips when the gateway starts draining: no new requests on kept-alive connections.
    draining: watch::Receiver<bool>,
    force_close: watch::Receiver<bool>,
    /// Held by every virtual connection task too, so the drain waits for them.
    done: mpsc::Sender<()>,
}

/// Serves one accepted TCP connection of an HTTP listener: PROXY header and
/// per-address admission as on the other listeners, TLS when configured, then
/// HTTP/1.1 with keep-alive. Once `draining` flips, requests in flight finish
/// and kept-alive connections close; `force_close` ends everything.
#[allow(clippy::too_many_arguments)] // the accept loop's per-connection state
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    endpoint: &Endpoint,
    shared: Arc<Shared>,
    draining: watch::Receiver<bool>,
    force_close: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let _open = OpenGauge::new(shared.metrics.clone(), endpoint.kind(), "http");
    let Some(admitted) = shell::admit(&shared, stream, peer, &mut slot, endpoint).await else {
        return;
    };
    let (id, peer, stream, buf) = (admitted.id, admitted.peer, admitted.stream, admitted.buf);
    let deadline = admitted.accepted + shared.limits.connection.handshake_timeout;
    let stream = Prefixed::new(buf, stream);
    let cx = Arc::new(ConnCx {
        id,
        peer,
        shared,
        draining,
        force_close,
        done,
    });
    match &endpoint.tls {
        None => serve(stream, cx).await,
        Some(tls) => match timeout_at(deadline, tls.0.accept(stream)).await {
            Ok(Ok(stream)) => serve(stream, cx).await,
            Ok(Err(e)) => {
                shell::count_closed(&cx.shared, "tls_handshake_failed");
                let total = cx.shared.admission.refused.count(Refusal::TlsHandshake);
                info!(conn = id, %peer, refused_total = total, "closed: TLS handshake failed: {e}");
            }
            Err(_) => shell::count_close(&cx.shared, id, peer, &Close::HandshakeTimeout),
        },
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, cx: Arc<ConnCx>) {
    let (mut draining, mut force_close) = (cx.draining.clone(), cx.force_close.clone());
    let (id, peer, shared) = (cx.id, cx.peer, cx.shared.clone());
    let timeout = cx.shared.limits.connection.handshake_timeout;
    let service = service_fn(move |request| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(handle(request, &cx).await) }
    });
    // Without the Date header, Content-Length is the last header line, where
    // some clients' minimal parsers (Telethon's) look for it.
    // A client that stops reading its responses is closed after
    // limits.write_timeout_secs, as on the stream transports.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(shared.limits.connection.write_timeout));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .auto_date_header(false)
        .serve_connection(TokioIo::new(Box::pin(stream)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stopped(&mut draining) => {
            conn.as_mut().graceful_shutdown();
            // Requests in flight finish, but not past the drain's grace.
            tokio::select! {
                result = conn.as_mut() => result,
                _ = stopped(&mut force_close) => Ok(()),
            }
        }
    };
    match result {
        Ok(()) => {
            let reason = if *draining.borrow() {
                "shutdown"
            } else {
                "client_closed"
            };
            shell::count_closed(&shared, reason);
            debug!(conn = id, %peer, "HTTP connection closed");
        }
        Err(e) => {
            shell::count_closed(&shared, "http_error");
            debug!(conn = id, %peer, "HTTP connection ended: {e}");
        }
    }
}

/// Resolves once `flag` is set (without holding the watch's lock).
async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

fn is_api_path(path: &str) -> bool {
    PATHS.contains(&path)
}

/// Browsers call `/apiw*` from other origins; every response allows it.
fn with_cors(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("origin, content-type"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if status != StatusCode::OK {
        // After an error the client starts over on a new connection.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    with_cors(response)
}

/// A refusal counted in `counter`, with a short reason as the body.
fn refuse(counter: &Counter, status: StatusCode, why: &'static str) -> Response<Full<Bytes>> {
    counter.inc();
    respond(status, Bytes::from_static(why.as_bytes()))
}

async fn handle(request: Request<Incoming>, cx: &ConnCx) -> Response<Full<Bytes>> {
    let stats = &cx.shared.http.stats;
    let refused = &cx.shared.admission.refused;
    stats.requests.inc();
    if !cx
        .shared
        .admission
        .allow_http_request(cx.peer.ip(), std::time::Instant::now())
    {
        shell::count_limit(&cx.shared, "http_requests_per_ip_per_minute");
        debug!(conn = cx.id, peer = %cx.peer, "HTTP request rate exceeded");
        return respond(
            StatusCode::TOO_MANY_REQUESTS,
            Bytes::copy_from_slice(&error_code::FLOOD.to_le_bytes()),
        );
    }
    if request.method() == Method::OPTIONS {
        let mut response = with_cors(Response::new(Full::new(Bytes::new())));
        response.headers_mut().insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("1728000"),
        );
        return response;
    }
    if request.method() != Method::POST {
        let mut response = refuse(
            refused.counter(Refusal::HttpMethod),
            StatusCode::METHOD_NOT_ALLOWED,
            "POST only",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
        return response;
    }
    if !is_api_path(request.uri().path()) {
        return refuse(
            refused.counter(Refusal::HttpPath),
            StatusCode::NOT_FOUND,
            "unknown path",
        );
    }
    let max = cx.shared.limits.connection.max_frame_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return refuse(
            refused.counter(Refusal::HttpTooLarge),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
        );
    }
    let deadline = Instant::now() + cx.shared.limits.connection.handshake_timeout;
    let body = match timeout_at(deadline, Limited::new(request.into_body(), max).collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                refused.counter(Refusal::HttpTooLarge),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large",
            )
        }
        Ok(Err(_)) | Err(_) => {
            return refuse(
                refused.counter(Refusal::HttpBadBody),
                StatusCode::BAD_REQUEST,
                "incomplete body",
            )
        }
    };
    // MTProto bytes both ways (HTTP framing is not counted, unlike on TCP).
    let metrics = &cx.shared.metrics;
    metrics.bytes_received.inc_by(body.len() as u64);
    let response = match process(body, cx).await {
        Ok(reply) => respond(StatusCode::OK, reply),
        Err(close) => refusal(close, cx),
    };
    if let Some(len) = response.body().size_hint().exact() {
        metrics.bytes_sent.inc_by(len);
    }
    response
}

/// The HTTP answer to what would close a stream connection. Transport error
/// codes go in the body as on TCP (a 4-byte negative code) under the matching
/// HTTP status: −404 as 404, −429 as 429.
fn refusal(close: Close, cx: &ConnCx) -> Response<Full<Bytes>> {
    let stats = &cx.shared.http.stats;
    let refused = &cx.shared.admission.refused;
    let (id, peer) = (cx.id, cx.peer);
    shell::count_limit_of(&cx.shared, &close);
    if let Some(code) = close.code() {
        let status = if code == error_code::AUTH_KEY_NOT_FOUND {
            shell::count_404(&cx.shared, id, peer, &close);
            StatusCode::NOT_FOUND
        } else {
            debug!(conn = id, %peer, "sent {code}: {close}");
            StatusCode::TOO_MANY_REQUESTS
        };
        return respond(status, Bytes::copy_from_slice(&code.to_le_bytes()));
    }
    info!(conn = id, %peer, "request refused: {close}");
    match close {
        Close::Session(_) => refuse(
            &stats.unavailable,
            StatusCode::BAD_GATEWAY,
            "session failed",
        ),
        Close::TooManySessions(_) => refuse(
            &stats.unavailable,
            StatusCode::TOO_MANY_REQUESTS,
            "too many sessions on this auth key",
        ),
        Close::KeyLookup(_) | Close::Shutdown | Close::ClientLimit => refuse(
            &stats.unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "try again later",
        ),
        _ => refuse(
            refused.counter(Refusal::HttpBadBody),
            StatusCode::BAD_REQUEST,
            "bad MTProto message",
        ),
    }
}

async fn process(body: Bytes, cx: &ConnCx) -> Result<Bytes, Close> {
    let auth_key_id = message::auth_key_id(&body)?;
    if auth_key_id == 0 {
        on_plain(&body, cx).await
    } else {
        on_encrypted(auth_key_id, body, cx).await
    }
}

/// The handshake nonce every handshake request carries right after its constructor.
fn nonce(body: &[u8]) -> Option<[u8; 16]> {
    body.get(4..20)?.try_into().ok()
}

async fn on_plain(body: &[u8], cx: &ConnCx) -> Result<Bytes, Close> {
    let shared = &cx.shared;
    let hub = &shared.http;
    let plain = message::parse_plain(body, false)?;
    let nonce = nonce(plain.body).ok_or(MessageError::TooShort(body.len()))?;
    let now = Instant::now();
    let starts = matches!(
        Handshake::constructor(plain.body),
        Some(id::REQ_PQ | id::REQ_PQ_MULTI)
    );
    let mut pending = {
        let mut handshakes = lock(&hub.handshakes);
        if starts {
            // Clients that leave mid-handshake: dropped at most once a second
            // (and whenever the table is full), so the table and its gauge
            // hold handshakes still in progress.
            let now_ms = crate::unix_time().as_millis() as u64;
            let swept = hub.handshakes_swept_ms.load(Ordering::Relaxed);
            if handshakes.len() >= MAX_PENDING_HANDSHAKES || now_ms.saturating_sub(swept) >= 1000 {
                hub.handshakes_swept_ms.store(now_ms, Ordering::Relaxed);
                let before = handshakes.len();
                handshakes.retain(|_, p| p.expires > now);
                let expired = (before - handshakes.len()) as u64;
                if expired > 0 {
                    shared
                        .metrics
                        .handshakes
                        .get_or_create(&OutcomeLabels { outcome: "timeout" })
                        .inc_by(expired);
                }
            }
            hub.handshakes_changed(&handshakes);
            if handshakes.len() >= MAX_PENDING_HANDSHAKES {
                return Err(Close::ClientLimit);
            }
            PendingHandshake {
                flow: HandshakeFlow::new(shared.handshake.clone()),
                expires: now + shared.limits.connection.handshake_timeout,
                held: Held::new(shared.budgets.clone()),
            }
        } else {
            // An unknown nonce: expired, never started, or started on another pod.
            let pending = handshakes.remove(&nonce);
            hub.handshakes_changed(&handshakes);
            match pending {
                Some(p) if p.expires > now => p,
                _ => return Err(HandshakeError::NonceMismatch.into()),
            }
        }
    };
    let mut events = VecDeque::new();
    let mut host = GatewayHost {
        shared,
        id: cx.id,
        peer: cx.peer,
        outbox: None,
        held: &mut pending.held,
    };
    let mut action = pending.flow.on_message(
        plain.msg_id,
        plain.body,
        shell::now(),
        &mut host,
        &mut rand::thread_rng(),
        &mut events,
    );
    // The heavy steps and the key store, one after the other, as a stream
    // connection runs them.
    let reply = loop {
        match action {
            Ok(HandshakeAction::Compute(job)) => {
                let job = shell::compute(shared, job).await?;
                action = pending
                    .flow
                    .on_computed(job, shell::now(), &mut host, &mut events);
            }
            Ok(HandshakeAction::Store(key)) => {
                let outcome = shell::store_key(shared, cx.id, key).await;
                action = pending
                    .flow
                    .on_stored(outcome, shell::now(), &mut host, &mut events);
            }
            Ok(HandshakeAction::Reply(reply)) => break Ok(reply),
            Ok(HandshakeAction::Nothing) => {
                break Err(Close::Handshake(HandshakeError::OutOfOrder(
                    "a message without a reply",
                    "http",
                )))
            }
            Err(close) => break Err(close),
        }
    };
    for event in events {
        shell::record(&shared.metrics, None, event);
    }
    let reply = match reply {
        // The nonce is visible on plain http://: a request that names it with
        // the wrong server_nonce must not end the real client's handshake
        // (a failed check leaves the handshake's state as it was).
        Err(Close::Handshake(HandshakeError::NonceMismatch)) if !starts => {
            let mut handshakes = lock(&hub.handshakes);
            handshakes.insert(nonce, pending);
            hub.handshakes_changed(&handshakes);
            return Err(HandshakeError::NonceMismatch.into());
        }
        reply => reply?,
    };
    if !pending.flow.is_done() {
        let mut handshakes = lock(&hub.handshakes);
        handshakes.insert(nonce, pending);
        hub.handshakes_changed(&handshakes);
    }
    Ok(Bytes::from(reply))
}

async fn on_encrypted(auth_key_id: i64, body: Bytes, cx: &ConnCx) -> Result<Bytes, Close> {
    let started = Instant::now();
    let shared = &cx.shared;
    let lookup = shell::lookup_key(shared, auth_key_id).await;
    let info = match resolve_key(auth_key_id, lookup, None, shell::now().unix_secs()) {
        Ok(info) => info,
        Err(close) => {
            if matches!(close, Close::ExpiredKey(_)) {
                shared.keys.cache.remove(auth_key_id).await;
            }
            return Err(close);
        }
    };
    let opened = open(&info, BytesMut::from(body), false)?;
    let (salt, session_id) = (opened.salt, opened.session_id);
    let request = longpoll::inspect(opened.msg_id, opened.seq_no, opened.body());
    let guard = attach(cx, &info, session_id)?;
    let data = shell::client_data(
        shared,
        cx.peer.ip().to_string().into(),
        Forward::new(&info, CONN_TYPE_HTTP, opened),
    );
    match shell::forward(shared.clone(), data).await {
        Forwarded::Accepted => {}
        Forwarded::UnknownKey => return Err(Close::KeyUnregistered(auth_key_id)),
        Forwarded::Failed(e) => return Err(Close::Session(e)),
    }
    let wait = HttpWait::for_request(&request, shared.limits.http_max_wait);
    let plaintext = collect(&guard.0, wait, started, cx, |seq| {
        let unix = crate::unix_time();
        longpoll::ack(
            salt,
            session_id,
            &request.content_msg_ids,
            seq,
            unix.as_secs() as i64,
            unix.subsec_nanos(),
        )
    })
    .await;
    let mut out = BytesMut::with_capacity(plaintext.len() + 64);
    message::encrypt(&info.key, &plaintext, &mut out, &mut rand::thread_rng());
    Ok(out.freeze())
}

/// The virtual connection of (key, session), made (and put in the registry,
/// with its task) on the session's first request; counted while `guard` lives.
fn attach(cx: &ConnCx, info: &Arc<AuthKeyInfo>, session_id: i64) -> Result<RequestGuard, Close> {
    let shared = &cx.shared;
    let key = (info.id(), session_id);
    let client_ip = cx.peer.ip();
    let mut sessions = lock(&shared.http.sessions);
    if let Some(vc) = sessions.by_session.get(&key) {
        let mut st = vc.state();
        if !st.closed {
            st.requests += 1;
            st.client_ip = client_ip;
            drop(st);
            return Ok(RequestGuard(vc.clone()));
        }
    }
    if sessions.by_session.len() >= shared.limits.max_connections {
        return Err(Close::ClientLimit);
    }
    let of_key = sessions.per_key.get(&key.0).copied().unwrap_or(0);
    if of_key >= shared.limits.connection.max_sessions {
        return Err(Close::TooManySessions(of_key));
    }
    let id = shared.connection_ids.next();
    let vc = Arc::new(VirtualConn::new(id, client_ip));
    let (outbox, inbox) = outbox::channel(shared.limits.outbox_capacity);
    if let Attached::KeyFull(n) = shared.registry.attach(key.0, session_id, id, &outbox) {
        return Err(Close::KeySessionsFull(n));
    }
    sessions.insert(key, vc.clone());
    tokio::spawn(run_session(
        shared.clone(),
        vc.clone(),
        info.clone(),
        session_id,
        inbox,
        (cx.draining.clone(), cx.force_close.clone()),
        cx.done.clone(),
    ));
    Ok(RequestGuard(vc))
}

/// Holds a request until its wait ends, then takes what is queued as one
/// plaintext; with nothing queued, `empty` makes the answer.
async fn collect(
    vc: &VirtualConn,
    wait: HttpWait,
    started: Instant,
    cx: &ConnCx,
    empty: impl FnOnce(&mut Sequence) -> Vec<u8>,
) -> Vec<u8> {
    let mut force_close = cx.force_close.clone();
    loop {
        let arrived = vc.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let deadline = {
            let mut st = vc.state();
            let queued = st
                .queue
                .front()
                .zip(st.queue.back())
                .map(|((_, first), (_, last))| (*first, *last));
            let at = wait.respond_at(
                started.into_std(),
                queued.map(|(f, l)| (f.into_std(), l.into_std())),
            );
            let stopping = *force_close.borrow();
            if st.closed || stopping || Instant::from_std(at) <= Instant::now() {
                return take(&mut st, cx, empty);
            }
            Instant::from_std(at)
        };
        tokio::select! {
            _ = arrived => {}
            _ = sleep_until(deadline) => {}
            _ = force_close.changed() => {}
        }
    }
}

fn take(st: &mut VcState, cx: &ConnCx, empty: impl FnOnce(&mut Sequence) -> Vec<u8>) -> Vec<u8> {
    if st.queue.is_empty() {
        return empty(&mut st.seq);
    }
    // One response carries at most one container's worth; the rest waits.
    let n = st.queue.len().min(longpoll::MAX_CONTAINER_MESSAGES);
    let queued: Vec<(Bytes, Instant)> = st.queue.drain(..n).collect();
    let taken: usize = queued.iter().map(|(m, _)| m.len()).sum();
    st.queued_bytes -= taken;
    let messages: Vec<&[u8]> = queued.iter().map(|(m, _)| &m[..]).collect();
    let unix = crate::unix_time();
    match longpoll::merge(
        &messages,
        &mut st.seq,
        unix.as_secs() as i64,
        unix.subsec_nanos(),
    ) {
        Ok(plaintext) => {
            cx.shared.metrics.messages_sent.inc_by(queued.len() as u64);
            plaintext
        }
        Err(e) => {
            cx.shared
                .http
                .stats
                .queue_dropped
                .inc_by(queued.len() as u64);
            info!(
                conn = cx.id,
                "dropped {} server messages: {e}",
                queued.len()
            );
            empty(&mut st.seq)
        }
    }
}

/// Moves server messages from the registry into the queue, and ends the
/// virtual connection when it sees no request for the idle timeout (or, once
/// the gateway drains, when no request is in flight; or at the forced close),
/// telling the session as a closed connection would.
async fn run_session(
    shared: Arc<Shared>,
    vc: Arc<VirtualConn>,
    info: Arc<AuthKeyInfo>,
    session_id: i64,
    mut inbox: Inbox,
    (mut draining, mut force_close): (watch::Receiver<bool>, watch::Receiver<bool>),
    done: mpsc::Sender<()>,
) {
    let idle = shared.limits.connection.idle_timeout;
    let max_bytes = shared.limits.http_queue_bytes;
    let mut drain = false;
    loop {
        if drain {
            let mut st = vc.state();
            if st.requests == 0 {
                st.closed = true;
                break;
            }
        }
        // Under a request the connection does not expire: wait for it to end.
        let (idle_at, busy) = {
            let st = vc.state();
            (st.last_request + idle, st.requests > 0)
        };
        tokio::select! {
            outgoing = inbox.recv() => {
                let Some(outgoing) = outgoing else { break };
                if !vc.push(outgoing.payload, max_bytes) {
                    shared.http.stats.queue_dropped.inc();
                }
            }
            _ = stopped(&mut draining), if !drain => drain = true,
            _ = vc.request_done.notified(), if drain || busy => {}
            _ = sleep_until(idle_at), if !drain && !busy => {
                let mut st = vc.state();
                if st.requests == 0 && st.last_request + idle <= Instant::now() {
                    st.closed = true;
                    shared.http.stats.sessions_expired.inc();
                    break;
                }
            }
            _ = stopped(&mut force_close) => break,
        }
    }
    let client_ip = {
        let mut st = vc.state();
        st.closed = true;
        let dropped = st.queue.len() as u64;
        st.queue.clear();
        shared.http.stats.queue_dropped.inc_by(dropped);
        st.client_ip
    };
    vc.arrived.notify_waiters();
    lock(&shared.http.sessions).remove((info.id(), session_id), &vc);
    if shared.registry.detach(info.id(), session_id, vc.id) {
        let event = SessionClientEvent {
            server_id: shared.server_id.to_string(),
            auth_key_id: info.id(),
            key_type: info.key_type as i32,
            perm_auth_key_id: info.perm_auth_key_id,
            session_id,
            client_ip: client_ip.to_string(),
        };
        super::report_closed_session(&shared, event).await;
    }
    drop(done);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_connections_are_counted_per_auth_key() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut sessions = Sessions::default();
        let (a, b, other) = (
            Arc::new(VirtualConn::new(1, ip)),
            Arc::new(VirtualConn::new(2, ip)),
            Arc::new(VirtualConn::new(3, ip)),
        );
        sessions.insert((7, 1), a.clone());
        sessions.insert((7, 2), b.clone());
        sessions.insert((8, 1), other);
        assert_eq!(sessions.per_key[&7], 2);
        // A stale task's removal does not touch its replacement.
        let replacement = Arc::new(VirtualConn::new(4, ip));
        sessions.by_session.insert((7, 1), replacement.clone());
        sessions.remove((7, 1), &a);
        assert_eq!(sessions.per_key[&7], 2);
        sessions.remove((7, 1), &replacement);
        sessions.remove((7, 2), &b);
        assert!(!sessions.per_key.contains_key(&7));
        assert_eq!(sessions.per_key[&8], 1);
    }

    #[test]
    fn api_paths_are_telegrams() {
        for path in ["/api", "/apiw", "/apiw1", "/apiw_test"] {
            assert!(is_api_path(path), "{path}");
        }
        for path in ["/", "/apiws", "/api/", "/API", "/apiw2"] {
            assert!(!is_api_path(path), "{path}");
        }
    }

    #[test]
    fn handshake_requests_are_keyed_by_nonce() {
        let mut body = vec![0xf1, 0x8e, 0x7e, 0xbe];
        body.extend_from_slice(&[7; 16]);
        assert_eq!(nonce(&body), Some([7; 16]));
        assert_eq!(nonce(&body[..19]), None);
    }

    #[test]
    fn a_full_queue_refuses_but_an_empty_one_takes_any_message() {
        let vc = VirtualConn {
            id: 1,
            state: Mutex::new(VcState {
                queue: VecDeque::new(),
                queued_bytes: 0,
                seq: Sequence::default(),
                requests: 0,
                last_request: Instant::now(),
                client_ip: IpAddr::from([127, 0, 0, 1]),
                closed: false,
            }),
            arrived: Notify::new(),
            request_done: Notify::new(),
        };
        assert!(vc.push(Bytes::from(vec![0; 100]), 50));
        assert!(!vc.push(Bytes::from(vec![0; 1]), 50));
        vc.state().queue.clear();
        vc.state().queued_bytes = 0;
        assert!(vc.push(Bytes::from(vec![0; 20]), 50));
        assert!(vc.push(Bytes::from(vec![0; 30]), 50));
        assert!(!vc.push(Bytes::from(vec![0; 1]), 50));
        vc.state().closed = true;
        vc.state().queue.clear();
        assert!(!vc.push(Bytes::from(vec![0; 1]), 50));
    }
}
