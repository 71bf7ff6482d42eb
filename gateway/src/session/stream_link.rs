//! One `session.RPCSessionStream/SessionDataStream` call to a session
//! instance, driven on HTTP/2 directly. A single task owns the connection,
//! the request body and the response body: a call costs one wake-up each
//! way, and requests queued together leave in one DATA frame. Through
//! tonic's client the same call cost two more wake-ups per message (hyper's
//! request-body task and a response reader), which made stream mode the
//! gateway's most expensive per-message path.
//!
//! Callers encode their request; the link numbers it (`request_id`), sends
//! it, and completes the caller when the answer with that number arrives.
//! An answer missing for the call deadline ends the link (the session is
//! stuck or gone), failing every call on it; the caller's retry opens a new
//! link.
//!
//! With [`Replies`], the call asks the session to send this gateway's server
//! messages on the same stream (`SessionStreamResponse.send_data`, our
//! extension of teamgram's protocol): the link hands them to the
//! connections itself, and a reply and the answer to the message it
//! answers usually arrive in one read. A session that does not know the
//! extension keeps sending them through the reverse path.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use h2::client::{Connection, ResponseFuture};
use h2::{RecvStream, SendStream};
use hyper::header::HeaderValue;
use hyper::StatusCode;
use mtproto_edge_proto::gateway as gpb;
use mtproto_edge_proto::session::{
    self as spb, session_stream_request, session_stream_response::Payload, STREAM_REPLIES_HEADER,
    STREAM_REPLIES_VALUE,
};
use mtproto_session::tls::TlsFiles;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::debug;

use super::grpc_h2::{self, broken, grpc_status, next_message, unavailable, unsent, Io};
use super::remote::Failure;
use crate::grpc_frame::{poll_after_ready_tasks, send_within_window, PREFIX};
use crate::server::registry::Registry;

const PATH: &str = "/session.RPCSessionStream/SessionDataStream";
/// Batches of calls queued for the link task before callers wait
/// (back-pressure).
const QUEUE: usize = 1024;
/// Calls taken off the queue per turn of the link task (one DATA frame);
/// a batch is taken whole.
const BATCH: usize = 64;
/// Calls sent and unanswered before the link takes no more (callers then
/// wait on the queue).
const MAX_WAITING: usize = 4096;
/// Framed bytes held while the peer's window is shut before the link takes
/// no more calls.
const MAX_OUT: usize = 256 << 10;

/// Where server messages the session sends on the stream go.
#[derive(Debug, Clone)]
pub(crate) struct Replies {
    pub(crate) registry: Arc<Registry>,
    /// Counts them (`mtproto_session_stream_replies_total`).
    pub(crate) count: Counter,
}

impl Replies {
    fn deliver(&self, reply: gpb::TlGatewaySendDataToGateway) {
        self.count.inc();
        self.registry
            .deliver(reply.auth_key_id, reply.session_id, reply.payload);
    }
}

/// The answer to one call, or why there is none.
pub(super) type Answer = Result<Payload, Failure>;

/// A caller's requests, encoded without their `request_id`, which the link
/// adds; answered together, in order.
struct Calls {
    bodies: Vec<Bytes>,
    done: oneshot::Sender<Vec<Answer>>,
}

/// The callers' end of one open stream.
#[derive(Debug)]
pub(super) struct StreamLink {
    calls: mpsc::Sender<Calls>,
}

impl StreamLink {
    /// Connects to `addr` (with mutual TLS when `tls` is set), opens the
    /// stream and starts its task. `deadline` bounds the opening and every
    /// call's answer. With `replies`, the session is asked for server
    /// messages on the stream.
    pub(super) async fn open(
        addr: &str,
        tls: Option<&Arc<TlsFiles>>,
        deadline: Duration,
        replies: Option<Replies>,
    ) -> Result<Self, Failure> {
        grpc_h2::open_within(addr, deadline, Self::start(addr, tls, deadline, replies)).await
    }

    async fn start(
        addr: &str,
        tls: Option<&Arc<TlsFiles>>,
        deadline: Duration,
        replies: Option<Replies>,
    ) -> Result<Self, Failure> {
        let (mut client, mut connection) = grpc_h2::connect(addr, tls).await?;
        let mut request = grpc_h2::Target::new(tls.is_some(), addr)?.request(PATH);
        if replies.is_some() {
            request.headers_mut().insert(
                STREAM_REPLIES_HEADER,
                HeaderValue::from_static(STREAM_REPLIES_VALUE),
            );
        }
        // The connection is polled meanwhile, so the peer's settings are read.
        poll_fn(|cx| {
            if let Poll::Ready(ended) = connection.poll_unpin(cx) {
                return Poll::Ready(Err(ended
                    .err()
                    .map_or_else(closed, |e| unavailable(addr, &e))));
            }
            client.poll_ready(cx).map_err(|e| unavailable(addr, &e))
        })
        .await?;
        let (response, send) = client
            .send_request(request, false)
            .map_err(|e| unavailable(addr, &e))?;
        let (calls, queue) = mpsc::channel(QUEUE);
        tokio::spawn(Link::new(connection, send, response, queue, deadline, replies).run());
        Ok(Self { calls })
    }

    /// True once the link's task has ended.
    pub(super) fn is_closed(&self) -> bool {
        self.calls.is_closed()
    }

    /// Sends one request, encoded without its `request_id` (by
    /// [`encode_request`], or `send_data` for messages), and waits for its
    /// answer.
    pub(super) async fn call(&self, body: Bytes) -> Answer {
        let mut answers = self.call_all(vec![body]).await;
        answers.pop().unwrap_or_else(|| Err(closed()))
    }

    /// Sends requests encoded as [`StreamLink::call`] takes them, queued as one batch so
    /// that they leave together, and waits for their answers, in order:
    /// one queue slot and one wake-up for the batch, not one per request.
    pub(super) async fn call_all(&self, bodies: Vec<Bytes>) -> Vec<Answer> {
        let count = bodies.len();
        let (done, answers) = oneshot::channel();
        let calls = Calls { bodies, done };
        let queued = match self.calls.try_send(calls) {
            Ok(()) => true,
            // The link's deadline sweep ends a stuck link, which closes the
            // queue and ends this wait.
            Err(mpsc::error::TrySendError::Full(calls)) => self.calls.send(calls).await.is_ok(),
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        let answers = if queued { answers.await.ok() } else { None };
        answers.unwrap_or_else(|| vec![Err(closed()); count])
    }
}

/// A request's encoding without its `request_id`, which the link adds.
pub(super) fn encode_request(payload: session_stream_request::Payload) -> Bytes {
    spb::SessionStreamRequest {
        request_id: String::new(),
        payload: Some(payload),
    }
    .encode_to_vec()
    .into()
}

fn closed() -> Failure {
    Failure::Transient("session stream closed".into())
}

/// A batch of calls sent and not all answered, numbered from `first`.
struct Waiting {
    first: u64,
    sent: Instant,
    /// One per call of the batch, filled as they come (handed to the
    /// caller when it is completed).
    answers: Vec<Option<Answer>>,
    /// Calls in the batch (`answers` is empty once handed over).
    calls: usize,
    /// Calls of the batch not yet answered.
    left: usize,
    /// `None` once the caller is completed.
    done: Option<oneshot::Sender<Vec<Answer>>>,
}

impl Waiting {
    /// Records the answer to call `at` of the batch (past its calls it is
    /// no call's, and ignored, as a repeated one is); the last completes
    /// the caller.
    fn answer(&mut self, at: u64, answer: Answer) {
        let slot = usize::try_from(at)
            .ok()
            .and_then(|at| self.answers.get_mut(at));
        let Some(slot) = slot.filter(|slot| slot.is_none()) else {
            return;
        };
        *slot = Some(answer);
        self.left -= 1;
        if self.left == 0 {
            self.complete(|| Err(closed()));
        }
    }

    /// Completes the caller, the calls still unanswered with `missing`.
    fn complete(&mut self, missing: impl Fn() -> Answer) {
        if let Some(done) = self.done.take() {
            // Collected in place: the caller gets the batch's own storage.
            let answers = std::mem::take(&mut self.answers)
                .into_iter()
                .map(|a| a.unwrap_or_else(&missing));
            let _ = done.send(answers.collect());
        }
    }
}

/// The response side of the call: its headers awaited, then its body.
enum Answers {
    Awaited(ResponseFuture),
    Body(RecvStream),
}

/// The link task's state.
struct Link {
    connection: Connection<Io, Bytes>,
    send: SendStream<Bytes>,
    answers: Answers,
    queue: mpsc::Receiver<Calls>,
    /// Encoded calls not yet handed to HTTP/2 (flow control).
    out: BytesMut,
    /// Answer bytes received and not yet decoded.
    input: BytesMut,
    /// Sent batches in id order (ids are given in send order).
    waiting: VecDeque<Waiting>,
    /// Calls of the batches in `waiting`.
    waiting_calls: usize,
    next_id: u64,
    /// Calls were taken and the write put off until the worker's other
    /// ready tasks have run.
    deferred: bool,
    deadline: Duration,
    sweep: Interval,
    replies: Option<Replies>,
}

impl Link {
    fn new(
        connection: Connection<Io, Bytes>,
        send: SendStream<Bytes>,
        response: ResponseFuture,
        queue: mpsc::Receiver<Calls>,
        deadline: Duration,
        replies: Option<Replies>,
    ) -> Self {
        let mut sweep = tokio::time::interval(deadline / 4);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            connection,
            send,
            answers: Answers::Awaited(response),
            queue,
            out: BytesMut::new(),
            input: BytesMut::new(),
            waiting: VecDeque::new(),
            waiting_calls: 0,
            next_id: 1,
            deferred: false,
            deadline,
            sweep,
            replies,
        }
    }

    async fn run(mut self) {
        let failure = poll_fn(|cx| self.poll_turn(cx)).await;
        debug!("session stream ended: {failure:?}");
        self.queue.close();
        for mut waiting in self.waiting.drain(..) {
            waiting.complete(|| Err(failure.clone()));
        }
        while let Ok(calls) = self.queue.try_recv() {
            let _ = calls
                .done
                .send(vec![Err(failure.clone()); calls.bodies.len()]);
        }
    }

    /// Moves everything that can move; ready with the reason once the
    /// stream is over.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Failure> {
        loop {
            let mut progress = false;
            match self.take_calls(cx) {
                Ok(true) if !self.deferred => {
                    self.deferred = true;
                    poll_after_ready_tasks(cx);
                    return Poll::Pending;
                }
                Ok(taken) => progress |= taken,
                Err(failure) => return Poll::Ready(failure),
            }
            match self.send_out(cx) {
                Ok(sent) => progress |= sent,
                Err(failure) => return Poll::Ready(failure),
            }
            match self.receive(cx) {
                Poll::Ready(Ok(())) => progress = true,
                Poll::Ready(Err(failure)) => return Poll::Ready(failure),
                Poll::Pending => {}
            }
            if let Poll::Ready(result) = self.connection.poll_unpin(cx) {
                return Poll::Ready(result.err().map_or_else(closed, broken));
            }
            self.deferred = false;
            if self.sweep.poll_tick(cx).is_ready() {
                if let Some(oldest) = self.waiting.front() {
                    if oldest.sent.elapsed() >= self.deadline {
                        return Poll::Ready(Failure::Transient(
                            "session stream call timed out".into(),
                        ));
                    }
                }
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Takes queued calls, numbers and frames them into `out`; true when
    /// some were taken, an error when every caller is gone and nothing is
    /// left to answer.
    fn take_calls(&mut self, cx: &mut Context<'_>) -> Result<bool, Failure> {
        let mut taken = 0;
        let now = Instant::now();
        while taken < BATCH {
            if self.waiting_calls >= MAX_WAITING || self.out.len() >= MAX_OUT {
                break;
            }
            match self.queue.poll_recv(cx) {
                Poll::Ready(Some(calls)) => {
                    if calls.done.is_closed() || calls.bodies.is_empty() {
                        continue;
                    }
                    let first = self.next_id;
                    for body in &calls.bodies {
                        frame_request(&mut self.out, self.next_id, body);
                        self.next_id += 1;
                    }
                    let count = calls.bodies.len();
                    self.waiting.push_back(Waiting {
                        first,
                        sent: now,
                        answers: std::iter::repeat_with(|| None).take(count).collect(),
                        calls: count,
                        left: count,
                        done: Some(calls.done),
                    });
                    self.waiting_calls += count;
                    taken += count;
                }
                Poll::Ready(None) if self.waiting.is_empty() => return Err(closed()),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        Ok(taken > 0)
    }

    /// Hands framed calls to HTTP/2 as far as the peer's window allows.
    fn send_out(&mut self, cx: &mut Context<'_>) -> Result<bool, Failure> {
        send_within_window(&mut self.send, &mut self.out, cx).map_err(unsent)
    }

    /// Reads the response: its headers, then answers; ready when something
    /// was read, with an error once the stream has ended.
    fn receive(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let recv = match &mut self.answers {
            Answers::Awaited(response) => {
                let response = match response.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(broken(e))),
                    Poll::Ready(Ok(response)) => response,
                };
                if let Some(status) = grpc_status(response.headers()) {
                    // Trailers-only: the call is over before it started.
                    return Poll::Ready(Err(status.err().unwrap_or_else(closed)));
                }
                if response.status() != StatusCode::OK {
                    return Poll::Ready(Err(Failure::Transient(format!(
                        "Unavailable: session answered HTTP {}",
                        response.status()
                    ))));
                }
                self.answers = Answers::Body(response.into_body());
                return Poll::Ready(Ok(()));
            }
            Answers::Body(recv) => recv,
        };
        match recv.poll_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let _ = recv.flow_control().release_capacity(chunk.len());
                self.input.extend_from_slice(&chunk);
                Poll::Ready(self.answer())
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(broken(e))),
            Poll::Ready(None) => Poll::Ready(Err(match recv.poll_trailers(cx) {
                Poll::Ready(Ok(Some(trailers))) => match grpc_status(&trailers) {
                    Some(Err(failure)) => failure,
                    _ => closed(),
                },
                _ => closed(),
            })),
        }
    }

    /// Decodes the complete answers in `input` and completes their calls;
    /// server messages among them go to their connections.
    fn answer(&mut self) -> Result<(), Failure> {
        while let Some(message) = next_message(&mut self.input)? {
            let answer = AnswerRead::decode(message)
                .map_err(|e| Failure::Fatal(format!("session sent an undecodable answer: {e}")))?;
            if let Some(Payload::SendData(reply)) = answer.payload {
                match &self.replies {
                    Some(replies) => replies.deliver(reply),
                    None => debug!("session sent a server message on a stream that did not ask"),
                }
                continue;
            }
            let id = std::str::from_utf8(&answer.request_id).map(str::parse::<u64>);
            let Ok(Ok(id)) = id else {
                debug!("session stream answered an unknown request id");
                continue;
            };
            // The last batch numbered from `id` or before.
            let batch = self.waiting.partition_point(|w| w.first <= id);
            if let Some(waiting) = batch.checked_sub(1).and_then(|at| self.waiting.get_mut(at)) {
                let payload = answer
                    .payload
                    .ok_or_else(|| Failure::Fatal("session answered without a payload".into()));
                waiting.answer(id - waiting.first, payload);
            }
            while let Some(answered) = self.waiting.front().filter(|w| w.done.is_none()) {
                self.waiting_calls -= answered.calls;
                self.waiting.pop_front();
            }
        }
        Ok(())
    }
}

/// `SessionStreamResponse` as the link reads it: the same fields, the
/// `request_id` kept as the bytes it arrived in (it is only parsed as a
/// number), which spares a `String` per answer.
#[derive(Message)]
struct AnswerRead {
    #[prost(bytes = "bytes", tag = "1")]
    request_id: Bytes,
    #[prost(oneof = "Payload", tags = "10, 11, 12, 20")]
    payload: Option<Payload>,
}

/// Appends one gRPC message: `request_id` (field 1) followed by the
/// caller's encoding of the rest. Protobuf fields may come in any order,
/// and an empty `request_id` is not encoded, so this is the message with
/// its id set.
fn frame_request(out: &mut BytesMut, id: u64, body: &[u8]) {
    let mut digits = itoa::Buffer::new();
    let id = digits.format(id).as_bytes();
    let len = 2 + id.len() + body.len();
    out.reserve(PREFIX + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    out.put_u8(0x0a); // field 1, length-delimited
    out.put_u8(id.len() as u8);
    out.put_slice(id);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc_frame::tests::read_messages;
    use crate::server::outbox;
    use crate::session::grpc_h2::tests::{server, server_seeing_headers};
    use mtproto_edge_proto::mtproto as pb;
    use session_stream_request::Payload as Request;

    fn query(auth_key_id: i64) -> Bytes {
        encode_request(Request::QueryAuthKey(spb::TlSessionQueryAuthKey {
            constructor: spb::QUERY_AUTH_KEY,
            auth_key_id,
        }))
    }

    fn queried_id(request: &spb::SessionStreamRequest) -> i64 {
        match &request.payload {
            Some(Request::QueryAuthKey(q)) => q.auth_key_id,
            other => panic!("not a query: {other:?}"),
        }
    }

    #[test]
    fn a_framed_request_decodes_with_its_id() {
        let mut out = BytesMut::new();
        frame_request(&mut out, 1_234_567, &query(42));
        let message = next_message(&mut out).expect("valid").expect("complete");
        let request = spb::SessionStreamRequest::decode(message).expect("decodes");
        assert_eq!(request.request_id, "1234567");
        assert_eq!(queried_id(&request), 42);
        assert!(out.is_empty());
    }

    #[test]
    fn an_answer_reads_as_the_generated_type_encodes_it() {
        for payload in [
            Payload::Ack(spb::SessionStreamAck { success: true }),
            Payload::Error(spb::SessionStreamError {
                code: 700,
                message: "REDIRECT_TO_10.0.0.1:20450".into(),
            }),
        ] {
            let sent = spb::SessionStreamResponse {
                request_id: "18446744073709551615".into(),
                payload: Some(payload.clone()),
            };
            let read = AnswerRead::decode(&sent.encode_to_vec()[..]).expect("decodes");
            assert_eq!(&read.request_id[..], b"18446744073709551615");
            assert_eq!(read.payload, Some(payload));
        }
    }

    #[test]
    fn answers_are_split_off_only_when_complete() {
        let mut wire = BytesMut::new();
        frame_request(&mut wire, 1, &query(7));
        frame_request(&mut wire, 2, &query(8));
        let mut input = BytesMut::new();
        let mut ids = Vec::new();
        for byte in wire {
            input.put_u8(byte);
            while let Some(message) = next_message(&mut input).expect("valid") {
                let request = spb::SessionStreamRequest::decode(message).expect("decodes");
                ids.push((queried_id(&request), request.request_id));
            }
        }
        assert_eq!(ids, [(7, "1".into()), (8, "2".into())]);
    }

    fn ok_headers() -> hyper::Response<()> {
        hyper::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .expect("response")
    }

    #[tokio::test]
    async fn answers_in_any_order_reach_their_callers() {
        const CALLS: i64 = 50;
        let addr = server(PATH, |mut body, mut respond| async move {
            let requests =
                read_messages::<spb::SessionStreamRequest>(&mut body, CALLS as usize).await;
            let mut answers = respond.send_response(ok_headers(), false).expect("headers");
            for request in requests.iter().rev() {
                let answer = spb::SessionStreamResponse {
                    request_id: request.request_id.clone(),
                    payload: Some(Payload::AuthKey(pb::AuthKeyInfo {
                        auth_key_id: queried_id(request),
                        ..Default::default()
                    })),
                };
                answers
                    .send_data(crate::grpc_frame::frame(&answer), false)
                    .expect("send");
            }
            std::future::pending::<()>().await;
        })
        .await;
        let link = StreamLink::open(&addr, None, Duration::from_secs(10), None)
            .await
            .expect("open");
        let answers = futures::future::join_all((0..CALLS).map(|i| link.call(query(i)))).await;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(Payload::AuthKey(info)) => assert_eq!(info.auth_key_id, i as i64),
                other => panic!("call {i}: {other:?}"),
            }
        }
    }

    /// A session that answers one query and, before the answer, sends a
    /// server message for key 1, session 2 on the stream; whether the call
    /// asked for that comes out of `asked`.
    async fn session_sending_a_server_message(asked: oneshot::Sender<bool>) -> String {
        server_seeing_headers(PATH, |headers, mut body, mut respond| async move {
            let wanted = headers
                .get(STREAM_REPLIES_HEADER)
                .is_some_and(|v| v == STREAM_REPLIES_VALUE);
            let _ = asked.send(wanted);
            let request = read_messages::<spb::SessionStreamRequest>(&mut body, 1).await;
            let mut answers = respond.send_response(ok_headers(), false).expect("headers");
            let server_message = spb::SessionStreamResponse {
                request_id: String::new(),
                payload: Some(Payload::SendData(gpb::TlGatewaySendDataToGateway {
                    constructor: gpb::SEND_DATA_TO_GATEWAY,
                    auth_key_id: 1,
                    session_id: 2,
                    payload: Bytes::from_static(b"server message"),
                })),
            };
            let answer = spb::SessionStreamResponse {
                request_id: request[0].request_id.clone(),
                payload: Some(Payload::AuthKey(pb::AuthKeyInfo::default())),
            };
            for message in [server_message, answer] {
                answers
                    .send_data(crate::grpc_frame::frame(&message), false)
                    .expect("send");
            }
            std::future::pending::<()>().await;
        })
        .await
    }

    #[tokio::test]
    async fn server_messages_on_the_stream_reach_their_connection_when_asked_for() {
        let registry = Arc::new(Registry::new(Arc::default(), 8));
        let (outbox, mut inbox) = outbox::channel(16);
        registry.attach(1, 2, 10, &outbox);
        let count = Counter::default();
        for ask in [false, true] {
            let (asked, wanted) = oneshot::channel();
            let addr = session_sending_a_server_message(asked).await;
            let replies = ask.then(|| Replies {
                registry: registry.clone(),
                count: count.clone(),
            });
            let link = StreamLink::open(&addr, None, Duration::from_secs(10), replies)
                .await
                .expect("open");
            assert!(
                matches!(link.call(query(1)).await, Ok(Payload::AuthKey(_))),
                "the call is answered after the server message (asked: {ask})"
            );
            assert_eq!(wanted.await.expect("called"), ask, "header sent");
            if ask {
                let delivered = inbox.try_recv().expect("delivered before the answer");
                assert_eq!(delivered.payload, &b"server message"[..]);
            } else {
                assert!(
                    inbox.try_recv().is_none(),
                    "a stream that did not ask ignores them"
                );
            }
        }
        assert_eq!(count.get(), 1);
    }

    #[tokio::test]
    async fn an_unanswered_call_ends_the_link_after_the_deadline() {
        let addr = server(PATH, |mut body, mut respond| async move {
            read_messages::<spb::SessionStreamRequest>(&mut body, 1).await;
            let _answers = respond.send_response(ok_headers(), false).expect("headers");
            std::future::pending::<()>().await;
        })
        .await;
        let link = StreamLink::open(&addr, None, Duration::from_millis(200), None)
            .await
            .expect("open");
        let answer = tokio::time::timeout(Duration::from_secs(10), link.call(query(1)))
            .await
            .expect("the link gave up within its deadline");
        assert_eq!(
            answer,
            Err(Failure::Transient("session stream call timed out".into()))
        );
        assert!(link.is_closed());
    }

    #[tokio::test]
    async fn a_refused_call_fails_its_callers_with_the_status() {
        let addr = server(PATH, |_body, mut respond| async move {
            let refusal = hyper::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .header("grpc-message", "unknown service")
                .body(())
                .expect("response");
            respond.send_response(refusal, true).expect("headers");
            std::future::pending::<()>().await;
        })
        .await;
        let link = StreamLink::open(&addr, None, Duration::from_secs(10), None)
            .await
            .expect("open");
        match link.call(query(1)).await {
            Err(Failure::Fatal(message)) => {
                assert!(message.contains("unknown service"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
