//! The auth-key handshake, structure-aware: every input starts a real
//! handshake (req_pq → resPQ with the fixed server key), then plays steps
//! the input shapes so that inputs reach every check, not only the state
//! check:
//!
//! - raw bodies, cut from the input, sent as they are;
//! - req_DH_params with valid nonces, p, q and fingerprint around input
//!   bytes as encrypted_data (raw RSA block), or around an input-mutated
//!   p_q_inner_data properly RSA_PAD- or legacy-encrypted;
//! - set_client_DH_params properly encrypted with the handshake's temp key
//!   around an input-mutated client_DH_inner_data (valid g_b or the input's);
//! - store outcomes (stored, collision, failed) chosen by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::handshake::{Handshake, Step, StoreOutcome};
use mtproto_core::rsa::{encrypt_legacy, encrypt_rsa_pad};
use mtproto_core_fuzz::{
    client_dh_inner, client_g_b, handshake_settings, inner_data, parse_res_pq, req_dh_params_body,
    req_pq_body, rng, server_key, set_client_dh_body, Cursor, NOW,
};

/// Applies up to a few input-chosen byte edits (xor, truncate, extend).
fn mutate(c: &mut Cursor<'_>, bytes: &mut Vec<u8>) {
    let n = c.u8() % 4;
    for _ in 0..n {
        let (op, at, x) = (c.u8() % 3, usize::from(c.u8()), c.u8());
        match op {
            0 if !bytes.is_empty() => {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            1 => bytes.truncate(at),
            _ => bytes.extend(std::iter::repeat_n(x, at % 8)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let mut r = rng(u64::from(c.u8()));
    let settings = handshake_settings();
    let fingerprint = server_key().fingerprint();
    let mut hs = Handshake::new(settings);

    let nonce: [u8; 16] = c.array();
    let Ok(Step::Reply(res_pq)) = hs.on_message(&req_pq_body(c.bool(), nonce), NOW, &mut r) else {
        panic!("a valid req_pq is answered");
    };
    let res = parse_res_pq(&res_pq).expect("resPQ parses");
    assert_eq!(res.nonce, nonce);
    assert_eq!(res.fingerprint, fingerprint);
    let server_nonce = res.server_nonce;
    let mut new_nonce = [0u8; 32];
    let mut stored_aux: Option<i64> = None;

    for _ in 0..6 {
        if c.is_empty() {
            break;
        }
        let result = match c.u8() % 8 {
            // A raw body.
            0 => {
                let body = c.chunk().to_vec();
                hs.on_message(&body, NOW, &mut r)
            }
            // req_DH_params around raw encrypted_data.
            1 => {
                let mut encrypted = c.take(256).to_vec();
                encrypted.resize(256, 0);
                encrypted[0] &= 0x7f;
                let body = req_dh_params_body(&nonce, &server_nonce, fingerprint, &encrypted);
                hs.on_message(&body, NOW, &mut r)
            }
            // req_DH_params with a properly encrypted, input-shaped inner data.
            2..=4 => {
                new_nonce = c.array();
                let (variant, dc, expires_in) =
                    (c.u8(), i32::from(c.u8() as i8), c.i32() >> (c.u8() % 32));
                let mut inner =
                    inner_data(variant, &nonce, &server_nonce, &new_nonce, dc, expires_in);
                mutate(&mut c, &mut inner);
                let public = server_key().public_key();
                let encrypted = if c.u8().is_multiple_of(4) {
                    encrypt_legacy(&public, &inner, &mut r)
                } else {
                    encrypt_rsa_pad(&public, &inner, &mut r)
                };
                let Some(encrypted) = encrypted else { continue };
                let mut body = req_dh_params_body(&nonce, &server_nonce, fingerprint, &encrypted);
                if c.u8().is_multiple_of(8) {
                    mutate(&mut c, &mut body);
                }
                hs.on_message(&body, NOW, &mut r)
            }
            // set_client_DH_params, encrypted with the temp key of new_nonce.
            5 | 6 => {
                let retry_id = match c.u8() % 4 {
                    0 => c.i64(),
                    _ => stored_aux.unwrap_or(0),
                };
                let own_g_b;
                let g_b: &[u8] = if c.u8().is_multiple_of(4) {
                    own_g_b = c.chunk().to_vec();
                    &own_g_b
                } else {
                    client_g_b()
                };
                let mut inner = client_dh_inner(&nonce, &server_nonce, retry_id, g_b);
                mutate(&mut c, &mut inner);
                let pad_len = usize::from(c.u8() % 32);
                let padding = c.take(pad_len).to_vec();
                let mut body =
                    set_client_dh_body(&nonce, &server_nonce, &new_nonce, &inner, &padding);
                if c.u8().is_multiple_of(8) {
                    mutate(&mut c, &mut body);
                }
                hs.on_message(&body, NOW, &mut r)
            }
            // Another req_pq (restarts unless storing).
            _ => hs.on_message(&req_pq_body(c.bool(), nonce), NOW, &mut r),
        };
        match result {
            Ok(Step::StoreKey(key)) => {
                assert_eq!(hs.state_name(), "storing_key");
                assert!(key.info.expires_at.is_none_or(|at| at > NOW));
                let outcome = match c.u8() % 3 {
                    0 => StoreOutcome::Stored,
                    1 => StoreOutcome::Collision,
                    _ => StoreOutcome::Failed,
                };
                if outcome == StoreOutcome::Collision {
                    stored_aux = Some(i64::from_le_bytes(key.info.key.aux_hash()));
                }
                let reply = hs
                    .on_store_result(outcome)
                    .expect("store result in storing state");
                assert_eq!(reply.len(), 52);
            }
            Ok(Step::Reply(reply)) => assert!(reply.len() <= 1024),
            Ok(Step::Nothing) | Err(_) => {}
        }
    }
    // A store result outside the storing state is an error, never a panic.
    if hs.state_name() != "storing_key" {
        assert!(hs.on_store_result(StoreOutcome::Stored).is_err());
    }
});
