//! Writes the seed corpora (fuzz/corpus/<target>/): test vectors and client
//! traffic built the way clients build it, laid out in the order each
//! target reads its input. Run from fuzz/ with
//! `cargo run --release --example seeds -- corpus` (not instrumented).

use std::io::Write;
use std::path::Path;

use bytes::BytesMut;
use mtproto_core::authkey::AuthKey;
use mtproto_core::bind::{self, Outer};
use mtproto_core::message;
use mtproto_core::rsa::{encrypt_legacy, encrypt_rsa_pad};
use mtproto_core::tl::{id, msg_container, TlWrite};
use mtproto_core::transport::{Framing, FramingKind};
use mtproto_core_fuzz::{
    inner_data, pq, req_pq_body, rng, server_key, ClientWire, NOW, TRANSPORTS,
};

/// Bytes in the order a target's `Cursor` reads them.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// `Cursor::chunk`: a length byte (0 = u16 length follows), then the bytes.
    fn chunk(&mut self, v: &[u8]) -> &mut Self {
        if (1..=255).contains(&v.len()) {
            self.u8(v.len() as u8);
        } else {
            self.u8(0).u16(v.len() as u16);
        }
        self.raw(v)
    }
}

fn ping(ping_id: i64) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u32(id::PING);
    b.put_i64(ping_id);
    b
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(body).expect("gzip");
    let mut packed = Vec::new();
    packed.put_u32(id::GZIP_PACKED);
    packed.put_bytes(&gz.finish().expect("gzip"));
    packed
}

fn http_wait(max_delay: i32, wait_after: i32, max_wait: i32) -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u32(id::HTTP_WAIT);
    b.put_i32(max_delay);
    b.put_i32(wait_after);
    b.put_i32(max_wait);
    b
}

fn msg_id(n: i64) -> i64 {
    (NOW << 32) + 4 * n
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write");
}

/// A client's first messages on a transport: req_pq_multi, then an
/// encrypted ping under `key`, each framed (the second asking a QuickAck).
fn client_stream(wire: &mut ClientWire, key: &AuthKey) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(wire.frame(
        &message::encode_plain(msg_id(1), &req_pq_body(true, [7; 16])),
        false,
        &[],
    ));
    let plain = message::plaintext_message(42, 1, msg_id(2), 1, &ping(9));
    let frame = message::encrypt_as_client(key, &plain, 12 + 16, &mut rng(1));
    out.extend(wire.frame(&frame, true, &[1, 2, 3]));
    out
}

fn transport(dir: &Path) {
    let key = AuthKey::new([9; 256]);
    for (i, &(kind, _)) in TRANSPORTS.iter().enumerate() {
        let mode = i as u8 + 1;
        let mut random = [0u8; 64];
        for (j, b) in random.iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(31).wrapping_add(mode);
        }
        // The target obfuscates the body itself: give it the plain frames.
        let mut plain_wire = ClientWire::start(kind, false, random).0;
        let mut s = Script::default();
        s.u8(mode)
            .raw(&[1, 7, 64, 255])
            .raw(&client_stream(&mut plain_wire, &key));
        write(dir, "transport", &format!("framed-{mode}"), &s.0);
    }
    // Raw streams: detection sees the first bytes.
    for (i, &(kind, obfuscated)) in TRANSPORTS.iter().enumerate() {
        let (mut wire, mut stream) = ClientWire::start(kind, obfuscated, [i as u8 + 0x40; 64]);
        stream.extend(client_stream(&mut wire, &key));
        let mut s = Script::default();
        s.u8(0).raw(&[3, 1, 200, 16]).raw(&stream);
        write(dir, "transport", &format!("raw-{i}"), &s.0);
    }
    for (name, bytes) in [
        ("http", &b"POST /api HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
        (
            "tls",
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc][..],
        ),
        ("h2", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
    ] {
        let mut s = Script::default();
        s.u8(0).raw(&[1, 1, 1, 1]).raw(bytes);
        write(dir, "transport", name, &s.0);
    }
    // Full transport round trip payloads (mode 4).
    let mut s = Script::default();
    s.u8(4)
        .raw(&[255, 255, 255, 255])
        .chunk(&[1; 16])
        .chunk(&ping(5));
    let mut f = Framing::new(FramingKind::Full);
    let mut out = BytesMut::new();
    f.encode(&[2; 8], &mut out, &mut rng(0));
    s.raw(&out);
    write(dir, "transport", "full-payloads", &s.0);
}

fn handshake(dir: &Path) {
    // seed, nonce, multi, then steps (see fuzz_targets/handshake.rs).
    let start = |s: &mut Script| {
        s.u8(1).raw(&[7; 16]).u8(1);
    };
    // req_DH_params (RSA_PAD, each variant), set_client_DH_params, store.
    for variant in 0..4u8 {
        let mut s = Script::default();
        start(&mut s);
        s.u8(2)
            .raw(&[variant + 1; 32])
            .u8(variant)
            .u8(2)
            .i32(3600)
            .u8(0);
        s.u8(0).u8(1).u8(1); // no edits; RSA_PAD; body not edited
        s.u8(5).u8(1).u8(1).u8(0).u8(0).u8(1); // retry 0, valid g_b, no edits, no padding, not edited
        s.u8(variant % 3); // store outcome
        s.u8(5).u8(1).u8(1).u8(0).u8(0).u8(1); // again (retry after a collision)
        s.u8(0);
        write(dir, "handshake", &format!("full-{variant}"), &s.0);
    }
    // Legacy padding, then a raw encrypted_data, then a raw body.
    let mut s = Script::default();
    start(&mut s);
    s.u8(3)
        .raw(&[5; 32])
        .u8(1)
        .u8(2)
        .i32(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(1);
    s.u8(1).raw(&[0x42; 256]);
    s.u8(0).chunk(&req_pq_body(false, [1; 16]));
    write(dir, "handshake", "legacy-raw", &s.0);
    // set_client_DH_params before req_DH_params; own g_b.
    let mut s = Script::default();
    start(&mut s);
    s.u8(6)
        .u8(0)
        .i64(5)
        .u8(0)
        .chunk(&[2; 256])
        .u8(0)
        .u8(4)
        .raw(&[0; 4])
        .u8(1);
    write(dir, "handshake", "out-of-order", &s.0);
}

fn decrypt(dir: &Path) {
    let key = AuthKey::new(std::array::from_fn(|i| (i * 13 + 5) as u8));
    for (flags, body) in [
        (0u8, ping(1)),
        (1, vec![0; 64]),
        (2, http_wait(0, 0, 25_000)),
    ] {
        let plain = message::plaintext_message(7, 8, msg_id(3), 3, &body);
        let pad = 12 + (16 - (plain.len() + 12) % 16) % 16;
        let mut frame = message::encrypt_as_client(&key, &plain, pad, &mut rng(2));
        if flags & 1 == 1 {
            frame.extend_from_slice(&[0xaa; 5]);
        }
        let mut s = Script::default();
        s.u8(flags).raw(&frame);
        write(dir, "decrypt", &format!("valid-{flags}"), &s.0);
    }
    let mut s = Script::default();
    s.u8(0)
        .i64(1)
        .i64(2)
        .i64(msg_id(1))
        .i32(1)
        .u8(3)
        .u8(5)
        .raw(&ping(3));
    write(dir, "decrypt", "round-trip", &s.0);
}

fn rsa_unpad(dir: &Path) {
    let key = server_key();
    let (_, _, _) = pq();
    let inner = inner_data(0, &[1; 16], &[2; 16], &[3; 32], 0, 0);
    let mut r = rng(4);
    for (name, c, flags) in [
        (
            "rsa-pad",
            encrypt_rsa_pad(&key.public_key(), &inner, &mut r),
            0u8,
        ),
        (
            "legacy",
            encrypt_legacy(&key.public_key(), &inner, &mut r),
            3,
        ),
    ] {
        let m = key.decrypt_raw(&c.expect("encrypt")).expect("decrypt");
        let mut s = Script::default();
        s.u8(flags).u16(inner.len() as u16).raw(&m);
        write(dir, "rsa_unpad", name, &s.0);
    }
}

fn plain(dir: &Path) {
    let msg = message::encode_plain(msg_id(1), &req_pq_body(true, [7; 16]));
    write(dir, "plain", "req_pq", &[&[0u8][..], &msg].concat());
    write(
        dir,
        "plain",
        "req_pq-padded",
        &[&[1u8][..], &msg, &[0; 7]].concat(),
    );
}

fn proxy(dir: &Path) {
    let v2 = |name: &str, command: u8, family: u8, body: &[u8]| {
        let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        out.push(command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out.push(0xef);
        write(dir, "proxy", name, &out);
    };
    let mut tcp4 = vec![192, 0, 2, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x01, 0xbb];
    tcp4.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]);
    v2("v2-tcp4", 0x21, 0x11, &tcp4);
    let mut tcp6 = vec![0x20, 0x01, 0x0d, 0xb8];
    tcp6.resize(32, 1);
    tcp6.extend_from_slice(&[0x9c, 0x40, 0x28, 0xdb]);
    v2("v2-tcp6", 0x21, 0x21, &tcp6);
    v2("v2-local", 0x20, 0x00, &[]);
    v2("v2-unix", 0x21, 0x31, &[0; 216]);
    for (name, line) in [
        (
            "v1-tcp4",
            &b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 10443\r\n\xef"[..],
        ),
        (
            "v1-tcp6",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n",
        ),
        ("v1-unknown", b"PROXY UNKNOWN\r\n"),
    ] {
        write(dir, "proxy", name, line);
    }
}

fn longpoll(dir: &Path) {
    let first = message::plaintext_message(1, 2, msg_id(1) + 1, 1, &ping(1));
    let second = message::plaintext_message(
        1,
        2,
        msg_id(2) + 1,
        3,
        &msg_container(&[(msg_id(3) + 1, 5, ping(2))]),
    );
    for (name, body, split) in [
        ("http_wait", http_wait(0, 100, 25_000), 0u16),
        (
            "container",
            msg_container(&[
                (msg_id(1), 1, ping(1)),
                (msg_id(2), 2, http_wait(500, 150, 3000)),
            ]),
            0,
        ),
        (
            "server-messages",
            [first.clone(), second].concat(),
            first.len() as u16,
        ),
    ] {
        let mut s = Script::default();
        s.i64(msg_id(9)).i32(3).u16(2000).u16(split).raw(&body);
        write(dir, "longpoll", name, &s.0);
    }
}

fn bind_seeds(dir: &Path) {
    let perm = AuthKey::new(std::array::from_fn(|i| (i * 3 + 1) as u8));
    let outer = Outer {
        msg_id: msg_id(5),
        temp_auth_key_id: 0x1234_5678,
        session_id: 77,
    };
    let req = bind::build_request(&perm, &outer, 5, 1_800_086_400, &mut rng(5));
    let mut s = Script::default();
    s.u8(0)
        .i64(outer.msg_id)
        .i64(outer.temp_auth_key_id)
        .i64(outer.session_id);
    s.i64(5).i32(1_800_086_400).raw(&req.encode());
    write(dir, "bind", "valid", &s.0);
}

fn reference_session(dir: &Path) {
    let mut salts = Vec::new();
    salts.put_u32(id::GET_FUTURE_SALTS);
    salts.put_i32(3);
    let mut destroy = Vec::new();
    destroy.put_u32(id::DESTROY_SESSION);
    destroy.put_i64(2);
    let mut state = Vec::new();
    state.put_u32(id::MSGS_STATE_REQ);
    state.put_u32(id::VECTOR);
    state.put_u32(2);
    state.put_i64(msg_id(1));
    state.put_i64(msg_id(2));
    let mut call = Vec::new();
    call.put_u32(id::INVOKE_WITH_LAYER);
    call.put_i32(200);
    let mut ack = Vec::new();
    ack.put_u32(id::MSGS_ACK);
    ack.put_u32(id::VECTOR);
    ack.put_u32(1);
    ack.put_i64(msg_id(1));
    let bind_req = bind::build_request(
        &AuthKey::new([1; 256]),
        &Outer {
            msg_id: msg_id(4),
            temp_auth_key_id: 3,
            session_id: 1,
        },
        5,
        100,
        &mut rng(6),
    )
    .encode();
    let bodies = [
        ("ping", ping(7)),
        ("future_salts", salts),
        ("destroy_session", destroy),
        ("msgs_state_req", state),
        ("api_call", call),
        (
            "rpc_drop_answer",
            id::RPC_DROP_ANSWER.to_le_bytes().to_vec(),
        ),
        (
            "container",
            msg_container(&[
                (msg_id(1), 1, ping(5)),
                (msg_id(2), 3, gzip(&ping(8))),
                (msg_id(3), 4, ack),
                (msg_id(4), 5, gzip(&bind_req)),
            ]),
        ),
        ("gzip-bind", gzip(&bind_req)),
    ];
    for (name, body) in bodies {
        let mut s = Script::default();
        let seq_no = if name == "container" { 6 } else { 1 };
        s.u8(0)
            .i64(msg_id(8))
            .i64(1)
            .u16(0)
            .i64(9)
            .i32(seq_no)
            .raw(&body);
        write(dir, "reference_session", name, &s.0);
    }
}

/// Scripts for the connection driver (see fuzz_targets/connection.rs).
fn connection(dir: &Path) {
    let header = |s: &mut Script, choice: u8| {
        // seed, transport, max_sessions, forward_window, max_unsent, handshakes, init random.
        s.u8(1).u8(choice).u8(1).u8(1).u8(6).u8(3);
        if choice < 7 {
            s.raw(&[0x5a; 64]);
        }
    };
    let send = |s: &mut Script| {
        s.u8(0).u8(0); // no padding, not cut
    };
    let encrypted = |s: &mut Script, which: u8, n: i64, quick_ack: bool| {
        s.u8(2)
            .u8(which)
            .u8(1)
            .i64(9)
            .i64(msg_id(n))
            .i32(1)
            .chunk(&ping(n))
            .u8(0)
            .u8(1);
        s.u8(u8::from(quick_ack)).u8(0).u8(0); // QuickAck, sent once
        s.u8(0).u8(0); // no padding, not cut
    };
    for choice in [0u8, 1, 2, 3, 4, 5, 6, 7] {
        // A whole handshake, then the new key in use.
        let mut s = Script::default();
        header(&mut s, choice);
        s.u8(5).u8(0).raw(&[7; 16]).u8(1).u16(1);
        send(&mut s);
        s.u8(12).u16(0xffff);
        s.u8(5).u8(1).raw(&[3; 32]).u8(0).u8(0).u16(2);
        send(&mut s);
        s.u8(7); // run the RSA/DH job
        s.u8(12).u16(0xffff);
        s.u8(5).u8(2).u8(1).u16(3);
        send(&mut s);
        s.u8(7); // run the DH job
        s.u8(7).u8(2); // stored
        s.u8(12).u16(0xffff);
        encrypted(&mut s, 4, 4, true);
        s.u8(7).u8(2); // lookup: found
        s.u8(9).u8(2); // forward accepted
        s.u8(14).chunk(&ping(1));
        s.u8(12).u16(0xffff);
        s.u8(11).u8(7);
        write(dir, "connection", &format!("handshake-{choice}"), &s.0);

        // Each known key (perm, unbound temp, bound temp, expired), two
        // messages, a server message, a partial write, timeouts.
        for which in 0..4u8 {
            let mut s = Script::default();
            header(&mut s, choice);
            for n in [1i64, 2] {
                encrypted(&mut s, which, n, n == 1);
                s.u8(7).u8(2).u8(9).u8(2);
            }
            s.u8(14)
                .chunk(&ping(2))
                .u8(12)
                .u16(7)
                .u8(11)
                .u8(4)
                .u8(11)
                .u8(6);
            write(dir, "connection", &format!("key{which}-{choice}"), &s.0);
        }
    }
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let dir = Path::new(&dir);
    transport(dir);
    handshake(dir);
    decrypt(dir);
    rsa_unpad(dir);
    plain(dir);
    proxy(dir);
    longpoll(dir);
    bind_seeds(dir);
    reference_session(dir);
    connection(dir);
}
