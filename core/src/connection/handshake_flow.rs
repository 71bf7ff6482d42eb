//! One handshake as a connection drives it: the client msg_id rule of
//! unencrypted messages, the per-address rate and the gateway-wide slot on
//! `req_pq`, which steps are heavy (RSA, 2048-bit DH) and leave the caller's
//! thread, the step and outcome events, storing the new key, and the msg_ids
//! of the unencrypted replies. Used by stream connections and by the HTTP
//! transport (where each step may come on another TCP connection).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{CryptoRng, RngCore};

use super::{Close, Event, Host, Now};
use crate::handshake::{
    Handshake, HandshakeError, HandshakeSettings, NewAuthKey, Step, StoreOutcome,
};
use crate::message;
use crate::tl::id;

/// What a handshake message asks of the caller.
#[derive(Debug)]
pub enum HandshakeAction {
    /// Send this unencrypted message (msg_id and envelope included).
    Reply(Vec<u8>),
    /// Run this step off the connection's thread, then hand it to
    /// [`HandshakeFlow::on_computed`].
    Compute(Box<HandshakeJob>),
    /// Store this key, then call [`HandshakeFlow::on_stored`].
    Store(NewAuthKey),
    /// Nothing to send (e.g. `msgs_ack` during the handshake).
    Nothing,
}

/// A heavy handshake step (RSA private operation, DH modexps), packaged so
/// that the shell can run it on a blocking pool.
#[derive(Debug)]
pub struct HandshakeJob {
    handshake: Handshake,
    body: Vec<u8>,
    unix_secs: i64,
    step: &'static str,
    started: Instant,
    result: Option<Result<Step, HandshakeError>>,
}

impl HandshakeJob {
    /// Does the step's work.
    pub fn run(&mut self, rng: &mut (impl RngCore + CryptoRng)) {
        self.result = Some(self.handshake.on_message(&self.body, self.unix_secs, rng));
    }
}

/// The state of one handshake between its messages.
#[derive(Debug)]
pub struct HandshakeFlow {
    /// `None` while a [`HandshakeJob`] holds it.
    handshake: Option<Handshake>,
    /// When this handshake's `req_pq` came.
    started: Option<Instant>,
    /// Holds one of the host's slots for handshakes in progress.
    slot: bool,
    last_msg_id: i64,
}

/// How far a client msg_id's time may lie behind and ahead of the server's
/// clock (the spec's window for client messages).
const MSG_ID_PAST_SECS: i64 = 300;
const MSG_ID_FUTURE_SECS: i64 = 30;

/// The spec's rule for a client msg_id: a multiple of 4 whose upper half,
/// Unix seconds, is within the window around `unix_secs`. 0 passes as "not
/// given": grammers sends it in every unencrypted message, and Telegram's
/// servers accept that.
pub fn client_msg_id_ok(msg_id: i64, unix_secs: i64) -> bool {
    let secs = msg_id >> 32;
    msg_id == 0
        || (msg_id % 4 == 0
            && secs >= unix_secs - MSG_ID_PAST_SECS
            && secs <= unix_secs + MSG_ID_FUTURE_SECS)
}

fn step_name(constructor: Option<u32>) -> &'static str {
    match constructor {
        Some(id::REQ_PQ | id::REQ_PQ_MULTI) => "req_pq",
        Some(id::REQ_DH_PARAMS) => "req_DH_params",
        Some(id::SET_CLIENT_DH_PARAMS) => "set_client_DH_params",
        _ => "other",
    }
}

impl HandshakeFlow {
    pub fn new(settings: Arc<HandshakeSettings>) -> Self {
        Self {
            handshake: Some(Handshake::new(settings)),
            started: None,
            slot: false,
            last_msg_id: 0,
        }
    }

    /// A `req_pq` was accepted: a timeout now counts as an abandoned handshake.
    pub fn started(&self) -> bool {
        self.started.is_some()
    }

    /// The key is stored and the client told `dh_gen_ok`.
    pub fn is_done(&self) -> bool {
        self.handshake
            .as_ref()
            .is_some_and(|h| h.state_name() == "done")
    }

    /// Gives back the host's slot, if this handshake holds one.
    pub fn release(&mut self, host: &mut impl Host) {
        if std::mem::take(&mut self.slot) {
            host.end_handshake();
        }
    }

    /// Handles one unencrypted message (its msg_id and body).
    pub fn on_message(
        &mut self,
        msg_id: i64,
        body: &[u8],
        now: Now,
        host: &mut impl Host,
        rng: &mut (impl RngCore + CryptoRng),
        events: &mut VecDeque<Event>,
    ) -> Result<HandshakeAction, Close> {
        let constructor = Handshake::constructor(body);
        let step = step_name(constructor);
        if !client_msg_id_ok(msg_id, now.unix_secs()) {
            events.push_back(Event::HandshakeStep {
                step,
                outcome: "bad_msg_id",
                elapsed: Duration::ZERO,
            });
            return Err(Close::BadPlainMsgId { msg_id });
        }
        if step == "req_pq" {
            if !host.allow_handshake() {
                events.push_back(Event::Handshake {
                    outcome: "flood",
                    elapsed: None,
                });
                return Err(Close::HandshakeFlood);
            }
            // A handshake restarted on the same connection keeps its slot.
            if !self.slot && !host.begin_handshake() {
                events.push_back(Event::Handshake {
                    outcome: "busy",
                    elapsed: None,
                });
                return Err(Close::HandshakesBusy);
            }
            self.slot = true;
            self.started = Some(now.instant);
        }
        let Some(mut handshake) = self.handshake.take() else {
            return Err(HandshakeError::OutOfOrder(step, "computing").into());
        };
        if matches!(step, "req_DH_params" | "set_client_DH_params") {
            return Ok(HandshakeAction::Compute(Box::new(HandshakeJob {
                handshake,
                body: body.to_vec(),
                unix_secs: now.unix_secs(),
                step,
                started: now.instant,
                result: None,
            })));
        }
        let result = handshake.on_message(body, now.unix_secs(), rng);
        self.handshake = Some(handshake);
        self.step_done(step, Duration::ZERO, result, now, host, events)
    }

    /// Takes back a step that ran off the connection's thread.
    pub fn on_computed(
        &mut self,
        job: Box<HandshakeJob>,
        now: Now,
        host: &mut impl Host,
        events: &mut VecDeque<Event>,
    ) -> Result<HandshakeAction, Close> {
        let HandshakeJob {
            mut handshake,
            step,
            started,
            result,
            ..
        } = *job;
        if let Some(rsa) = handshake.take_rsa_decrypt_time() {
            events.push_back(Event::RsaDecrypt(rsa));
        }
        self.handshake = Some(handshake);
        let result = result.unwrap_or(Err(HandshakeError::OutOfOrder(step, "not computed")));
        let elapsed = now.instant.saturating_duration_since(started);
        self.step_done(step, elapsed, result, now, host, events)
    }

    fn step_done(
        &mut self,
        step: &'static str,
        elapsed: Duration,
        result: Result<Step, HandshakeError>,
        now: Now,
        host: &mut impl Host,
        events: &mut VecDeque<Event>,
    ) -> Result<HandshakeAction, Close> {
        events.push_back(Event::HandshakeStep {
            step,
            outcome: result
                .as_ref()
                .map_or_else(HandshakeError::reason, |_| "ok"),
            elapsed,
        });
        match result {
            Err(e) => {
                events.push_back(Event::Handshake {
                    outcome: "failed",
                    elapsed: None,
                });
                self.release(host);
                Err(e.into())
            }
            Ok(Step::Nothing) => Ok(HandshakeAction::Nothing),
            Ok(Step::Reply(body)) => Ok(HandshakeAction::Reply(self.plain_reply(&body, now))),
            Ok(Step::StoreKey(key)) => Ok(HandshakeAction::Store(key)),
        }
    }

    /// Answers the client once the new key's fate is known.
    pub fn on_stored(
        &mut self,
        outcome: StoreOutcome,
        now: Now,
        host: &mut impl Host,
        events: &mut VecDeque<Event>,
    ) -> Result<HandshakeAction, Close> {
        if outcome != StoreOutcome::Collision {
            // Stored, or failed for good: no more work for this handshake.
            self.release(host);
        }
        let elapsed = match outcome {
            StoreOutcome::Stored => self
                .started
                .take()
                .map(|started| now.instant.saturating_duration_since(started)),
            _ => None,
        };
        events.push_back(Event::Handshake {
            outcome: match outcome {
                StoreOutcome::Stored => "created",
                StoreOutcome::Collision => "retry",
                StoreOutcome::Failed => "store_failed",
            },
            elapsed,
        });
        let Some(handshake) = self.handshake.as_mut() else {
            return Err(HandshakeError::OutOfOrder("store result", "computing").into());
        };
        let body = handshake.on_store_result(outcome)?;
        Ok(HandshakeAction::Reply(self.plain_reply(&body, now)))
    }

    /// An unencrypted reply with a server msg_id after the last one.
    fn plain_reply(&mut self, body: &[u8], now: Now) -> Vec<u8> {
        self.last_msg_id = message::next_server_msg_id(
            self.last_msg_id,
            now.unix_secs(),
            now.unix.subsec_nanos(),
            true,
        );
        message::encode_plain(self.last_msg_id, body)
    }
}
