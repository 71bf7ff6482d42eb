//! Unencrypted (handshake) messages: `message::parse_plain` on any frame;
//! what parses re-encodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::message;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let padded = flags & 1 == 1;
    let _ = message::auth_key_id(payload);
    if let Ok(plain) = message::parse_plain(payload, padded) {
        assert!(payload.len() >= 20 + plain.body.len());
        assert!(payload.len() - 20 - plain.body.len() <= if padded { 15 } else { 0 });
        let mut again = message::encode_plain(plain.msg_id, plain.body);
        assert_eq!(&again[8..], &payload[8..20 + plain.body.len()]);
        again[..8].copy_from_slice(&payload[..8]);
        let back = message::parse_plain(&again, false).expect("re-encoded message parses");
        assert_eq!(back, plain);
    }
});
