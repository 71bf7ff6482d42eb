//! teamgram's gRPC error contract on the wire, both directions, over loopback:
//!
//! - the reference session (`grpc_server::routes`, what `mtproto-session`
//!   serves) answers an unknown key with `grpc-status: 401` /
//!   `AUTH_KEY_UNREGISTERED` and a key another member owns with
//!   `grpc-status: 700` / `REDIRECT_TO_<owner>`, read here by a raw HTTP/2
//!   client; in stream mode `SessionStreamError.code` is 401 / 700;
//! - the gateway's session client maps a raw HTTP/2 server answering 401/700
//!   (trailers-only, as grpc-go fails a unary call, or trailers after the
//!   headers) and the older `Unknown` + message form to the right
//!   `SessionError`.

mod common;

use common::reference_session;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use mtproto_edge_proto::session::rpc_session_stream_client::RpcSessionStreamClient;
use mtproto_edge_proto::session::{
    self as spb, session_stream_request::Payload as StreamRequest,
    session_stream_response::Payload as StreamResponse,
};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::http::{self, HeaderMap, HeaderValue};

use mtproto_gateway::metrics::{RpcErrorLabels, SessionRpcMetrics};
use mtproto_gateway::session::remote::{Mode, RemoteSession, RemoteSettings};
use mtproto_session::ring::Ring;
use mtproto_session::{SessionClientEvent, SessionError, SessionService};

const WAIT: Duration = Duration::from_secs(10);
/// A member that never answers: keys it owns are redirected to it.
const OTHER: &str = "127.0.0.1:9";

async fn listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (listener, addr)
}

/// A `perm_auth_key_id` that `owner` owns on the ring of `members`.
fn key_owned_by(members: &[String], owner: &str) -> i64 {
    let ring = Ring::new(members.to_vec());
    (1..100_000)
        .find(|id| ring.owner_of_id(*id) == Some(owner))
        .expect("the member owns some key")
}

fn event(perm_auth_key_id: i64) -> spb::SessionClientEvent {
    spb::SessionClientEvent {
        predicate_name: "sessionClientEvent".into(),
        constructor: spb::SESSION_CLIENT_EVENT,
        server_id: "127.0.0.1:1".into(),
        conn_type: 0,
        auth_key_id: perm_auth_key_id,
        key_type: 0,
        perm_auth_key_id,
        session_id: 7,
        client_ip: "192.0.2.1".into(),
    }
}

/// One unary call as raw HTTP/2: the response headers, the body bytes and
/// the trailers (none for a trailers-only response).
struct RawReply {
    status: http::StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

async fn raw_unary(addr: SocketAddr, path: &str, message: impl Message) -> RawReply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    let encoded = message.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&encoded);
    send.send_data(Bytes::from(frame), true).expect("send body");
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("in time")
        .expect("response");
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.expect("trailers");
    RawReply {
        status: parts.status,
        headers: parts.headers,
        body: data,
        trailers,
    }
}

/// The reply is trailers-only (how grpc-go fails a unary call) with this
/// exact `grpc-status` and `grpc-message`.
fn assert_trailers_only(reply: &RawReply, grpc_status: &str, grpc_message: &str) {
    assert_eq!(reply.status, http::StatusCode::OK);
    assert!(reply.body.is_empty(), "no message in an error reply");
    assert!(
        reply.trailers.is_none(),
        "trailers-only: {:?}",
        reply.trailers
    );
    let header = |name: &str| reply.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        header("grpc-status"),
        Some(grpc_status),
        "{:?}",
        reply.headers
    );
    assert_eq!(
        header("grpc-message"),
        Some(grpc_message),
        "{:?}",
        reply.headers
    );
    assert_eq!(header("content-type"), Some("application/grpc"));
    assert!(
        !reply.headers.keys().any(|k| k.as_str().starts_with("x-")),
        "no private headers leak: {:?}",
        reply.headers
    );
}

#[tokio::test]
async fn the_session_answers_an_unknown_key_with_grpc_status_401() {
    let addr = reference_session(&[]).await;
    let reply = raw_unary(
        addr,
        "/session.RPCSession/session_queryAuthKey",
        spb::TlSessionQueryAuthKey {
            constructor: spb::QUERY_AUTH_KEY,
            auth_key_id: 0x1234_5678,
        },
    )
    .await;
    assert_trailers_only(&reply, "401", "AUTH_KEY_UNREGISTERED");
}

#[tokio::test]
async fn the_session_redirects_a_foreign_key_with_grpc_status_700() {
    let addr = reference_session(&[OTHER]).await;
    let members = [addr.to_string(), OTHER.to_string()];
    let foreign = key_owned_by(&members, OTHER);
    let reply = raw_unary(
        addr,
        "/session.RPCSession/session_closeSession",
        spb::TlSessionCloseSession {
            constructor: spb::CLOSE_SESSION,
            client: Some(event(foreign)),
        },
    )
    .await;
    assert_trailers_only(&reply, "700", &format!("REDIRECT_TO_{OTHER}"));

    // A key it owns is served: boolTrue, status 0 in the trailers.
    let own = key_owned_by(&members, &members[0]);
    let reply = raw_unary(
        addr,
        "/session.RPCSession/session_closeSession",
        spb::TlSessionCloseSession {
            constructor: spb::CLOSE_SESSION,
            client: Some(event(own)),
        },
    )
    .await;
    let trailers = reply.trailers.expect("trailers after the message");
    assert_eq!(trailers["grpc-status"], "0");
    let reply = mtproto_edge_proto::mtproto::Bool::decode(reply.body.get(5..).expect("a message"))
        .expect("a Bool");
    assert!(reply.value());
}

#[tokio::test]
async fn the_session_stream_carries_401_and_700() {
    let addr = reference_session(&[OTHER]).await;
    let foreign = key_owned_by(&[addr.to_string(), OTHER.to_string()], OTHER);
    let requests = tokio_stream::iter(vec![
        spb::SessionStreamRequest {
            request_id: "q".into(),
            payload: Some(StreamRequest::QueryAuthKey(spb::TlSessionQueryAuthKey {
                constructor: spb::QUERY_AUTH_KEY,
                auth_key_id: 0x1234_5678,
            })),
        },
        spb::SessionStreamRequest {
            request_id: "c".into(),
            payload: Some(StreamRequest::CloseSession(spb::TlSessionCloseSession {
                constructor: spb::CLOSE_SESSION,
                client: Some(event(foreign)),
            })),
        },
    ]);
    let mut responses = RpcSessionStreamClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .session_data_stream(requests)
        .await
        .expect("stream")
        .into_inner();
    let mut next = async || {
        let response = tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("in time")
            .expect("stream ok")
            .expect("a response");
        match response.payload {
            Some(StreamResponse::Error(e)) => (response.request_id, e.code, e.message),
            other => panic!("expected an error, got {other:?}"),
        }
    };
    assert_eq!(
        next().await,
        ("q".into(), 401, "AUTH_KEY_UNREGISTERED".into())
    );
    assert_eq!(
        next().await,
        ("c".into(), 700, format!("REDIRECT_TO_{OTHER}"))
    );
}

fn client(members: Vec<String>, mode: Mode) -> RemoteSession {
    RemoteSession::new(
        members,
        RemoteSettings {
            mode,
            call_timeout: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::from_millis(1),
        },
        SessionRpcMetrics::default(),
    )
}

#[tokio::test]
async fn the_gateway_client_and_the_reference_session_agree_in_both_modes() {
    // Two sessions; the first has both on its ring, the second only itself
    // (it serves every key it is sent). The gateway's ring has only the
    // first, which redirects the second's keys.
    let b = reference_session(&[]).await;
    let a = reference_session(&[&b.to_string()]).await;
    let foreign = key_owned_by(&[a.to_string(), b.to_string()], &b.to_string());
    for mode in [Mode::Unary, Mode::Stream] {
        let gateway = client(vec![a.to_string()], mode);
        match gateway.query_auth_key(0x1234_5678).await {
            Err(SessionError::AuthKeyUnregistered) => {}
            r => panic!("{mode:?}: expected AuthKeyUnregistered, got {r:?}"),
        }
        let close = SessionClientEvent {
            server_id: "127.0.0.1:1".into(),
            auth_key_id: foreign,
            key_type: 0,
            perm_auth_key_id: foreign,
            session_id: 7,
            client_ip: "192.0.2.1".into(),
        };
        gateway
            .close_session(close)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: the redirect to {b} is followed: {e}"));
    }
}

/// How the raw server fails each call.
#[derive(Debug, Clone)]
struct Answer {
    grpc_status: &'static str,
    message: String,
    /// The status in the response headers (grpc-go's unary errors) or in
    /// trailers after them.
    trailers_only: bool,
}

/// A session as bare HTTP/2 that fails every call with the answer made for
/// its address, as a Go teamgram session would put it on the wire.
async fn raw_session(answer: impl FnOnce(SocketAddr) -> Answer) -> SocketAddr {
    let (listener, addr) = listener().await;
    let answer = answer(addr);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    tokio::spawn(fail_call(request, respond, answer.clone()));
                }
            });
        }
    });
    addr
}

async fn fail_call(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answer: Answer,
) {
    // A unary call fails once its request is in; a stream, whose requests
    // never end, at its first one.
    let streaming = request.uri().path().ends_with("/SessionDataStream");
    let mut body = request.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if streaming {
            break;
        }
    }
    let mut status = HeaderMap::new();
    status.insert("grpc-status", HeaderValue::from_static(answer.grpc_status));
    status.insert(
        "grpc-message",
        HeaderValue::from_str(&answer.message).expect("ascii message"),
    );
    let mut response = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .expect("response");
    if answer.trailers_only {
        response.headers_mut().extend(status);
        let _ = respond.send_response(response, true);
    } else if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_trailers(status);
    }
}

async fn query_through(answer: Answer) -> Result<(), SessionError> {
    let addr = raw_session(|_| answer).await;
    client(vec![addr.to_string()], Mode::Unary)
        .query_auth_key(0x1234_5678)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn the_gateway_client_reads_teamgram_401_and_the_older_unknown_form() {
    for (grpc_status, trailers_only) in [("401", true), ("401", false), ("2", true)] {
        let answer = Answer {
            grpc_status,
            message: "AUTH_KEY_UNREGISTERED".into(),
            trailers_only,
        };
        match query_through(answer.clone()).await {
            Err(SessionError::AuthKeyUnregistered) => {}
            r => panic!("{answer:?}: expected AuthKeyUnregistered, got {r:?}"),
        }
    }
    // Another 401 (teamgram's SESSION_REVOKED…) is no -404: clients would
    // drop the key. The number is read from the wire, not guessed.
    for trailers_only in [true, false] {
        let answer = Answer {
            grpc_status: "401",
            message: "SESSION_REVOKED".into(),
            trailers_only,
        };
        match query_through(answer).await {
            Err(SessionError::Unavailable(e)) => {
                assert!(e.contains("status 401: SESSION_REVOKED"), "{e}")
            }
            r => panic!("expected Unavailable, got {r:?}"),
        }
    }
}

#[tokio::test]
async fn the_gateway_client_follows_teamgram_700_and_the_older_unknown_form() {
    let owner = reference_session(&[]).await;
    for (grpc_status, trailers_only) in [("700", true), ("700", false), ("2", true)] {
        // Redirected to the real session: the call succeeds there.
        let answer = Answer {
            grpc_status,
            message: format!("REDIRECT_TO_{owner}"),
            trailers_only,
        };
        let redirecting = raw_session(|_| answer.clone()).await;
        let gateway = client(vec![redirecting.to_string()], Mode::Unary);
        match gateway.query_auth_key(0x1234_5678).await {
            // The owner does not know the key: proof the call reached it.
            Err(SessionError::AuthKeyUnregistered) => {}
            r => panic!("{answer:?}: expected the owner's answer, got {r:?}"),
        }
    }
    for (grpc_status, trailers_only) in [("700", true), ("700", false), ("2", true)] {
        // Redirected to itself forever: the gateway gives up with SessionError::Redirect.
        let looping = raw_session(|me| Answer {
            grpc_status,
            message: format!("REDIRECT_TO_{me}"),
            trailers_only,
        })
        .await;
        match client(vec![looping.to_string()], Mode::Unary)
            .query_auth_key(0x1234_5678)
            .await
        {
            Err(SessionError::Redirect(to)) => assert_eq!(to, looping.to_string()),
            r => panic!("{grpc_status} {trailers_only}: expected Redirect, got {r:?}"),
        }
    }
}

/// A message from the client of [`event`].
fn client_data(perm_auth_key_id: i64, n: u8) -> mtproto_session::SessionClientData {
    let client = event(perm_auth_key_id);
    mtproto_session::SessionClientData {
        server_id: client.server_id.into(),
        conn_type: client.conn_type,
        auth_key_id: client.auth_key_id,
        key_type: client.key_type,
        perm_auth_key_id,
        session_id: client.session_id,
        client_ip: client.client_ip.into(),
        quick_ack: 0,
        salt: 0,
        payload: Bytes::from(vec![n; 32]),
    }
}

#[tokio::test]
async fn a_batch_of_messages_is_answered_one_outcome_each_in_both_modes() {
    // As above: the gateway's ring has only `a`, which redirects `b`'s keys.
    let b = reference_session(&[]).await;
    let a = reference_session(&[&b.to_string()]).await;
    let members = [a.to_string(), b.to_string()];
    let (own, foreign) = (
        key_owned_by(&members, &a.to_string()),
        key_owned_by(&members, &b.to_string()),
    );
    let unknown = raw_session(|_| Answer {
        grpc_status: "401",
        message: "AUTH_KEY_UNREGISTERED".into(),
        trailers_only: true,
    })
    .await;
    for mode in [Mode::Unary, Mode::Stream] {
        let metrics = SessionRpcMetrics::default();
        let settings = RemoteSettings {
            mode,
            call_timeout: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::from_millis(1),
        };
        let gateway = RemoteSession::new(vec![a.to_string()], settings.clone(), metrics.clone());
        let redirected = || {
            metrics
                .errors
                .get_or_create(&RpcErrorLabels {
                    method: "session_sendDataToSession",
                    kind: "redirect",
                })
                .get()
        };
        let batches = [
            vec![own; 3],
            // Each message's first attempt is redirected, then taken by `b`.
            vec![foreign; 3],
            // Keys of two owners: each goes its own way.
            vec![own, foreign, own],
        ];
        for (keys, redirects) in batches.iter().zip([0, 3, 4]) {
            let data = keys.iter().zip(0..).map(|(&k, n)| client_data(k, n));
            let outcomes = gateway.send_data_batch(data.collect()).await;
            assert_eq!(outcomes.len(), keys.len(), "{mode:?} {keys:?}");
            for outcome in outcomes {
                outcome.unwrap_or_else(|e| panic!("{mode:?} {keys:?}: {e}"));
            }
            assert_eq!(redirected(), redirects, "{mode:?} {keys:?}");
        }
        assert_eq!(metrics.in_flight.get(), 0, "{mode:?}");

        let refusing = RemoteSession::new(vec![unknown.to_string()], settings, metrics.clone());
        let outcomes = refusing
            .send_data_batch(vec![client_data(own, 1), client_data(own, 2)])
            .await;
        assert_eq!(outcomes.len(), 2);
        for outcome in outcomes {
            assert!(
                matches!(outcome, Err(SessionError::AuthKeyUnregistered)),
                "{mode:?}: {outcome:?}"
            );
        }
        assert!(refusing.send_data_batch(Vec::new()).await.is_empty());
    }
}
