//! The decisions of one client connection, sans-IO (the model is
//! quinn-proto's `Connection` inside quinn's tokio shell).
//!
//! The shell hands it the bytes it read, the current time, the results of
//! the [`Action`]s it asked for (key lookups, handshake computations, key
//! stores, forwards to the session) and server messages; it takes back bytes
//! to write ([`Connection::transmit`]), actions, [`Event`]s to count and one
//! deadline ([`Connection::poll_timeout`]). Nothing here waits: while an
//! action is outstanding the connection still writes, acknowledges and
//! times out, and the only thing that pauses is reading (while a frame waits
//! for its key or the handshake, or while `forward_window` messages are with
//! the session), so memory per connection stays bounded.

mod envelope;
mod handshake_flow;
mod replies;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rand::{CryptoRng, RngCore};
use thiserror::Error;

pub use envelope::{open, resolve_key, KeyLookup, Opened};
pub use handshake_flow::{client_msg_id_ok, HandshakeAction, HandshakeFlow, HandshakeJob};
pub use replies::MAX_AWAITED;

use crate::authkey::AuthKeyInfo;
use crate::handshake::{HandshakeError, HandshakeSettings, NewAuthKey, StoreOutcome};
use crate::message::{self, MessageError};
use crate::proxy::ProxyError;
use crate::transport::{error_code, InboundFrame, Transport, TransportError};
use replies::Awaited;

/// Bytes asked of the socket per read while a frame is incomplete.
const READ_CHUNK: usize = 16 * 1024;
/// The encoder's buffer grows by at least this much: the replies written
/// together split off one allocation, not one each. It is dropped once
/// everything is written, so idle connections hold none of it. Under 1 KiB
/// with the allocator's header, glibc serves it from its per-thread cache;
/// from 1 KiB on a request first consolidates the allocator's small free
/// chunks, which cost 2% of the gateway's user CPU with one request in flight.
const SCRATCH_CHUNK: usize = 1008;
/// The most a transport adds around a payload (the full transport's length,
/// sequence number and CRC).
const MAX_FRAME_OVERHEAD: usize = 12;

/// A connection's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// From accept until the connection's first valid encrypted message.
    pub handshake_timeout: Duration,
    /// Without traffic in either direction.
    pub idle_timeout: Duration,
    /// Bytes waiting to be written that see no progress for this long close the connection.
    pub write_timeout: Duration,
    pub max_frame_bytes: usize,
    /// Distinct session ids one connection may carry.
    pub max_sessions: usize,
    /// Messages handed to the session and not yet answered; at this many, reading pauses.
    pub forward_window: usize,
    /// Unwritten bytes beyond which the connection takes no more server messages.
    pub max_unsent_bytes: usize,
    /// From a frame's first byte to its last: a client cannot hold a partial
    /// frame (and its buffer) open by trickling bytes.
    pub frame_timeout: Duration,
}

/// The time, as the shell's clock reads it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    /// Since the Unix epoch.
    pub unix: Duration,
}

impl Now {
    pub fn unix_secs(&self) -> i64 {
        self.unix.as_secs() as i64
    }
}

/// What a connection asks of state shared beyond it, answered at once.
pub trait Host {
    /// May this client start another handshake (the per-address rate)?
    fn allow_handshake(&mut self) -> bool;
    /// Takes one of the gateway's slots for handshakes in progress (the
    /// RSA/DH work they can still ask for), held until
    /// [`Host::end_handshake`] or until the connection ends; false when all
    /// are taken.
    fn begin_handshake(&mut self) -> bool;
    /// The handshake that holds a slot ended (key stored or step failed).
    fn end_handshake(&mut self);
    /// This connection now carries (auth_key_id, session_id).
    fn attach_session(&mut self, auth_key_id: i64, session_id: i64) -> Attached;
    /// This connection's buffered input (partial frames) grew by `bytes`:
    /// false when that would pass the gateway-wide budget (nothing is
    /// counted then).
    fn buffer_grew(&mut self, bytes: usize) -> bool;
    /// This connection's buffered input shrank by `bytes`.
    fn buffer_shrank(&mut self, bytes: usize);
}

/// What [`Host::attach_session`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// The session is new to this gateway (teamgram's `conn_type = 1`).
    New,
    /// Another connection here carries it already.
    Known,
    /// The auth key already has this many sessions across the gateway's
    /// connections: the session is not attached.
    KeyFull(usize),
}

/// Why a connection ended.
#[derive(Debug, Error)]
pub enum Close {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("read failed: {0}")]
    Read(std::io::Error),
    #[error("write failed or made no progress within the write timeout")]
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
    #[error("the session does not know auth key {0}")]
    KeyUnregistered(i64),
    #[error("connection bound to auth key {bound} got a message for {got}")]
    KeyChanged { bound: i64, got: i64 },
    #[error("session service: {0}")]
    Session(String),
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
    #[error("the gateway's handshakes in progress are at their limit")]
    HandshakesBusy,
    #[error("the gateway's budget for buffered partial frames is spent")]
    BufferBudget,
    #[error("a started frame was not completed within the frame timeout")]
    FrameTimeout,
    #[error("auth key has {0} sessions across the gateway's connections")]
    KeySessionsFull(usize),
    /// The spec's window for client msg_ids (300 s past, 30 s ahead, a
    /// multiple of 4), applied to the unencrypted handshake messages.
    #[error("unencrypted message with msg_id {msg_id:#x} outside the spec's window or not a multiple of 4")]
    BadPlainMsgId { msg_id: i64 },
}

impl Close {
    /// The `reason` label of `mtproto_connections_closed_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Close::ClientClosed => "client_closed",
            Close::Read(_) => "read_error",
            Close::Write => "write_failed",
            Close::Transport(_) => "transport_error",
            Close::Message(_) => "bad_message",
            Close::Handshake(_) => "handshake_error",
            Close::UnknownKey(_) => "unknown_key",
            Close::ExpiredKey(_) => "expired_key",
            Close::KeyUnregistered(_) => "session_unknown_key",
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
            Close::HandshakesBusy => "handshakes_busy",
            Close::BufferBudget => "buffer_budget",
            Close::FrameTimeout => "frame_timeout",
            Close::KeySessionsFull(_) => "key_sessions_full",
            Close::BadPlainMsgId { .. } => "bad_msg_id",
        }
    }

    /// The transport error code sent before closing, where MTProto has one:
    /// −404 for a key that is truly unknown, −429 for every gateway limit a
    /// client can retry later (the per-address handshake rate, the
    /// gateway-wide handshake and buffer budgets, sessions per key). A bad
    /// handshake msg_id gets none: −404 would make the client drop a key
    /// it may have, −429 would tell it to back off from a flood it did not
    /// cause; it is closed like any other malformed message.
    pub fn code(&self) -> Option<i32> {
        match self {
            Close::UnknownKey(_) | Close::ExpiredKey(_) | Close::KeyUnregistered(_) => {
                Some(error_code::AUTH_KEY_NOT_FOUND)
            }
            Close::HandshakeFlood
            | Close::HandshakesBusy
            | Close::BufferBudget
            | Close::KeySessionsFull(_) => Some(error_code::FLOOD),
            _ => None,
        }
    }
}

/// A decrypted client message for the session (teamgram's
/// `SessionClientData` less what the shell knows: server id and client IP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// 1 when the session is new to this gateway, 2 on HTTP, else 0.
    pub conn_type: i32,
    pub auth_key_id: i64,
    pub key_type: i32,
    pub perm_auth_key_id: i64,
    pub session_id: i64,
    pub salt: i64,
    /// Plaintext from msg_id on, padding included.
    pub payload: Bytes,
}

impl Forward {
    pub fn new(info: &AuthKeyInfo, conn_type: i32, opened: Opened) -> Self {
        Self {
            conn_type,
            auth_key_id: info.id(),
            key_type: info.key_type as i32,
            perm_auth_key_id: info.perm_auth_key_id,
            session_id: opened.session_id,
            salt: opened.salt,
            payload: opened.payload,
        }
    }
}

/// How a forward to the session ended.
#[derive(Debug)]
pub enum Forwarded {
    Accepted,
    /// The session does not know the key (teamgram's `AUTH_KEY_UNREGISTERED`).
    UnknownKey,
    /// Retries are the session client's business; this is after them.
    Failed(String),
}

/// Work the shell runs for the connection; each result comes back through
/// the matching `handle_*` method.
#[derive(Debug)]
pub enum Action {
    /// Find this key (cache, then store or session) → [`Connection::handle_key`].
    LookupKey(i64),
    /// The key expired: drop it from the cache.
    ForgetKey(i64),
    /// Run on a blocking pool → [`Connection::handle_computed`].
    Compute(Box<HandshakeJob>),
    /// Store the new key → [`Connection::handle_stored`].
    StoreKey(NewAuthKey),
    /// Hand to the session, in order → [`Connection::handle_forwarded`].
    Forward(Forward),
}

/// Something to count.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The transport was detected (`abridged`, `obfuscated_intermediate`, …).
    Transport(&'static str),
    HandshakeStep {
        step: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    },
    RsaDecrypt(Duration),
    /// A handshake ended: created, retry, store_failed, failed, flood, timeout.
    Handshake {
        outcome: &'static str,
        elapsed: Option<Duration>,
    },
    QuickAck,
    /// A server message was framed for the client.
    ServerMessage,
}

/// What a connection is waiting for before it reads on.
#[derive(Debug)]
enum Waiting {
    Nothing,
    /// A frame waits for its key (boxed: every connection holds a `Waiting`,
    /// and a frame waits once, for the first key lookup).
    Key(Box<(i64, InboundFrame)>),
    Computation,
    Store,
}

/// Frees an emptied queue's storage: an idle connection holds none.
fn release<T>(queue: &mut VecDeque<T>) {
    if queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}

/// One transport packet to write.
#[derive(Debug)]
struct Packet {
    bytes: Bytes,
    /// It carries a server message (not a QuickAck, handshake reply or error code).
    server_message: bool,
}

/// One client connection (TCP or WebSocket byte stream).
#[derive(Debug)]
pub struct Connection {
    settings: Arc<Settings>,
    handshake_settings: Arc<HandshakeSettings>,
    transport: Transport,
    input: BytesMut,
    /// Boxed: most connections hold a key and no handshake.
    handshake: Option<Box<HandshakeFlow>>,
    key: Option<Arc<AuthKeyInfo>>,
    waiting: Waiting,
    sessions: Vec<i64>,
    forwards_in_flight: usize,
    /// Requests read from the client whose answer has not been framed.
    awaited: Awaited,
    /// The gateway is draining: nothing more is read from the client.
    draining: bool,
    /// Transport packets to write, in order (one WebSocket message each).
    transmit: VecDeque<Packet>,
    /// Server messages dropped from `transmit` by the write timeout.
    abandoned: usize,
    unsent: usize,
    scratch: BytesMut,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    handshake_deadline: Instant,
    idle_deadline: Instant,
    /// Set while bytes wait to be written: the last progress plus the write timeout.
    write_deadline: Option<Instant>,
    /// Set while a frame is incomplete: when it began plus the frame timeout.
    frame_deadline: Option<Instant>,
    /// Input bytes counted against the gateway's buffer budget.
    buffered: usize,
    /// Boxed: set once, at the end, and the reasons are large.
    close: Option<Box<Close>>,
}

impl Connection {
    /// A connection accepted at `now`; `input` holds bytes already read
    /// (after a PROXY header): call [`Connection::handle_input`] with 0 to
    /// process them.
    pub fn new(
        settings: Arc<Settings>,
        handshake_settings: Arc<HandshakeSettings>,
        input: BytesMut,
        now: Instant,
    ) -> Self {
        Self {
            transport: Transport::new(settings.max_frame_bytes),
            input,
            handshake: None,
            key: None,
            waiting: Waiting::Nothing,
            sessions: Vec::new(),
            forwards_in_flight: 0,
            awaited: Awaited::default(),
            draining: false,
            transmit: VecDeque::new(),
            abandoned: 0,
            unsent: 0,
            scratch: BytesMut::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            handshake_deadline: now + settings.handshake_timeout,
            idle_deadline: now + settings.idle_timeout,
            write_deadline: None,
            frame_deadline: None,
            buffered: 0,
            close: None,
            settings,
            handshake_settings,
        }
    }

    /// The key this connection is bound to.
    pub fn key(&self) -> Option<&Arc<AuthKeyInfo>> {
        self.key.as_ref()
    }

    /// The session ids this connection carries.
    pub fn sessions(&self) -> &[i64] {
        &self.sessions
    }

    /// Why the connection is closing, once it is: the shell writes what is
    /// left in [`Connection::transmit`] (bounded by the write timeout) and ends.
    pub fn closing(&self) -> Option<&Close> {
        self.close.as_deref()
    }

    /// Takes the close reason, when closing.
    pub fn take_close(&mut self) -> Option<Close> {
        self.close.take().map(|close| *close)
    }

    /// The shell should read: nothing is pending that the next frame must
    /// wait for, and the gateway is not draining.
    pub fn wants_read(&self) -> bool {
        self.can_decode() && !self.draining
    }

    /// The next frame already read may be handled.
    fn can_decode(&self) -> bool {
        self.close.is_none()
            && matches!(self.waiting, Waiting::Nothing)
            && self.forwards_in_flight < self.settings.forward_window
    }

    /// The gateway drains: read nothing more from the client (it resends
    /// what it gets no answer to on its next connection), but handle the
    /// frames already read and deliver their answers.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Draining, and nothing is left to deliver: every request read has its
    /// answer framed, nothing is with the session or waits for a key, and
    /// everything framed is written. (A handshake in progress is dropped:
    /// the client starts it again elsewhere.)
    pub fn drained(&self) -> bool {
        self.draining
            && self.forwards_in_flight == 0
            && self.awaited.is_empty()
            && self.transmit.is_empty()
            && !matches!(self.waiting, Waiting::Key(..))
    }

    /// Requests read from the client whose answer was never framed.
    pub fn awaited_replies(&self) -> usize {
        self.awaited.len()
    }

    /// A server message for this connection that will not be written (the
    /// connection closes first): it is counted as such, so its request no
    /// longer counts as awaiting an answer.
    pub fn undeliverable(&mut self, plaintext: &[u8]) {
        self.awaited.on_server_message(plaintext);
    }

    /// Server messages framed and not completely written (queued, or
    /// given up when a write made no progress).
    pub fn unwritten_server_messages(&self) -> usize {
        self.abandoned + self.transmit.iter().filter(|p| p.server_message).count()
    }

    /// The shell may hand over another server message.
    pub fn accepts_server_messages(&self) -> bool {
        self.close.is_none() && self.unsent < self.settings.max_unsent_bytes
    }

    /// `read` new bytes are in the input buffer (0 to process what is there).
    pub fn handle_input(
        &mut self,
        read: usize,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        if read > 0 {
            self.idle_deadline = now.instant + self.settings.idle_timeout;
        }
        self.process(now, host, rng);
    }

    /// Decodes and handles frames until one must wait or the input runs out,
    /// then accounts for what is left buffered.
    fn process(&mut self, now: Now, host: &mut impl Host, rng: &mut (impl RngCore + CryptoRng)) {
        let mut decoded = false;
        while self.can_decode() {
            let detecting = self.transport.name().is_none();
            let frame = self.transport.decode(&mut self.input);
            if let Some(name) = self.transport.name().filter(|_| detecting) {
                self.events.push_back(Event::Transport(name));
            }
            match frame {
                Ok(Some(frame)) => {
                    decoded = true;
                    self.on_frame(frame, now, host, rng);
                }
                Ok(None) => break,
                Err(e) => self.close_with(Close::Transport(e), now, rng),
            }
        }
        if self.input.is_empty() {
            self.frame_deadline = None;
            // A connection between frames holds no read buffer.
            self.input = BytesMut::new();
        } else if decoded || self.frame_deadline.is_none() {
            // What is left is the start of the next frame.
            self.frame_deadline = Some(now.instant + self.settings.frame_timeout);
        }
        self.account_buffered(now, host, rng);
    }

    /// Brings the gateway's count of buffered input up to date; a
    /// connection whose growth the budget cannot take is closed (only it).
    fn account_buffered(&mut self, now: Now, host: &mut impl Host, rng: &mut impl RngCore) {
        let held = if self.close.is_some() {
            0
        } else {
            self.input.len()
        };
        if held > self.buffered {
            if !host.buffer_grew(held - self.buffered) {
                self.close_with(Close::BufferBudget, now, rng);
                return self.account_buffered(now, host, rng);
            }
        } else if held < self.buffered {
            host.buffer_shrank(self.buffered - held);
        }
        self.buffered = held;
    }

    fn on_frame(
        &mut self,
        frame: InboundFrame,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        match message::auth_key_id(&frame.payload) {
            Err(e) => self.close_with(e.into(), now, rng),
            Ok(0) => self.on_plain(frame, now, host, rng),
            Ok(auth_key_id) => self.on_encrypted(auth_key_id, frame, now, host, rng),
        }
    }

    fn on_plain(
        &mut self,
        frame: InboundFrame,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let plain = match message::parse_plain(&frame.payload, frame.padded) {
            Ok(plain) => plain,
            Err(e) => return self.close_with(e.into(), now, rng),
        };
        let settings = &self.handshake_settings;
        let flow = self
            .handshake
            .get_or_insert_with(|| Box::new(HandshakeFlow::new(settings.clone())));
        let action = flow.on_message(plain.msg_id, plain.body, now, host, rng, &mut self.events);
        self.on_handshake_action(action, now, rng);
    }

    fn on_handshake_action(
        &mut self,
        action: Result<HandshakeAction, Close>,
        now: Now,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        match action {
            Err(close) => self.close_with(close, now, rng),
            Ok(HandshakeAction::Nothing) => {}
            Ok(HandshakeAction::Reply(msg)) => self.send_frame(&msg, now, rng),
            Ok(HandshakeAction::Compute(job)) => {
                self.waiting = Waiting::Computation;
                self.actions.push_back(Action::Compute(job));
            }
            Ok(HandshakeAction::Store(key)) => {
                self.waiting = Waiting::Store;
                self.actions.push_back(Action::StoreKey(key));
            }
        }
    }

    /// The key is looked up once, then bound. A temp key that is still
    /// unbound is looked up again for every message, so the connection that
    /// sent `auth.bindTempAuthKey` forwards the perm key id as soon as the
    /// binding is stored.
    fn on_encrypted(
        &mut self,
        auth_key_id: i64,
        frame: InboundFrame,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        match &self.key {
            Some(key) if key.id() != auth_key_id => {
                let bound = key.id();
                self.close_with(
                    Close::KeyChanged {
                        bound,
                        got: auth_key_id,
                    },
                    now,
                    rng,
                );
            }
            Some(key) if key.is_expired(now.unix_secs()) => {
                self.actions.push_back(Action::ForgetKey(auth_key_id));
                self.close_with(Close::ExpiredKey(auth_key_id), now, rng);
            }
            Some(key) if !key.is_unbound_temp() => {
                let key = key.clone();
                self.decrypt_and_forward(&key, frame, now, host, rng);
            }
            _ => {
                self.waiting = Waiting::Key(Box::new((auth_key_id, frame)));
                self.actions.push_back(Action::LookupKey(auth_key_id));
            }
        }
    }

    fn decrypt_and_forward(
        &mut self,
        info: &Arc<AuthKeyInfo>,
        frame: InboundFrame,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let opened = match open(info, frame.payload, frame.padded) {
            Ok(opened) => opened,
            Err(close) => return self.close_with(close, now, rng),
        };
        // A QuickAck is a courtesy: none for a client that leaves the
        // transmit budget unread, or sending acked frames would queue
        // 4 bytes per frame without bound.
        if frame.quick_ack
            && self.unsent < self.settings.max_unsent_bytes
            && self
                .transport
                .encode_quick_ack(opened.quick_ack_token, &mut self.scratch)
        {
            self.push_transmit(now);
            self.events.push_back(Event::QuickAck);
        }
        let session_id = opened.session_id;
        let conn_type = if self.sessions.contains(&session_id) {
            0
        } else {
            if self.sessions.len() >= self.settings.max_sessions {
                let count = self.sessions.len();
                return self.close_with(Close::TooManySessions(count), now, rng);
            }
            match host.attach_session(info.id(), session_id) {
                Attached::New => {
                    self.sessions.push(session_id);
                    1
                }
                Attached::Known => {
                    self.sessions.push(session_id);
                    0
                }
                Attached::KeyFull(count) => {
                    return self.close_with(Close::KeySessionsFull(count), now, rng)
                }
            }
        };
        self.awaited.on_client_message(&opened.payload);
        self.forwards_in_flight += 1;
        self.actions
            .push_back(Action::Forward(Forward::new(info, conn_type, opened)));
    }

    /// The answer to [`Action::LookupKey`].
    pub fn handle_key(
        &mut self,
        lookup: KeyLookup,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        let Waiting::Key(waiting) = std::mem::replace(&mut self.waiting, Waiting::Nothing) else {
            return;
        };
        let (auth_key_id, frame) = *waiting;
        if self.close.is_some() {
            return;
        }
        match resolve_key(auth_key_id, lookup, self.key.as_ref(), now.unix_secs()) {
            Ok(info) => {
                if self.key.is_none() {
                    if let Some(mut flow) = self.handshake.take() {
                        flow.release(host);
                    }
                }
                self.key = Some(info.clone());
                self.decrypt_and_forward(&info, frame, now, host, rng);
            }
            Err(close) => {
                if matches!(close, Close::ExpiredKey(_)) {
                    self.actions.push_back(Action::ForgetKey(auth_key_id));
                }
                self.close_with(close, now, rng);
            }
        }
        self.process(now, host, rng);
    }

    /// The answer to [`Action::Compute`].
    pub fn handle_computed(
        &mut self,
        job: Box<HandshakeJob>,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        if !matches!(self.waiting, Waiting::Computation) || self.close.is_some() {
            return;
        }
        self.waiting = Waiting::Nothing;
        let Some(flow) = self.handshake.as_mut() else {
            return;
        };
        let action = flow.on_computed(job, now, host, &mut self.events);
        self.on_handshake_action(action, now, rng);
        self.process(now, host, rng);
    }

    /// The answer to [`Action::StoreKey`].
    pub fn handle_stored(
        &mut self,
        outcome: StoreOutcome,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        if !matches!(self.waiting, Waiting::Store) || self.close.is_some() {
            return;
        }
        self.waiting = Waiting::Nothing;
        let Some(flow) = self.handshake.as_mut() else {
            return;
        };
        let action = flow.on_stored(outcome, now, host, &mut self.events);
        self.on_handshake_action(action, now, rng);
        self.process(now, host, rng);
    }

    /// The answer to one [`Action::Forward`], in the order they were asked.
    pub fn handle_forwarded(
        &mut self,
        outcome: Forwarded,
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
    ) {
        self.forwards_in_flight = self.forwards_in_flight.saturating_sub(1);
        match outcome {
            Forwarded::Accepted => {}
            Forwarded::UnknownKey => {
                let id = self.key.as_ref().map_or(0, |k| k.id());
                self.close_with(Close::KeyUnregistered(id), now, rng);
            }
            Forwarded::Failed(e) => self.close_with(Close::Session(e), now, rng),
        }
        self.process(now, host, rng);
    }

    /// Encrypts one server message (plaintext from the salt on) for this
    /// connection's key and queues it. False when it cannot take it (no key,
    /// closing); the caller checks [`Connection::accepts_server_messages`] first.
    pub fn send_server_message(
        &mut self,
        plaintext: &[u8],
        now: Now,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> bool {
        let Some(info) = &self.key else { return false };
        if self.close.is_some() {
            return false;
        }
        let len = message::encrypted_len(plaintext.len());
        // The frames split off one buffer until it is full; a new one has
        // room for this frame and, at small sizes, the next few.
        let room = len + MAX_FRAME_OVERHEAD;
        if self.scratch.capacity() - self.scratch.len() < room {
            self.scratch.reserve(room.max(SCRATCH_CHUNK));
        }
        let key = &info.key;
        self.transport
            .encode_frame_with(len, &mut self.scratch, rng, |out, rng| {
                message::encrypt(key, plaintext, out, rng)
            });
        self.push_packet(now, true);
        self.awaited.on_server_message(plaintext);
        self.idle_deadline = now.instant + self.settings.idle_timeout;
        self.events.push_back(Event::ServerMessage);
        true
    }

    fn send_frame(&mut self, payload: &[u8], now: Now, rng: &mut impl RngCore) {
        self.transport.encode_frame(payload, &mut self.scratch, rng);
        self.push_transmit(now);
    }

    /// Moves what was encoded into `scratch` onto the transmit queue as one packet.
    fn push_transmit(&mut self, now: Now) {
        self.push_packet(now, false);
    }

    fn push_packet(&mut self, now: Now, server_message: bool) {
        if self.scratch.is_empty() {
            return;
        }
        let bytes = self.scratch.split().freeze();
        if self.transmit.is_empty() {
            self.write_deadline = Some(now.instant + self.settings.write_timeout);
        }
        self.unsent += bytes.len();
        self.transmit.push_back(Packet {
            bytes,
            server_message,
        });
    }

    /// The buffer to read into, and the bytes to write as slices in order, up
    /// to `out.len()` packets: a vectored write sends them in one system
    /// call; a WebSocket sends the first as one message. Returns how many
    /// slices were filled.
    pub fn io_buffers<'a>(&'a mut self, out: &mut [IoSlice<'a>]) -> (&'a mut BytesMut, usize) {
        // Between frames the buffer has no room (the shell reads the next
        // bytes into one of its own); a partial frame gets room to grow.
        if !self.input.is_empty() && self.input.capacity() - self.input.len() < READ_CHUNK / 4 {
            self.input.reserve(READ_CHUNK);
        }
        let mut n = 0;
        for (slot, packet) in out.iter_mut().zip(&self.transmit) {
            *slot = IoSlice::new(&packet.bytes);
            n += 1;
        }
        (&mut self.input, n)
    }

    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// `n` bytes of [`Connection::transmit`] were written; returns how
    /// many server messages that completed.
    pub fn handle_written(&mut self, mut n: usize, now: Instant) -> usize {
        self.unsent = self.unsent.saturating_sub(n);
        let mut server_messages = 0;
        while n > 0 {
            let Some(front) = self.transmit.front_mut() else {
                break;
            };
            if n < front.bytes.len() {
                front.bytes.advance(n);
                break;
            }
            n -= front.bytes.len();
            server_messages += usize::from(front.server_message);
            self.transmit.pop_front();
        }
        self.write_deadline =
            (!self.transmit.is_empty()).then(|| now + self.settings.write_timeout);
        if self.transmit.is_empty() {
            release(&mut self.transmit);
            // The encoder's leftover room keeps the last packet's allocation alive.
            self.scratch = BytesMut::new();
        }
        server_messages
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front();
        if action.is_none() {
            release(&mut self.actions);
        }
        action
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front();
        if event.is_none() {
            release(&mut self.events);
        }
        event
    }

    /// The next deadline; call [`Connection::handle_timeout`] when it passes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.close.is_some() {
            return self.write_deadline;
        }
        let handshake = self.key.is_none().then_some(self.handshake_deadline);
        // A frame that waits because this side paused reading is not late.
        let frame = self.frame_deadline.filter(|_| self.wants_read());
        [
            Some(self.idle_deadline),
            handshake,
            self.write_deadline,
            frame,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle_timeout(&mut self, now: Now, rng: &mut (impl RngCore + CryptoRng)) {
        let at = now.instant;
        if self.write_deadline.is_some_and(|d| d <= at) {
            // Nothing more can be written: give up on what is queued.
            self.abandoned += self.transmit.iter().filter(|p| p.server_message).count();
            self.transmit.clear();
            self.unsent = 0;
            self.write_deadline = None;
            if self.close.is_none() {
                self.close = Some(Box::new(Close::Write));
            }
            return;
        }
        if self.key.is_none() && self.handshake_deadline <= at {
            self.close_with(Close::HandshakeTimeout, now, rng);
        } else if self.wants_read() && self.frame_deadline.is_some_and(|d| d <= at) {
            self.close_with(Close::FrameTimeout, now, rng);
        } else if self.idle_deadline <= at {
            self.close_with(Close::IdleTimeout, now, rng);
        }
    }

    /// The shell ends the connection (client closed, read error, drain).
    pub fn close(&mut self, reason: Close, now: Now, rng: &mut (impl RngCore + CryptoRng)) {
        self.close_with(reason, now, rng);
    }

    fn close_with(&mut self, reason: Close, now: Now, rng: &mut impl RngCore) {
        if self.close.is_some() {
            return;
        }
        if matches!(reason, Close::HandshakeTimeout)
            && self.handshake.as_ref().is_some_and(|h| h.started())
        {
            self.events.push_back(Event::Handshake {
                outcome: "timeout",
                elapsed: None,
            });
        }
        if let Some(code) = reason.code() {
            self.transport.encode_error(code, &mut self.scratch, rng);
            self.push_transmit(now);
        }
        self.waiting = Waiting::Nothing;
        self.close = Some(Box::new(reason));
    }
}
