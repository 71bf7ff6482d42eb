//! MTProto 2.0 decryption with a fixed key: arbitrary frames never panic,
//! and what a client encrypts decrypts back to it (with and without the
//! padded transport's tail); server replies round-trip too.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mtproto_core::authkey::AuthKey;
use mtproto_core::message::{self, MessageError};
use mtproto_core_fuzz::{rng, Cursor};

fn key() -> AuthKey {
    AuthKey::new(std::array::from_fn(|i| (i * 13 + 5) as u8))
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    let mut c = Cursor::new(data);
    let flags = c.u8();

    // Arbitrary input as a frame, with the key's id in front half the time
    // (the id is not checked here, but it keeps inputs realistic).
    let mut frame = c.rest().to_vec();
    if flags & 2 != 0 && frame.len() >= 8 {
        frame[..8].copy_from_slice(&key.id().to_le_bytes());
    }
    let padded = flags & 1 == 1;
    match message::decrypt(&key, &mut frame, padded) {
        Ok(d) => {
            assert_eq!(d.plaintext.len() % 16, 0);
            assert!(d.body.len() + 32 + 12 <= d.plaintext.len());
            assert!(d.quick_ack_token & 0x8000_0000 != 0);
        }
        Err(MessageError::TooShort(n)) => assert!(n < 24),
        Err(_) => {}
    }

    // Round trip: input-derived plaintext, client-encrypted, decrypts back.
    let mut c = Cursor::new(data);
    let _ = c.u8();
    let (salt, session_id, msg_id, seq_no) = (c.i64(), c.i64(), c.i64(), c.i32());
    let extra_blocks = usize::from(c.u8() % 64);
    let tail = usize::from(c.u8() % 16);
    let body = c.rest();
    let body = &body[..body.len() / 4 * 4];
    let plaintext = message::plaintext_message(salt, session_id, msg_id, seq_no, body);
    let padding = 12 + (16 - (plaintext.len() + 12) % 16) % 16 + 16 * extra_blocks;
    let padding = if padding > 1024 {
        padding - 16 * ((padding - 1024).div_ceil(16))
    } else {
        padding
    };
    let mut r = rng(u64::from(flags));
    let mut frame = message::encrypt_as_client(&key, &plaintext, padding, &mut r);
    if padded {
        frame.extend(std::iter::repeat_n(0xa5, tail));
    }
    let d = message::decrypt(&key, &mut frame, padded).expect("client message decrypts");
    assert_eq!(
        (d.salt, d.session_id, d.msg_id, d.seq_no, d.body),
        (salt, session_id, msg_id, seq_no, body)
    );
    assert_eq!(&d.plaintext[..plaintext.len()], &plaintext[..]);

    // A server reply decrypts as the client would read it.
    let mut out = BytesMut::new();
    message::encrypt(&key, &plaintext, &mut out, &mut r);
    let back = message::decrypt_as_server_reply(&key, &out).expect("server reply decrypts");
    assert_eq!(&back[..plaintext.len()], &plaintext[..]);
});
