//! Temp keys end to end, through two gateways that share one SQLite store and
//! one server key (a fleet in miniature): `expires_in` is honoured, and
//! `auth.bindTempAuthKey` is verified, recorded, and seen by a gateway that
//! had cached the temp key before it was bound.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use mtproto_core::authkey::AuthKey;
use mtproto_core::bind::{build_request, Outer};
use mtproto_core::tl::{id, TlReader, TlWrite};
use mtproto_gateway::app::Gateway;
use mtproto_gateway::config::{Cli, Config, ConfigExt};
use mtproto_testclient::{Client, ClientError, CreatedKey};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::RsaPublicKey;
use tokio::sync::watch;

async fn start(data: &Path) -> (SocketAddr, watch::Sender<bool>) {
    start_with(data, &[]).await
}

async fn start_with(data: &Path, args: &[&str]) -> (SocketAddr, watch::Sender<bool>) {
    let cli = Cli::parse_from(
        [
            "mtproto-gateway",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .iter()
        .chain(args),
    );
    let config = Config::load(&cli).unwrap();
    let gateway = Gateway::build(&config).await.unwrap();
    let addr = gateway.local_addrs()[0];
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(gateway.serve(stopped));
    (addr, stop)
}

fn server_key(data: &Path) -> RsaPublicKey {
    let pem = std::fs::read_to_string(data.join("server-rsa-public.pem")).unwrap();
    RsaPublicKey::from_pkcs1_pem(&pem).unwrap()
}

/// An API call the reference session refuses: which error says what it knows.
fn api_call() -> Vec<u8> {
    let mut b = Vec::new();
    b.put_u32(id::INVOKE_WITH_LAYER);
    b.put_i32(200);
    b.put_u32(0x1234_5678);
    b
}

/// Sends the body `make` builds for a msg_id and returns the result of its
/// rpc_result, answering bad_server_salt like a client (a resend gets a new
/// msg_id, so the body is built again) and skipping notifications.
async fn rpc(
    client: &mut Client,
    key: &CreatedKey,
    session_id: i64,
    make: impl Fn(i64) -> Vec<u8>,
) -> Vec<u8> {
    let mut salt = key.salt;
    let mut msg_id = client.next_msg_id();
    client
        .send(&key.key, salt, session_id, msg_id, &make(msg_id))
        .await
        .unwrap();
    loop {
        let (_, reply) = tokio::time::timeout(Duration::from_secs(10), client.recv(&key.key))
            .await
            .expect("a reply in time")
            .unwrap();
        let mut messages = vec![reply];
        let mut r = TlReader::new(&messages[0]);
        if r.u32().unwrap() == id::MSG_CONTAINER {
            let count = r.u32().unwrap();
            messages = (0..count)
                .map(|_| {
                    r.i64().unwrap();
                    r.i32().unwrap();
                    let len = r.u32().unwrap() as usize;
                    r.take(len).unwrap().to_vec()
                })
                .collect();
        }
        for m in messages {
            let mut r = TlReader::new(&m);
            match r.u32().unwrap() {
                id::BAD_SERVER_SALT => {
                    r.i64().unwrap();
                    r.i32().unwrap();
                    r.i32().unwrap();
                    salt = r.i64().unwrap();
                    msg_id = client.next_msg_id();
                    client
                        .send(&key.key, salt, session_id, msg_id, &make(msg_id))
                        .await
                        .unwrap();
                }
                id::RPC_RESULT => {
                    assert_eq!(r.i64().unwrap(), msg_id);
                    return r.remaining().to_vec();
                }
                _ => {}
            }
        }
    }
}

fn rpc_error(result: &[u8]) -> (i32, String) {
    let mut r = TlReader::new(result);
    r.expect(id::RPC_ERROR, "rpc_error").unwrap();
    let code = r.i32().unwrap();
    (
        code,
        String::from_utf8(r.bytes().unwrap().to_vec()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_key_bound_via_one_gateway_works_at_once_there_and_on_another_that_cached_it_unbound()
{
    let dir = tempfile::tempdir().unwrap();
    let (a, stop_a) = start(dir.path()).await;
    let (b, stop_b) = start(dir.path()).await;
    let server = server_key(dir.path());

    let mut on_a = Client::connect(a).await.unwrap();
    let perm = on_a.create_key(&server, None).await.unwrap();
    let temp = on_a.create_key(&server, Some(3600)).await.unwrap();

    // B learns the temp key while it is unbound: API calls are refused as on Telegram.
    let mut on_b = Client::connect(b).await.unwrap();
    let (code, message) = rpc_error(&rpc(&mut on_b, &temp, 7, |_| api_call()).await);
    assert_eq!((code, message.as_str()), (401, "AUTH_KEY_PERM_EMPTY"));

    // A bind whose inner message names another session is refused.
    let session_id = 99;
    let bind = |inner_session: i64| {
        let (perm, temp_id) = (perm.key.clone(), temp.key.id());
        move |msg_id| {
            let outer = Outer {
                msg_id,
                temp_auth_key_id: temp_id,
                session_id: inner_session,
            };
            build_request(&perm, &outer, 5, 2_000_000_000, &mut rand::thread_rng()).encode()
        }
    };
    let (code, message) = rpc_error(&rpc(&mut on_a, &temp, session_id, bind(1)).await);
    assert_eq!((code, message.as_str()), (400, "ENCRYPTED_MESSAGE_INVALID"));
    // The real one is accepted.
    let result = rpc(&mut on_a, &temp, session_id, bind(session_id)).await;
    assert_eq!(result, 0x9972_75b5_u32.to_le_bytes(), "boolTrue");
    // The connection that bound the key uses it at once.
    let (code, message) = rpc_error(&rpc(&mut on_a, &temp, session_id, |_| api_call()).await);
    assert_eq!(
        (code, message.as_str()),
        (400, "API_METHOD_NOT_SERVED_BY_REFERENCE_SESSION")
    );

    // A new connection to B sees the binding without a restart.
    let mut again = Client::connect(b).await.unwrap();
    let (code, message) = rpc_error(&rpc(&mut again, &temp, 8, |_| api_call()).await);
    assert_eq!(
        (code, message.as_str()),
        (400, "API_METHOD_NOT_SERVED_BY_REFERENCE_SESSION")
    );

    let _ = (stop_a.send(true), stop_b.send(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_temp_keys_get_404() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = start(dir.path()).await;
    let server = server_key(dir.path());
    let mut client = Client::connect(addr).await.unwrap();
    let temp = client.create_key(&server, Some(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut late = Client::connect(addr).await.unwrap();
    let msg_id = late.next_msg_id();
    late.send(&temp.key, temp.salt, 1, msg_id, &api_call())
        .await
        .unwrap();
    match late.recv(&temp.key).await {
        Err(ClientError::TransportError(code)) => assert_eq!(code, -404),
        other => panic!("expected -404, got {other:?}"),
    }
    let unknown = AuthKey::new([8; 256]);
    let mut stranger = Client::connect(addr).await.unwrap();
    let msg_id = stranger.next_msg_id();
    stranger
        .send(&unknown, 0, 1, msg_id, &api_call())
        .await
        .unwrap();
    assert!(matches!(
        stranger.recv(&unknown).await,
        Err(ClientError::TransportError(-404))
    ));
    let _ = stop.send(true);
}

/// A temp key made through gateway A and used on gateway B, both in front of
/// a remote session: B learns the key from `session_queryAuthKey`, whose
/// conversion used to drop the expiry, so B served the key forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_temp_keys_get_404_when_looked_up_through_a_remote_session() {
    let dir = tempfile::tempdir().unwrap();
    let session = format!("grpc://{}", common::reference_session(&[]).await);
    let args = ["--session", &session, "--grpc-listen", "127.0.0.1:0"];
    let (a, stop_a) = start_with(dir.path(), &args).await;
    let (b, stop_b) = start_with(dir.path(), &args).await;
    let server = server_key(dir.path());
    let temp = Client::connect(a)
        .await
        .unwrap()
        .create_key(&server, Some(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut late = Client::connect(b).await.unwrap();
    let msg_id = late.next_msg_id();
    late.send(&temp.key, temp.salt, 1, msg_id, &api_call())
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), late.recv(&temp.key)).await {
        Ok(Err(ClientError::TransportError(code))) => assert_eq!(code, -404),
        other => panic!("expected -404, got {other:?}"),
    }
    let _ = (stop_a.send(true), stop_b.send(true));
}
