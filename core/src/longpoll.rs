//! MTProto's HTTP transport, sans IO: what a request asks of the held
//! response (`http_wait`, and which of its messages want an answer), when the
//! held response must go, and how queued server messages become the one
//! MTProto message an HTTP response body carries.
//!
//! `http_wait#9299359f max_delay:int wait_after:int max_wait:int`
//! (<https://core.telegram.org/mtproto/service_messages>): with nothing
//! queued the response waits up to `max_wait`; once something is queued it
//! goes `wait_after` after the newest message, but no later than `max_delay`
//! after the oldest.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::message::{next_server_msg_id, plaintext_message, PLAINTEXT_HEADER};
use super::tl::{id, TlReader, TlWrite};

/// Messages one `msg_container` may carry (Telegram's limit): read from a
/// client's, written into a response's.
pub const MAX_CONTAINER_MESSAGES: usize = 1020;

/// A request without `http_wait` that carries something to answer waits like
/// this (the clients that send none, such as Telethon, expect the answer in
/// the same response): the reply and what follows it closely go together.
const IMPLICIT_MAX_DELAY: Duration = Duration::from_millis(500);
const IMPLICIT_WAIT_AFTER: Duration = Duration::from_millis(50);

/// The long-poll parameters of one request, in milliseconds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpWait {
    pub max_delay: Duration,
    pub wait_after: Duration,
    pub max_wait: Duration,
}

impl HttpWait {
    fn read(r: &mut TlReader<'_>) -> Option<Self> {
        let ms = |v: i32| Duration::from_millis(u64::try_from(v).unwrap_or(0));
        Some(Self {
            max_delay: ms(r.i32().ok()?),
            wait_after: ms(r.i32().ok()?),
            max_wait: ms(r.i32().ok()?),
        })
    }

    /// How a request waits: its own `http_wait` with every part capped at
    /// `cap`; without one, until its answer is queued when it carries
    /// something to answer, else not at all.
    pub fn for_request(request: &RequestInfo, cap: Duration) -> Self {
        let wait = request
            .http_wait
            .unwrap_or(if request.content_msg_ids.is_empty() {
                HttpWait {
                    max_delay: Duration::ZERO,
                    wait_after: Duration::ZERO,
                    max_wait: Duration::ZERO,
                }
            } else {
                HttpWait {
                    max_delay: IMPLICIT_MAX_DELAY,
                    wait_after: IMPLICIT_WAIT_AFTER,
                    max_wait: cap,
                }
            });
        HttpWait {
            max_delay: wait.max_delay.min(cap),
            wait_after: wait.wait_after.min(cap),
            max_wait: wait.max_wait.min(cap),
        }
    }

    /// When the held response goes, for a request that arrived at `request`
    /// with the oldest and newest queued messages (if any) arrived at
    /// `first` and `last`.
    pub fn respond_at(&self, request: Instant, queued: Option<(Instant, Instant)>) -> Instant {
        match queued {
            None => request + self.max_wait,
            Some((first, last)) => (first + self.max_delay).min(last + self.wait_after),
        }
    }
}

/// What the gateway needs to know of a decrypted client message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The last `http_wait` the message (or its container) carries.
    pub http_wait: Option<HttpWait>,
    /// Content-related messages (odd `seq_no`): the server owes them an answer or an ack.
    pub content_msg_ids: Vec<i64>,
}

/// Reads a decrypted client message (`msg_id`, `seq_no`, body). Malformed
/// parts are skipped: the session, not the gateway, judges the content.
pub fn inspect(msg_id: i64, seq_no: i32, body: &[u8]) -> RequestInfo {
    let mut info = RequestInfo::default();
    let mut r = TlReader::new(body);
    match r.u32() {
        Ok(id::MSG_CONTAINER) => {
            let Ok(count) = r.u32() else { return info };
            for _ in 0..count.min(MAX_CONTAINER_MESSAGES as u32) {
                let (Ok(inner_id), Ok(inner_seq), Ok(len)) = (r.i64(), r.i32(), r.u32()) else {
                    break;
                };
                let Ok(inner) = r.take(len as usize) else {
                    break;
                };
                note(&mut info, inner_id, inner_seq, inner);
            }
        }
        Ok(_) => note(&mut info, msg_id, seq_no, body),
        Err(_) => {}
    }
    info
}

fn note(info: &mut RequestInfo, msg_id: i64, seq_no: i32, body: &[u8]) {
    if seq_no & 1 == 1 {
        info.content_msg_ids.push(msg_id);
    }
    let mut r = TlReader::new(body);
    if r.u32().ok() == Some(id::HTTP_WAIT) {
        if let Some(wait) = HttpWait::read(&mut r) {
            info.http_wait = Some(wait);
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("server message of {0} bytes is shorter than its header or declared length")]
    Malformed(usize),
    #[error("{0} messages do not fit one container (at most {MAX_CONTAINER_MESSAGES})")]
    TooMany(u64),
}

/// A server message's header fields and body.
struct ServerMessage<'a> {
    salt: i64,
    session_id: i64,
    msg_id: i64,
    seq_no: i32,
    body: &'a [u8],
}

fn parse_server_message(plaintext: &[u8]) -> Result<ServerMessage<'_>, MergeError> {
    let bad = || MergeError::Malformed(plaintext.len());
    let mut r = TlReader::new(plaintext);
    let (salt, session_id, msg_id, seq_no, len) = (
        r.i64().map_err(|_| bad())?,
        r.i64().map_err(|_| bad())?,
        r.i64().map_err(|_| bad())?,
        r.i32().map_err(|_| bad())?,
        r.u32().map_err(|_| bad())?,
    );
    let body = r.take(len as usize).map_err(|_| bad())?;
    Ok(ServerMessage {
        salt,
        session_id,
        msg_id,
        seq_no,
        body,
    })
}

/// Server-side ids the next gateway-made message of a session must follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sequence {
    /// The largest server msg_id sent to the session.
    pub last_msg_id: i64,
    /// The largest server seq_no sent to the session.
    pub last_seq_no: i32,
}

impl Sequence {
    /// seq_no of a message that is not content-related: twice the content
    /// messages sent so far, i.e. the last seq_no rounded up to even.
    fn service_seq_no(&self) -> i32 {
        self.last_seq_no.saturating_add(1) & !1
    }

    fn next_msg_id(&mut self, unix_secs: i64, subsec_nanos: u32) -> i64 {
        self.last_msg_id = next_server_msg_id(self.last_msg_id, unix_secs, subsec_nanos, false);
        self.last_msg_id
    }
}

/// One server plaintext (`salt | session_id | msg_id | seq_no | length |
/// body`) out of the queued ones: the message itself when alone, else a
/// `msg_container` holding them all in order (containers among them are
/// flattened, since containers do not nest). The container takes the newest
/// salt and a msg_id after every message's. `seq` is updated.
pub fn merge(
    messages: &[&[u8]],
    seq: &mut Sequence,
    unix_secs: i64,
    subsec_nanos: u32,
) -> Result<Vec<u8>, MergeError> {
    let parsed = messages
        .iter()
        .map(|m| parse_server_message(m))
        .collect::<Result<Vec<_>, _>>()?;
    for m in &parsed {
        seq.last_msg_id = seq.last_msg_id.max(m.msg_id);
        seq.last_seq_no = seq.last_seq_no.max(m.seq_no);
    }
    let (Some(first), Some(last)) = (parsed.first(), parsed.last()) else {
        return Err(MergeError::Malformed(0));
    };
    if parsed.len() == 1 {
        return Ok(messages[0][..PLAINTEXT_HEADER + first.body.len()].to_vec());
    }
    let mut body = Vec::new();
    body.put_u32(id::MSG_CONTAINER);
    let count_at = body.len();
    body.put_u32(0);
    let mut count = 0u64;
    for m in &parsed {
        let mut inner = TlReader::new(m.body);
        if inner.u32().ok() == Some(id::MSG_CONTAINER) {
            // Already `msg_id seqno bytes body` records: copy them as they are.
            let n = inner
                .u32()
                .map_err(|_| MergeError::Malformed(m.body.len()))?;
            body.put_raw(inner.remaining());
            count += u64::from(n);
        } else {
            body.put_i64(m.msg_id);
            body.put_i32(m.seq_no);
            body.put_u32(m.body.len() as u32);
            body.put_raw(m.body);
            count += 1;
        }
    }
    if count > MAX_CONTAINER_MESSAGES as u64 {
        return Err(MergeError::TooMany(count));
    }
    body[count_at..count_at + 4].copy_from_slice(&(count as u32).to_le_bytes());
    let msg_id = seq.next_msg_id(unix_secs, subsec_nanos);
    Ok(plaintext_message(
        last.salt,
        first.session_id,
        msg_id,
        seq.service_seq_no(),
        &body,
    ))
}

/// The response when the wait ends with nothing queued: `msgs_ack` of the
/// request's content-related messages (possibly none). Web clients treat an
/// empty body as a network error, so a response always carries a message.
pub fn ack(
    salt: i64,
    session_id: i64,
    msg_ids: &[i64],
    seq: &mut Sequence,
    unix_secs: i64,
    subsec_nanos: u32,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + 8 * msg_ids.len());
    body.put_u32(id::MSGS_ACK);
    body.put_u32(id::VECTOR);
    body.put_u32(msg_ids.len() as u32);
    for &msg_id in msg_ids {
        body.put_i64(msg_id);
    }
    let msg_id = seq.next_msg_id(unix_secs, subsec_nanos);
    plaintext_message(salt, session_id, msg_id, seq.service_seq_no(), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tl::msg_container;

    fn http_wait(max_delay: i32, wait_after: i32, max_wait: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(id::HTTP_WAIT);
        b.put_i32(max_delay);
        b.put_i32(wait_after);
        b.put_i32(max_wait);
        b
    }

    const PING: [u8; 12] = [0xec, 0x77, 0xbe, 0x7a, 1, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn finds_http_wait_alone_and_in_containers() {
        let alone = inspect(100, 3, &http_wait(0, 100, 25_000));
        assert_eq!(
            alone.http_wait,
            Some(HttpWait {
                max_delay: Duration::ZERO,
                wait_after: Duration::from_millis(100),
                max_wait: Duration::from_secs(25),
            })
        );
        assert_eq!(alone.content_msg_ids, vec![100]);
        let hw = http_wait(500, 150, 3000);
        let both = inspect(
            200,
            4,
            &msg_container(&[(104, 5, &PING[..]), (108, 6, &hw[..])]),
        );
        assert_eq!(
            both.http_wait.map(|w| w.max_wait),
            Some(Duration::from_secs(3))
        );
        assert_eq!(both.content_msg_ids, vec![104]);
        // A plain ping: content, no wait.
        let ping = inspect(300, 1, &PING);
        assert_eq!(ping.http_wait, None);
        assert_eq!(ping.content_msg_ids, vec![300]);
    }

    #[test]
    fn malformed_input_is_skipped_not_fatal() {
        let mut truncated = msg_container(&[(104, 5, &PING)]);
        truncated.truncate(truncated.len() - 3);
        assert!(inspect(1, 0, &truncated).content_msg_ids.is_empty());
        let mut huge = Vec::new();
        huge.put_u32(id::MSG_CONTAINER);
        huge.put_u32(u32::MAX);
        assert_eq!(inspect(1, 0, &huge), RequestInfo::default());
        assert_eq!(inspect(1, 1, &[1, 2]), RequestInfo::default());
        // A negative wait reads as zero.
        let w = inspect(1, 1, &http_wait(-5, -5, -5)).http_wait.unwrap();
        assert_eq!(w.max_wait, Duration::ZERO);
    }

    #[test]
    fn waits_follow_http_wait_and_are_capped() {
        let cap = Duration::from_secs(25);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let long_poll = HttpWait::for_request(&inspect(1, 1, &http_wait(500, 150, 60_000)), cap);
        assert_eq!(long_poll.max_wait, cap);
        // Nothing queued: max_wait after the request.
        assert_eq!(long_poll.respond_at(t0, None), t0 + cap);
        // One message: wait_after later.
        let m = t0 + ms(1000);
        assert_eq!(long_poll.respond_at(t0, Some((m, m))), m + ms(150));
        // Messages keep coming: no later than max_delay after the first.
        assert_eq!(
            long_poll.respond_at(t0, Some((m, m + ms(400)))),
            m + ms(500)
        );
        // No http_wait: an ack-only request is answered at once; a query waits for its answer.
        let ack_only = HttpWait::for_request(&inspect(1, 2, &PING), cap);
        assert_eq!(ack_only.respond_at(t0, None), t0);
        let query = HttpWait::for_request(&inspect(1, 1, &PING), cap);
        assert_eq!(query.respond_at(t0, None), t0 + cap);
        assert_eq!(query.respond_at(t0, Some((m, m))), m + IMPLICIT_WAIT_AFTER);
    }

    fn server_message(msg_id: i64, seq_no: i32, salt: i64, body: &[u8]) -> Vec<u8> {
        plaintext_message(salt, 77, msg_id, seq_no, body)
    }

    #[test]
    fn one_message_goes_as_it_is_and_several_in_a_container() {
        let mut seq = Sequence::default();
        let a = server_message(0x10_0000_0001, 1, 5, &PING);
        let mut padded = a.clone();
        padded.extend_from_slice(&[0; 12]);
        assert_eq!(merge(&[&padded], &mut seq, 0, 0).unwrap(), a);
        assert_eq!(seq.last_msg_id, 0x10_0000_0001);

        let inner = msg_container(&[(0x10_0000_0011, 3, &PING), (0x10_0000_0015, 4, &PING)]);
        let b = server_message(0x10_0000_0019, 4, 6, &inner);
        let c = server_message(0x10_0000_001d, 5, 7, &PING);
        let mut seq = Sequence::default();
        let merged = merge(&[&a, &b, &c], &mut seq, 0x10, 0).unwrap();
        let m = parse_server_message(&merged).unwrap();
        assert_eq!((m.salt, m.session_id), (7, 77));
        assert!(m.msg_id > 0x10_0000_001d && m.msg_id % 4 == 3);
        assert_eq!(m.seq_no, 6);
        let expected = msg_container(&[
            (0x10_0000_0001, 1, &PING),
            (0x10_0000_0011, 3, &PING),
            (0x10_0000_0015, 4, &PING),
            (0x10_0000_001d, 5, &PING),
        ]);
        assert_eq!(m.body, &expected[..]);
        assert_eq!(
            merge(&[&a, &a[..30]], &mut seq, 0, 0),
            Err(MergeError::Malformed(30))
        );
        // A container that claims more than one container may carry.
        let mut huge = Vec::new();
        huge.put_u32(id::MSG_CONTAINER);
        huge.put_u32(u32::MAX);
        let h = server_message(0x10_0000_0021, 6, 7, &huge);
        assert_eq!(
            merge(&[&a, &h], &mut seq, 0, 0),
            Err(MergeError::TooMany(u64::from(u32::MAX) + 1))
        );
    }

    #[test]
    fn the_empty_answer_acks_the_request() {
        let mut seq = Sequence {
            last_msg_id: 0x20_0000_0003,
            last_seq_no: 7,
        };
        let plain = ack(9, 77, &[40, 44], &mut seq, 0x10, 0);
        let m = parse_server_message(&plain).unwrap();
        assert_eq!((m.salt, m.session_id, m.seq_no), (9, 77, 8));
        assert!(m.msg_id > 0x20_0000_0003);
        let mut r = TlReader::new(m.body);
        assert_eq!(r.u32().unwrap(), id::MSGS_ACK);
        assert_eq!(r.vector_i64(10).unwrap(), vec![40, 44]);
    }
}
