//! WebSocket listeners: the upgrade (path, Origin and subprotocol checks) and
//! an adapter that turns binary messages into the same byte stream a TCP
//! connection carries, so the connection task is shared. Message boundaries
//! mean nothing: a frame may span messages and a message may hold many frames.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// What a WebSocket listener accepts.
#[derive(Debug, Clone)]
pub struct WsOptions {
    pub path: String,
    /// Allowed `Origin` values; empty allows any, and requests without one.
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message (and frame) accepted.
    pub max_message_bytes: usize,
}

/// Why an upgrade was refused, checked before any WebSocket state exists.
fn check_request(options: &WsOptions, request: &Request) -> Result<(), (StatusCode, &'static str)> {
    if request.uri().path() != options.path {
        return Err((StatusCode::NOT_FOUND, "unknown path"));
    }
    if !options.allowed_origins.is_empty() {
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| options.allowed_origins.iter().any(|a| a == o)) {
            return Err((StatusCode::FORBIDDEN, "origin not allowed"));
        }
    }
    Ok(())
}

/// Whether the client offered the `binary` subprotocol (browsers then require it echoed).
fn offers_binary(request: &Request) -> bool {
    request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "binary")
}

/// Runs the server side of the upgrade.
pub async fn accept<S>(stream: S, options: &WsOptions) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    #[allow(clippy::result_large_err)] // the signature tungstenite's Callback requires
    let callback = |request: &Request, mut response: Response| {
        if let Err((status, why)) = check_request(options, request) {
            let mut refusal = ErrorResponse::new(Some(why.to_string()));
            *refusal.status_mut() = status;
            return Err(refusal);
        }
        if offers_binary(request) {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                header::HeaderValue::from_static("binary"),
            );
        }
        Ok(response)
    };
    // Small buffers: most connections are idle; big messages still fit, up to the cap.
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(options.max_message_bytes.saturating_mul(2))
        .max_message_size(Some(options.max_message_bytes))
        .max_frame_size(Some(options.max_message_bytes));
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
        refusal: None,
    })
}

/// A WebSocket as a byte stream: binary messages in, one binary message per write out.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// A close frame to send on shutdown, after refusing the client's input.
    refusal: Option<CloseFrame>,
}

fn io_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            let message = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                // End of stream, or the client's close (tungstenite queues the reply).
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    let refusal = match &e {
                        WsError::Capacity(_) => Some((CloseCode::Size, "message too big")),
                        WsError::Utf8(_) => Some((CloseCode::Invalid, "text is not UTF-8")),
                        WsError::Protocol(_) => Some((CloseCode::Protocol, "protocol error")),
                        _ => None,
                    };
                    self.refusal = refusal.map(|(code, reason)| CloseFrame {
                        code,
                        reason: reason.into(),
                    });
                    return Poll::Ready(Err(io_error(e)));
                }
            };
            match message {
                Message::Binary(data) => self.pending = data,
                Message::Text(_) => {
                    self.refusal = Some(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "binary messages only".into(),
                    });
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text message",
                    )));
                }
                // Pings are answered by tungstenite itself.
                _ => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(io_error)?;
        let message = Message::Binary(BytesMut::from(data).freeze());
        Pin::new(&mut self.inner)
            .start_send(message)
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(io_error)?;
            let frame = self.refusal.take();
            Pin::new(&mut self.inner)
                .start_send(Message::Close(frame))
                .map_err(io_error)?;
        }
        Pin::new(&mut self.inner).poll_close(cx).map_err(io_error)
    }
}

/// Bytes already read (after a PROXY header) served before the stream's own.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    fn options() -> WsOptions {
        WsOptions {
            path: "/apiws".into(),
            allowed_origins: vec!["https://web.example".into()],
            max_message_bytes: 1024,
        }
    }

    fn request(path: &str, origin: Option<&str>) -> Request {
        let mut r = format!("ws://localhost{path}")
            .into_client_request()
            .unwrap();
        if let Some(origin) = origin {
            r.headers_mut()
                .insert(header::ORIGIN, origin.parse().unwrap());
        }
        r.map(|_| ())
    }

    #[test]
    fn path_and_origin_are_checked() {
        let o = options();
        assert!(check_request(&o, &request("/apiws", Some("https://web.example"))).is_ok());
        assert_eq!(
            check_request(&o, &request("/other", Some("https://web.example")))
                .unwrap_err()
                .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            check_request(&o, &request("/apiws", Some("https://evil.example")))
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            check_request(&o, &request("/apiws", None)).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let any = WsOptions {
            allowed_origins: Vec::new(),
            ..options()
        };
        assert!(check_request(&any, &request("/apiws", None)).is_ok());
    }

    async fn pair() -> (
        WsStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (server, client) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { accept(server, &options()).await.unwrap() });
        let mut req = "ws://localhost/apiws".into_client_request().unwrap();
        req.headers_mut()
            .insert(header::ORIGIN, "https://web.example".parse().unwrap());
        req.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, "binary".parse().unwrap());
        let (client, response) = tokio_tungstenite::client_async(req, client).await.unwrap();
        assert_eq!(
            response
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .unwrap(),
            "binary"
        );
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn messages_form_one_byte_stream_both_ways() {
        let (mut server, mut client) = pair().await;
        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        for part in [&b"ab"[..], b"", b"cdefg"] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdefg");
        server.write_all(b"xyz").await.unwrap();
        server.flush().await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match client.next().await.unwrap().unwrap() {
                Message::Pong(p) => seen.push(p.to_vec()),
                Message::Binary(b) => seen.push(b.to_vec()),
                other => panic!("{other:?}"),
            }
        }
        assert!(seen.contains(&b"p".to_vec()) && seen.contains(&b"xyz".to_vec()));
        // The client's close ends the stream; the server answers it.
        let (closed, read) = tokio::join!(client.close(None), server.read(&mut got));
        closed.unwrap();
        assert_eq!(read.unwrap(), 0);
    }

    #[tokio::test]
    async fn text_and_oversized_messages_are_refused_with_a_close_code() {
        for (message, code) in [
            (Message::Text("hi".into()), CloseCode::Unsupported),
            (
                Message::Binary(Bytes::from(vec![0u8; 2000])),
                CloseCode::Size,
            ),
        ] {
            let (mut server, mut client) = pair().await;
            client.send(message).await.unwrap();
            let mut got = [0u8; 4];
            assert!(server.read(&mut got).await.is_err());
            let (_, received) = tokio::join!(server.shutdown(), client.next());
            match received {
                Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, code),
                other => panic!("{other:?}"),
            }
        }
    }
}
