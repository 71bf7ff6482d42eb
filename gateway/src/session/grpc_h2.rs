//! What the gateway's two session clients share, both gRPC on HTTP/2
//! driven directly (`unary_link`, `stream_link`): the connection, gRPC's
//! message framing, and how a `grpc-status` is read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::{Connection, SendRequest};
use hyper::header::{HeaderValue, CONTENT_TYPE, TE};
use hyper::http::uri::{self, Authority, PathAndQuery, Scheme};
use hyper::{HeaderMap, Method, Request, Uri};
use mtproto_session::tls::{connect_tls, keep_alive, TlsFiles};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tonic::Code;

use super::remote::{classify, Failure};
use crate::grpc_frame::{self, SendError, CONNECTION_WINDOW, STREAM_WINDOW};

/// The connection to a session, plain or TLS.
pub(super) type Io = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The failure of a session that cannot be reached.
pub(super) fn unavailable(addr: &str, e: &dyn std::fmt::Display) -> Failure {
    Failure::Transient(format!("Unavailable: session {addr}: {e}"))
}

/// The failure of a broken HTTP/2 connection or stream.
pub(super) fn broken(e: h2::Error) -> Failure {
    Failure::Transient(format!("Unavailable: {e}"))
}

/// Opening a link to `addr` within `deadline`: a session that does not
/// complete it in time is unavailable.
pub(super) async fn open_within<T>(
    addr: &str,
    deadline: Duration,
    opening: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(deadline, opening)
        .await
        .unwrap_or_else(|_| Err(unavailable(addr, &"connecting timed out")))
}

/// Connects to `addr` (with mutual TLS when `tls` is set) and makes the
/// HTTP/2 handshake. The caller drives the returned connection.
pub(super) async fn connect(
    addr: &str,
    tls: Option<&Arc<TlsFiles>>,
) -> Result<(SendRequest<Bytes>, Connection<Io, Bytes>), Failure> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| unavailable(addr, &e))?;
    tcp.set_nodelay(true).map_err(|e| unavailable(addr, &e))?;
    keep_alive(&tcp).map_err(|e| unavailable(addr, &e))?;
    let io: Io = match tls {
        Some(tls) => Either::Right(Box::new(
            connect_tls(tls, tcp)
                .await
                .map_err(|e| unavailable(addr, &e))?,
        )),
        None => Either::Left(tcp),
    };
    h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| unavailable(addr, &e))
}

/// Where a link's calls go, parsed once, so that a call's URI is put
/// together without formatting or parsing.
#[derive(Debug, Clone)]
pub(super) struct Target {
    scheme: Scheme,
    authority: Authority,
}

/// The session's address, for messages.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.authority.fmt(f)
    }
}

impl Target {
    pub(super) fn new(tls: bool, addr: &str) -> Result<Self, Failure> {
        let authority = Authority::try_from(addr)
            .map_err(|e| Failure::Fatal(format!("session address {addr}: {e}")))?;
        let scheme = if tls { Scheme::HTTPS } else { Scheme::HTTP };
        Ok(Self { scheme, authority })
    }

    /// The headers of a gRPC call to `path`.
    pub(super) fn request(&self, path: &'static str) -> Request<()> {
        let mut uri = uri::Parts::default();
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(PathAndQuery::from_static(path));
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_parts(uri).expect("scheme, authority and path are all set");
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        request
    }
}

/// Splits the next complete answer off `input`.
pub(super) fn next_message(input: &mut BytesMut) -> Result<Option<Bytes>, Failure> {
    grpc_frame::next_message(input).map_err(|e| Failure::Fatal(format!("session sent {e}")))
}

/// The failure of framed bytes that could not be sent.
pub(super) fn unsent(e: SendError) -> Failure {
    match e {
        SendError::Broken(e) => broken(e),
        SendError::Closed => Failure::Transient("session stream closed".into()),
    }
}

/// The `grpc-status` of a header or trailer block: `None` without one,
/// `Some(Ok(()))` for OK, else the failure it reports. Read here rather
/// than with tonic's `Status::from_header_map`, which keeps no number
/// outside 0–16 (teamgram's 401 and 700) and panics on a malformed
/// `grpc-status-details-bin`.
pub(super) fn grpc_status(headers: &HeaderMap) -> Option<Result<(), Failure>> {
    let value = headers.get("grpc-status")?;
    let Some(code) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return Some(Err(Failure::Fatal(format!(
            "session sent an unreadable grpc-status {value:?}"
        ))));
    };
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        // Percent-encoded, as gRPC over HTTP/2 sends it.
        .map(|m| {
            percent_encoding::percent_decode_str(m)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(Err(match i32::try_from(code) {
        Ok(c @ 0..=16) => classify(None, Code::from(c), &message),
        _ => classify(Some(code), Code::Unknown, &message),
    }))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::future::poll_fn;

    use h2::RecvStream;
    use tokio::net::TcpListener;

    /// A raw HTTP/2 server on loopback taking one call: `serve` gets the
    /// request body and the way to answer.
    pub(in crate::session) async fn server<F, Fut>(path: &'static str, serve: F) -> String
    where
        F: FnOnce(RecvStream, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        server_seeing_headers(path, |_, body, respond| serve(body, respond)).await
    }

    /// [`server`], with `serve` getting the request's headers too.
    pub(in crate::session) async fn server_seeing_headers<F, Fut>(
        path: &'static str,
        serve: F,
    ) -> String
    where
        F: FnOnce(HeaderMap, RecvStream, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(tcp).await.expect("handshake");
            let (request, respond) = connection.accept().await.expect("a call").expect("ok");
            assert_eq!(request.uri().path(), path);
            tokio::spawn(async move { poll_fn(|cx| connection.poll_closed(cx)).await });
            let (parts, body) = request.into_parts();
            serve(parts.headers, body, respond).await;
        });
        addr
    }

    #[test]
    fn grpc_status_maps_to_teamgram_meanings() {
        let status = |code: &'static str, message: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", HeaderValue::from_static(code));
            headers.insert("grpc-message", HeaderValue::from_static(message));
            grpc_status(&headers)
        };
        assert_eq!(grpc_status(&HeaderMap::new()), None);
        assert_eq!(status("0", ""), Some(Ok(())));
        assert_eq!(
            status("401", "AUTH_KEY_UNREGISTERED"),
            Some(Err(Failure::Unregistered))
        );
        assert_eq!(
            status("700", "REDIRECT_TO_10.0.0.7%3A20450"),
            Some(Err(Failure::Redirect("10.0.0.7:20450".into())))
        );
        assert!(matches!(
            status("14", "gone"),
            Some(Err(Failure::Transient(_)))
        ));
        assert!(matches!(status("3", "bad"), Some(Err(Failure::Fatal(_)))));
        assert!(matches!(status("500", "oops"), Some(Err(Failure::Fatal(m))) if m.contains("500")));
        assert!(matches!(status("x", ""), Some(Err(Failure::Fatal(_)))));
    }
}
