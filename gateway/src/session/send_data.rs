//! Stream mode's `sendDataToSession` requests, encoded straight from the
//! forwarded messages: the bytes prost makes of the generated types (a test
//! holds them equal), without building those types. Building them cost
//! every forwarded message four allocations (two strings copied out of
//! shared ones, the predicate name, a buffer of its own); here a batch
//! shares one buffer.

use bytes::{BufMut, Bytes, BytesMut};
use mtproto_edge_proto::session as spb;
use mtproto_session::SessionClientData;
use prost::encoding::{encoded_len_varint, key_len, WireType};

/// `SessionStreamRequest.send_data`.
const STREAM_SEND_DATA: u32 = 10;
/// `TL_session_sendDataToSession.constructor` and `.data`.
const CALL_CONSTRUCTOR: u32 = 1;
const CALL_DATA: u32 = 3;

/// One field as proto3 encodes it: zeros and empty strings are left out; a
/// nested message's header is written whatever its length.
enum Field<'a> {
    /// `int32` and `int64` alike: a negative `int32` is sign-extended.
    Int(u32, i64),
    Bytes(u32, &'a [u8]),
    /// The tag and length of a message whose fields follow.
    Message(u32, usize),
}

impl Field<'_> {
    fn len(&self) -> usize {
        match *self {
            Field::Int(_, 0) => 0,
            Field::Bytes(_, []) => 0,
            Field::Int(tag, value) => key_len(tag) + encoded_len_varint(value as u64),
            Field::Bytes(tag, bytes) => {
                key_len(tag) + encoded_len_varint(bytes.len() as u64) + bytes.len()
            }
            Field::Message(tag, len) => key_len(tag) + encoded_len_varint(len as u64),
        }
    }

    fn put(&self, out: &mut BytesMut) {
        match *self {
            Field::Int(_, 0) | Field::Bytes(_, []) => {}
            Field::Int(tag, value) => {
                put_key(tag, WireType::Varint, out);
                put_varint(value as u64, out);
            }
            Field::Bytes(tag, bytes) => {
                put_key(tag, WireType::LengthDelimited, out);
                put_varint(bytes.len() as u64, out);
                out.put_slice(bytes);
            }
            Field::Message(tag, len) => {
                put_key(tag, WireType::LengthDelimited, out);
                put_varint(len as u64, out);
            }
        }
    }
}

fn put_key(tag: u32, wire_type: WireType, out: &mut BytesMut) {
    put_varint(u64::from(tag << 3 | wire_type as u32), out);
}

/// A varint written with one copy: prost's `encode_varint` puts it byte by
/// byte, each a capacity check, and the ids of every message (auth key,
/// session, salt) take nine or ten bytes each.
fn put_varint(mut value: u64, out: &mut BytesMut) {
    let mut bytes = [0u8; 10];
    let mut len = 0;
    while value >= 0x80 {
        bytes[len] = value as u8 | 0x80;
        value >>= 7;
        len += 1;
    }
    bytes[len] = value as u8;
    out.put_slice(&bytes[..=len]);
}

/// teamgram's `SessionClientData`, field by field in tag order.
fn client_data_fields(data: &SessionClientData) -> [Field<'_>; 12] {
    [
        Field::Bytes(1, b"sessionClientData"),
        Field::Int(2, spb::SESSION_CLIENT_DATA.into()),
        Field::Bytes(3, data.server_id.as_bytes()),
        Field::Int(4, data.conn_type.into()),
        Field::Int(5, data.auth_key_id),
        Field::Int(6, data.key_type.into()),
        Field::Int(7, data.perm_auth_key_id),
        Field::Int(8, data.session_id),
        Field::Bytes(9, data.client_ip.as_bytes()),
        Field::Int(10, data.quick_ack.into()),
        Field::Int(11, data.salt),
        Field::Bytes(12, &data.payload),
    ]
}

/// The request for each message, without its `request_id` (the link adds
/// it), split off one buffer.
pub(super) fn send_data_bodies(batch: &[SessionClientData]) -> Vec<Bytes> {
    let requests: Vec<_> = batch.iter().map(Request::new).collect();
    let mut out = BytesMut::with_capacity(requests.iter().map(|r| r.len).sum());
    requests
        .iter()
        .map(|request| {
            request.put(&mut out);
            out.split().freeze()
        })
        .collect()
}

/// The request for one message, without its `request_id`.
pub(super) fn send_data_body(data: &SessionClientData) -> Bytes {
    let request = Request::new(data);
    let mut out = BytesMut::with_capacity(request.len);
    request.put(&mut out);
    out.freeze()
}

/// `SessionStreamRequest { send_data: TL_session_sendDataToSession {
/// constructor, data } }`: the headers of the nested messages, then the
/// message's fields.
struct Request<'a> {
    headers: [Field<'a>; 3],
    data: [Field<'a>; 12],
    len: usize,
}

impl<'a> Request<'a> {
    fn new(data: &'a SessionClientData) -> Self {
        let data = client_data_fields(data);
        let data_len = data.iter().map(Field::len).sum();
        let constructor = Field::Int(CALL_CONSTRUCTOR, spb::SEND_DATA_TO_SESSION.into());
        let data_header = Field::Message(CALL_DATA, data_len);
        let call_len = constructor.len() + data_header.len() + data_len;
        let call_header = Field::Message(STREAM_SEND_DATA, call_len);
        Self {
            len: call_header.len() + call_len,
            headers: [call_header, constructor, data_header],
            data,
        }
    }

    fn put(&self, out: &mut BytesMut) {
        for field in self.headers.iter().chain(&self.data) {
            field.put(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtproto_edge_proto::session::session_stream_request::Payload;
    use mtproto_session::wire::data_to_proto;
    use prost::Message;

    /// What prost makes of the same message through the generated types.
    fn through_prost(data: SessionClientData) -> Vec<u8> {
        spb::SessionStreamRequest {
            request_id: String::new(),
            payload: Some(Payload::SendData(spb::TlSessionSendDataToSession {
                constructor: spb::SEND_DATA_TO_SESSION,
                data: Some(data_to_proto(data)),
            })),
        }
        .encode_to_vec()
    }

    fn message(payload_len: usize) -> SessionClientData {
        SessionClientData {
            server_id: "10.0.0.5:20110".into(),
            conn_type: 1,
            auth_key_id: -7_000_000_000,
            key_type: -1,
            perm_auth_key_id: i64::MAX,
            session_id: i64::MIN,
            client_ip: "2001:db8::7".into(),
            quick_ack: i32::MIN,
            salt: 0x0102_0304_0506_0708,
            payload: Bytes::from(vec![0xa5; payload_len]),
        }
    }

    #[test]
    fn varints_are_prosts() {
        let steps = (0..64).flat_map(|bit| {
            let at = 1u64 << bit;
            [at - 1, at, at + 1]
        });
        for value in steps.chain([u64::MAX, (-1i64) as u64]) {
            let (mut ours, mut theirs) = (BytesMut::new(), BytesMut::new());
            put_varint(value, &mut ours);
            prost::encoding::encode_varint(value, &mut theirs);
            assert_eq!(ours, theirs, "{value}");
        }
    }

    #[test]
    fn requests_are_the_bytes_prost_makes() {
        let empty = SessionClientData {
            server_id: "".into(),
            conn_type: 0,
            auth_key_id: 0,
            key_type: 0,
            perm_auth_key_id: 0,
            session_id: 0,
            client_ip: "".into(),
            quick_ack: 0,
            salt: 0,
            payload: Bytes::new(),
        };
        // Lengths around the varint steps of the nested messages' lengths.
        let batch = vec![
            message(40),
            empty,
            message(127),
            message(16_300),
            message(16_400),
            message(1 << 21),
        ];
        assert_eq!(
            &send_data_body(&batch[0])[..],
            &through_prost(batch[0].clone())[..]
        );
        let bodies = send_data_bodies(&batch);
        assert_eq!(bodies.len(), batch.len());
        for (body, data) in bodies.iter().zip(batch) {
            assert_eq!(&body[..], &through_prost(data)[..]);
        }
    }
}
