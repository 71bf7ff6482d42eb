//! Which client requests on a connection still await their answer, so a
//! draining gateway knows when a connection has nothing more to deliver, and
//! can count what it could not deliver when the grace ends.
//!
//! A request is a content-related client message (odd `seq_no`) other than
//! the service messages that get no answer of their own; its answer is the
//! server message that names its msg_id: `rpc_result`, `pong`,
//! `future_salts`, `msgs_state_info`, or `bad_msg_notification` /
//! `bad_server_salt` (for the message or the container it came in). Answers
//! inside `gzip_packed` are not looked into: such a request stays awaited, so
//! the count errs towards "undelivered", never towards silence.

use std::collections::VecDeque;

use crate::tl::{id, TlReader};

/// Requests tracked per connection; beyond this the oldest is forgotten, so
/// a session that never answers cannot grow a connection's memory.
pub const MAX_AWAITED: usize = 1024;

/// Content-related client messages that get no answer naming them.
const UNANSWERED: [u32; 6] = [
    id::MSGS_ACK,
    id::HTTP_WAIT,
    id::MSG_RESEND_REQ,
    id::MSGS_STATE_INFO,
    id::MSGS_ALL_INFO,
    // Answered by destroy_session_ok/none, which carry the session id only.
    id::DESTROY_SESSION,
];

/// The requests of one connection awaiting an answer, oldest first.
#[derive(Debug, Default)]
pub struct Awaited {
    /// (request msg_id, msg_id of the container it came in or 0).
    requests: VecDeque<(i64, i64)>,
}

impl Awaited {
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Notes the requests of a decrypted client message (plaintext from
    /// msg_id on). Malformed parts are skipped: the session judges them.
    pub fn on_client_message(&mut self, plaintext: &[u8]) {
        let mut r = TlReader::new(plaintext);
        let (Ok(msg_id), Ok(seq_no), Ok(len)) = (r.i64(), r.i32(), r.u32()) else {
            return;
        };
        let Ok(body) = r.take(len as usize) else {
            return;
        };
        let mut b = TlReader::new(body);
        if b.u32().ok() != Some(id::MSG_CONTAINER) {
            return self.note(msg_id, seq_no, body, 0);
        }
        let Ok(count) = b.u32() else { return };
        for _ in 0..count {
            let (Ok(inner_id), Ok(inner_seq), Ok(len)) = (b.i64(), b.i32(), b.u32()) else {
                return;
            };
            let Ok(inner) = b.take(len as usize) else {
                return;
            };
            self.note(inner_id, inner_seq, inner, msg_id);
        }
    }

    fn note(&mut self, msg_id: i64, seq_no: i32, body: &[u8], container: i64) {
        let constructor = TlReader::new(body).u32().ok();
        if seq_no & 1 == 0
            || constructor.is_none_or(|c| UNANSWERED.contains(&c))
            || self.requests.iter().any(|&(m, _)| m == msg_id)
        {
            return;
        }
        if self.requests.len() >= MAX_AWAITED {
            self.requests.pop_front();
        }
        self.requests.push_back((msg_id, container));
    }

    /// Forgets the requests a server message (plaintext from the salt on) answers.
    pub fn on_server_message(&mut self, plaintext: &[u8]) {
        if self.requests.is_empty() {
            return;
        }
        let mut r = TlReader::new(plaintext);
        let (Ok(_salt), Ok(_session), Ok(_msg_id), Ok(_seq_no), Ok(len)) =
            (r.i64(), r.i64(), r.i64(), r.i32(), r.u32())
        else {
            return;
        };
        let Ok(body) = r.take(len as usize) else {
            return;
        };
        let mut b = TlReader::new(body);
        if b.u32().ok() == Some(id::MSG_CONTAINER) {
            let count = b.u32().unwrap_or(0);
            for _ in 0..count {
                let (Ok(_), Ok(_), Ok(len)) = (b.i64(), b.i32(), b.u32()) else {
                    break;
                };
                let Ok(inner) = b.take(len as usize) else {
                    break;
                };
                self.answer(inner);
            }
        } else {
            self.answer(body);
        }
        if self.requests.is_empty() {
            self.requests = VecDeque::new();
        }
    }

    fn answer(&mut self, body: &[u8]) {
        let mut r = TlReader::new(body);
        let (Ok(constructor), Ok(named)) = (r.u32(), r.i64()) else {
            return;
        };
        match constructor {
            id::RPC_RESULT | id::PONG | id::FUTURE_SALTS | id::MSGS_STATE_INFO => {
                if let Some(at) = self.requests.iter().position(|&(m, _)| m == named) {
                    self.requests.remove(at);
                }
            }
            // A refused container refuses every message in it.
            id::BAD_MSG_NOTIFICATION | id::BAD_SERVER_SALT => self
                .requests
                .retain(|&(m, container)| m != named && container != named),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tl::{msg_container, TlWrite};

    fn client(msg_id: i64, seq_no: i32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.put_i64(msg_id);
        m.put_i32(seq_no);
        m.put_u32(body.len() as u32);
        m.extend_from_slice(body);
        m.extend_from_slice(&[0; 12]);
        m
    }

    fn server(body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.put_i64(7);
        m.put_i64(8);
        m.put_i64(9);
        m.put_i32(2);
        m.put_u32(body.len() as u32);
        m.extend_from_slice(body);
        m
    }

    fn tl(constructor: u32, first: i64) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(constructor);
        b.put_i64(first);
        b
    }

    #[test]
    fn pings_and_queries_await_until_answered_acks_do_not() {
        let mut awaited = Awaited::default();
        awaited.on_client_message(&client(100, 1, &tl(id::PING, 1)));
        awaited.on_client_message(&client(104, 3, &tl(0x1234_5678, 0)));
        awaited.on_client_message(&client(108, 4, &tl(id::MSGS_ACK, 0)));
        awaited.on_client_message(&client(112, 5, &tl(id::MSGS_ACK, 0)));
        assert_eq!(awaited.len(), 2);
        // A resend of a request awaited is one request.
        awaited.on_client_message(&client(100, 1, &tl(id::PING, 1)));
        assert_eq!(awaited.len(), 2);
        // A pong names the ping's msg_id after its constructor.
        awaited.on_server_message(&server(&tl(id::PONG, 100)));
        assert_eq!(awaited.len(), 1);
        awaited.on_server_message(&server(&tl(id::RPC_RESULT, 999)));
        assert_eq!(awaited.len(), 1);
        awaited.on_server_message(&server(&tl(id::RPC_RESULT, 104)));
        assert!(awaited.is_empty());
    }

    #[test]
    fn containers_both_ways_and_a_refused_container() {
        let mut awaited = Awaited::default();
        let ack = tl(id::MSGS_ACK, 0);
        awaited.on_client_message(&client(
            200,
            2,
            &msg_container(&[
                (204, 1, tl(id::PING, 1)),
                (208, 2, ack),
                (212, 3, tl(id::PING, 2)),
            ]),
        ));
        awaited.on_client_message(&client(216, 5, &tl(id::PING, 3)));
        assert_eq!(awaited.len(), 3);
        // bad_server_salt for the container: both pings in it are refused.
        awaited.on_server_message(&server(&tl(id::BAD_SERVER_SALT, 200)));
        assert_eq!(awaited.len(), 1);
        awaited.on_client_message(&client(220, 7, &tl(id::PING, 4)));
        awaited.on_server_message(&server(&msg_container(&[
            (1, 2, tl(id::PONG, 216)),
            (5, 2, tl(id::PONG, 220)),
        ])));
        assert!(awaited.is_empty());
    }

    #[test]
    fn bounded_and_malformed_input_is_skipped() {
        let mut awaited = Awaited::default();
        for i in 0..(MAX_AWAITED as i64 + 10) {
            awaited.on_client_message(&client(i * 4, 1, &tl(id::PING, i)));
        }
        assert_eq!(awaited.len(), MAX_AWAITED);
        let before = awaited.len();
        awaited.on_client_message(&[1, 2, 3]);
        awaited.on_client_message(&client(1, 1, &[]));
        let mut truncated = client(5, 1, &msg_container(&[(9, 1, tl(id::PING, 0))]));
        truncated.truncate(30);
        awaited.on_client_message(&truncated);
        awaited.on_server_message(&[0; 10]);
        awaited.on_server_message(&server(&[1]));
        assert_eq!(awaited.len(), before);
    }
}
