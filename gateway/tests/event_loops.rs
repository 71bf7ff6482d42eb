//! Connections moving between event loops mid-conversation, in stream mode
//! against the reference session over real gRPC: a connection asked to move
//! goes to the other loop at its next turn, and the sampler merges it
//! back once both loops are nearly idle. Pings pipelined across the moves
//! are all answered, each once, on one connection and one session.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use clap::Parser;
use mtproto_core::authkey::AuthKey;
use mtproto_core::tl::{id, TlReader, TlWrite};
use mtproto_gateway::app::Gateway;
use mtproto_gateway::config::{Cli, Config, ConfigExt};
use mtproto_gateway::loops::Loops;
use mtproto_testclient::Client;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::RsaPublicKey;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);
/// Pings outstanding while the connection moves.
const IN_FLIGHT: i64 = 4;

/// One client session's pings: sent with fresh ids, each pong checked off once.
struct Pinger {
    client: Client,
    key: AuthKey,
    salt: i64,
    session_id: i64,
    next: i64,
    /// msg_id → ping_id of the pings not answered yet.
    outstanding: HashMap<i64, i64>,
    answered: HashSet<i64>,
}

impl Pinger {
    async fn send(&mut self, ping_id: i64) {
        let mut body = Vec::new();
        body.put_u32(id::PING);
        body.put_i64(ping_id);
        let msg_id = self.client.next_msg_id();
        self.client
            .send(&self.key, self.salt, self.session_id, msg_id, &body)
            .await
            .unwrap();
        self.outstanding.insert(msg_id, ping_id);
    }

    async fn send_new(&mut self) {
        self.next += 1;
        self.send(self.next).await;
    }

    /// Reads server messages until one more pong arrives.
    async fn pong(&mut self) {
        let answered = self.answered.len();
        while self.answered.len() == answered {
            let (_, body) = tokio::time::timeout(WAIT, self.client.recv(&self.key))
                .await
                .expect("a reply in time")
                .unwrap();
            self.take(&body).await;
        }
    }

    async fn take(&mut self, body: &[u8]) {
        let mut r = TlReader::new(body);
        match r.u32().unwrap() {
            id::MSG_CONTAINER => {
                for _ in 0..r.u32().unwrap() {
                    let (_msg_id, _seq_no) = (r.i64().unwrap(), r.i32().unwrap());
                    let len = r.u32().unwrap() as usize;
                    let inner = r.take(len).unwrap().to_vec();
                    Box::pin(self.take(&inner)).await;
                }
            }
            id::PONG => {
                let msg_id = r.i64().unwrap();
                let ping_id = r.i64().unwrap();
                assert_eq!(self.outstanding.remove(&msg_id), Some(ping_id));
                assert!(
                    self.answered.insert(ping_id),
                    "ping {ping_id} answered twice"
                );
            }
            id::BAD_SERVER_SALT => {
                let bad_msg_id = r.i64().unwrap();
                let (_seq_no, _code) = (r.i32().unwrap(), r.i32().unwrap());
                self.salt = r.i64().unwrap();
                let ping_id = self.outstanding.remove(&bad_msg_id).unwrap();
                self.send(ping_id).await;
            }
            id::BAD_MSG_NOTIFICATION => panic!("bad_msg_notification"),
            // new_session_created and acks.
            _ => {}
        }
    }

    /// One round: a pong taken and a new ping sent, keeping [`IN_FLIGHT`] out.
    async fn turn(&mut self) {
        self.pong().await;
        self.send_new().await;
    }
}

/// Pings until `loops` shows the one connection on loop `on`, asking for a
/// move from the other loop before each round when `ask` is set.
async fn until_on(pinger: &mut Pinger, loops: &Loops, on: usize, ask: bool) {
    let other = 1 - on;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut want = [0, 0];
    want[on] = 1;
    while loops.connections() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?}",
            loops.connections()
        );
        if ask {
            loops.shed(other, on, 1);
        }
        pinger.turn().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_between_loops_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let session = common::reference_session(&[]).await;
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    drop(grpc);
    let toml = dir.path().join("gateway.toml");
    std::fs::write(&toml, "[runtime]\nworker_threads = 2\n").unwrap();
    let cli = Cli::parse_from([
        "mtproto-gateway",
        "--config",
        toml.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--session",
        &format!("grpc://{session}"),
        "--session-mode",
        "stream",
        "--grpc-listen",
        &grpc_addr.to_string(),
    ]);
    let config = Config::load(&cli).unwrap();
    let gateway = Gateway::build(&config).await.unwrap();
    let addr = gateway.local_addrs()[0];
    let loops = gateway
        .event_loops()
        .expect("event loops in stream mode")
        .clone();
    assert_eq!(loops.len(), 2);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(gateway.serve(stopped));

    let pem = std::fs::read_to_string(dir.path().join("server-rsa-public.pem")).unwrap();
    let server = RsaPublicKey::from_pkcs1_pem(&pem).unwrap();
    let mut client = Client::connect(addr).await.unwrap();
    let created = client.create_key(&server, None).await.unwrap();
    let mut pinger = Pinger {
        client,
        key: created.key,
        salt: created.salt,
        session_id: 7,
        next: 0,
        outstanding: HashMap::new(),
        answered: HashSet::new(),
    };
    pinger.send_new().await;
    pinger.pong().await;
    assert_eq!(
        loops.connections(),
        [1, 0],
        "new connections pack onto loop 0"
    );
    for _ in 0..IN_FLIGHT {
        pinger.send_new().await;
    }

    until_on(&mut pinger, &loops, 1, true).await;
    // Nearly idle, the two loops merge: back to loop 0 unasked.
    until_on(&mut pinger, &loops, 0, false).await;
    for _ in 0..IN_FLIGHT {
        pinger.pong().await;
    }
    assert!(pinger.outstanding.is_empty());
    let sent = pinger.next;
    assert_eq!(pinger.answered, (1..=sent).collect::<HashSet<_>>());
    drop(pinger);

    stop.send(true).unwrap();
    tokio::time::timeout(WAIT * 3, serving)
        .await
        .expect("stopped in time")
        .unwrap()
        .unwrap();
    assert_eq!(loops.connections(), [0, 0]);
}
