//! The reference session's answers to MTProto service messages, as pure
//! functions: given one client message, what to send back.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::Read;

use rand::RngCore;

use crate::authkey::FutureSalt;
use crate::tl::{date, id, TlReader, TlWrite};

/// Client msg_ids more than this many seconds in the past are refused (code 16).
const MSG_ID_TOO_OLD_SECS: i64 = 300;
/// ... or in the future (code 17).
const MSG_ID_TOO_NEW_SECS: i64 = 30;
/// Default of [`Context::max_unpacked_bytes`]: MTProto's usual frame limit.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 1 << 20;
/// At most this many salts per `get_future_salts`.
pub const MAX_FUTURE_SALTS: i32 = 64;
/// Salt validity window.
pub const SALT_PERIOD_SECS: i64 = 1800;
/// The message API calls get until a real session service is connected.
pub const API_NOT_SERVED: &str = "API_METHOD_NOT_SERVED_BY_REFERENCE_SESSION";
/// Telegram's answer to API calls on a temp key not bound to a perm key yet.
pub const PERM_EMPTY: &str = "AUTH_KEY_PERM_EMPTY";

/// One message to send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub body: Vec<u8>,
    /// Content-related messages take odd seq_nos and need an ack.
    pub content_related: bool,
    /// Answers a client message (server msg_id ≡ 1 mod 4) or not (≡ 3 mod 4).
    pub is_response: bool,
}

/// What the session decided about one client message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub replies: Vec<Reply>,
    /// Future salts promised to the client, to be stored.
    pub new_salts: Vec<FutureSalt>,
    /// `destroy_session` calls (msg_id, session id) for other sessions of
    /// the key: the session forgets the target and answers with
    /// [`destroy_session_result`].
    pub destroy_sessions: Vec<(i64, i64)>,
    /// `auth.bindTempAuthKey` calls (msg_id, body) for the session to verify
    /// against its store and answer.
    pub binds: Vec<(i64, Vec<u8>)>,
}

/// Checks a client msg_id (spec "bad_msg_notification" codes 16, 17, 18).
pub fn check_msg_id(msg_id: i64, now: i64) -> Result<(), i32> {
    if msg_id % 4 != 0 {
        return Err(18);
    }
    let secs = msg_id >> 32;
    if secs < now - MSG_ID_TOO_OLD_SECS {
        return Err(16);
    }
    if secs > now + MSG_ID_TOO_NEW_SECS {
        return Err(17);
    }
    Ok(())
}

pub fn bad_server_salt(bad_msg_id: i64, bad_seq_no: i32, new_salt: i64) -> Reply {
    let mut b = Vec::with_capacity(28);
    b.put_u32(id::BAD_SERVER_SALT);
    b.put_i64(bad_msg_id);
    b.put_i32(bad_seq_no);
    b.put_i32(48);
    b.put_i64(new_salt);
    Reply {
        body: b,
        content_related: false,
        is_response: true,
    }
}

pub fn bad_msg_notification(bad_msg_id: i64, bad_seq_no: i32, code: i32) -> Reply {
    let mut b = Vec::with_capacity(20);
    b.put_u32(id::BAD_MSG_NOTIFICATION);
    b.put_i64(bad_msg_id);
    b.put_i32(bad_seq_no);
    b.put_i32(code);
    Reply {
        body: b,
        content_related: false,
        is_response: true,
    }
}

pub fn new_session_created(first_msg_id: i64, unique_id: i64, server_salt: i64) -> Reply {
    let mut b = Vec::with_capacity(28);
    b.put_u32(id::NEW_SESSION_CREATED);
    b.put_i64(first_msg_id);
    b.put_i64(unique_id);
    b.put_i64(server_salt);
    Reply {
        body: b,
        content_related: true,
        is_response: false,
    }
}

pub fn rpc_result(req_msg_id: i64, result: &[u8]) -> Reply {
    let mut b = Vec::with_capacity(12 + result.len());
    b.put_u32(id::RPC_RESULT);
    b.put_i64(req_msg_id);
    b.put_raw(result);
    Reply {
        body: b,
        content_related: true,
        is_response: true,
    }
}

pub fn rpc_error(req_msg_id: i64, code: i32, message: &str) -> Reply {
    let mut e = Vec::new();
    e.put_u32(id::RPC_ERROR);
    e.put_i32(code);
    e.put_bytes(message.as_bytes());
    rpc_result(req_msg_id, &e)
}

/// What the session knows about the key and time a message arrived with.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub session_id: i64,
    pub now: i64,
    /// The salt the client should use now.
    pub current_salt: i64,
    /// A temp key not bound to a perm key yet: only service messages and the bind work.
    pub unbound_temp_key: bool,
    /// What all the `gzip_packed` of one client message may inflate to
    /// together, so a small frame cannot expand into an unbounded
    /// allocation; the gateway passes its `limits.max_frame_bytes`.
    pub max_unpacked_bytes: u64,
}

/// Answers one client message (already past the salt and time checks of
/// [`check_msg_id`]): it and each message of a container first pass the
/// session's [`MsgWindow`], then get their answers.
pub fn respond(
    msg_id: i64,
    seq_no: i32,
    body: &[u8],
    ctx: &Context,
    window: &mut MsgWindow,
    rng: &mut impl RngCore,
) -> Outcome {
    let mut out = Outcome::default();
    let mut unpack_budget = ctx.max_unpacked_bytes;
    let Some(body) = unpack(body, &mut unpack_budget) else {
        return out;
    };
    if constructor(&body) != Some(id::MSG_CONTAINER) {
        if admit(&mut out, window, msg_id, seq_no, &body, false) {
            answer(&mut out, msg_id, &body, ctx, rng);
        }
        return out;
    }
    if !admit(&mut out, window, msg_id, seq_no, &body, true) {
        return out;
    }
    let mut r = TlReader::new(&body[4..]);
    let Ok(count) = r.u32() else { return out };
    for _ in 0..count.min(MAX_CONTAINER_MESSAGES) {
        let (Ok(inner_id), Ok(inner_seq), Ok(len)) = (r.i64(), r.i32(), r.u32()) else {
            return out;
        };
        let Ok(inner) = r.take(len as usize) else {
            return out;
        };
        let Some(inner) = unpack(inner, &mut unpack_budget) else {
            continue;
        };
        if constructor(&inner) == Some(id::MSG_CONTAINER) {
            out.replies
                .push(bad_msg_notification(inner_id, inner_seq, INVALID_CONTAINER));
        } else if admit(&mut out, window, inner_id, inner_seq, &inner, false) {
            answer(&mut out, inner_id, &inner, ctx, rng);
        }
    }
    out
}

/// At most this many messages of one container are read.
const MAX_CONTAINER_MESSAGES: u32 = 1024;
/// `bad_msg_notification` code for a container inside a container.
const INVALID_CONTAINER: i32 = 64;

fn constructor(body: &[u8]) -> Option<u32> {
    TlReader::new(body).u32().ok()
}

/// The body with a `gzip_packed` unwrapped; what it inflates to is taken from
/// `budget`, one budget per client message (a container of 1024 small
/// bombs would otherwise inflate 1024 times over). `None` for corrupt gzip.
fn unpack<'a>(body: &'a [u8], budget: &mut u64) -> Option<Cow<'a, [u8]>> {
    let mut r = TlReader::new(body);
    if r.u32() != Ok(id::GZIP_PACKED) {
        return Some(Cow::Borrowed(body));
    }
    let packed = r.bytes().ok()?;
    let mut unpacked = Vec::new();
    let read = flate2::read::GzDecoder::new(packed)
        .take(*budget)
        .read_to_end(&mut unpacked);
    *budget = budget.saturating_sub(unpacked.len() as u64);
    read.ok().map(|_| Cow::Owned(unpacked))
}

/// Puts one message through the window; a refusal is answered here
/// (a duplicate is dropped without an answer, as the spec's security
/// guidelines say).
fn admit(
    out: &mut Outcome,
    window: &mut MsgWindow,
    msg_id: i64,
    seq_no: i32,
    body: &[u8],
    container: bool,
) -> bool {
    let relevance = constructor(body).map_or(Relevance::Either, relevance);
    match window.admit(msg_id, seq_no, container, relevance) {
        Ok(()) => true,
        Err(Refusal::Duplicate) => false,
        Err(Refusal::Code(code)) => {
            out.replies.push(bad_msg_notification(msg_id, seq_no, code));
            false
        }
    }
}

/// The answer to one message that passed the window.
fn answer(out: &mut Outcome, msg_id: i64, body: &[u8], ctx: &Context, rng: &mut impl RngCore) {
    let (session_id, now, current_salt) = (ctx.session_id, ctx.now, ctx.current_salt);
    let mut r = TlReader::new(body);
    let Ok(constructor) = r.u32() else {
        return;
    };
    match constructor {
        id::PING | id::PING_DELAY_DISCONNECT => {
            let Ok(ping_id) = r.i64() else { return };
            let mut b = Vec::with_capacity(20);
            b.put_u32(id::PONG);
            b.put_i64(msg_id);
            b.put_i64(ping_id);
            out.replies.push(Reply {
                body: b,
                content_related: true,
                is_response: true,
            });
        }
        id::MSGS_ACK | id::HTTP_WAIT => {}
        id::GET_FUTURE_SALTS => {
            let Ok(num) = r.i32() else { return };
            let num = num.clamp(1, MAX_FUTURE_SALTS);
            // future_salts is an answer but not wrapped in rpc_result; its
            // salts are a bare vector of bare future_salt.
            let mut b = Vec::with_capacity(20 + 16 * num as usize);
            b.put_u32(id::FUTURE_SALTS);
            b.put_i64(msg_id);
            b.put_i32(date(now));
            b.put_u32(num as u32);
            let start = now - now.rem_euclid(SALT_PERIOD_SECS);
            for i in 0..i64::from(num) {
                let since = start + i * SALT_PERIOD_SECS;
                let salt = if i == 0 {
                    current_salt
                } else {
                    rng.next_u64() as i64
                };
                let future = FutureSalt::new(since, since + SALT_PERIOD_SECS, salt);
                b.put_i32(future.valid_since);
                b.put_i32(future.valid_until);
                b.put_i64(salt);
                if i > 0 {
                    out.new_salts.push(future);
                }
            }
            out.replies.push(Reply {
                body: b,
                content_related: true,
                is_response: true,
            });
        }
        id::DESTROY_SESSION => {
            let Ok(target) = r.i64() else { return };
            if target == session_id {
                // The spec's destroy_session is for other sessions of the key.
                out.replies
                    .push(destroy_session_result(msg_id, target, false));
            } else {
                out.destroy_sessions.push((msg_id, target));
            }
        }
        id::MSGS_STATE_REQ => {
            let Ok(ids) = r.vector_i64(8192) else { return };
            let mut b = Vec::new();
            b.put_u32(id::MSGS_STATE_INFO);
            b.put_i64(msg_id);
            // 1 = "nothing is known about the message".
            b.put_bytes(&vec![1u8; ids.len()]);
            out.replies.push(Reply {
                body: b,
                content_related: true,
                is_response: true,
            });
        }
        super::bind::BIND_TEMP_AUTH_KEY => out.binds.push((msg_id, body.to_vec())),
        id::RPC_DROP_ANSWER => {
            let mut result = Vec::new();
            result.put_u32(id::RPC_ANSWER_UNKNOWN);
            out.replies.push(rpc_result(msg_id, &result));
        }
        _ if ctx.unbound_temp_key => out.replies.push(rpc_error(msg_id, 401, PERM_EMPTY)),
        _ => out.replies.push(rpc_error(msg_id, 400, API_NOT_SERVED)),
    }
}

/// The answer to `destroy_session`: `destroy_session_ok` when the session
/// existed and is now forgotten, `destroy_session_none` otherwise.
pub fn destroy_session_result(msg_id: i64, target: i64, destroyed: bool) -> Reply {
    let mut result = Vec::with_capacity(12);
    result.put_u32(if destroyed {
        id::DESTROY_SESSION_OK
    } else {
        id::DESTROY_SESSION_NONE
    });
    result.put_i64(target);
    rpc_result(msg_id, &result)
}

/// How many client messages a session remembers: more than a full container
/// (Telethon and GramJS put at most 100 messages in one), 16 bytes each.
pub const MSG_WINDOW: usize = 128;

/// Which seq_no parity a message must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relevance {
    /// Content-related: odd (code 35 otherwise).
    Content,
    /// Containers and acks: even (code 34 otherwise).
    Service,
    /// Service messages clients disagree about (e.g. `http_wait` is a TL
    /// function, sent both ways): not checked.
    Either,
}

fn relevance(constructor: u32) -> Relevance {
    match constructor {
        id::MSG_CONTAINER | id::MSGS_ACK => Relevance::Service,
        id::HTTP_WAIT
        | id::MSGS_STATE_REQ
        | id::MSGS_STATE_INFO
        | id::MSGS_ALL_INFO
        | id::MSG_RESEND_REQ
        | id::MSG_RESEND_ANS_REQ
        | id::RPC_DROP_ANSWER => Relevance::Either,
        _ => Relevance::Content,
    }
}

/// Why [`MsgWindow::admit`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before: not processed again, not answered.
    Duplicate,
    /// Answered with `bad_msg_notification` and this code.
    Code(i32),
}

/// The msg_id and seq_no of a session's last [`MSG_WINDOW`] client
/// messages, by msg_id: the spec's rules for ids (18, 19, 20, duplicates)
/// and sequence numbers (32 to 35) are checked against it.
#[derive(Debug, Default, Clone)]
pub struct MsgWindow {
    seen: VecDeque<(i64, i32)>,
}

impl MsgWindow {
    /// Checks one message and remembers it when it passes. Sequence numbers
    /// must grow with msg_ids, two content-related messages never share one,
    /// and the parity must match the message's [`Relevance`].
    pub fn admit(
        &mut self,
        msg_id: i64,
        seq_no: i32,
        container: bool,
        relevance: Relevance,
    ) -> Result<(), Refusal> {
        if msg_id & 3 != 0 {
            return Err(Refusal::Code(18));
        }
        // Clients number their messages upwards, so a new id is nearly always
        // the highest: found without a search over the window (cold in the
        // cache when a gateway serves many sessions).
        let at = match self.seen.back() {
            Some(&(newest, _)) if msg_id <= newest => {
                match self.seen.binary_search_by_key(&msg_id, |&(id, _)| id) {
                    Ok(_) if container => return Err(Refusal::Code(19)),
                    Ok(_) => return Err(Refusal::Duplicate),
                    Err(at) => at,
                }
            }
            _ => self.seen.len(),
        };
        if at == 0 && self.seen.len() >= MSG_WINDOW {
            return Err(Refusal::Code(20));
        }
        let odd = seq_no & 1 == 1;
        match relevance {
            Relevance::Content if !odd => return Err(Refusal::Code(35)),
            Relevance::Service if odd => return Err(Refusal::Code(34)),
            _ => {}
        }
        let clashes = |other: i32| other == seq_no && odd;
        if let Some(&(_, before)) = at.checked_sub(1).and_then(|i| self.seen.get(i)) {
            if before > seq_no || clashes(before) {
                return Err(Refusal::Code(32));
            }
        }
        if let Some(&(_, after)) = self.seen.get(at) {
            if after < seq_no || clashes(after) {
                return Err(Refusal::Code(33));
            }
        }
        // The oldest goes first, so the deque never outgrows MSG_WINDOW (a
        // full window has `at` >= 1 here: lower ids got code 20 above).
        let at = if self.seen.len() >= MSG_WINDOW {
            self.seen.pop_front();
            at - 1
        } else {
            at
        };
        self.seen.insert(at, (msg_id, seq_no));
        Ok(())
    }
}

/// Parses a server reply's `pong`, for tests.
pub fn parse_pong(body: &[u8]) -> Option<(i64, i64)> {
    let mut r = TlReader::new(body);
    r.expect(id::PONG, "pong").ok()?;
    Some((r.i64().ok()?, r.i64().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tl::msg_container;
    use std::io::Write;

    const NOW: i64 = 1_800_000_000;

    fn ctx(session_id: i64, current_salt: i64) -> Context {
        Context {
            session_id,
            now: NOW,
            current_salt,
            unbound_temp_key: false,
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
        }
    }

    /// One message on a session that has seen nothing yet.
    fn fresh(msg_id: i64, seq_no: i32, body: &[u8], ctx: &Context) -> Outcome {
        respond(
            msg_id,
            seq_no,
            body,
            ctx,
            &mut MsgWindow::default(),
            &mut rand::thread_rng(),
        )
    }

    fn ping(ping_id: i64) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(id::PING);
        b.put_i64(ping_id);
        b
    }

    fn ack(msg_id: i64) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(id::MSGS_ACK);
        b.put_u32(id::VECTOR);
        b.put_u32(1);
        b.put_i64(msg_id);
        b
    }

    fn gzip(body: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(body).unwrap();
        let mut packed = Vec::new();
        packed.put_u32(id::GZIP_PACKED);
        packed.put_bytes(&gz.finish().unwrap());
        packed
    }

    /// The (bad_msg_id, code) of each bad_msg_notification among the replies.
    fn notifications(out: &Outcome) -> Vec<(i64, i32)> {
        out.replies
            .iter()
            .filter_map(|reply| {
                let mut r = TlReader::new(&reply.body);
                r.expect(id::BAD_MSG_NOTIFICATION, "bad_msg_notification")
                    .ok()?;
                let bad_msg_id = r.i64().ok()?;
                r.i32().ok()?;
                Some((bad_msg_id, r.i32().ok()?))
            })
            .collect()
    }

    fn pongs(out: &Outcome) -> Vec<(i64, i64)> {
        out.replies
            .iter()
            .filter_map(|r| parse_pong(&r.body))
            .collect()
    }

    #[test]
    fn msg_id_checks_give_spec_codes() {
        assert_eq!(check_msg_id(NOW << 32, NOW), Ok(()));
        assert_eq!(check_msg_id((NOW << 32) | 1, NOW), Err(18));
        assert_eq!(check_msg_id((NOW - 1000) << 32, NOW), Err(16));
        assert_eq!(check_msg_id((NOW + 1000) << 32, NOW), Err(17));
    }

    #[test]
    fn ping_gets_pong_inside_a_container_and_gzip() {
        let out = fresh(40, 1, &ping(7), &ctx(1, 9));
        assert_eq!(parse_pong(&out.replies[0].body), Some((40, 7)));

        let body = msg_container(&[(44, 1, ping(5)), (48, 3, gzip(&ping(8))), (52, 4, ack(1))]);
        let out = fresh(56, 4, &body, &ctx(1, 9));
        assert_eq!(pongs(&out), vec![(44, 5), (48, 8)]);
        assert_eq!(out.replies.len(), 2, "msgs_ack gets no reply");
    }

    #[test]
    fn a_gzip_packed_container_is_unpacked() {
        let body = gzip(&msg_container(&[(44, 1, ping(5))]));
        let out = fresh(48, 2, &body, &ctx(1, 9));
        assert_eq!(pongs(&out), vec![(44, 5)]);
    }

    #[test]
    fn api_calls_get_rpc_error_400() {
        let mut call = Vec::new();
        call.put_u32(id::INVOKE_WITH_LAYER);
        call.put_i32(200);
        let out = fresh(60, 1, &call, &ctx(1, 9));
        let mut r = TlReader::new(&out.replies[0].body);
        r.expect(id::RPC_RESULT, "rpc_result").unwrap();
        assert_eq!(r.i64().unwrap(), 60);
        r.expect(id::RPC_ERROR, "rpc_error").unwrap();
        assert_eq!(r.i32().unwrap(), 400);
        assert_eq!(r.bytes().unwrap(), API_NOT_SERVED.as_bytes());
        let unbound = Context {
            unbound_temp_key: true,
            ..ctx(1, 9)
        };
        let out = fresh(60, 1, &call, &unbound);
        let mut r = TlReader::new(&out.replies[0].body);
        r.expect(id::RPC_RESULT, "rpc_result").unwrap();
        r.i64().unwrap();
        r.expect(id::RPC_ERROR, "rpc_error").unwrap();
        assert_eq!(r.i32().unwrap(), 401);
        assert_eq!(r.bytes().unwrap(), PERM_EMPTY.as_bytes());
    }

    #[test]
    fn future_salts_start_with_the_current_one() {
        let mut req = Vec::new();
        req.put_u32(id::GET_FUTURE_SALTS);
        req.put_i32(3);
        let out = fresh(64, 1, &req, &ctx(1, 1234));
        let mut r = TlReader::new(&out.replies[0].body);
        r.expect(id::FUTURE_SALTS, "future_salts").unwrap();
        assert_eq!(r.i64().unwrap(), 64);
        assert_eq!(r.i32().unwrap(), NOW as i32);
        assert_eq!(r.u32().unwrap(), 3);
        let since = r.i32().unwrap();
        assert!(since <= NOW as i32 && r.i32().unwrap() > NOW as i32);
        assert_eq!(r.i64().unwrap(), 1234);
        assert_eq!(out.new_salts.len(), 2);
    }

    /// Past 2038-01-19 the dates wrap into TL's 32-bit `int` (bits of the
    /// unsigned time); the salts stay a run of consecutive periods.
    #[test]
    fn future_salts_after_2038_keep_their_order() {
        let now = (1i64 << 31) - 100;
        let mut req = Vec::new();
        req.put_u32(id::GET_FUTURE_SALTS);
        req.put_i32(3);
        let c = Context { now, ..ctx(1, 1) };
        let out = fresh(64, 1, &req, &c);
        let mut r = TlReader::new(&out.replies[0].body);
        r.expect(id::FUTURE_SALTS, "future_salts").unwrap();
        r.i64().unwrap();
        assert_eq!(crate::tl::unix_from_date(r.i32().unwrap()), now);
        r.u32().unwrap();
        let mut since = Vec::new();
        for _ in 0..3 {
            let s = crate::tl::unix_from_date(r.i32().unwrap());
            assert_eq!(
                crate::tl::unix_from_date(r.i32().unwrap()),
                s + SALT_PERIOD_SECS
            );
            r.i64().unwrap();
            since.push(s);
        }
        assert!(since[0] <= now && now < since[0] + SALT_PERIOD_SECS);
        assert_eq!(since[2], since[0] + 2 * SALT_PERIOD_SECS);
        assert!(since[2] > i64::from(i32::MAX), "past the signed range");
        assert_eq!(out.new_salts[1].since(), since[2]);
    }

    #[test]
    fn destroy_session_of_this_session_is_none_and_of_another_is_left_to_the_session() {
        let destroy = |target: i64| {
            let mut b = Vec::new();
            b.put_u32(id::DESTROY_SESSION);
            b.put_i64(target);
            b
        };
        let out = fresh(4, 1, &destroy(1), &ctx(1, 9));
        assert_eq!(out.replies, vec![destroy_session_result(4, 1, false)]);
        assert!(out.destroy_sessions.is_empty());
        let out = fresh(4, 1, &destroy(2), &ctx(1, 9));
        assert!(out.replies.is_empty());
        assert_eq!(out.destroy_sessions, vec![(4, 2)]);

        let none = destroy_session_result(4, 2, false);
        let mut r = TlReader::new(&none.body);
        r.expect(id::RPC_RESULT, "rpc_result").unwrap();
        assert_eq!(r.i64().unwrap(), 4);
        r.expect(id::DESTROY_SESSION_NONE, "destroy_session_none")
            .unwrap();
        assert_eq!(r.i64().unwrap(), 2);
        let ok = destroy_session_result(4, 2, true);
        let mut r = TlReader::new(&ok.body);
        r.i32().unwrap();
        r.i64().unwrap();
        r.expect(id::DESTROY_SESSION_OK, "destroy_session_ok")
            .unwrap();
    }

    #[test]
    fn a_duplicate_is_not_processed_twice_and_not_answered() {
        let mut window = MsgWindow::default();
        let mut rng = rand::thread_rng();
        let c = ctx(1, 9);
        let out = respond(40, 1, &ping(7), &c, &mut window, &mut rng);
        assert_eq!(pongs(&out), vec![(40, 7)]);
        let again = respond(40, 1, &ping(7), &c, &mut window, &mut rng);
        assert_eq!(again, Outcome::default());
        // Nor inside a container with a new msg_id.
        let body = msg_container(&[(40, 1, ping(7)), (44, 3, ping(8))]);
        let out = respond(48, 4, &body, &c, &mut window, &mut rng);
        assert_eq!(pongs(&out), vec![(44, 8)]);
    }

    #[test]
    fn a_container_reusing_a_msg_id_gets_19() {
        let mut window = MsgWindow::default();
        let mut rng = rand::thread_rng();
        let c = ctx(1, 9);
        respond(40, 1, &ping(7), &c, &mut window, &mut rng);
        let out = respond(
            40,
            2,
            &msg_container(&[(36, 1, ping(8))]),
            &c,
            &mut window,
            &mut rng,
        );
        assert_eq!(notifications(&out), vec![(40, 19)]);
        assert!(pongs(&out).is_empty(), "nothing inside is processed");
    }

    #[test]
    fn an_id_below_a_full_window_gets_20() {
        let mut window = MsgWindow::default();
        for i in 0..MSG_WINDOW as i64 {
            assert_eq!(
                window.admit(100 + 4 * i, 2 * i as i32 + 1, false, Relevance::Content),
                Ok(())
            );
        }
        assert_eq!(
            window.admit(96, 0, false, Relevance::Either),
            Err(Refusal::Code(20))
        );
        // The lowest remembered id is still a duplicate, a new highest is fine.
        assert_eq!(
            window.admit(100, 1, false, Relevance::Content),
            Err(Refusal::Duplicate)
        );
        let next = 100 + 4 * MSG_WINDOW as i64;
        assert_eq!(
            window.admit(next, 2 * MSG_WINDOW as i32 + 1, false, Relevance::Content),
            Ok(())
        );
        // The window moved: 100 is forgotten, and now too old to tell.
        assert_eq!(
            window.admit(100, 1, false, Relevance::Content),
            Err(Refusal::Code(20))
        );
        // Memory stays at the window's size.
        for i in 0..1000 {
            let id = next + 4 * (i + 1);
            let seq = 2 * (MSG_WINDOW as i32 + i as i32) + 3;
            assert_eq!(window.admit(id, seq, false, Relevance::Content), Ok(()));
        }
        assert!(
            window.seen.capacity() <= MSG_WINDOW,
            "{}",
            window.seen.capacity()
        );
        // Below a window that is not full, every id is known: accepted.
        let mut window = MsgWindow::default();
        window.admit(100, 3, false, Relevance::Content).unwrap();
        assert_eq!(window.admit(96, 1, false, Relevance::Content), Ok(()));
    }

    #[test]
    fn ids_not_divisible_by_4_get_18_also_inside_a_container() {
        let mut window = MsgWindow::default();
        assert_eq!(
            window.admit(42, 1, false, Relevance::Content),
            Err(Refusal::Code(18))
        );
        let out = fresh(
            48,
            2,
            &msg_container(&[(42, 1, ping(1)), (44, 1, ping(2))]),
            &ctx(1, 9),
        );
        assert_eq!(notifications(&out), vec![(42, 18)]);
        assert_eq!(pongs(&out), vec![(44, 2)]);
    }

    #[test]
    fn seq_no_parity_gives_34_and_35() {
        let c = ctx(1, 9);
        // A content-related message (a call) with an even seq_no.
        assert_eq!(notifications(&fresh(40, 2, &ping(1), &c)), vec![(40, 35)]);
        // An ack or a container with an odd one.
        assert_eq!(notifications(&fresh(40, 1, &ack(4), &c)), vec![(40, 34)]);
        let body = msg_container(&[(36, 1, ping(1))]);
        assert_eq!(notifications(&fresh(40, 3, &body, &c)), vec![(40, 34)]);
        // Inside a container, and after gzip_packed is unwrapped.
        let body = msg_container(&[(32, 0, gzip(&ping(1))), (36, 1, ping(2))]);
        let out = fresh(40, 2, &body, &c);
        assert_eq!(notifications(&out), vec![(32, 35)]);
        assert_eq!(pongs(&out), vec![(36, 2)]);
        // Messages clients disagree about are not checked.
        let mut wait = Vec::new();
        wait.put_u32(id::HTTP_WAIT);
        wait.put_raw(&[0; 12]);
        for seq_no in [0, 1] {
            assert!(fresh(40, seq_no, &wait, &c).replies.is_empty());
        }
    }

    #[test]
    fn seq_no_must_grow_with_msg_id_giving_32_and_33() {
        let mut window = MsgWindow::default();
        let content = Relevance::Content;
        window.admit(100, 5, false, content).unwrap();
        // Later id, lower seq_no; later id, the same odd seq_no.
        assert_eq!(window.admit(104, 3, false, content), Err(Refusal::Code(32)));
        assert_eq!(window.admit(104, 5, false, content), Err(Refusal::Code(32)));
        // Earlier id, higher seq_no; earlier id, the same odd seq_no.
        assert_eq!(window.admit(96, 7, false, content), Err(Refusal::Code(33)));
        assert_eq!(window.admit(96, 5, false, content), Err(Refusal::Code(33)));
        // Consistent pairs, in any order of arrival.
        assert_eq!(window.admit(96, 3, false, content), Ok(()));
        assert_eq!(window.admit(108, 7, false, content), Ok(()));
        assert_eq!(window.admit(104, 6, false, Relevance::Service), Ok(()));
        // Even seq_nos may repeat: an ack and its container share one.
        assert_eq!(window.admit(112, 8, false, Relevance::Service), Ok(()));
        assert_eq!(window.admit(116, 8, true, Relevance::Service), Ok(()));
    }

    #[test]
    fn clients_container_layouts_pass() {
        // Telethon/GramJS/grammers: inner messages first, then the container
        // with the next msg_id and an even seq_no counting them; some
        // clients take the container's msg_id first.
        let c = ctx(1, 9);
        let mut window = MsgWindow::default();
        let mut rng = rand::thread_rng();
        let first = msg_container(&[(100, 1, ping(1)), (104, 3, ping(2)), (108, 4, ack(5))]);
        let out = respond(112, 4, &first, &c, &mut window, &mut rng);
        assert_eq!(pongs(&out).len(), 2);
        assert!(notifications(&out).is_empty());
        let second = msg_container(&[(120, 5, ping(3)), (124, 6, ack(9))]);
        let out = respond(116, 4, &second, &c, &mut window, &mut rng);
        assert_eq!(pongs(&out), vec![(120, 3)]);
        assert!(notifications(&out).is_empty());
        let out = respond(128, 7, &ping(4), &c, &mut window, &mut rng);
        assert_eq!(pongs(&out), vec![(128, 4)]);
    }

    #[test]
    fn a_container_inside_a_container_gets_64() {
        let inner = msg_container(&[(36, 1, ping(1))]);
        let out = fresh(44, 2, &msg_container(&[(40, 2, inner)]), &ctx(1, 9));
        assert_eq!(notifications(&out), vec![(40, 64)]);
        assert!(pongs(&out).is_empty());
    }

    /// Each `gzip_packed` of a container had its own 1 MiB cap, so 1024 small
    /// bombs carrying `auth.bindTempAuthKey` kept 1 GiB from a ~1 MB message
    /// (found reviewing the bound the `reference_session` fuzz target asserts).
    #[test]
    fn one_unpack_budget_for_all_gzip_packed_of_a_message() {
        let budget = 64 << 10;
        let mut bind = crate::bind::BIND_TEMP_AUTH_KEY.to_le_bytes().to_vec();
        bind.resize(budget as usize, 0);
        let packed = gzip(&bind);
        let body = msg_container(&[
            (4, 1, packed.clone()),
            (8, 3, packed.clone()),
            (12, 5, packed.clone()),
            (16, 7, packed),
        ]);
        let c = Context {
            max_unpacked_bytes: budget,
            ..ctx(1, 1)
        };
        let out = fresh(20, 8, &body, &c);
        let kept: usize = out.binds.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(kept as u64, budget, "{} binds", out.binds.len());
    }

    #[test]
    fn gzip_bombs_are_capped_and_garbage_is_ignored() {
        let packed = gzip(&vec![0u8; 8 << 20]);
        let out = fresh(8, 1, &packed, &ctx(1, 1));
        assert_eq!(
            out.replies.len(),
            1,
            "capped body is treated as an unknown call"
        );
        for junk in [
            &[][..],
            &[0xdc, 0xf8, 0xf1, 0x73, 0xff, 0xff, 0xff, 0xff][..],
            &[1, 2, 3],
        ] {
            let _ = fresh(8, 1, junk, &ctx(1, 1));
        }
    }
}
