//! Throughput of the hot paths next to a reference measured in the same run
//! on the same machine: IGE decrypt + msg_key check against OpenSSL
//! AES-256-CBC encrypt, and the server side of a handshake against one
//! OpenSSL RSA-2048 private operation. `scripts/bench.sh` prints the ratios.

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use openssl::symm::{Cipher, Crypter, Mode};
use rand::RngCore;

use mtproto_gateway::authkey::AuthKey;
use mtproto_gateway::protocol::crypto::{handshake_key_iv, ige_encrypt};
use mtproto_gateway::protocol::dh;
use mtproto_gateway::protocol::handshake::{Handshake, HandshakeSettings, Step};
use mtproto_gateway::protocol::message::{decrypt, encrypt_as_client, plaintext_message};
use mtproto_gateway::protocol::pq::{factorize, PqPool};
use mtproto_gateway::protocol::rsa::{encrypt_rsa_pad, ServerKey};
use mtproto_gateway::protocol::tl::{id, TlReader, TlWrite};

const SIZES: [usize; 2] = [1024, 16 * 1024];

fn ige(c: &mut Criterion) {
    let key = AuthKey::new(std::array::from_fn(|i| (i * 13) as u8));
    for size in SIZES {
        let mut group = c.benchmark_group(format!("aes_{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        let body = vec![7u8; size - 32 - 16];
        let frame = encrypt_as_client(
            &key,
            &plaintext_message(1, 2, 4, 1, &body),
            16,
            &mut rand::thread_rng(),
        );
        group.bench_function("mtproto_ige_decrypt_verify", |b| {
            b.iter_batched_ref(
                || frame.clone(),
                |f| decrypt(&key, f, false).map(|d| d.msg_id),
                BatchSize::SmallInput,
            )
        });
        let openssl_key = [3u8; 32];
        let iv = [5u8; 16];
        let input = vec![9u8; size];
        let mut output = vec![0u8; size + 32];
        group.bench_function("openssl_aes256_cbc_encrypt", |b| {
            b.iter(|| {
                let mut crypter = Crypter::new(
                    Cipher::aes_256_cbc(),
                    Mode::Encrypt,
                    &openssl_key,
                    Some(&iv),
                )
                .expect("openssl cipher");
                crypter.pad(false);
                crypter.update(&input, &mut output).expect("openssl update")
            })
        });
        let mut out = BytesMut::with_capacity(size + 64);
        let reply = plaintext_message(1, 2, 5, 1, &body);
        group.bench_function("mtproto_ige_encrypt_reply", |b| {
            b.iter(|| {
                out.clear();
                mtproto_gateway::protocol::message::encrypt(
                    &key,
                    &reply,
                    &mut out,
                    &mut rand::thread_rng(),
                );
                out.len()
            })
        });
        group.finish();
    }
}

/// Client messages for one handshake, made outside the measured part.
struct ClientSide {
    handshake: Handshake,
    set_client_dh: Vec<u8>,
}

fn prepare(
    settings: &Arc<HandshakeSettings>,
    key: &ServerKey,
) -> (Handshake, Vec<u8>, [u8; 16], [u8; 16], [u8; 32]) {
    let mut rng = rand::thread_rng();
    let mut hs = Handshake::new(settings.clone());
    let nonce: [u8; 16] = rand::random();
    let mut req = Vec::new();
    req.put_u32(id::REQ_PQ_MULTI);
    req.put_raw(&nonce);
    let Ok(Step::Reply(res_pq)) = hs.on_message(&req, 1_800_000_000, &mut rng) else {
        panic!("resPQ");
    };
    let mut r = TlReader::new(&res_pq);
    r.u32().ok();
    r.int128().ok();
    let server_nonce = r.int128().expect("server_nonce");
    let pq_bytes = r.bytes().expect("pq");
    let pq = pq_bytes.iter().fold(0u64, |a, &b| a << 8 | u64::from(b));
    let (p, q) = factorize(pq).expect("factor");
    let new_nonce: [u8; 32] = rand::random();
    let mut inner = Vec::new();
    inner.put_u32(id::P_Q_INNER_DATA_DC);
    inner.put_bytes(&pq.to_be_bytes());
    inner.put_bytes(&(p as u32).to_be_bytes());
    inner.put_bytes(&(q as u32).to_be_bytes());
    inner.put_raw(&nonce);
    inner.put_raw(&server_nonce);
    inner.put_raw(&new_nonce);
    inner.put_i32(2);
    let encrypted = encrypt_rsa_pad(&key.public_key(), &inner, &mut rng).expect("rsa_pad");
    let mut msg = Vec::new();
    msg.put_u32(id::REQ_DH_PARAMS);
    msg.put_raw(&nonce);
    msg.put_raw(&server_nonce);
    msg.put_bytes(&(p as u32).to_be_bytes());
    msg.put_bytes(&(q as u32).to_be_bytes());
    msg.put_i64(key.fingerprint());
    msg.put_bytes(&encrypted);
    (hs, msg, nonce, server_nonce, new_nonce)
}

fn handshake(c: &mut Criterion) {
    let key = ServerKey::generate(&mut rand::thread_rng()).expect("keygen");
    let settings = Arc::new(HandshakeSettings {
        keys: vec![key.clone()],
        pq_pool: PqPool::generate(16, &mut rand::thread_rng()),
        accept_legacy_rsa_padding: true,
    });
    let mut group = c.benchmark_group("handshake");
    group.sample_size(20);
    group.bench_function("server_side_full_handshake", |b| {
        b.iter_batched(
            || {
                let (hs, req_dh, nonce, server_nonce, new_nonce) = prepare(&settings, &key);
                // set_client_DH_params carries only g_b, so it can be built before
                // the server has answered req_DH_params.
                let (_, g_b) = dh::params().new_secret(&mut rand::thread_rng());
                let mut inner = Vec::new();
                inner.put_u32(id::CLIENT_DH_INNER_DATA);
                inner.put_raw(&nonce);
                inner.put_raw(&server_nonce);
                inner.put_i64(0);
                inner.put_bytes(&g_b.to_bytes_be());
                let mut data = mtproto_gateway::protocol::crypto::sha1(&[&inner]).to_vec();
                data.extend_from_slice(&inner);
                while data.len() % 16 != 0 {
                    data.push(0);
                }
                let (k, iv) = handshake_key_iv(&new_nonce, &server_nonce);
                ige_encrypt(&mut data, &k, &iv);
                let mut set = Vec::new();
                set.put_u32(id::SET_CLIENT_DH_PARAMS);
                set.put_raw(&nonce);
                set.put_raw(&server_nonce);
                set.put_bytes(&data);
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
    group.finish();
}

criterion_group!(benches, ige, handshake);
criterion_main!(benches);
