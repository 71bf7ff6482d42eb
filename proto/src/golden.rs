//! Golden wire tests: each message the gateway or the reference session sends
//! is encoded and compared with bytes built here from first principles (tag =
//! field number << 3 | wire type) using the field numbers of teamgram's
//! protos. A field-number slip in the .proto files fails these tests.

use prost::Message;

use crate::{gateway, mtproto, session};

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Wire type 0; negative int32/int64 are sign-extended to 64 bits.
fn int(field: u32, v: i64, out: &mut Vec<u8>) {
    varint(u64::from(field) << 3, out);
    varint(v as u64, out);
}

/// Wire type 2.
fn len(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(u64::from(field) << 3 | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn client_data() -> session::SessionClientData {
    session::SessionClientData {
        predicate_name: "sessionClientData".into(),
        constructor: session::SESSION_CLIENT_DATA,
        server_id: "10.0.0.5:20110".into(),
        conn_type: 1,
        auth_key_id: -7_000_000_000,
        key_type: 1,
        perm_auth_key_id: 123_456_789_012,
        session_id: -42,
        client_ip: "192.0.2.7".into(),
        quick_ack: 0,
        salt: 0x0102_0304_0506_0708,
        payload: vec![1, 2, 3, 4].into(),
    }
}

fn client_data_bytes() -> Vec<u8> {
    let mut b = Vec::new();
    len(1, b"sessionClientData", &mut b);
    int(2, i64::from(session::SESSION_CLIENT_DATA), &mut b);
    len(3, b"10.0.0.5:20110", &mut b);
    int(4, 1, &mut b);
    int(5, -7_000_000_000, &mut b);
    int(6, 1, &mut b);
    int(7, 123_456_789_012, &mut b);
    int(8, -42, &mut b);
    len(9, b"192.0.2.7", &mut b);
    int(11, 0x0102_0304_0506_0708, &mut b);
    len(12, &[1, 2, 3, 4], &mut b);
    b
}

fn client_event() -> session::SessionClientEvent {
    session::SessionClientEvent {
        predicate_name: "sessionClientEvent".into(),
        constructor: session::SESSION_CLIENT_EVENT,
        server_id: "10.0.0.5:20110".into(),
        conn_type: 0,
        auth_key_id: 99,
        key_type: 0,
        perm_auth_key_id: 99,
        session_id: 7,
        client_ip: "198.51.100.1".into(),
    }
}

fn client_event_bytes() -> Vec<u8> {
    let mut b = Vec::new();
    len(1, b"sessionClientEvent", &mut b);
    int(2, i64::from(session::SESSION_CLIENT_EVENT), &mut b);
    len(3, b"10.0.0.5:20110", &mut b);
    int(5, 99, &mut b);
    int(7, 99, &mut b);
    int(8, 7, &mut b);
    len(9, b"198.51.100.1", &mut b);
    b
}

#[test]
fn bool_true_and_false() {
    let mut t = Vec::new();
    len(1, b"boolTrue", &mut t);
    int(2, i64::from(mtproto::BOOL_TRUE), &mut t);
    assert_eq!(mtproto::Bool::from_bool(true).encode_to_vec(), t);
    assert!(mtproto::Bool::decode(&t[..]).unwrap().value());
    // teamgram's helpers set only the name.
    let mut f = Vec::new();
    len(1, b"boolFalse", &mut f);
    assert!(!mtproto::Bool::decode(&f[..]).unwrap().value());
    assert!(!mtproto::Bool::default().value());
}

#[test]
fn auth_key_info_and_set_auth_key() {
    let info = mtproto::AuthKeyInfo {
        predicate_name: "authKeyInfo".into(),
        constructor: mtproto::AUTH_KEY_INFO,
        auth_key_id: -1,
        auth_key: vec![0xab; 256],
        auth_key_type: 1,
        perm_auth_key_id: 5,
        temp_auth_key_id: -1,
        media_temp_auth_key_id: 0,
        expires_at: 0,
    };
    let mut info_bytes = Vec::new();
    len(1, b"authKeyInfo", &mut info_bytes);
    int(2, i64::from(mtproto::AUTH_KEY_INFO), &mut info_bytes);
    int(3, -1, &mut info_bytes);
    len(4, &[0xab; 256], &mut info_bytes);
    int(5, 1, &mut info_bytes);
    int(6, 5, &mut info_bytes);
    int(7, -1, &mut info_bytes);
    assert_eq!(info.encode_to_vec(), info_bytes);
    // Our expiry field rides beside teamgram's, which skips it.
    let expiring = mtproto::AuthKeyInfo {
        expires_at: 1_800_086_400,
        ..info.clone()
    };
    let mut expiring_bytes = info_bytes.clone();
    int(100, 1_800_086_400, &mut expiring_bytes);
    assert_eq!(expiring.encode_to_vec(), expiring_bytes);

    let salt = mtproto::FutureSalt {
        predicate_name: "futureSalt".into(),
        constructor: mtproto::FUTURE_SALT,
        valid_since: 1_800_000_000,
        valid_until: 1_800_001_800,
        salt: -3,
    };
    let mut salt_bytes = Vec::new();
    len(1, b"futureSalt", &mut salt_bytes);
    int(2, i64::from(mtproto::FUTURE_SALT), &mut salt_bytes);
    int(3, 1_800_000_000, &mut salt_bytes);
    int(4, 1_800_001_800, &mut salt_bytes);
    int(5, -3, &mut salt_bytes);
    assert_eq!(salt.encode_to_vec(), salt_bytes);

    let set = session::TlSessionSetAuthKey {
        constructor: session::SET_AUTH_KEY,
        auth_key: Some(info),
        future_salt: Some(salt),
        expires_in: 3600,
    };
    let mut b = Vec::new();
    int(1, i64::from(session::SET_AUTH_KEY), &mut b);
    len(3, &info_bytes, &mut b);
    len(4, &salt_bytes, &mut b);
    int(5, 3600, &mut b);
    assert_eq!(set.encode_to_vec(), b);
}

#[test]
fn query_auth_key() {
    let q = session::TlSessionQueryAuthKey {
        constructor: session::QUERY_AUTH_KEY,
        auth_key_id: -8_070_450_532_247_928_832,
    };
    let mut b = Vec::new();
    int(1, i64::from(session::QUERY_AUTH_KEY), &mut b);
    int(3, -8_070_450_532_247_928_832, &mut b);
    assert_eq!(q.encode_to_vec(), b);
}

#[test]
fn send_data_and_close_session() {
    let send = session::TlSessionSendDataToSession {
        constructor: session::SEND_DATA_TO_SESSION,
        data: Some(client_data()),
    };
    let mut b = Vec::new();
    int(1, i64::from(session::SEND_DATA_TO_SESSION), &mut b);
    len(3, &client_data_bytes(), &mut b);
    assert_eq!(send.encode_to_vec(), b);

    let close = session::TlSessionCloseSession {
        constructor: session::CLOSE_SESSION,
        client: Some(client_event()),
    };
    let mut b = Vec::new();
    int(1, i64::from(session::CLOSE_SESSION), &mut b);
    len(3, &client_event_bytes(), &mut b);
    assert_eq!(close.encode_to_vec(), b);
}

#[test]
fn session_stream_envelopes() {
    let req = session::SessionStreamRequest {
        request_id: "r1".into(),
        payload: Some(session::session_stream_request::Payload::SendData(
            session::TlSessionSendDataToSession {
                constructor: 0,
                data: Some(client_data()),
            },
        )),
    };
    let mut inner = Vec::new();
    len(3, &client_data_bytes(), &mut inner);
    let mut b = Vec::new();
    len(1, b"r1", &mut b);
    len(10, &inner, &mut b);
    assert_eq!(req.encode_to_vec(), b);

    let query = session::SessionStreamRequest {
        request_id: "r2".into(),
        payload: Some(session::session_stream_request::Payload::QueryAuthKey(
            session::TlSessionQueryAuthKey {
                constructor: 0,
                auth_key_id: 5,
            },
        )),
    };
    let mut b = Vec::new();
    len(1, b"r2", &mut b);
    len(13, &[0x18, 0x05], &mut b);
    assert_eq!(query.encode_to_vec(), b);

    let err = session::SessionStreamResponse {
        request_id: "r1".into(),
        payload: Some(session::session_stream_response::Payload::Error(
            session::SessionStreamError {
                code: 700,
                message: "REDIRECT_TO_10.0.0.2:20120".into(),
            },
        )),
    };
    let mut e = Vec::new();
    int(1, 700, &mut e);
    len(2, b"REDIRECT_TO_10.0.0.2:20120", &mut e);
    let mut b = Vec::new();
    len(1, b"r1", &mut b);
    len(11, &e, &mut b);
    assert_eq!(err.encode_to_vec(), b);

    let ack = session::SessionStreamResponse {
        request_id: "r3".into(),
        payload: Some(session::session_stream_response::Payload::Ack(
            session::SessionStreamAck { success: true },
        )),
    };
    let mut b = Vec::new();
    len(1, b"r3", &mut b);
    len(10, &[0x08, 0x01], &mut b);
    assert_eq!(ack.encode_to_vec(), b);
}

#[test]
fn gateway_send_data_and_stream() {
    let send = gateway::TlGatewaySendDataToGateway {
        constructor: gateway::SEND_DATA_TO_GATEWAY,
        auth_key_id: 11,
        session_id: -12,
        payload: vec![9; 40].into(),
    };
    let mut b = Vec::new();
    int(1, i64::from(gateway::SEND_DATA_TO_GATEWAY), &mut b);
    int(3, 11, &mut b);
    int(4, -12, &mut b);
    len(5, &[9; 40], &mut b);
    assert_eq!(send.encode_to_vec(), b);

    let req = gateway::GatewayStreamRequest {
        request_id: String::new(),
        send_data: Some(send),
    };
    let mut r = Vec::new();
    len(10, &b, &mut r);
    assert_eq!(req.encode_to_vec(), r);

    // Our extension: the same message on the gateway's session stream, as
    // field 20 of its response, with no request_id.
    let on_stream = session::SessionStreamResponse {
        request_id: String::new(),
        payload: req
            .send_data
            .map(session::session_stream_response::Payload::SendData),
    };
    let mut r = Vec::new();
    len(20, &b, &mut r);
    assert_eq!(on_stream.encode_to_vec(), r);

    let resp = gateway::GatewayStreamResponse {
        request_id: "x".into(),
        success: true,
    };
    let mut b = Vec::new();
    len(1, b"x", &mut b);
    int(2, 1, &mut b);
    assert_eq!(resp.encode_to_vec(), b);
}
