//! The reference session's answers to MTProto service messages, as pure
//! functions: given one client message, what to send back.

use std::io::Read;

use rand::RngCore;

use crate::tl::{id, TlReader, TlWrite};

/// Client msg_ids more than this many seconds in the past are refused (code 16).
const MSG_ID_TOO_OLD_SECS: i64 = 300;
/// ... or in the future (code 17).
const MSG_ID_TOO_NEW_SECS: i64 = 30;
/// Decompressed `gzip_packed` bodies are capped so a small frame cannot
/// expand into an unbounded allocation: this many bytes for all the
/// `gzip_packed` of one client message together (a container of 1024 of
/// them would otherwise inflate 1024 times over).
pub const MAX_UNPACKED_BYTES: u64 = 1 << 20;
/// At most this many salts per `get_future_salts`.
pub const MAX_FUTURE_SALTS: i32 = 64;
/// Salt validity window.
pub const SALT_PERIOD_SECS: i32 = 1800;
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
    pub new_salts: Vec<(i32, i32, i64)>,
    /// `destroy_session` for this session id was requested.
    pub destroyed_session: Option<i64>,
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
}

/// Answers one client message (already past salt and msg_id checks).
pub fn respond(msg_id: i64, body: &[u8], ctx: &Context, rng: &mut impl RngCore) -> Outcome {
    let mut out = Outcome::default();
    let mut unpack_budget = MAX_UNPACKED_BYTES;
    respond_into(&mut out, msg_id, body, ctx, rng, 0, &mut unpack_budget);
    out
}

fn respond_into(
    out: &mut Outcome,
    msg_id: i64,
    body: &[u8],
    ctx: &Context,
    rng: &mut impl RngCore,
    depth: u8,
    unpack_budget: &mut u64,
) {
    let (session_id, now, current_salt) = (ctx.session_id, ctx.now, ctx.current_salt);
    let mut r = TlReader::new(body);
    let Ok(constructor) = r.u32() else {
        return;
    };
    match constructor {
        id::MSG_CONTAINER if depth == 0 => {
            let Ok(count) = r.u32() else { return };
            for _ in 0..count.min(1024) {
                let (Ok(inner_id), Ok(_seq), Ok(len)) = (r.i64(), r.i32(), r.u32()) else {
                    return;
                };
                let Ok(inner) = r.take(len as usize) else {
                    return;
                };
                respond_into(out, inner_id, inner, ctx, rng, 1, unpack_budget);
            }
        }
        id::GZIP_PACKED if depth < 2 => {
            let Ok(packed) = r.bytes() else { return };
            let mut unpacked = Vec::new();
            let decoder = flate2::read::GzDecoder::new(packed);
            let read = decoder.take(*unpack_budget).read_to_end(&mut unpacked);
            *unpack_budget = unpack_budget.saturating_sub(unpacked.len() as u64);
            if read.is_ok() {
                respond_into(out, msg_id, &unpacked, ctx, rng, depth + 1, unpack_budget);
            }
        }
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
            b.put_i32(now as i32);
            b.put_u32(num as u32);
            let start = now as i32 - now as i32 % SALT_PERIOD_SECS;
            for i in 0..num {
                let since = start + i * SALT_PERIOD_SECS;
                let until = since + SALT_PERIOD_SECS;
                let salt = if i == 0 {
                    current_salt
                } else {
                    rng.next_u64() as i64
                };
                b.put_i32(since);
                b.put_i32(until);
                b.put_i64(salt);
                if i > 0 {
                    out.new_salts.push((since, until, salt));
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
            let mut result = Vec::new();
            let known = target != session_id;
            result.put_u32(if known {
                id::DESTROY_SESSION_OK
            } else {
                id::DESTROY_SESSION_NONE
            });
            result.put_i64(target);
            if known {
                out.destroyed_session = Some(target);
            }
            out.replies.push(rpc_result(msg_id, &result));
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

/// Parses a server reply's `pong`, for tests.
pub fn parse_pong(body: &[u8]) -> Option<(i64, i64)> {
    let mut r = TlReader::new(body);
    r.expect(id::PONG, "pong").ok()?;
    Some((r.i64().ok()?, r.i64().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const NOW: i64 = 1_800_000_000;

    fn ctx(session_id: i64, current_salt: i64) -> Context {
        Context {
            session_id,
            now: NOW,
            current_salt,
            unbound_temp_key: false,
        }
    }

    fn ping(ping_id: i64) -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(id::PING);
        b.put_i64(ping_id);
        b
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
        let mut rng = rand::thread_rng();
        let out = respond(40, &ping(7), &ctx(1, 9), &mut rng);
        assert_eq!(parse_pong(&out.replies[0].body), Some((40, 7)));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&ping(8)).unwrap();
        let mut packed = Vec::new();
        packed.put_u32(id::GZIP_PACKED);
        packed.put_bytes(&gz.finish().unwrap());

        let mut container = Vec::new();
        container.put_u32(id::MSG_CONTAINER);
        container.put_u32(3);
        for (mid, body) in [
            (44i64, ping(5)),
            (48, packed),
            (
                52,
                vec![0x59, 0xb4, 0xd6, 0x62, 0x15, 0xc4, 0xb5, 0x1c, 0, 0, 0, 0],
            ),
        ] {
            container.put_i64(mid);
            container.put_i32(1);
            container.put_u32(body.len() as u32);
            container.put_raw(&body);
        }
        let out = respond(56, &container, &ctx(1, 9), &mut rng);
        let pongs: Vec<_> = out
            .replies
            .iter()
            .filter_map(|r| parse_pong(&r.body))
            .collect();
        assert_eq!(pongs, vec![(44, 5), (48, 8)]);
        assert_eq!(out.replies.len(), 2, "msgs_ack gets no reply");
    }

    #[test]
    fn api_calls_get_rpc_error_400() {
        let mut call = Vec::new();
        call.put_u32(id::INVOKE_WITH_LAYER);
        call.put_i32(200);
        let out = respond(60, &call, &ctx(1, 9), &mut rand::thread_rng());
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
        let out = respond(60, &call, &unbound, &mut rand::thread_rng());
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
        let out = respond(64, &req, &ctx(1, 1234), &mut rand::thread_rng());
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

    /// Each `gzip_packed` of a container had its own 1 MiB cap, so 1024 small
    /// bombs carrying `auth.bindTempAuthKey` kept 1 GiB from a ~1 MB message
    /// (found reviewing the bound the `reference_session` fuzz target asserts).
    #[test]
    fn one_unpack_budget_for_all_gzip_packed_of_a_message() {
        let mut bind = crate::bind::BIND_TEMP_AUTH_KEY.to_le_bytes().to_vec();
        bind.resize(MAX_UNPACKED_BYTES as usize, 0);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&bind).unwrap();
        let mut packed = Vec::new();
        packed.put_u32(id::GZIP_PACKED);
        packed.put_bytes(&gz.finish().unwrap());
        let mut container = Vec::new();
        container.put_u32(id::MSG_CONTAINER);
        container.put_u32(4);
        for mid in [4i64, 8, 12, 16] {
            container.put_i64(mid);
            container.put_i32(1);
            container.put_u32(packed.len() as u32);
            container.put_raw(&packed);
        }
        let out = respond(20, &container, &ctx(1, 1), &mut rand::thread_rng());
        let kept: usize = out.binds.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(kept as u64, MAX_UNPACKED_BYTES, "{} binds", out.binds.len());
    }

    #[test]
    fn gzip_bombs_are_capped_and_garbage_is_ignored() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 8 << 20]).unwrap();
        let mut packed = Vec::new();
        packed.put_u32(id::GZIP_PACKED);
        packed.put_bytes(&gz.finish().unwrap());
        let out = respond(8, &packed, &ctx(1, 1), &mut rand::thread_rng());
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
            let _ = respond(8, junk, &ctx(1, 1), &mut rand::thread_rng());
        }
    }
}
