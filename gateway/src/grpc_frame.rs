//! gRPC on HTTP/2 streams as both ends of the gateway speak it, driven on
//! `h2` directly: the session clients (`session::unary_link`,
//! `session::stream_link`) and the reverse-path server (`server::reverse`).
//! Message framing, the windows, and sending as far as the peer's window
//! allows.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::SendStream;
use prost::Message;

/// gRPC's message prefix: a compression flag and a 4-byte length.
pub(crate) const PREFIX: usize = 5;
/// The largest message taken (tonic's default limit).
pub(crate) const MAX_MESSAGE: usize = 4 << 20;

/// HTTP/2 receive windows, hyper's defaults (which tonic used). The
/// connection window also sets h2's budget for small DATA frames received
/// and not yet read (half of it): each unary answer is one such frame until
/// its caller's task reads it, so with h2's 64 KiB default a burst of a few
/// hundred answers made h2 close the connection (`ENHANCE_YOUR_CALM`).
pub(crate) const STREAM_WINDOW: u32 = 2 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 5 << 20;

/// A message prefix the gateway does not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("a compressed message, which was not offered")]
    Compressed,
    #[error("a {0}-byte message (at most {MAX_MESSAGE})")]
    TooLarge(usize),
}

/// One message, framed (uncompressed).
pub(crate) fn frame(message: &impl Message) -> Bytes {
    let mut out = BytesMut::new();
    put_frame(&mut out, message);
    out.freeze()
}

/// Appends one message, framed (uncompressed).
pub(crate) fn put_frame(out: &mut BytesMut, message: &impl Message) {
    let len = message.encoded_len();
    out.reserve(PREFIX + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    message
        .encode(out)
        .expect("the buffer was reserved for the message");
}

/// Splits the next complete message off `input`.
pub(crate) fn next_message(input: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    if input.len() < PREFIX {
        return Ok(None);
    }
    if input[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([input[1], input[2], input[3], input[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    if input.len() < PREFIX + len {
        // Not reserved ahead: a declared length costs memory only as the
        // bytes arrive (within the HTTP/2 windows).
        return Ok(None);
    }
    input.advance(PREFIX);
    Ok(Some(input.split_to(len).freeze()))
}

/// Why framed bytes could not be handed to HTTP/2.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The stream or connection failed.
    Broken(h2::Error),
    /// The stream is over: the peer will take nothing more.
    Closed,
}

/// Hands as much of `out` to HTTP/2 as the peer's window allows; true when
/// some was sent, false when nothing was waiting or the window is shut
/// (the task is woken when it opens).
pub(crate) fn send_within_window(
    send: &mut SendStream<Bytes>,
    out: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Result<bool, SendError> {
    if out.is_empty() {
        return Ok(false);
    }
    send.reserve_capacity(out.len());
    let mut room = send.capacity();
    if room == 0 {
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(n))) => room = n,
            Poll::Ready(Some(Err(e))) => return Err(SendError::Broken(e)),
            Poll::Ready(None) => return Err(SendError::Closed),
            Poll::Pending => return Ok(false),
        }
    }
    let chunk = out.split_to(room.min(out.len())).freeze();
    send.send_data(chunk, false).map_err(SendError::Broken)?;
    Ok(true)
}

/// Has the task polled again once its worker has run the other tasks that
/// are ready. A link's task does this before writing what it was handed:
/// those tasks often hand it more, which then leaves in the same write
/// (a write's fixed cost in the kernel is large next to a small message).
pub(crate) fn poll_after_ready_tasks(cx: &mut Context<'_>) {
    let mut yielding = std::pin::pin!(tokio::task::yield_now());
    // The first poll registers the wake-up and is always pending.
    let _ = yielding.as_mut().poll(cx);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use h2::RecvStream;
    use mtproto_edge_proto::mtproto as pb;

    /// The next `n` messages of an HTTP/2 body, for tests of either end.
    pub(crate) async fn read_messages<M: Message + Default>(
        body: &mut RecvStream,
        n: usize,
    ) -> Vec<M> {
        let (mut input, mut messages) = (BytesMut::new(), Vec::new());
        while messages.len() < n {
            let chunk = body.data().await.expect("more").expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            input.extend_from_slice(&chunk);
            while let Some(message) = next_message(&mut input).expect("valid") {
                messages.push(M::decode(message).expect("decodes"));
            }
        }
        messages
    }

    #[test]
    fn messages_are_split_off_only_when_complete() {
        let framed = frame(&pb::Bool::from_bool(true));
        let mut input = BytesMut::new();
        for (i, byte) in framed.iter().enumerate() {
            input.put_u8(*byte);
            let got = next_message(&mut input).unwrap();
            assert_eq!(
                got.is_some(),
                i == framed.len() - 1,
                "after {} bytes",
                i + 1
            );
            if let Some(message) = got {
                assert!(pb::Bool::decode(message).unwrap().value());
            }
        }
        assert!(input.is_empty());
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused() {
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert_eq!(next_message(&mut compressed), Err(FrameError::Compressed));
        let mut oversized = BytesMut::new();
        oversized.put_u8(0);
        oversized.put_u32(MAX_MESSAGE as u32 + 1);
        assert_eq!(
            next_message(&mut oversized),
            Err(FrameError::TooLarge(MAX_MESSAGE + 1))
        );
        let mut largest = BytesMut::new();
        largest.put_u8(0);
        largest.put_u32(MAX_MESSAGE as u32);
        assert_eq!(next_message(&mut largest), Ok(None));
    }
}
