//! Unary calls of `session.RPCSession` (teamgram's session service) to one
//! session instance, on HTTP/2 directly. One task drives the connection;
//! each call runs in its caller's task: it opens a stream, sends the one
//! message with the end of the stream, and reads the answer and the
//! status. Through tonic's channel every call also passed through tower's
//! buffer task and a spawned task of hyper's for its request body, which
//! made unary mode the gateway's most expensive per-message path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use h2::RecvStream;
use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;
use mtproto_session::tls::TlsFiles;
use prost::Message;
use tokio::sync::Semaphore;
use tracing::debug;

use super::grpc_h2::{self, broken, grpc_status, next_message, Target};
use super::remote::Failure;
use crate::grpc_frame;

pub(super) const QUERY_AUTH_KEY: &str = "/session.RPCSession/session_queryAuthKey";
pub(super) const SET_AUTH_KEY: &str = "/session.RPCSession/session_setAuthKey";
pub(super) const SEND_DATA: &str = "/session.RPCSession/session_sendDataToSession";
pub(super) const CLOSE_SESSION: &str = "/session.RPCSession/session_closeSession";

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Calls in flight on one link; more wait for a turn (within their
/// deadline). Each holds at most one small DATA frame that h2 buffers until
/// the call reads it, and h2 closes a connection whose unread small frames
/// pass its budget (half the connection window): 4,096 stay well under it.
const MAX_IN_FLIGHT: usize = 4096;

#[derive(Debug)]
pub(super) struct UnaryLink {
    client: SendRequest<Bytes>,
    target: Target,
    deadline: Duration,
    /// The deadline as gRPC's `grpc-timeout`, so the session can give up too.
    timeout_header: HeaderValue,
    /// Set when the connection has ended; the next call opens a new link.
    ended: Arc<AtomicBool>,
    turns: Semaphore,
}

impl UnaryLink {
    /// Connects to `addr` (with mutual TLS when `tls` is set) and starts the
    /// connection's task. `deadline` bounds the opening and every call.
    pub(super) async fn open(
        addr: &str,
        tls: Option<&Arc<TlsFiles>>,
        deadline: Duration,
    ) -> Result<Self, Failure> {
        let target = Target::new(tls.is_some(), addr)?;
        let (client, connection) =
            grpc_h2::open_within(addr, deadline, grpc_h2::connect(addr, tls)).await?;
        let ended = Arc::new(AtomicBool::new(false));
        tokio::spawn({
            let ended = ended.clone();
            let addr = addr.to_string();
            async move {
                if let Err(e) = connection.await {
                    debug!(session = %addr, "session connection ended: {e}");
                }
                ended.store(true, Ordering::Release);
            }
        });
        let timeout_header = HeaderValue::from_str(&format!("{}m", deadline.as_millis().max(1)))
            .map_err(|e| Failure::Fatal(format!("grpc-timeout: {e}")))?;
        Ok(Self {
            client,
            target,
            deadline,
            timeout_header,
            ended,
            turns: Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// True once the connection has ended.
    pub(super) fn is_closed(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// One call of `path` with `request`: the answer, or the failure its
    /// status (or the connection) reports.
    pub(super) async fn call<A: Message + Default>(
        &self,
        path: &'static str,
        request: &impl Message,
    ) -> Result<A, Failure> {
        let body = grpc_frame::frame(request);
        tokio::time::timeout(self.deadline, self.call_within(path, body))
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Transient(format!(
                    "DeadlineExceeded: {path} on {} took over {:?}",
                    self.target, self.deadline
                )))
            })
    }

    async fn call_within<A: Message + Default>(
        &self,
        path: &'static str,
        body: Bytes,
    ) -> Result<A, Failure> {
        let _turn = self.turns.acquire().await.map_err(|_| closed())?;
        let mut request = self.target.request(path);
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, self.timeout_header.clone());
        let mut client = self.client.clone().ready().await.map_err(broken)?;
        let (response, mut send) = client.send_request(request, false).map_err(broken)?;
        send.send_data(body, true).map_err(broken)?;
        let response = response.await.map_err(broken)?;
        if let Some(status) = grpc_status(response.headers()) {
            // Trailers-only: how a session refuses a call.
            status?;
            return Err(Failure::Fatal(format!("{path}: OK without an answer")));
        }
        if response.status() != StatusCode::OK {
            return Err(Failure::Transient(format!(
                "Unavailable: session answered {path} with HTTP {}",
                response.status()
            )));
        }
        let mut body = response.into_body();
        let answer = read_answer(&mut body).await?;
        match body
            .trailers()
            .await
            .map_err(broken)?
            .as_ref()
            .and_then(grpc_status)
        {
            Some(Ok(())) => {}
            Some(Err(failure)) => return Err(failure),
            None => return Err(Failure::Fatal(format!("{path}: no grpc-status"))),
        }
        let answer =
            answer.ok_or_else(|| Failure::Fatal(format!("{path}: OK without an answer")))?;
        A::decode(answer).map_err(|e| Failure::Fatal(format!("{path}: undecodable answer: {e}")))
    }
}

fn closed() -> Failure {
    Failure::Transient("session link closed".into())
}

/// The body of a unary call: at most one message.
async fn read_answer(body: &mut RecvStream) -> Result<Option<Bytes>, Failure> {
    let mut input = BytesMut::new();
    let mut answer = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(broken)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        input.extend_from_slice(&chunk);
        if let Some(message) = next_message(&mut input)? {
            if answer.is_some() {
                return Err(Failure::Fatal(
                    "session sent two answers to a unary call".into(),
                ));
            }
            answer = Some(message);
        }
    }
    if !input.is_empty() {
        return Err(Failure::Fatal(
            "session ended a unary call inside a message".into(),
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::grpc_h2::tests::server;
    use mtproto_edge_proto::mtproto as pb;
    use mtproto_edge_proto::session as spb;

    fn query() -> spb::TlSessionQueryAuthKey {
        spb::TlSessionQueryAuthKey {
            constructor: spb::QUERY_AUTH_KEY,
            auth_key_id: 42,
        }
    }

    async fn link(addr: &str) -> UnaryLink {
        UnaryLink::open(addr, None, Duration::from_secs(5))
            .await
            .expect("connects")
    }

    /// How a query to the server at `addr` fails.
    async fn query_failure(addr: &str) -> Failure {
        link(addr)
            .await
            .call::<pb::Bool>(QUERY_AUTH_KEY, &query())
            .await
            .unwrap_err()
    }

    fn headers(grpc_status: Option<&'static str>) -> hyper::Response<()> {
        let mut response = hyper::Response::builder().header("content-type", "application/grpc");
        if let Some(code) = grpc_status {
            response = response.header("grpc-status", code);
        }
        response.body(()).expect("response")
    }

    #[tokio::test]
    async fn an_answer_and_its_ok_status_reach_the_caller() {
        let addr = server(QUERY_AUTH_KEY, |mut body, mut respond| async move {
            let chunk = body.data().await.expect("a request").expect("data");
            let mut input = BytesMut::from(&chunk[..]);
            let request = next_message(&mut input).expect("valid").expect("whole");
            assert_eq!(
                spb::TlSessionQueryAuthKey::decode(request)
                    .unwrap()
                    .auth_key_id,
                42
            );
            let mut send = respond
                .send_response(headers(None), false)
                .expect("headers");
            // The answer arrives split across two frames.
            let framed = grpc_frame::frame(&pb::Bool::from_bool(true));
            send.send_data(framed.slice(..3), false).expect("data");
            send.send_data(framed.slice(3..), false).expect("data");
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            send.send_trailers(trailers).expect("trailers");
        })
        .await;
        let answer: pb::Bool = link(&addr)
            .await
            .call(QUERY_AUTH_KEY, &query())
            .await
            .unwrap();
        assert!(answer.value());
    }

    #[tokio::test]
    async fn a_trailers_only_refusal_carries_teamgrams_code() {
        let addr = server(QUERY_AUTH_KEY, |_body, mut respond| async move {
            let mut refusal = headers(Some("700"));
            refusal.headers_mut().insert(
                "grpc-message",
                HeaderValue::from_static("REDIRECT_TO_10.1.2.3:20450"),
            );
            respond.send_response(refusal, true).expect("headers");
        })
        .await;
        assert_eq!(
            query_failure(&addr).await,
            Failure::Redirect("10.1.2.3:20450".into())
        );
    }

    #[tokio::test]
    async fn an_error_status_after_an_answer_wins_and_a_missing_status_is_an_error() {
        for (trailer, expect_unregistered) in [(Some("401"), true), (None, false)] {
            let addr = server(QUERY_AUTH_KEY, move |_body, mut respond| async move {
                let mut send = respond
                    .send_response(headers(None), false)
                    .expect("headers");
                send.send_data(grpc_frame::frame(&pb::Bool::from_bool(true)), false)
                    .expect("data");
                let mut trailers = hyper::HeaderMap::new();
                if let Some(code) = trailer {
                    trailers.insert("grpc-status", HeaderValue::from_static(code));
                    trailers.insert(
                        "grpc-message",
                        HeaderValue::from_static("AUTH_KEY_UNREGISTERED"),
                    );
                }
                send.send_trailers(trailers).expect("trailers");
            })
            .await;
            let failure = query_failure(&addr).await;
            if expect_unregistered {
                assert_eq!(failure, Failure::Unregistered);
            } else {
                assert!(matches!(failure, Failure::Fatal(m) if m.contains("no grpc-status")));
            }
        }
    }

    #[tokio::test]
    async fn an_unanswered_call_fails_transiently_at_its_deadline() {
        let addr = server(QUERY_AUTH_KEY, |_body, respond| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(respond);
        })
        .await;
        let link = UnaryLink::open(&addr, None, Duration::from_millis(200))
            .await
            .expect("connects");
        let request = query();
        let call = link.call::<pb::Bool>(QUERY_AUTH_KEY, &request);
        let failure = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("ends at its deadline")
            .unwrap_err();
        assert!(matches!(failure, Failure::Transient(m) if m.contains("DeadlineExceeded")));
    }

    #[tokio::test]
    async fn a_closed_connection_marks_the_link_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let connection = h2::server::handshake(tcp).await.unwrap();
            drop(connection);
        });
        let link = link(&addr).await;
        let failure = link
            .call::<pb::Bool>(QUERY_AUTH_KEY, &query())
            .await
            .unwrap_err();
        assert!(matches!(failure, Failure::Transient(_)), "{failure:?}");
        for _ in 0..100 {
            if link.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the link never noticed its connection ended");
    }
}
