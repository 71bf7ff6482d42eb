//! Transport decoding: any byte stream, in any split, for every framing,
//! plain and obfuscated2. Bulk, split and byte-by-byte feeding must give the
//! same frames and the same error; frames encoded either way decode back.
//!
//! Input: mode byte, four split sizes, then the stream. Mode 0 feeds the
//! stream as it is (detection sees the raw first bytes); modes 1..=7 open
//! the connection as a client of that transport would and send the stream
//! after it (obfuscated ones encrypted, so the fuzzer's bytes are what the
//! framing decodes).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mtproto_core::transport::{Framing, FramingKind, Transport, TransportError};
use mtproto_core_fuzz::{rng, ClientWire, Cursor, ServerPacket, TRANSPORTS};

const MAX_FRAME: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<(Vec<u8>, bool, bool)>,
    error: Option<TransportError>,
    name: Option<&'static str>,
    dc_id: Option<i16>,
}

/// Decodes `stream` fed in chunks of the sizes `splits` gives (cycled).
fn decode(stream: &[u8], splits: &[usize]) -> Decoded {
    let mut t = Transport::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut error = None;
    'feed: for &size in splits.iter().cycle() {
        if at >= stream.len() {
            break;
        }
        let end = at.saturating_add(size).min(stream.len());
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match t.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(!f.payload.is_empty() && f.payload.len() <= MAX_FRAME);
                    frames.push((f.payload.to_vec(), f.quick_ack, f.padded));
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
    }
    Decoded {
        frames,
        error,
        name: t.name(),
        dc_id: t.dc_id(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let mode = c.u8() % 8;
    let splits: Vec<usize> = (0..4).map(|_| usize::from(c.u8()).max(1)).collect();
    let body = c.rest();

    let (stream, client) = if mode == 0 {
        (body.to_vec(), None)
    } else {
        let (kind, obfuscated) = TRANSPORTS[usize::from(mode - 1)];
        let mut random = [0u8; 64];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(mode);
        }
        let (mut wire, mut stream) = ClientWire::start(kind, obfuscated, random);
        stream.extend(wire.raw(body));
        (stream, Some((kind, obfuscated)))
    };

    let bulk = decode(&stream, &[usize::MAX]);
    let split = decode(&stream, &splits);
    let bytewise = decode(&stream, &[1]);
    assert_eq!(bulk, split, "split feeding differs from bulk");
    assert_eq!(bulk, bytewise, "byte-by-byte feeding differs from bulk");

    // Round trips on an established transport, both directions.
    let Some((kind, obfuscated)) = client else {
        return;
    };
    if kind == FramingKind::Full {
        // Full is detected from its first packet: round-trip its framing alone.
        round_trip_framing(body);
        return;
    }
    let mut random = [7u8; 64];
    random[63] = mode;
    let (mut client, opening) = ClientWire::start(kind, obfuscated, random);
    let mut server = Transport::new(MAX_FRAME);
    let mut inbound = BytesMut::from(&opening[..]);
    assert!(server.decode(&mut inbound).expect("opening").is_none());
    assert_eq!(server.framing(), Some(kind));
    assert_eq!(server.is_obfuscated(), obfuscated);

    let mut r = rng(u64::from(mode));
    let mut payloads = Cursor::new(body);
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    while !payloads.is_empty() {
        let p = payloads.chunk();
        let p = &p[..p.len() / 4 * 4];
        if p.is_empty() {
            continue;
        }
        let quick_ack = p[0] & 1 == 1;
        // Client to server.
        inbound.extend_from_slice(&client.frame(
            p,
            quick_ack,
            &p[..usize::from(p[0] % 16).min(p.len())],
        ));
        let f = server
            .decode(&mut inbound)
            .expect("client frame decodes")
            .expect("whole frame");
        assert_eq!(f.quick_ack, quick_ack);
        if kind == FramingKind::PaddedIntermediate {
            assert!(f.payload.starts_with(p) && f.payload.len() - p.len() < 16);
        } else {
            assert_eq!(&f.payload[..], p);
        }
        // Server to client.
        server.encode_frame(p, &mut out, &mut r);
        expected.push(ServerPacket::Frame(p.to_vec()));
        let token = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) | 0x8000_0000;
        assert!(server.encode_quick_ack(token, &mut out));
        expected.push(ServerPacket::QuickAck(token));
    }
    assert!(inbound.is_empty());
    let got = client.receive(&out).expect("server output parses");
    assert_eq!(got.len(), expected.len());
    for (got, want) in got.into_iter().zip(expected) {
        match (got, want) {
            (ServerPacket::Frame(g), ServerPacket::Frame(w))
                if kind == FramingKind::PaddedIntermediate =>
            {
                assert!(
                    g.starts_with(&w) && g.len() - w.len() < 4,
                    "0..=3 padding bytes"
                );
            }
            (g, w) => assert_eq!(g, w),
        }
    }
});

/// Full transport: packets the server encodes decode back in sequence.
fn round_trip_framing(body: &[u8]) {
    let mut encoder = Framing::new(FramingKind::Full);
    let mut decoder = Framing::new(FramingKind::Full);
    let mut r = rng(0);
    let mut payloads = Cursor::new(body);
    let mut out = BytesMut::new();
    let mut sent = Vec::new();
    while !payloads.is_empty() {
        let p = payloads.chunk();
        let p = &p[..p.len() / 4 * 4];
        if !p.is_empty() {
            encoder.encode(p, &mut out, &mut r);
            sent.push(p.to_vec());
        }
    }
    for p in sent {
        let f = decoder
            .decode(&mut out, MAX_FRAME)
            .expect("decodes")
            .expect("whole");
        assert_eq!(&f.payload[..], &p[..]);
    }
    assert!(out.is_empty());
}
