//! The test plays the client side of the handshake as the spec describes it.

use std::sync::{Arc, OnceLock};

use rsa::BigUint;

use super::*;
use crate::pq::factorize;
use crate::rsa::{encrypt_legacy, encrypt_rsa_pad, test_key};

fn settings(accept_legacy: bool) -> Arc<HandshakeSettings> {
    Arc::new(HandshakeSettings {
        keys: vec![test_key().clone()],
        pq_pool: PqPool::generate(4, &mut rand::thread_rng()),
        accept_legacy_rsa_padding: accept_legacy,
        max_temp_key_expires_secs: DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS,
        dh_secret_bits: dh::SPEC_SECRET_BITS,
    })
}

const NOW: i64 = 1_800_000_000;

#[derive(Clone, Copy)]
enum Variant {
    Plain,
    Dc(i32),
    Temp(i32),
    TempDc(i32, i32),
}

struct Client {
    nonce: [u8; 16],
    server_nonce: [u8; 16],
    new_nonce: [u8; 32],
    p: u64,
    q: u64,
    pq: u64,
    fingerprint: i64,
}

fn req_pq(hs: &mut Handshake, multi: bool) -> Client {
    let nonce: [u8; 16] = rand::random();
    let mut msg = Vec::new();
    msg.put_u32(if multi { id::REQ_PQ_MULTI } else { id::REQ_PQ });
    msg.put_raw(&nonce);
    let Step::Reply(res_pq) = hs.on_message(&msg, NOW, &mut rand::thread_rng()).unwrap() else {
        panic!("expected resPQ");
    };
    let mut r = TlReader::new(&res_pq);
    r.expect(id::RES_PQ, "resPQ").unwrap();
    assert_eq!(r.int128().unwrap(), nonce);
    let server_nonce = r.int128().unwrap();
    let pq = be_u64(r.bytes().unwrap()).unwrap();
    let fingerprints = r.vector_i64(16).unwrap();
    assert_eq!(fingerprints, vec![test_key().fingerprint()]);
    let (p, q) = factorize(pq).unwrap();
    Client {
        nonce,
        server_nonce,
        new_nonce: rand::random(),
        p,
        q,
        pq,
        fingerprint: fingerprints[0],
    }
}

fn inner_data(c: &Client, variant: Variant) -> Vec<u8> {
    let mut d = Vec::new();
    d.put_u32(match variant {
        Variant::Plain => id::P_Q_INNER_DATA,
        Variant::Dc(_) => id::P_Q_INNER_DATA_DC,
        Variant::Temp(_) => id::P_Q_INNER_DATA_TEMP,
        Variant::TempDc(..) => id::P_Q_INNER_DATA_TEMP_DC,
    });
    d.put_bytes(&c.pq.to_be_bytes());
    d.put_bytes(&(c.p as u32).to_be_bytes());
    d.put_bytes(&(c.q as u32).to_be_bytes());
    d.put_raw(&c.nonce);
    d.put_raw(&c.server_nonce);
    d.put_raw(&c.new_nonce);
    match variant {
        Variant::Plain => {}
        Variant::Dc(dc) => d.put_i32(dc),
        Variant::Temp(expires) => d.put_i32(expires),
        Variant::TempDc(dc, expires) => {
            d.put_i32(dc);
            d.put_i32(expires);
        }
    }
    d
}

fn req_dh_params_msg(c: &Client, encrypted: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.put_u32(id::REQ_DH_PARAMS);
    msg.put_raw(&c.nonce);
    msg.put_raw(&c.server_nonce);
    msg.put_bytes(&(c.p as u32).to_be_bytes());
    msg.put_bytes(&(c.q as u32).to_be_bytes());
    msg.put_i64(c.fingerprint);
    msg.put_bytes(encrypted);
    msg
}

/// Sends req_DH_params and returns g_a after checking the server's answer.
fn req_dh_params(hs: &mut Handshake, c: &Client, variant: Variant, legacy: bool) -> BigUint {
    let data = inner_data(c, variant);
    let mut rng = rand::thread_rng();
    let encrypted = if legacy {
        encrypt_legacy(&test_key().public_key(), &data, &mut rng)
    } else {
        encrypt_rsa_pad(&test_key().public_key(), &data, &mut rng)
    }
    .unwrap();
    let Step::Reply(reply) = hs
        .on_message(&req_dh_params_msg(c, &encrypted), NOW, &mut rng)
        .unwrap()
    else {
        panic!("expected server_DH_params_ok");
    };
    let mut r = TlReader::new(&reply);
    r.expect(id::SERVER_DH_PARAMS_OK, "server_DH_params_ok")
        .unwrap();
    assert_eq!(r.int128().unwrap(), c.nonce);
    assert_eq!(r.int128().unwrap(), c.server_nonce);
    let mut answer = r.bytes().unwrap().to_vec();
    assert_eq!(answer.len() % 16, 0);
    let (key, iv) = handshake_key_iv(&c.new_nonce, &c.server_nonce);
    ige_decrypt(&mut answer, &key, &iv);
    let mut inner = TlReader::new(&answer[20..]);
    inner
        .expect(id::SERVER_DH_INNER_DATA, "server_DH_inner_data")
        .unwrap();
    assert_eq!(inner.int128().unwrap(), c.nonce);
    assert_eq!(inner.int128().unwrap(), c.server_nonce);
    assert_eq!(inner.u32().unwrap(), 3);
    assert_eq!(inner.bytes().unwrap(), &dh::params().prime_bytes[..]);
    let g_a = BigUint::from_bytes_be(inner.bytes().unwrap());
    assert_eq!(inner.i32().unwrap(), NOW as i32);
    let len = inner.position();
    assert_eq!(&answer[..20], &sha1(&[&answer[20..20 + len]])[..]);
    assert!(dh::params().in_safe_range(&g_a));
    g_a
}

fn set_client_dh_msg(c: &Client, retry_id: i64, g_b: &BigUint, corrupt_hash: bool) -> Vec<u8> {
    let mut inner = Vec::new();
    inner.put_u32(id::CLIENT_DH_INNER_DATA);
    inner.put_raw(&c.nonce);
    inner.put_raw(&c.server_nonce);
    inner.put_i64(retry_id);
    inner.put_bytes(&g_b.to_bytes_be());
    let mut data = sha1(&[&inner]).to_vec();
    if corrupt_hash {
        data[0] ^= 1;
    }
    data.extend_from_slice(&inner);
    while !data.len().is_multiple_of(16) {
        data.push(rand::random());
    }
    let (key, iv) = handshake_key_iv(&c.new_nonce, &c.server_nonce);
    ige_encrypt(&mut data, &key, &iv);
    let mut msg = Vec::new();
    msg.put_u32(id::SET_CLIENT_DH_PARAMS);
    msg.put_raw(&c.nonce);
    msg.put_raw(&c.server_nonce);
    msg.put_bytes(&data);
    msg
}

fn client_secret() -> (dh::DhSecret, BigUint) {
    dh::params().new_secret(dh::SPEC_SECRET_BITS, &mut rand::thread_rng())
}

fn check_dh_gen(reply: &[u8], c: &Client, key: &AuthKey, constructor: u32, n: u8) {
    let mut r = TlReader::new(reply);
    r.expect(constructor, "dh_gen").unwrap();
    assert_eq!(r.int128().unwrap(), c.nonce);
    assert_eq!(r.int128().unwrap(), c.server_nonce);
    let expected = sha1(&[&c.new_nonce, &[n], &key.aux_hash()]);
    assert_eq!(r.int128().unwrap()[..], expected[4..20]);
}

fn complete(variant: Variant, legacy: bool) -> NewAuthKey {
    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, true);
    assert_eq!(hs.take_rsa_decrypt_time(), None);
    let g_a = req_dh_params(&mut hs, &c, variant, legacy);
    assert!(
        hs.take_rsa_decrypt_time().is_some(),
        "RSA time is read once"
    );
    assert_eq!(hs.take_rsa_decrypt_time(), None);
    let (b, g_b) = client_secret();
    let step = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap();
    let Step::StoreKey(new_key) = step else {
        panic!("expected StoreKey");
    };
    let client_key = AuthKey::new(*dh::params().shared_key(&g_a, &b).unwrap());
    assert_eq!(new_key.info.key, client_key);
    let salt = i64::from_le_bytes(std::array::from_fn(|i| c.new_nonce[i] ^ c.server_nonce[i]));
    assert_eq!(new_key.first_salt.salt, salt);
    assert_eq!(new_key.first_salt.valid_since, NOW as i32);
    let reply = hs.on_store_result(StoreOutcome::Stored).unwrap();
    check_dh_gen(&reply, &c, &client_key, id::DH_GEN_OK, 1);
    assert_eq!(hs.state_name(), "done");
    new_key
}

#[test]
fn perm_key_with_rsa_pad() {
    let k = complete(Variant::Plain, false);
    assert_eq!(k.info.key_type, AuthKeyType::Perm);
    assert_eq!(k.info.perm_auth_key_id, k.info.id());
    assert_eq!(k.info.expires_at, None);
}

#[test]
fn perm_key_with_legacy_padding_and_dc() {
    let k = complete(Variant::Dc(2), true);
    assert_eq!(k.info.key_type, AuthKeyType::Perm);
    assert_eq!(k.dc, Some(2));
}

#[test]
fn temp_keys_carry_expiry_and_media_type() {
    let k = complete(Variant::Temp(3600), false);
    assert_eq!(k.info.key_type, AuthKeyType::Temp);
    assert_eq!(k.info.expires_at, Some(NOW + 3600));
    assert_eq!(k.info.perm_auth_key_id, 0);
    let k = complete(Variant::TempDc(-2, 600), false);
    assert_eq!(k.info.key_type, AuthKeyType::MediaTemp);
    assert_eq!(k.info.expires_at, Some(NOW + 600));
    let k = complete(Variant::TempDc(2, 600), false);
    assert_eq!(k.info.key_type, AuthKeyType::Temp);
}

#[test]
fn temp_key_expiry_is_capped_by_the_setting() {
    let asked = DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS + 1;
    let k = complete(Variant::Temp(i32::MAX), false);
    let max = i64::from(DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS);
    assert_eq!(k.info.expires_at, Some(NOW + max));
    assert_eq!(k.expires_in, DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS);
    let k = complete(Variant::TempDc(-2, asked), false);
    assert_eq!(k.info.expires_at, Some(NOW + max));
}

#[test]
fn collision_answers_dh_gen_retry_and_checks_retry_id() {
    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, false);
    req_dh_params(&mut hs, &c, Variant::Plain, false);
    let (_, g_b) = client_secret();
    let Step::StoreKey(first) = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap()
    else {
        panic!("expected StoreKey");
    };
    let reply = hs.on_store_result(StoreOutcome::Collision).unwrap();
    check_dh_gen(&reply, &c, &first.info.key, id::DH_GEN_RETRY, 2);

    let (_, g_b2) = client_secret();
    let err = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b2, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap_err();
    assert!(matches!(err, HandshakeError::BadRetryId { .. }), "{err}");

    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, false);
    req_dh_params(&mut hs, &c, Variant::Plain, false);
    let Step::StoreKey(first) = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap()
    else {
        panic!("expected StoreKey");
    };
    hs.on_store_result(StoreOutcome::Collision).unwrap();
    let retry_id = i64::from_le_bytes(first.info.key.aux_hash());
    let step = hs
        .on_message(
            &set_client_dh_msg(&c, retry_id, &g_b2, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap();
    let Step::StoreKey(second) = step else {
        panic!("expected StoreKey");
    };
    assert_ne!(second.info.id(), first.info.id());
    let reply = hs.on_store_result(StoreOutcome::Failed).unwrap();
    check_dh_gen(&reply, &c, &second.info.key, id::DH_GEN_FAIL, 3);
    assert_eq!(hs.state_name(), "idle");
}

#[test]
fn steps_out_of_order_are_errors_not_panics() {
    // set_client_DH_params right after req_pq (teamgram crashed here).
    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, true);
    let (_, g_b) = client_secret();
    let err = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b, false),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap_err();
    assert!(matches!(err, HandshakeError::OutOfOrder(..)), "{err}");

    let mut hs = Handshake::new(settings(true));
    let c = Client {
        nonce: [1; 16],
        server_nonce: [2; 16],
        new_nonce: [3; 32],
        p: 5,
        q: 7,
        pq: 35,
        fingerprint: 0,
    };
    let err = hs
        .on_message(
            &req_dh_params_msg(&c, &[0; 256]),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap_err();
    assert!(matches!(err, HandshakeError::OutOfOrder(..)), "{err}");
    assert!(hs.on_store_result(StoreOutcome::Stored).is_err());
}

#[test]
fn wrong_nonce_pq_fingerprint_and_padding_are_refused() {
    let mut rng = rand::thread_rng();
    let mut hs = Handshake::new(settings(false));
    let c = req_pq(&mut hs, true);
    let data = inner_data(&c, Variant::Plain);
    let good = encrypt_rsa_pad(&test_key().public_key(), &data, &mut rng).unwrap();

    let mut wrong = req_dh_params_msg(&c, &good);
    wrong[4] ^= 1;
    assert!(matches!(
        hs.on_message(&wrong, NOW, &mut rng),
        Err(HandshakeError::NonceMismatch)
    ));
    let bad_pq = Client {
        p: c.p + 2,
        ..Client { ..c }
    };
    let c = Client { ..bad_pq };
    let msg = req_dh_params_msg(&c, &good);
    assert!(matches!(
        hs.on_message(&msg, NOW, &mut rng),
        Err(HandshakeError::BadPq)
    ));
    let c = Client {
        p: c.p - 2,
        fingerprint: 42,
        ..c
    };
    assert!(matches!(
        hs.on_message(&req_dh_params_msg(&c, &good), NOW, &mut rng),
        Err(HandshakeError::UnknownFingerprint(42))
    ));
    let c = Client {
        fingerprint: test_key().fingerprint(),
        ..c
    };
    let legacy = encrypt_legacy(&test_key().public_key(), &data, &mut rng).unwrap();
    assert!(matches!(
        hs.on_message(&req_dh_params_msg(&c, &legacy), NOW, &mut rng),
        Err(HandshakeError::Rsa(RsaDecryptError::BadPadding))
    ));
    // Inner data that names another server_nonce.
    let other = Client {
        server_nonce: [9; 16],
        ..c
    };
    let mismatched = encrypt_rsa_pad(
        &test_key().public_key(),
        &inner_data(&other, Variant::Plain),
        &mut rng,
    )
    .unwrap();
    let c = Client {
        server_nonce: other_nonce(&hs),
        ..other
    };
    assert!(matches!(
        hs.on_message(&req_dh_params_msg(&c, &mismatched), NOW, &mut rng),
        Err(HandshakeError::InnerMismatch)
    ));
    // The state survived all of that; the real request still works.
    assert!(matches!(
        hs.on_message(&req_dh_params_msg(&c, &good), NOW, &mut rng),
        Ok(Step::Reply(_))
    ));
}

fn other_nonce(hs: &Handshake) -> [u8; 16] {
    match hs.state {
        State::PqSent { server_nonce, .. } => server_nonce,
        _ => panic!("not in pq_sent"),
    }
}

#[test]
fn temp_key_without_positive_expiry_is_refused() {
    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, true);
    let data = inner_data(&c, Variant::Temp(0));
    let enc = encrypt_rsa_pad(&test_key().public_key(), &data, &mut rand::thread_rng()).unwrap();
    assert!(matches!(
        hs.on_message(&req_dh_params_msg(&c, &enc), NOW, &mut rand::thread_rng()),
        Err(HandshakeError::BadExpiresIn(0))
    ));
}

#[test]
fn g_b_out_of_range_and_bad_hash_are_refused() {
    let p = &dh::params().prime;
    let one = BigUint::from(1u32);
    for g_b in [
        one.clone(),
        BigUint::from(2u32),
        p - &one,
        p - (&one << 100),
        &one << 1000,
    ] {
        let mut hs = Handshake::new(settings(true));
        let c = req_pq(&mut hs, true);
        req_dh_params(&mut hs, &c, Variant::Plain, false);
        let err = hs
            .on_message(
                &set_client_dh_msg(&c, 0, &g_b, false),
                NOW,
                &mut rand::thread_rng(),
            )
            .unwrap_err();
        assert!(matches!(err, HandshakeError::GbOutOfRange), "{err}");
    }
    let mut hs = Handshake::new(settings(true));
    let c = req_pq(&mut hs, true);
    req_dh_params(&mut hs, &c, Variant::Plain, false);
    let (_, g_b) = client_secret();
    let err = hs
        .on_message(
            &set_client_dh_msg(&c, 0, &g_b, true),
            NOW,
            &mut rand::thread_rng(),
        )
        .unwrap_err();
    assert!(matches!(err, HandshakeError::BadClientDhHash), "{err}");
}

/// Every prefix of every valid handshake message is an error, never a panic.
#[test]
fn truncated_messages_never_panic() {
    static MSGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let msgs = MSGS.get_or_init(|| {
        let mut hs = Handshake::new(settings(true));
        let c = req_pq(&mut hs, true);
        let enc = encrypt_rsa_pad(
            &test_key().public_key(),
            &inner_data(&c, Variant::Plain),
            &mut rand::thread_rng(),
        )
        .unwrap();
        let (_, g_b) = client_secret();
        vec![
            req_dh_params_msg(&c, &enc),
            set_client_dh_msg(&c, 0, &g_b, false),
        ]
    });
    for msg in msgs {
        for cut in 0..msg.len() {
            let mut hs = Handshake::new(settings(true));
            let _ = hs.on_message(&msg[..cut], NOW, &mut rand::thread_rng());
        }
    }
    let mut hs = Handshake::new(settings(true));
    assert!(matches!(
        hs.on_message(&[0xde, 0xad, 0xbe, 0xef], NOW, &mut rand::thread_rng()),
        Err(HandshakeError::UnknownConstructor(0xefbe_adde))
    ));
    assert!(matches!(
        hs.on_message(&[1, 2], NOW, &mut rand::thread_rng()),
        Err(HandshakeError::Tl(_))
    ));
}
