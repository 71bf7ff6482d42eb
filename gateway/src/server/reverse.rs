//! The gateway's gRPC server for the reverse path: teamgram's
//! `gateway.RPCGateway` (unary) and `gateway.RPCGatewayStream`, through
//! which session services hand server messages to the connections of a
//! session.
//!
//! Served on HTTP/2 directly: one task per session connection reads its
//! calls, delivers their messages and writes the answers, batched per DATA
//! frame read. Through tonic and hyper every call also had a task of its
//! own, a wake-up more each way per batch on stream mode's hottest path.
//! Every peer is bounded: connections, calls per connection, message size,
//! bytes held for unfinished requests, and answers the peer does not read.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use mtproto_edge_proto::gateway::{self as gpb};
use mtproto_edge_proto::mtproto as pb;
use mtproto_session::tls::{self as grpc_tls, ServedIo, TlsFiles};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::registry::Registry;
use crate::grpc_frame::{
    next_message, put_frame, send_within_window, FrameError, SendError, CONNECTION_WINDOW, PREFIX,
    STREAM_WINDOW,
};
use crate::metrics::{Metrics, ReasonLabels};

pub const UNARY_PATH: &str = "/gateway.RPCGateway/gateway_sendDataToGateway";
pub const STREAM_PATH: &str = "/gateway.RPCGatewayStream/GatewayDataStream";

/// Calls open at once on one connection (HTTP/2 `MAX_CONCURRENT_STREAMS`).
const MAX_CALLS: u32 = 256;
/// Bytes one connection's calls may hold of requests not yet complete
/// (incomplete messages, and a unary request until its stream ends); a
/// call that would pass it fails with `RESOURCE_EXHAUSTED`.
const MAX_PARTIAL: usize = 32 << 20;
/// Answers framed and not yet taken by the peer's window, past which a
/// stream call reads no more requests (so the peer's window fills).
const MAX_OUT: usize = 256 << 10;
const MAX_HEADER_LIST: u32 = 16 << 10;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// What `grpc-message` percent-encodes.
const MESSAGE_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

#[derive(Debug, Clone)]
pub struct ReversePath {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Session connections served at once (`session.max_reverse_connections`);
    /// more are closed when accepted.
    max_connections: usize,
    /// [`MAX_PARTIAL`], smaller in tests.
    max_partial: usize,
}

impl ReversePath {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, max_connections: usize) -> Self {
        Self {
            registry,
            metrics,
            max_connections,
            max_partial: MAX_PARTIAL,
        }
    }

    /// Counts a refusal in `mtproto_reverse_path_refused_total{reason}`.
    fn refused(&self, reason: &'static str) {
        self.metrics
            .reverse_path_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a call's failure status, when it is the peer's doing.
    fn count(&self, status: &Status) {
        if let Some(reason) = status.reason {
            self.refused(reason);
        }
    }

    /// boolTrue when a live connection of the session took the message into
    /// its outbox.
    fn deliver(&self, request: gpb::TlGatewaySendDataToGateway) -> bool {
        self.registry
            .deliver(request.auth_key_id, request.session_id, request.payload)
    }

    /// Serves `listener` (with mutual TLS when `tls` is set) until `stop`
    /// turns true or its sender is dropped; then each connection gets a
    /// GOAWAY, its open streams end with `UNAVAILABLE` after the answers
    /// to what they read, its unary calls complete, and it is waited for.
    /// Dropping the future closes every connection at once.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<Arc<TlsFiles>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut incoming = grpc_tls::incoming(listener, tls);
        let mut connections = JoinSet::new();
        let drain = stop.clone();
        loop {
            tokio::select! {
                accepted = incoming.next() => match accepted {
                    Some(Ok(io)) if connections.len() < self.max_connections => {
                        connections.spawn(self.clone().serve_connection(io, drain.clone()));
                    }
                    Some(Ok(io)) => {
                        self.refused("connections");
                        warn!(
                            peer = ?io.connect_info().addr,
                            "reverse path at its {} session connections (session.max_reverse_connections): connection closed",
                            self.max_connections
                        );
                    }
                    Some(Err(e)) => debug!("reverse path accept failed: {e}"),
                    None => break,
                },
                Some(_) = connections.join_next() => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
        }
        drop(incoming);
        while connections.join_next().await.is_some() {}
    }

    async fn serve_connection(self, io: ServedIo, stop: watch::Receiver<bool>) {
        let peer = io.connect_info().addr;
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(MAX_CALLS)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io);
        let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return debug!(?peer, "reverse path HTTP/2 handshake failed: {e}"),
            Err(_) => return debug!(?peer, "reverse path HTTP/2 handshake timed out"),
        };
        let partial = Arc::new(AtomicUsize::new(0));
        let mut calls = FuturesUnordered::new();
        let mut stopping = pin!({
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            }
        });
        let mut draining = false;
        poll_fn(|cx| {
            if !draining && stopping.as_mut().poll(cx).is_ready() {
                connection.graceful_shutdown();
                draining = true;
            }
            loop {
                let mut progress = false;
                while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                    progress = true;
                }
                // Reading and writing the socket happen here too.
                loop {
                    match connection.poll_accept(cx) {
                        Poll::Ready(Some(Ok((request, respond)))) => {
                            calls.push(self.clone().call(
                                request,
                                respond,
                                partial.clone(),
                                stop.clone(),
                            ));
                            progress = true;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            debug!(?peer, "reverse path connection failed: {e}");
                            return Poll::Ready(());
                        }
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => break,
                    }
                }
                if !progress {
                    return Poll::Pending;
                }
            }
        })
        .await;
    }

    /// One call, answered; failures end the call with their status.
    async fn call(
        self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        partial: Arc<AtomicUsize>,
        mut stop: watch::Receiver<bool>,
    ) {
        if request.method() != Method::POST {
            return http_refusal(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        }
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if !grpc {
            return http_refusal(&mut respond, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        let path = request.uri().path();
        let unary = match path {
            UNARY_PATH => true,
            STREAM_PATH => false,
            _ => {
                debug!(path, "reverse path call of an unknown method");
                let refusal =
                    Status::refusal(Code::Unimplemented, "unknown method", "unknown_method");
                self.count(&refusal);
                return refusal.send_alone(&mut respond);
            }
        };
        let body = Input {
            body: request.into_body(),
            held: BytesMut::new(),
            kept: 0,
            partial,
            max_partial: self.max_partial,
        };
        if unary {
            if let Err(status) = self.unary(body, &mut respond).await {
                self.count(&status);
                status.send_alone(&mut respond);
            }
            return;
        }
        let send = match respond.send_response(grpc_headers(), false) {
            Ok(send) => send,
            Err(e) => return debug!("reverse path stream not answered: {e}"),
        };
        let mut call = StreamCall {
            path: self.clone(),
            input: body,
            send,
            out: BytesMut::new(),
            ended: false,
        };
        // The server stops after the drain, when no client connection is
        // left to deliver to: an open stream is ended then rather than
        // waited for (the session keeps it open for as long as it may).
        let status = tokio::select! {
            biased;
            status = poll_fn(|cx| call.poll_turn(cx)) => status,
            _ = stop.wait_for(|stopped| *stopped) => {
                Status::new(Code::Unavailable, "the gateway is shutting down")
            }
        };
        self.count(&status);
        call.finish(status);
    }

    async fn unary(
        &self,
        mut input: Input,
        respond: &mut SendResponse<Bytes>,
    ) -> Result<(), Status> {
        let mut message = None;
        while let Some(chunk) = poll_fn(|cx| input.poll_chunk(cx)).await? {
            input.take(&chunk)?;
            while let Some(next) = input.next()? {
                input.keep(&next);
                if message.replace(next).is_some() {
                    return Err(Status::refusal(
                        Code::Internal,
                        "more than one request message",
                        "malformed",
                    ));
                }
            }
        }
        input.end()?;
        let message = message
            .ok_or_else(|| Status::refusal(Code::Internal, "no request message", "malformed"))?;
        let request = decode::<gpb::TlGatewaySendDataToGateway>(message)?;
        let mut answer = BytesMut::new();
        put_frame(&mut answer, &pb::Bool::from_bool(self.deliver(request)));
        let sent = respond
            .send_response(grpc_headers(), false)
            .and_then(|mut send| {
                send.send_data(answer.freeze(), false)?;
                send.send_trailers(Status::OK.trailers())
            });
        if let Err(e) = sent {
            debug!("reverse path answer not sent: {e}");
        }
        Ok(())
    }
}

/// A call's request body and the incomplete message it holds, counted
/// against the connection's budget.
struct Input {
    body: RecvStream,
    held: BytesMut,
    /// Bytes of complete messages the call still holds (a unary request
    /// until its stream ends), counted like `held`.
    kept: usize,
    partial: Arc<AtomicUsize>,
    max_partial: usize,
}

impl Input {
    /// The next DATA chunk, `None` at the end of the requests.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Status>> {
        match self.body.poll_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Ok(None)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(Status::broken(&e))),
            Poll::Ready(Some(Ok(chunk))) => {
                let _ = self.body.flow_control().release_capacity(chunk.len());
                Poll::Ready(Ok(Some(chunk)))
            }
        }
    }

    /// Adds a chunk to what is held, within the connection's budget.
    fn take(&mut self, chunk: &[u8]) -> Result<(), Status> {
        let total = self.partial.fetch_add(chunk.len(), Ordering::Relaxed) + chunk.len();
        if total > self.max_partial {
            self.partial.fetch_sub(chunk.len(), Ordering::Relaxed);
            return Err(Status::refusal(
                Code::ResourceExhausted,
                "too many bytes held for unfinished requests on this connection",
                "incomplete_bytes",
            ));
        }
        self.held.extend_from_slice(chunk);
        Ok(())
    }

    /// The next complete message held.
    fn next(&mut self) -> Result<Option<Bytes>, Status> {
        let message = next_message(&mut self.held).map_err(Status::framing)?;
        if let Some(message) = &message {
            self.partial
                .fetch_sub(PREFIX + message.len(), Ordering::Relaxed);
        }
        Ok(message)
    }

    /// Keeps counting a message taken by [`Input::next`] until the call
    /// ends.
    fn keep(&mut self, message: &Bytes) {
        let len = PREFIX + message.len();
        self.partial.fetch_add(len, Ordering::Relaxed);
        self.kept += len;
    }

    /// Checks that the requests did not end inside a message.
    fn end(&self) -> Result<(), Status> {
        if self.held.is_empty() {
            Ok(())
        } else {
            Err(Status::refusal(
                Code::Internal,
                "requests ended inside a message",
                "malformed",
            ))
        }
    }
}

impl Drop for Input {
    fn drop(&mut self) {
        self.partial
            .fetch_sub(self.held.len() + self.kept, Ordering::Relaxed);
    }
}

/// One `GatewayDataStream` call: each request delivered and answered in
/// order, the answers to one DATA frame's requests sent together.
struct StreamCall {
    path: ReversePath,
    input: Input,
    send: SendStream<Bytes>,
    /// Framed answers not yet handed to HTTP/2 (flow control).
    out: BytesMut,
    /// The peer has ended its requests.
    ended: bool,
}

impl StreamCall {
    /// Moves everything that can move; ready with the call's status once
    /// the requests are over and every answer is handed to HTTP/2.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        loop {
            let mut progress = match send_within_window(&mut self.send, &mut self.out, cx) {
                Ok(sent) => sent,
                Err(SendError::Broken(e)) => return Poll::Ready(Status::broken(&e)),
                Err(SendError::Closed) => return Poll::Ready(Status::OK),
            };
            if self.ended {
                if self.out.is_empty() {
                    return Poll::Ready(Status::OK);
                }
            } else if self.out.len() < MAX_OUT {
                match self.input.poll_chunk(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(Some(chunk))) => {
                        if let Err(status) = self.answer(&chunk) {
                            return Poll::Ready(status);
                        }
                        progress = true;
                    }
                    Poll::Ready(Ok(None)) => {
                        if let Err(status) = self.input.end() {
                            return Poll::Ready(status);
                        }
                        self.ended = true;
                        progress = true;
                    }
                    Poll::Ready(Err(status)) => return Poll::Ready(status),
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Delivers the complete requests of a chunk and frames their answers.
    fn answer(&mut self, chunk: &[u8]) -> Result<(), Status> {
        self.input.take(chunk)?;
        while let Some(message) = self.input.next()? {
            let request = decode::<StreamRequestRead>(message)?;
            if std::str::from_utf8(&request.request_id).is_err() {
                return Err(Status::refusal(
                    Code::Internal,
                    "undecodable request: request_id is not UTF-8",
                    "malformed",
                ));
            }
            let success = request
                .send_data
                .is_some_and(|send| self.path.deliver(send));
            let answer = StreamAnswerWrite {
                request_id: request.request_id,
                success,
            };
            put_frame(&mut self.out, &answer);
        }
        Ok(())
    }

    /// Ends the call with `status` after the answers framed so far (h2
    /// sends them as the window opens; at most `MAX_OUT` and one chunk's
    /// answers).
    fn finish(mut self, status: Status) {
        if !self.out.is_empty() {
            let _ = self.send.send_data(self.out.split().freeze(), false);
        }
        if let Err(e) = self.send.send_trailers(status.trailers()) {
            debug!("reverse path stream not ended: {e}");
        }
    }
}

/// `GatewayStreamRequest` and `GatewayStreamResponse` as a stream call
/// reads and writes them: the same fields (and bytes on the wire), the
/// `request_id` kept as the bytes it arrived in, so echoing it costs no
/// `String` per request.
#[derive(Message)]
struct StreamRequestRead {
    #[prost(bytes = "bytes", tag = "1")]
    request_id: Bytes,
    #[prost(message, optional, tag = "10")]
    send_data: Option<gpb::TlGatewaySendDataToGateway>,
}

#[derive(Message)]
struct StreamAnswerWrite {
    #[prost(bytes = "bytes", tag = "1")]
    request_id: Bytes,
    #[prost(bool, tag = "2")]
    success: bool,
}

fn decode<M: Message + Default>(message: Bytes) -> Result<M, Status> {
    M::decode(message).map_err(|e| {
        Status::refusal(
            Code::Internal,
            format!("undecodable request: {e}"),
            "malformed",
        )
    })
}

fn grpc_headers() -> Response<()> {
    let mut response = Response::new(());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A refusal below gRPC (not a gRPC request at all), as the gRPC spec asks.
fn http_refusal(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Err(e) = respond.send_response(response, true) {
        debug!("reverse path refusal not sent: {e}");
    }
}

/// gRPC status codes the reverse path answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    Ok = 0,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// A call's outcome, sent as its trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    code: Code,
    message: String,
    /// Set when the call was refused for what the peer sent:
    /// `mtproto_reverse_path_refused_total`'s `reason`.
    reason: Option<&'static str>,
}

impl Status {
    const OK: Status = Status {
        code: Code::Ok,
        message: String::new(),
        reason: None,
    };

    fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// A refusal of what the peer sent, counted under `reason`.
    fn refusal(code: Code, message: impl Into<String>, reason: &'static str) -> Self {
        Self {
            reason: Some(reason),
            ..Self::new(code, message)
        }
    }

    fn broken(e: &h2::Error) -> Self {
        Self::new(Code::Unavailable, e.to_string())
    }

    fn framing(e: FrameError) -> Self {
        match e {
            FrameError::Compressed => {
                Self::refusal(Code::Unimplemented, e.to_string(), "malformed")
            }
            FrameError::TooLarge(_) => {
                Self::refusal(Code::ResourceExhausted, e.to_string(), "message_size")
            }
        }
    }

    fn trailers(&self) -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(self.code as u16));
        if !self.message.is_empty() {
            let message =
                percent_encoding::utf8_percent_encode(&self.message, MESSAGE_ESCAPES).to_string();
            if let Ok(value) = HeaderValue::try_from(message) {
                trailers.insert("grpc-message", value);
            }
        }
        trailers
    }

    /// Sends the status as the whole answer (gRPC's trailers-only form).
    fn send_alone(&self, respond: &mut SendResponse<Bytes>) {
        let mut response = grpc_headers();
        response.headers_mut().extend(self.trailers());
        if let Err(e) = respond.send_response(response, true) {
            debug!("reverse path status not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc_frame::frame;
    use crate::grpc_frame::tests::read_messages;
    use crate::server::outbox;
    use h2::client::SendRequest;
    use hyper::header::TE;

    struct Served {
        addr: String,
        stop: watch::Sender<bool>,
        serving: tokio::task::JoinHandle<()>,
    }

    async fn serve(path: ReversePath) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(path.serve(listener, None, stopped));
        Served {
            addr,
            stop,
            serving,
        }
    }

    /// A server whose registry has one live connection, of key 1 and
    /// session 2; the connection's outbox (kept to stay attached) and inbox.
    async fn serve_one_session() -> (Served, outbox::Outbox, outbox::Inbox) {
        let registry = Arc::new(Registry::new(Arc::default(), 8));
        let (outbox, inbox) = outbox::channel(16);
        registry.attach(1, 2, 10, &outbox);
        let served = serve(ReversePath::new(registry, Arc::default(), 8)).await;
        (served, outbox, inbox)
    }

    async fn client(addr: &str) -> SendRequest<Bytes> {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(connection);
        client.ready().await.expect("ready")
    }

    fn call(path: &str, content_type: &'static str) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = format!("http://gateway{path}").parse().expect("uri");
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        request
    }

    fn send_data(
        auth_key_id: i64,
        session_id: i64,
        payload: &'static [u8],
    ) -> gpb::TlGatewaySendDataToGateway {
        gpb::TlGatewaySendDataToGateway {
            constructor: gpb::SEND_DATA_TO_GATEWAY,
            auth_key_id,
            session_id,
            payload: Bytes::from_static(payload),
        }
    }

    fn stream_request(
        id: &str,
        data: gpb::TlGatewaySendDataToGateway,
    ) -> gpb::GatewayStreamRequest {
        gpb::GatewayStreamRequest {
            request_id: id.into(),
            send_data: Some(data),
        }
    }

    fn status_of(headers: &HeaderMap) -> Option<(String, String)> {
        let text = |name| {
            headers
                .get(name)
                .map(|v: &HeaderValue| v.to_str().expect("ascii").to_string())
        };
        Some((
            text("grpc-status")?,
            text("grpc-message").unwrap_or_default(),
        ))
    }

    #[tokio::test]
    async fn a_stream_delivers_and_answers_each_request_and_ends_when_the_server_stops() {
        let (served, _outbox, mut inbox) = serve_one_session().await;
        let mut client = client(&served.addr).await;
        let (response, mut requests) = client
            .send_request(call(STREAM_PATH, "application/grpc"), false)
            .expect("call");
        let mut batch = BytesMut::new();
        put_frame(&mut batch, &stream_request("a", send_data(1, 2, b"one")));
        put_frame(&mut batch, &stream_request("b", send_data(1, 3, b"lost")));
        put_frame(&mut batch, &stream_request("c", send_data(1, 2, b"two")));
        requests.send_data(batch.freeze(), false).expect("send");
        let response = response.await.expect("headers");
        assert_eq!(response.status(), StatusCode::OK);
        let mut answers = response.into_body();
        let got = read_messages::<gpb::GatewayStreamResponse>(&mut answers, 3).await;
        let got: Vec<_> = got
            .iter()
            .map(|a| (a.request_id.as_str(), a.success))
            .collect();
        assert_eq!(got, [("a", true), ("b", false), ("c", true)]);
        assert_eq!(inbox.try_recv().expect("one").payload, &b"one"[..]);
        assert_eq!(inbox.try_recv().expect("two").payload, &b"two"[..]);

        // Stopping: the open stream ends with UNAVAILABLE at once, although
        // the peer has not ended its requests, and the server stops.
        served.stop.send(true).expect("stop");
        let trailers = tokio::time::timeout(Duration::from_secs(10), answers.trailers())
            .await
            .expect("the stream ends without its peer ending it")
            .expect("trailers")
            .expect("some");
        let status = status_of(&trailers).expect("a status");
        assert_eq!(status.0, "14", "{status:?}");
        tokio::time::timeout(Duration::from_secs(10), served.serving)
            .await
            .expect("the server stops while the peer still holds its stream")
            .expect("join");
        drop(requests);
    }

    #[tokio::test]
    async fn a_unary_call_answers_whether_it_was_delivered() {
        let (served, _outbox, mut inbox) = serve_one_session().await;
        let mut client = client(&served.addr).await;
        for (session, delivered) in [(2, true), (3, false)] {
            let (response, mut request) = client
                .send_request(call(UNARY_PATH, "application/grpc+proto"), false)
                .expect("call");
            request
                .send_data(frame(&send_data(1, session, b"m")), true)
                .expect("send");
            let mut body = response.await.expect("headers").into_body();
            let answer = read_messages::<pb::Bool>(&mut body, 1).await;
            assert_eq!(answer[0].value(), delivered, "session {session}");
            let trailers = body.trailers().await.expect("trailers").expect("some");
            assert_eq!(status_of(&trailers), Some(("0".into(), String::new())));
        }
        assert_eq!(inbox.try_recv().expect("delivered").payload, &b"m"[..]);
        assert!(inbox.try_recv().is_none());
    }

    #[tokio::test]
    async fn session_connections_past_the_limit_are_closed_and_counted() {
        let registry = Arc::new(Registry::new(Arc::default(), 8));
        let (outbox, mut inbox) = outbox::channel(16);
        registry.attach(1, 2, 10, &outbox);
        let metrics = Arc::new(Metrics::default());
        let served = serve(ReversePath::new(registry, metrics.clone(), 2)).await;
        let delivers = |client: &mut SendRequest<Bytes>| {
            let (response, mut request) = client
                .send_request(call(UNARY_PATH, "application/grpc"), false)
                .expect("call");
            request
                .send_data(frame(&send_data(1, 2, b"m")), true)
                .expect("send");
            async move {
                let mut body = response.await.expect("headers").into_body();
                read_messages::<pb::Bool>(&mut body, 1).await[0].value()
            }
        };
        // A connection the server kept (it sent its settings, or is still
        // waiting for ours), or None when it closed it.
        let accepted = || async {
            let tcp = tokio::net::TcpStream::connect(&served.addr)
                .await
                .expect("connect");
            let peeked =
                tokio::time::timeout(Duration::from_millis(300), tcp.peek(&mut [0; 16])).await;
            (!matches!(peeked, Ok(Ok(0) | Err(_)))).then_some(tcp)
        };
        let mut first = client(&served.addr).await;
        let mut second = client(&served.addr).await;
        assert!(delivers(&mut first).await && delivers(&mut second).await);

        assert!(accepted().await.is_none(), "the third is closed at once");
        let refused = || {
            metrics
                .reverse_path_refused
                .get_or_create(&ReasonLabels {
                    reason: "connections",
                })
                .get()
        };
        assert_eq!(refused(), 1);

        // A slot comes free when a session hangs up (once the server has
        // seen it go).
        drop(first);
        let mut freed = None;
        for _ in 0..100 {
            freed = accepted().await;
            if freed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (mut fourth, connection) = h2::client::handshake(freed.expect("a slot came free"))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        assert!(delivers(&mut fourth).await && delivers(&mut second).await);
        for _ in 0..4 {
            assert!(inbox.try_recv().is_some());
        }
    }

    /// Sends `body` as a whole call of `path` and returns the HTTP status
    /// and the gRPC status (from the headers or the trailers).
    async fn refusal(
        client: &mut SendRequest<Bytes>,
        path: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> (StatusCode, Option<(String, String)>) {
        let (response, mut request) = client
            .send_request(call(path, content_type), false)
            .expect("call");
        request.send_data(body, true).expect("send");
        let response = response.await.expect("headers");
        let status = response.status();
        if let Some(grpc) = status_of(response.headers()) {
            return (status, Some(grpc));
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.expect("trailers");
        (status, trailers.as_ref().and_then(status_of))
    }

    #[tokio::test]
    async fn bad_calls_get_their_status_and_the_connection_goes_on() {
        let registry = Arc::new(Registry::new(Arc::default(), 8));
        let metrics = Arc::new(Metrics::default());
        let served = serve(ReversePath {
            max_partial: 1000,
            ..ReversePath::new(registry, metrics.clone(), 8)
        })
        .await;
        let mut client = client(&served.addr).await;
        let code = |status: &(StatusCode, Option<(String, String)>)| {
            status.1.as_ref().map(|(code, _)| code.clone())
        };

        let unknown = refusal(
            &mut client,
            "/gateway.RPCGateway/other",
            "application/grpc",
            Bytes::new(),
        )
        .await;
        assert_eq!(unknown.0, StatusCode::OK);
        assert_eq!(code(&unknown).as_deref(), Some("12"));

        let not_grpc = refusal(&mut client, UNARY_PATH, "text/plain", Bytes::new()).await;
        assert_eq!(not_grpc, (StatusCode::UNSUPPORTED_MEDIA_TYPE, None));

        let compressed = Bytes::from_static(&[1, 0, 0, 0, 1, 0]);
        let status = refusal(&mut client, STREAM_PATH, "application/grpc", compressed).await;
        assert_eq!(code(&status).as_deref(), Some("12"));

        let empty = refusal(&mut client, UNARY_PATH, "application/grpc", Bytes::new()).await;
        assert_eq!(code(&empty).as_deref(), Some("13"));

        let mut cut = BytesMut::from(&frame(&send_data(1, 2, b"abc"))[..]);
        cut.truncate(cut.len() - 1);
        let status = refusal(&mut client, STREAM_PATH, "application/grpc", cut.freeze()).await;
        assert_eq!(code(&status).as_deref(), Some("13"));

        // Garbage; then a request_id that is not a string (field 1, two
        // bytes of invalid UTF-8).
        for undecodable in [
            &[0, 0, 0, 0, 2, 0xff, 0xff][..],
            &[0, 0, 0, 0, 4, 0x0a, 2, 0xc3, 0x28],
        ] {
            let body = Bytes::from_static(undecodable);
            let status = refusal(&mut client, STREAM_PATH, "application/grpc", body).await;
            assert_eq!(code(&status).as_deref(), Some("13"));
        }

        // A message larger than the connection may hold incomplete.
        let mut large = BytesMut::new();
        large.extend_from_slice(&[0, 0, 0, 8, 0]);
        large.extend_from_slice(&[0; 1200]);
        let status = refusal(&mut client, STREAM_PATH, "application/grpc", large.freeze()).await;
        assert_eq!(code(&status).as_deref(), Some("8"));

        // A unary request not yet ended keeps its bytes counted: a second
        // one does not fit beside it, and the first still completes.
        let payload: &'static [u8] = &[7; 600];
        let (held, mut first) = client
            .send_request(call(UNARY_PATH, "application/grpc"), false)
            .expect("call");
        first
            .send_data(frame(&send_data(1, 2, payload)), false)
            .expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = refusal(
            &mut client,
            UNARY_PATH,
            "application/grpc",
            frame(&send_data(1, 2, payload)),
        )
        .await;
        assert_eq!(code(&status).as_deref(), Some("8"));
        first.send_data(Bytes::new(), true).expect("end");
        let mut body = held.await.expect("headers").into_body();
        assert!(!read_messages::<pb::Bool>(&mut body, 1).await[0].value());

        let mut oversized = BytesMut::new();
        oversized.extend_from_slice(&[0, 0, 0x40, 0, 1]);
        let status = refusal(
            &mut client,
            UNARY_PATH,
            "application/grpc",
            oversized.freeze(),
        )
        .await;
        assert_eq!(code(&status).as_deref(), Some("8"));

        for (reason, count) in [
            ("unknown_method", 1),
            ("malformed", 5),
            ("incomplete_bytes", 2),
            ("message_size", 1),
        ] {
            let counted = metrics
                .reverse_path_refused
                .get_or_create(&ReasonLabels { reason })
                .get();
            assert_eq!(counted, count, "{reason}");
        }

        // The connection still serves calls after all of those.
        let ok = refusal(
            &mut client,
            UNARY_PATH,
            "application/grpc",
            frame(&send_data(1, 2, b"m")),
        )
        .await;
        assert_eq!(ok, (StatusCode::OK, Some(("0".into(), String::new()))));
    }
}
