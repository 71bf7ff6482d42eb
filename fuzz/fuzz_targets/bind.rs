//! `auth.bindTempAuthKey`: parsing any body, verifying any request against a
//! fixed perm key, and well-formed requests whose encrypted part the input
//! corrupts (the clean one must verify).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::authkey::AuthKey;
use mtproto_core::bind::{self, BindRequest, Outer};
use mtproto_core_fuzz::{rng, Cursor};

fn perm() -> AuthKey {
    AuthKey::new(std::array::from_fn(|i| (i * 3 + 1) as u8))
}

fuzz_target!(|data: &[u8]| {
    let perm = perm();
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let outer = Outer {
        msg_id: c.i64(),
        temp_auth_key_id: c.i64(),
        session_id: c.i64(),
    };
    let (nonce, expires_at) = (c.i64(), c.i32());
    let rest = c.rest();

    // Any body.
    let mut body = rest.to_vec();
    if flags & 1 == 1 && body.len() >= 12 {
        // Name the perm key so verification gets past the first check.
        body[..4].copy_from_slice(&bind::BIND_TEMP_AUTH_KEY.to_le_bytes());
        body[4..12].copy_from_slice(&perm.id().to_le_bytes());
    }
    if let Some(req) = BindRequest::parse(&body) {
        assert_eq!(BindRequest::parse(&req.encode()), Some(req.clone()));
        let _ = bind::verify(&req, &perm, &outer);
    }

    // A real request, then corrupted by the input.
    let mut req = bind::build_request(&perm, &outer, nonce, expires_at, &mut rng(u64::from(flags)));
    assert_eq!(bind::verify(&req, &perm, &outer), Ok(()));
    let mut edits = Cursor::new(rest);
    let mut changed = false;
    while !edits.is_empty() {
        let (at, x) = (usize::from(edits.u16()), edits.u8());
        match at % 4 {
            0 if !req.encrypted_message.is_empty() => {
                let i = at / 4 % req.encrypted_message.len();
                req.encrypted_message[i] ^= x;
                changed |= x != 0;
            }
            1 => {
                req.encrypted_message.truncate(at / 4);
                changed = true;
            }
            2 => {
                req.encrypted_message.push(x);
                changed = true;
            }
            _ => {}
        }
    }
    let result = bind::verify(&req, &perm, &outer);
    if !changed {
        assert_eq!(result, Ok(()));
    }
});
