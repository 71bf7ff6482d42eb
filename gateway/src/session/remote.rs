//! The gateway as a client of remote session services over gRPC, in
//! teamgram's unary (`session.RPCSession`) or bidirectional-stream
//! (`session.RPCSessionStream`) mode. Requests are routed on the go-zero ring;
//! `REDIRECT_TO_<addr>` is followed (with mutual TLS only to a current ring
//! member, so a session cannot send this gateway's traffic elsewhere),
//! transient errors are retried with backoff, and a node is never evicted
//! because of a blip.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::join_all;
use mtproto_edge_proto::mtproto as pb;
use mtproto_edge_proto::session::{
    self as spb, session_stream_request::Payload as StreamRequest,
    session_stream_response::Payload as StreamResponse,
};
use prometheus_client::metrics::counter::Counter;
use tonic::Code;
use tracing::{debug, warn};

use super::links::Links;
use super::send_data::{send_data_bodies, send_data_body};
use super::stream_link::{encode_request, Answer, Replies, StreamLink};
use super::unary_link::{self, UnaryLink};
use crate::metrics::{GaugeGuard, MethodLabels, RpcErrorLabels, SessionRpcMetrics};
use crate::server::registry::Registry;
use mtproto_core::authkey::AuthKeyInfo;
use mtproto_core::handshake::{NewAuthKey, StoreOutcome};
use mtproto_session::ring::Ring;
use mtproto_session::tls::TlsFiles;
use mtproto_session::wire::{
    data_to_proto, event_to_proto, info_from_proto, info_to_proto, AUTH_KEY_UNREGISTERED,
    REDIRECT_PREFIX,
};
use mtproto_session::{SessionClientData, SessionClientEvent, SessionError, SessionService};

const MAX_REDIRECTS: usize = 2;
const SEND_DATA: &str = "session_sendDataToSession";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unary,
    Stream,
}

#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub mode: Mode,
    /// Deadline of one call (each attempt).
    pub call_timeout: Duration,
    /// Retries of a transient failure before giving up.
    pub retries: usize,
    pub backoff: Duration,
}

/// How a failed call is treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    Unregistered,
    Redirect(String),
    /// A redirect to an address not on the ring: refused.
    NotMember(String),
    Transient(String),
    Fatal(String),
}

impl Failure {
    fn kind(&self) -> &'static str {
        match self {
            Failure::Unregistered => "unregistered",
            Failure::Redirect(_) => "redirect",
            Failure::NotMember(_) => "redirect_refused",
            Failure::Transient(_) => "transient",
            Failure::Fatal(_) => "fatal",
        }
    }
}

/// Classifies a failed call by its message, then by its status: teamgram's
/// raw number when it sent one outside 0–16 (`raw`: 401, 700, 400, 500…),
/// else tonic's code. The message decides for both forms a session may send
/// an unknown key or a redirect in: teamgram's (`grpc-status` 401 / 700) and
/// the older one of this repository's session (`Unknown` with the same
/// messages); teamgram's stream mode also wraps them in a 500's text.
pub(super) fn classify(raw: Option<u32>, code: Code, message: &str) -> Failure {
    if message.contains(AUTH_KEY_UNREGISTERED) {
        return Failure::Unregistered;
    }
    if let Some(addr) = message.strip_prefix(REDIRECT_PREFIX) {
        return Failure::Redirect(addr.trim().to_string());
    }
    if let Some(raw) = raw {
        return Failure::Fatal(format!("status {raw}: {message}"));
    }
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled => Failure::Transient(format!("{code:?}: {message}")),
        _ => Failure::Fatal(format!("{code:?}: {message}")),
    }
}

/// A stream-mode error reply: `SessionStreamError {code, message}` with
/// teamgram's numbers (401, 700, 400, 500).
fn classify_stream_error(code: i32, message: &str) -> Failure {
    classify(Some(code.unsigned_abs()), Code::Unknown, message)
}

#[derive(Debug)]
pub struct RemoteSession {
    ring: RwLock<Ring>,
    settings: RemoteSettings,
    unary_links: Links<UnaryLink>,
    streams: Links<StreamLink>,
    metrics: SessionRpcMetrics,
    /// Sessions are dialled with mutual TLS when set.
    tls: Option<Arc<TlsFiles>>,
    /// Redirects to addresses off the ring are refused (set with TLS). In
    /// plaintext, as teamgram's gateway, any redirect is followed: a session
    /// there is unauthenticated anyway, and a static list may name only an
    /// entry point that redirects to the others.
    members_only: bool,
    /// Streams ask for server messages on themselves when set.
    replies: Option<Replies>,
}

impl RemoteSession {
    pub fn new(members: Vec<String>, settings: RemoteSettings, metrics: SessionRpcMetrics) -> Self {
        metrics.ring_members.set(members.len() as i64);
        Self {
            ring: RwLock::new(Ring::new(members)),
            settings,
            unary_links: Links::new(UnaryLink::is_closed),
            streams: Links::new(StreamLink::is_closed),
            metrics,
            tls: None,
            members_only: false,
            replies: None,
        }
    }

    pub fn with_tls(self, tls: Option<Arc<TlsFiles>>) -> Self {
        Self {
            members_only: tls.is_some(),
            tls,
            ..self
        }
    }

    /// Streams (stream mode) ask their session to send server messages on
    /// them, for `registry`'s connections, rather than through the reverse
    /// path; `count` counts them.
    pub fn with_stream_replies(self, registry: Arc<Registry>, count: Counter) -> Self {
        Self {
            replies: Some(Replies { registry, count }),
            ..self
        }
    }

    /// Replaces the ring membership (static list today; discovery later).
    pub fn set_members(&self, members: Vec<String>) {
        self.metrics.ring_members.set(members.len() as i64);
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Ring::new(members);
    }

    /// The current ring members.
    pub fn members(&self) -> Vec<String> {
        self.ring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .members()
            .to_vec()
    }

    fn is_member(&self, addr: &str) -> bool {
        self.ring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .members()
            .iter()
            .any(|m| m == addr)
    }

    fn owner(&self, key: i64) -> Result<String, SessionError> {
        self.ring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .owner_of_id(key)
            .map(str::to_string)
            .ok_or_else(|| SessionError::Unavailable("no session instances configured".into()))
    }

    /// The open unary link to `addr`, opened if needed.
    async fn unary(&self, addr: &str) -> Result<Arc<UnaryLink>, Failure> {
        self.unary_links
            .get(addr, || {
                let (addr, tls, deadline) = self.link_target(addr);
                async move { UnaryLink::open(&addr, tls.as_ref(), deadline).await }
            })
            .await
    }

    /// The open stream to `addr`, opened if needed.
    async fn stream(&self, addr: &str) -> Result<Arc<StreamLink>, Failure> {
        self.streams
            .get(addr, || {
                let (addr, tls, deadline) = self.link_target(addr);
                let replies = self.replies.clone();
                async move { StreamLink::open(&addr, tls.as_ref(), deadline, replies).await }
            })
            .await
    }

    /// What opening a link to `addr` needs, owned (the opening outlives its
    /// first caller when others wait for it too).
    fn link_target(&self, addr: &str) -> (String, Option<Arc<TlsFiles>>, Duration) {
        (
            addr.to_string(),
            self.tls.clone(),
            self.settings.call_timeout,
        )
    }

    /// One request (encoded as [`StreamLink::call`] takes it) over the stream to
    /// `addr`: the answer, or the failure an error answer carries.
    async fn stream_call(&self, addr: &str, request: Bytes) -> Result<StreamResponse, Failure> {
        stream_answer(self.stream(addr).await?.call(request).await)
    }

    /// One `sendDataToSession` over the stream to `addr`.
    async fn stream_send_data(&self, addr: String, body: Bytes) -> Result<(), Failure> {
        send_data_ack(self.stream_call(&addr, body).await)
    }

    /// A connection's messages over the stream to their owner, queued
    /// together: one ring lookup, one link lookup and one wait for them
    /// all. A message whose first attempt fails goes on alone through
    /// [`RemoteSession::settle`]'s redirects and retries.
    async fn stream_send_data_batch(
        &self,
        data: Vec<SessionClientData>,
    ) -> Vec<Result<(), SessionError>> {
        let Some(ring_key) = data.first().map(|d| d.perm_auth_key_id) else {
            return Vec::new();
        };
        let target = match self.owner(ring_key) {
            Ok(target) if data.iter().all(|d| d.perm_auth_key_id == ring_key) => target,
            // Messages of several keys (a temp key bound meanwhile), or no
            // owner at all: one by one.
            _ => return join_all(data.into_iter().map(|d| self.send_data(d))).await,
        };
        let _in_flight = GaugeGuard::raise(&self.metrics.in_flight, data.len());
        let started = std::time::Instant::now();
        let answers = match self.stream(&target).await {
            Ok(link) => link.call_all(send_data_bodies(&data)).await,
            Err(failure) => vec![Err(failure); data.len()],
        };
        let firsts: Vec<_> = answers
            .into_iter()
            .map(|answer| send_data_ack(stream_answer(answer)))
            .collect();
        let answered = started.elapsed().as_secs_f64();
        {
            let duration = self
                .metrics
                .duration
                .get_or_create(&MethodLabels { method: SEND_DATA });
            firsts
                .iter()
                .filter(|first| first.is_ok())
                .for_each(|_| duration.observe(answered));
        }
        if firsts.iter().all(Result::is_ok) {
            return firsts.into_iter().map(|_| Ok(())).collect();
        }
        // The failed ones go on at once, each on its own (as separate calls
        // would), not one after another's backoff; they are encoded again,
        // which spares every batch that succeeds a copy of its requests.
        let target = &target;
        join_all(data.iter().zip(firsts).map(|(data, first)| async move {
            let failure = match first {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            let body = send_data_body(data);
            let call = |addr| self.stream_send_data(addr, body.clone());
            let outcome = self
                .settle(ring_key, SEND_DATA, call, target.clone(), Err(failure))
                .await;
            self.observe(SEND_DATA, started);
            outcome
        }))
        .await
    }

    fn observe(&self, method: &'static str, started: std::time::Instant) {
        self.metrics
            .duration
            .get_or_create(&MethodLabels { method })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Runs one request against the owner of `ring_key`, following redirects
    /// and retrying transient failures; the whole call is timed.
    async fn route<T, F, Fut>(
        &self,
        ring_key: i64,
        method: &'static str,
        call: F,
    ) -> Result<T, SessionError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let _in_flight = GaugeGuard::new(&self.metrics.in_flight);
        let started = std::time::Instant::now();
        let result = self.route_attempts(ring_key, method, call).await;
        self.observe(method, started);
        result
    }

    async fn route_attempts<T, F, Fut>(
        &self,
        ring_key: i64,
        method: &'static str,
        call: F,
    ) -> Result<T, SessionError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let target = self.owner(ring_key)?;
        let outcome = call(target.clone()).await;
        self.settle(ring_key, method, call, target, outcome).await
    }

    /// Goes on from the outcome of a call to `target`: follows redirects
    /// and retries transient failures with backoff until it succeeds or
    /// gives up.
    async fn settle<T, F, Fut>(
        &self,
        ring_key: i64,
        method: &'static str,
        call: F,
        mut target: String,
        mut outcome: Result<T, Failure>,
    ) -> Result<T, SessionError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let (mut redirects, mut attempt) = (0, 0);
        loop {
            if let Err(Failure::Redirect(addr)) = &outcome {
                if self.members_only && !self.is_member(addr) {
                    warn!(method, session = %target, to = %addr, "refused a redirect to a session that is not a ring member");
                    outcome = Err(Failure::NotMember(addr.clone()));
                }
            }
            if let Err(failure) = &outcome {
                let kind = failure.kind();
                self.metrics
                    .errors
                    .get_or_create(&RpcErrorLabels { method, kind })
                    .inc();
            }
            match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::Unregistered) => return Err(SessionError::AuthKeyUnregistered),
                Err(Failure::Redirect(addr)) if redirects < MAX_REDIRECTS => {
                    debug!(method, from = %target, to = %addr, "session redirect");
                    redirects += 1;
                    target = addr;
                }
                // Sessions bouncing a key between them disagree about the ring
                // for a moment (one has seen a membership change, another not
                // yet): back off and start again from this gateway's ring.
                // This gateway's ring may lag a new member for a moment: back
                // off and ask the ring again, as for a bounce.
                Err(Failure::Redirect(addr) | Failure::NotMember(addr))
                    if attempt < self.settings.retries =>
                {
                    attempt += 1;
                    let delay = self.settings.backoff * (1 << attempt.min(6));
                    warn!(method, session = %target, to = %addr, attempt, "redirects exhausted, retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    redirects = 0;
                    target = self.owner(ring_key)?;
                }
                Err(Failure::Redirect(addr)) => {
                    return Err(SessionError::Redirect(addr));
                }
                Err(Failure::NotMember(addr)) => {
                    return Err(SessionError::Unavailable(format!(
                        "{method} on {target}: redirected to {addr}, not a ring member"
                    )))
                }
                Err(Failure::Transient(msg)) if attempt < self.settings.retries => {
                    attempt += 1;
                    let delay = self.settings.backoff * (1 << attempt.min(6));
                    warn!(method, session = %target, attempt, "transient session error, retrying in {delay:?}: {msg}");
                    tokio::time::sleep(delay).await;
                    // The ring may have changed meanwhile; ask it again unless redirected.
                    if redirects == 0 {
                        target = self.owner(ring_key)?;
                    }
                }
                Err(Failure::Transient(msg) | Failure::Fatal(msg)) => {
                    return Err(SessionError::Unavailable(format!(
                        "{method} on {target}: {msg}"
                    )))
                }
            }
            outcome = call(target.clone()).await;
        }
    }
}

/// A stream answer, with an error answer made the failure it carries.
fn stream_answer(answer: Answer) -> Result<StreamResponse, Failure> {
    match answer? {
        StreamResponse::Error(e) => Err(classify_stream_error(e.code, &e.message)),
        answer => Ok(answer),
    }
}

/// The outcome of a `sendDataToSession` over the stream.
fn send_data_ack(answer: Result<StreamResponse, Failure>) -> Result<(), Failure> {
    match answer? {
        StreamResponse::Ack(ack) => bool_or_stream_ack(ack.success),
        _ => Err(Failure::Fatal("auth key for sendData".into())),
    }
}

fn bool_or_stream_ack(value: bool) -> Result<(), Failure> {
    if value {
        Ok(())
    } else {
        Err(Failure::Fatal("session answered boolFalse".into()))
    }
}

#[async_trait]
impl SessionService for RemoteSession {
    async fn query_auth_key(&self, auth_key_id: i64) -> Result<AuthKeyInfo, SessionError> {
        let request = spb::TlSessionQueryAuthKey {
            constructor: spb::QUERY_AUTH_KEY,
            auth_key_id,
        };
        let streamed = (self.settings.mode == Mode::Stream)
            .then(|| encode_request(StreamRequest::QueryAuthKey(request)));
        let info = self
            .route(auth_key_id, "session_queryAuthKey", |addr| {
                let streamed = streamed.clone();
                async move {
                    match streamed {
                        None => {
                            self.unary(&addr)
                                .await?
                                .call::<pb::AuthKeyInfo>(unary_link::QUERY_AUTH_KEY, &request)
                                .await
                        }
                        Some(body) => match self.stream_call(&addr, body).await? {
                            StreamResponse::AuthKey(info) => Ok(info),
                            _ => Err(Failure::Fatal("ack for queryAuthKey".into())),
                        },
                    }
                }
            })
            .await?;
        info_from_proto(&info).map_err(|e| {
            warn!(auth_key_id, "session returned a corrupt auth key: {e}");
            SessionError::Unavailable(e)
        })
    }

    /// Always unary, as in teamgram.
    async fn set_auth_key(&self, key: &NewAuthKey) -> Result<StoreOutcome, SessionError> {
        let request = spb::TlSessionSetAuthKey {
            constructor: spb::SET_AUTH_KEY,
            auth_key: Some(info_to_proto(&key.info)),
            future_salt: Some(pb::FutureSalt {
                predicate_name: "futureSalt".into(),
                constructor: pb::FUTURE_SALT,
                valid_since: key.first_salt.valid_since,
                valid_until: key.first_salt.valid_until,
                salt: key.first_salt.salt,
            }),
            expires_in: key.expires_in,
        };
        let stored = self
            .route(key.info.id(), "session_setAuthKey", |addr| {
                let request = request.clone();
                async move {
                    self.unary(&addr)
                        .await?
                        .call::<pb::Bool>(unary_link::SET_AUTH_KEY, &request)
                        .await
                        .map(|answer| answer.value())
                }
            })
            .await?;
        // teamgram answers boolFalse when the store refuses the key (e.g. a duplicate id).
        Ok(if stored {
            StoreOutcome::Stored
        } else {
            StoreOutcome::Collision
        })
    }

    async fn send_data(&self, data: SessionClientData) -> Result<(), SessionError> {
        let ring_key = data.perm_auth_key_id;
        match self.settings.mode {
            // Boxed: a unary call's state is larger than a stream call's,
            // and inline it would size every stream-mode message's future
            // too (1.5 KB instead of 1 KB).
            Mode::Unary => {
                let request = &spb::TlSessionSendDataToSession {
                    constructor: spb::SEND_DATA_TO_SESSION,
                    data: Some(data_to_proto(data)),
                };
                Box::pin(self.route(ring_key, SEND_DATA, |addr| async move {
                    let answer = self
                        .unary(&addr)
                        .await?
                        .call::<pb::Bool>(unary_link::SEND_DATA, request)
                        .await?;
                    bool_or_stream_ack(answer.value())
                }))
                .await
            }
            Mode::Stream => {
                let body = send_data_body(&data);
                self.route(ring_key, SEND_DATA, |addr| {
                    self.stream_send_data(addr, body.clone())
                })
                .await
            }
        }
    }

    async fn send_data_batch(&self, data: Vec<SessionClientData>) -> Vec<Result<(), SessionError>> {
        match self.settings.mode {
            Mode::Unary => join_all(data.into_iter().map(|d| self.send_data(d))).await,
            Mode::Stream => self.stream_send_data_batch(data).await,
        }
    }

    async fn close_session(&self, event: SessionClientEvent) -> Result<(), SessionError> {
        let request = spb::TlSessionCloseSession {
            constructor: spb::CLOSE_SESSION,
            client: Some(event_to_proto(&event)),
        };
        let streamed = (self.settings.mode == Mode::Stream)
            .then(|| encode_request(StreamRequest::CloseSession(request.clone())));
        self.route(event.perm_auth_key_id, "session_closeSession", |addr| {
            let request = request.clone();
            let streamed = streamed.clone();
            async move {
                match streamed {
                    None => self
                        .unary(&addr)
                        .await?
                        .call::<pb::Bool>(unary_link::CLOSE_SESSION, &request)
                        .await
                        .map(|_| ()),
                    Some(body) => self.stream_call(&addr, body).await.map(|_| ()),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(retries: usize) -> RemoteSession {
        RemoteSession::new(
            vec!["a:1".into(), "b:1".into()],
            RemoteSettings {
                mode: Mode::Unary,
                call_timeout: Duration::from_secs(1),
                retries,
                backoff: Duration::from_millis(1),
            },
            SessionRpcMetrics::default(),
        )
    }

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_redirect_bounce_backs_off_and_starts_again_from_the_ring() {
        let calls = AtomicU64::new(0);
        // Two sessions disagreeing: every call is redirected until the fourth.
        let route = |retries| {
            let session = remote(retries);
            let calls = &calls;
            async move {
                calls.store(0, Ordering::SeqCst);
                session
                    .route(7, "m", |addr| async move {
                        match calls.fetch_add(1, Ordering::SeqCst) {
                            0..=2 => Err(Failure::Redirect(if addr == "a:1" {
                                "b:1".into()
                            } else {
                                "a:1".into()
                            })),
                            _ => Ok(addr),
                        }
                    })
                    .await
            }
        };
        assert!(route(1).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(matches!(route(0).await, Err(SessionError::Redirect(_))));
    }

    #[tokio::test]
    async fn with_tls_a_redirect_to_a_non_member_is_refused_and_counted() {
        let session = RemoteSession {
            members_only: true,
            ..remote(1)
        };
        let called = Mutex::new(Vec::new());
        let result = session
            .route(7, "m", |addr| {
                called.lock().unwrap().push(addr);
                async { Err::<(), _>(Failure::Redirect("evil:1".into())) }
            })
            .await;
        assert!(matches!(result, Err(SessionError::Unavailable(m)) if m.contains("evil:1")));
        // Never dialled: each attempt went to a member, then back to the ring.
        let called = called.into_inner().unwrap();
        assert_eq!(called.len(), 2);
        assert!(
            called.iter().all(|a| a == "a:1" || a == "b:1"),
            "{called:?}"
        );
        let refused = session
            .metrics
            .errors
            .get_or_create(&RpcErrorLabels {
                method: "m",
                kind: "redirect_refused",
            })
            .get();
        assert_eq!(refused, 2);

        // Plaintext (teamgram's way): followed.
        let called = Mutex::new(Vec::new());
        let _ = remote(0)
            .route(7, "m", |addr| {
                called.lock().unwrap().push(addr);
                async { Err::<(), _>(Failure::Redirect("evil:1".into())) }
            })
            .await;
        assert!(called.into_inner().unwrap().contains(&"evil:1".to_string()));
    }

    #[test]
    fn status_messages_map_to_teamgram_meanings() {
        // teamgram's form (raw 401/700) and the older Unknown form alike.
        for raw in [Some(401), None] {
            assert_eq!(
                classify(raw, Code::Unknown, "AUTH_KEY_UNREGISTERED"),
                Failure::Unregistered
            );
        }
        for raw in [Some(700), None] {
            assert_eq!(
                classify(raw, Code::Unknown, "REDIRECT_TO_10.0.0.2:20120"),
                Failure::Redirect("10.0.0.2:20120".into())
            );
        }
        assert!(matches!(
            classify(None, Code::Unavailable, "x"),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(None, Code::Internal, "x"),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(None, Code::Unknown, "boom"),
            Failure::Fatal(_)
        ));
        // Only AUTH_KEY_UNREGISTERED means -404: other 401s (SESSION_REVOKED…)
        // must not make clients drop their keys.
        assert_eq!(
            classify(Some(401), Code::Unknown, "SESSION_REVOKED"),
            Failure::Fatal("status 401: SESSION_REVOKED".into())
        );
        assert_eq!(
            classify(Some(500), Code::Unknown, "transport error"),
            Failure::Fatal("status 500: transport error".into())
        );
        assert_eq!(
            classify_stream_error(401, "AUTH_KEY_UNREGISTERED"),
            Failure::Unregistered
        );
        assert_eq!(
            classify_stream_error(401, "SESSION_REVOKED"),
            Failure::Fatal("status 401: SESSION_REVOKED".into())
        );
        // teamgram's stream mode answers a failed queryAuthKey with 500 and the Go error text.
        assert_eq!(
            classify_stream_error(
                500,
                "rpc error: code = Code(401) desc = AUTH_KEY_UNREGISTERED"
            ),
            Failure::Unregistered
        );
        assert_eq!(
            classify_stream_error(700, "REDIRECT_TO_a:1"),
            Failure::Redirect("a:1".into())
        );
    }
}
