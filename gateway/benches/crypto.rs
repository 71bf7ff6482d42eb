//! The server side of a handshake (with the spec's 2048-bit DH secret and
//! with a 256-bit one) next to its unavoidable cryptography done by OpenSSL
//! in the same run: one RSA-2048 private operation plus two 2048-bit modular
//! exponentiations with 2048-bit exponents. `scripts/bench.sh` and
//! `scripts/perf.sh` print the ratios; the IGE figures are the `ige` bench.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use openssl::bn::{BigNum, BigNumContext};
use rand::RngCore;

use mtproto_core::dh;
use mtproto_core::handshake::{Handshake, HandshakeSettings, Step};
use mtproto_core::pq::PqPool;
use mtproto_core::rsa::ServerKey;
use mtproto_testclient::{
    read_res_pq, req_dh_params, req_pq_multi, set_client_dh_params, Exchange,
};

/// Client messages for one handshake, made outside the measured part.
struct ClientSide {
    handshake: Handshake,
    set_client_dh: Vec<u8>,
}

/// A handshake state machine past resPQ, and the client's req_DH_params.
fn prepare(settings: &Arc<HandshakeSettings>, key: &ServerKey) -> (Handshake, Vec<u8>, Exchange) {
    let mut hs = Handshake::new(settings.clone());
    let nonce: [u8; 16] = rand::random();
    let Ok(Step::Reply(res_pq)) = hs.on_message(
        &req_pq_multi(&nonce),
        1_800_000_000,
        &mut rand::thread_rng(),
    ) else {
        panic!("resPQ");
    };
    let ex = read_res_pq(&res_pq, &nonce, &key.public_key()).expect("resPQ");
    let req = req_dh_params(&ex, &key.public_key(), None).expect("req_DH_params");
    (hs, req, ex)
}

fn handshake(c: &mut Criterion) {
    let key = ServerKey::generate(&mut rand::thread_rng()).expect("keygen");
    let mut group = c.benchmark_group("handshake");
    group.sample_size(20);
    for (name, bits) in [
        ("server_side_full_handshake", dh::SPEC_SECRET_BITS),
        ("server_side_full_handshake_dh256", 256),
    ] {
        let settings = Arc::new(HandshakeSettings {
            keys: vec![key.clone()],
            pq_pool: PqPool::generate(16, &mut rand::thread_rng()),
            accept_legacy_rsa_padding: true,
            max_temp_key_expires_secs: mtproto_core::handshake::DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS,
            dh_secret_bits: bits,
        });
        server_side(&mut group, name, &settings, &key);
    }
    let pem = key.private_pkcs1_pem().expect("pem");
    let openssl_key = openssl::rsa::Rsa::private_key_from_pem(pem.as_bytes()).expect("openssl key");
    let mut block = [0u8; 256];
    rand::thread_rng().fill_bytes(&mut block[1..]);
    let mut ciphertext = vec![0u8; 256];
    openssl_key
        .public_encrypt(&block, &mut ciphertext, openssl::rsa::Padding::NONE)
        .expect("openssl encrypt");
    let mut plain = vec![0u8; 256];
    group.bench_function("openssl_rsa2048_private_decrypt", |b| {
        b.iter(|| {
            openssl_key
                .private_decrypt(&ciphertext, &mut plain, openssl::rsa::Padding::NONE)
                .expect("openssl decrypt")
        })
    });
    let prime = BigNum::from_slice(&dh::params().prime_bytes).expect("prime");
    let g = BigNum::from_u32(dh::G).expect("g");
    group.bench_function("openssl_ceiling_rsa_and_two_modexps", |b| {
        b.iter(|| {
            let mut ctx = BigNumContext::new().expect("ctx");
            let mut secret = [0u8; 256];
            rand::thread_rng().fill_bytes(&mut secret);
            let mut a = BigNum::from_slice(&secret).expect("a");
            a.set_const_time();
            let mut g_a = BigNum::new().expect("bn");
            g_a.mod_exp(&g, &a, &prime, &mut ctx).expect("g^a");
            let mut shared = BigNum::new().expect("bn");
            // The client's g_b is as random as g_a: reuse it as the base.
            shared.mod_exp(&g_a, &a, &prime, &mut ctx).expect("g_b^a");
            let n = openssl_key
                .private_decrypt(&ciphertext, &mut plain, openssl::rsa::Padding::NONE)
                .expect("openssl decrypt");
            (n, shared.num_bits())
        })
    });
    group.finish();
}

/// The server's part of a handshake, from req_DH_params to the new key.
fn server_side(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    settings: &Arc<HandshakeSettings>,
    key: &ServerKey,
) {
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                let (hs, req_dh, ex) = prepare(settings, key);
                // set_client_DH_params carries only g_b, so it can be built before
                // the server has answered req_DH_params.
                let (_, g_b) =
                    dh::params().new_secret(dh::SPEC_SECRET_BITS, &mut rand::thread_rng());
                let set = set_client_dh_params(&ex, &g_b);
                (
                    ClientSide {
                        handshake: hs,
                        set_client_dh: set,
                    },
                    req_dh,
                )
            },
            |(mut client, req_dh)| {
                let mut rng = rand::thread_rng();
                let dh_ok = client
                    .handshake
                    .on_message(&req_dh, 1_800_000_000, &mut rng);
                let stored =
                    client
                        .handshake
                        .on_message(&client.set_client_dh, 1_800_000_000, &mut rng);
                (dh_ok.is_ok(), matches!(stored, Ok(Step::StoreKey(_))))
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, handshake);
criterion_main!(benches);
