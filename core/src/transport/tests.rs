use bytes::BufMut;
use rand::rngs::mock::StepRng;

use super::*;

fn rng() -> StepRng {
    StepRng::new(0x1234_5678, 0x9e37_79b9)
}

/// Feeds `wire` one byte at a time and collects every frame decoded.
fn decode_all(t: &mut Transport, wire: &[u8]) -> Result<Vec<InboundFrame>, TransportError> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &b in wire {
        buf.put_u8(b);
        while let Some(f) = t.decode(&mut buf)? {
            frames.push(f);
        }
    }
    Ok(frames)
}

#[test]
fn detects_plain_abridged_with_short_and_long_lengths() {
    let mut wire = vec![0xef, 0x02];
    wire.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let long = vec![9u8; 0x7f * 4 + 8];
    wire.extend_from_slice(&[0x7f, (long.len() / 4) as u8, 0, 0]);
    wire.extend_from_slice(&long);
    // QuickAck flag on a short frame.
    wire.extend_from_slice(&[0x81, 1, 2, 3, 4]);
    let mut t = Transport::new(1 << 20);
    assert_eq!(t.name(), None);
    let frames = decode_all(&mut t, &wire).unwrap();
    assert_eq!(t.framing(), Some(FramingKind::Abridged));
    assert_eq!(t.name(), Some("abridged"));
    assert_eq!(frames.len(), 3);
    assert_eq!(&frames[0].payload[..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&frames[1].payload[..], &long[..]);
    assert!(!frames[1].quick_ack);
    assert!(frames[2].quick_ack);
}

#[test]
fn detects_intermediate_and_padded_with_quick_ack_bit() {
    for (tag, padded) in [(0xeeee_eeeeu32, false), (0xdddd_dddd, true)] {
        let mut wire = tag.to_le_bytes().to_vec();
        wire.extend_from_slice(&(6u32 | 0x8000_0000).to_le_bytes());
        wire.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        let mut t = Transport::new(1 << 20);
        let frames = decode_all(&mut t, &wire).unwrap();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].quick_ack);
        assert_eq!(frames[0].padded, padded);
        assert_eq!(&frames[0].payload[..], &[1, 2, 3, 4, 5, 6]);
    }
}

fn full_packet(seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&((payload.len() + 12) as u32).to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(payload);
    let crc = crc32fast::hash(&p);
    p.extend_from_slice(&crc.to_le_bytes());
    p
}

#[test]
fn full_transport_checks_seq_and_crc() {
    let mut wire = full_packet(0, &[0; 8]);
    wire.extend(full_packet(1, &[1; 12]));
    let mut t = Transport::new(1 << 20);
    let frames = decode_all(&mut t, &wire).unwrap();
    assert_eq!(t.framing(), Some(FramingKind::Full));
    assert_eq!(frames.len(), 2);
    assert_eq!(&frames[1].payload[..], &[1; 12]);

    let mut wire = full_packet(0, &[0; 8]);
    wire.extend(full_packet(5, &[1; 12]));
    assert_eq!(
        decode_all(&mut Transport::new(1 << 20), &wire).unwrap_err(),
        TransportError::BadSeq {
            expected: 1,
            got: 5
        }
    );

    let mut wire = full_packet(0, &[0; 8]);
    let last = wire.len() - 1;
    wire[last] ^= 1;
    assert_eq!(
        decode_all(&mut Transport::new(1 << 20), &wire).unwrap_err(),
        TransportError::BadCrc
    );
    let mut short = full_packet(0, &[0; 8]);
    short[0] = 8;
    assert_eq!(
        decode_all(&mut Transport::new(1 << 20), &short).unwrap_err(),
        TransportError::FrameTooShort(8)
    );
}

#[test]
fn oversized_and_empty_frames_are_refused_before_buffering() {
    let mut t = Transport::new(1024);
    let mut buf = BytesMut::from(&[0xee, 0xee, 0xee, 0xee, 0, 0x10, 0, 0][..]);
    assert_eq!(
        t.decode(&mut buf).unwrap_err(),
        TransportError::FrameTooLarge {
            len: 4096,
            max: 1024
        }
    );
    let mut t = Transport::new(1024);
    let mut buf = BytesMut::from(&[0xef, 0x00][..]);
    assert_eq!(t.decode(&mut buf).unwrap_err(), TransportError::EmptyFrame);
}

#[test]
fn http_and_tls_prefixes_are_refused() {
    for prefix in [
        &b"POST /api"[..],
        b"GET / HTTP/1.1",
        b"HEAD /",
        b"OPTIONS *",
    ] {
        let mut buf = BytesMut::from(prefix);
        assert_eq!(
            Transport::new(1024).decode(&mut buf).unwrap_err(),
            TransportError::HttpOnTcpPort
        );
    }
    let mut buf = BytesMut::from(&[0x16, 0x03, 0x01, 0x02, 0x00][..]);
    assert_eq!(
        Transport::new(1024).decode(&mut buf).unwrap_err(),
        TransportError::Unsupported
    );
}

#[test]
fn error_code_404_bytes_per_transport() {
    let cases: [(&[u8], &[u8]); 3] = [
        (&[0xef], &[0x01, 0x6c, 0xfe, 0xff, 0xff]),
        (
            &[0xee, 0xee, 0xee, 0xee],
            &[0x04, 0, 0, 0, 0x6c, 0xfe, 0xff, 0xff],
        ),
        (
            &full_packet(0, &[0; 8]),
            &full_packet(0, &(-404i32).to_le_bytes()),
        ),
    ];
    for (hello, expected) in cases {
        let mut t = Transport::new(1024);
        decode_all(&mut t, hello).unwrap();
        let mut out = BytesMut::new();
        t.encode_error(error_code::AUTH_KEY_NOT_FOUND, &mut out, &mut rng());
        assert_eq!(&out[..], expected);
    }
}

#[test]
fn padded_intermediate_length_includes_0_to_3_padding_bytes() {
    let mut t = Transport::new(1024);
    decode_all(&mut t, &[0xdd, 0xdd, 0xdd, 0xdd]).unwrap();
    let mut r = rand::thread_rng();
    for _ in 0..64 {
        let mut out = BytesMut::new();
        t.encode_frame(&[7u8; 24], &mut out, &mut r);
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert_eq!(len, out.len() - 4);
        assert!((24..=27).contains(&len));
        assert_eq!(&out[4..28], &[7u8; 24]);
    }
}

#[test]
fn quick_ack_framing_per_transport() {
    let token = 0x8123_4567u32;
    let mut t = Transport::new(1024);
    decode_all(&mut t, &[0xef]).unwrap();
    let mut out = BytesMut::new();
    assert!(t.encode_quick_ack(token, &mut out));
    assert_eq!(&out[..], &[0x81, 0x23, 0x45, 0x67]);

    let mut t = Transport::new(1024);
    decode_all(&mut t, &[0xee, 0xee, 0xee, 0xee]).unwrap();
    let mut out = BytesMut::new();
    assert!(t.encode_quick_ack(token, &mut out));
    assert_eq!(&out[..], &[0x67, 0x45, 0x23, 0x81]);

    let mut t = Transport::new(1024);
    decode_all(&mut t, &full_packet(0, &[0; 8])).unwrap();
    let mut out = BytesMut::new();
    assert!(!t.encode_quick_ack(token, &mut out));
    assert!(out.is_empty());
}

/// Header and frames computed with Telethon 1.45's `ObfuscatedIO` with its
/// random bytes fixed to `(i * 5 + 1) % 256`.
#[test]
fn obfuscated2_matches_telethon_vector() {
    let header = hex::decode(
        "01060b10151a1f24292e33383d42474c51565b60656a6f74797e83888d92979c\
         a1a6abb0b5babfc4c9ced3d8dde2e7ecf1f6fb00050a0f14b17603cb047240b4",
    )
    .unwrap();
    let mut wire = header.clone();
    wire.extend(hex::decode("d021ea4286").unwrap());
    let mut t = Transport::new(1024);
    let frames = decode_all(&mut t, &wire).unwrap();
    assert!(t.is_obfuscated());
    assert_eq!(t.framing(), Some(FramingKind::Abridged));
    assert_eq!(t.dc_id(), Some(0x322d));
    assert_eq!(frames.len(), 1);
    assert_eq!(&frames[0].payload[..], &[1, 2, 3, 4]);

    let mut out = BytesMut::new();
    t.encode_frame(&[0xaa, 0xbb, 0xcc, 0xdd], &mut out, &mut rng());
    assert_eq!(hex::encode(&out), "b2097810c0");
}

/// Every byte the server sends after a QuickAck or an error must continue
/// the same CTR keystream the client decrypts with.
#[test]
fn obfuscated_round_trip_keeps_ctr_in_step_for_every_framing() {
    for framing in [
        FramingKind::Abridged,
        FramingKind::Intermediate,
        FramingKind::PaddedIntermediate,
    ] {
        let random: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(13).wrapping_add(3));
        let (init, mut client) = obfuscated2::client_init(random, framing, -2);
        let mut plain_frames = Vec::new();
        for len in [8usize, 600, 40] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut f = Vec::new();
            match framing {
                FramingKind::Abridged if len / 4 < 0x7f => f.push((len / 4) as u8),
                FramingKind::Abridged => {
                    f.extend_from_slice(&(((len / 4) as u32) << 8 | 0x7f).to_le_bytes())
                }
                _ => f.extend_from_slice(&(len as u32).to_le_bytes()),
            }
            f.extend_from_slice(&payload);
            plain_frames.push((f, payload));
        }
        let mut wire = init.to_vec();
        for (f, _) in &plain_frames {
            let mut enc = f.clone();
            client.encrypt_outbound(&mut enc);
            wire.extend(enc);
        }
        let mut t = Transport::new(1 << 20);
        let frames = decode_all(&mut t, &wire).unwrap();
        assert_eq!(t.framing(), Some(framing));
        assert_eq!(
            t.name().map(|n| n.strip_prefix("obfuscated_")),
            Some(Some(framing.as_str()))
        );
        assert_eq!(t.dc_id(), Some(-2));
        assert_eq!(frames.len(), 3);
        for (got, (_, want)) in frames.iter().zip(&plain_frames) {
            assert_eq!(&got.payload[..], &want[..]);
        }

        let mut out = BytesMut::new();
        assert!(t.encode_quick_ack(0x8000_0001, &mut out));
        t.encode_error(-404, &mut out, &mut rng());
        t.encode_frame(&[5u8; 24], &mut out, &mut rng());
        client.decrypt_inbound(&mut out);
        let ack_len = 4;
        let expected_ack = match framing {
            FramingKind::Abridged => 0x8000_0001u32.to_be_bytes(),
            _ => 0x8000_0001u32.to_le_bytes(),
        };
        assert_eq!(&out[..ack_len], &expected_ack);
        let rest = &out[ack_len..];
        match framing {
            FramingKind::Abridged => {
                assert_eq!(&rest[..5], &[1, 0x6c, 0xfe, 0xff, 0xff]);
                assert_eq!(rest[5], 6);
                assert_eq!(&rest[6..30], &[5u8; 24]);
            }
            FramingKind::Intermediate => {
                assert_eq!(&rest[..8], &[4, 0, 0, 0, 0x6c, 0xfe, 0xff, 0xff]);
                assert_eq!(&rest[8..12], &[24, 0, 0, 0]);
            }
            _ => {
                let err_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                assert_eq!(&rest[4..8], &[0x6c, 0xfe, 0xff, 0xff]);
                let next = &rest[4 + err_len..];
                let len = u32::from_le_bytes([next[0], next[1], next[2], next[3]]) as usize;
                assert_eq!(&next[4..28], &[5u8; 24]);
                assert_eq!(next.len(), 4 + len);
            }
        }
    }
}

#[test]
fn obfuscated_init_with_unknown_tag_is_refused() {
    let random: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(1));
    let (mut init, _) = obfuscated2::client_init(random, FramingKind::Full, 2);
    init[0] = 0x42;
    let mut buf = BytesMut::from(&init[..]);
    assert!(matches!(
        Transport::new(1024).decode(&mut buf),
        Err(TransportError::BadObfuscatedTag(_))
    ));
}
