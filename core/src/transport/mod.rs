//! MTProto transports, sans-IO: first-bytes detection, the four framings
//! (abridged, intermediate, padded intermediate, full), obfuscated2 around the
//! first three, QuickAck replies and transport error codes.
//!
//! The caller appends bytes read from the socket to a `BytesMut` and calls
//! [`Transport::decode`]; it writes whatever the `encode_*` methods append to
//! an output buffer. Nothing here touches a socket or a clock.

mod framing;
pub mod obfuscated2;

use bytes::{Buf, BufMut, BytesMut};
use rand::RngCore;
use thiserror::Error;

pub use framing::Framing;
use obfuscated2::Obfuscation;

/// Transport error codes, sent as a bare negative int32 frame.
pub mod error_code {
    /// The auth key is unknown (the client should create a new one).
    pub const AUTH_KEY_NOT_FOUND: i32 = -404;
    /// Too many connections or handshakes from this address.
    pub const FLOOD: i32 = -429;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingKind {
    Abridged,
    Intermediate,
    PaddedIntermediate,
    Full,
}

impl FramingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FramingKind::Abridged => "abridged",
            FramingKind::Intermediate => "intermediate",
            FramingKind::PaddedIntermediate => "padded_intermediate",
            FramingKind::Full => "full",
        }
    }
}

/// One frame's payload, as it came off the wire.
#[derive(Debug)]
pub struct InboundFrame {
    pub payload: BytesMut,
    /// The client asked for a QuickAck of this frame.
    pub quick_ack: bool,
    /// The payload may end with 0–15 bytes of transport padding.
    pub padded: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("zero-length frame")]
    EmptyFrame,
    #[error("full-transport packet length {0} is below the 12-byte minimum")]
    FrameTooShort(usize),
    #[error("full-transport CRC32 mismatch")]
    BadCrc,
    #[error("full-transport sequence number {got}, expected {expected}")]
    BadSeq { expected: u32, got: u32 },
    #[error("HTTP request on an MTProto TCP port")]
    HttpOnTcpPort,
    #[error("unsupported transport (MTProxy fake-TLS or similar)")]
    Unsupported,
    #[error("obfuscated2 init carries unknown protocol tag {0:#010x}")]
    BadObfuscatedTag(u32),
}

impl TransportError {
    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TransportError::FrameTooLarge { .. } => "frame_too_large",
            TransportError::EmptyFrame => "empty_frame",
            TransportError::FrameTooShort(_) => "frame_too_short",
            TransportError::BadCrc => "bad_crc",
            TransportError::BadSeq { .. } => "bad_seq",
            TransportError::HttpOnTcpPort => "http_on_tcp_port",
            TransportError::Unsupported => "unsupported_transport",
            TransportError::BadObfuscatedTag(_) => "bad_obfuscated_tag",
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
enum Detected {
    NeedMore,
    Plain { kind: FramingKind, consume: usize },
    Obfuscated,
}

fn detect(buf: &[u8]) -> Result<Detected, TransportError> {
    let Some(&first) = buf.first() else {
        return Ok(Detected::NeedMore);
    };
    if first == 0xef {
        return Ok(Detected::Plain {
            kind: FramingKind::Abridged,
            consume: 1,
        });
    }
    if buf.len() < 4 {
        return Ok(Detected::NeedMore);
    }
    match u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) {
        0xeeee_eeee => {
            return Ok(Detected::Plain {
                kind: FramingKind::Intermediate,
                consume: 4,
            })
        }
        0xdddd_dddd => {
            return Ok(Detected::Plain {
                kind: FramingKind::PaddedIntermediate,
                consume: 4,
            })
        }
        // "HEAD", "POST", "GET ", "OPTI"
        0x4441_4548 | 0x5453_4f50 | 0x2054_4547 | 0x4954_504f => {
            return Err(TransportError::HttpOnTcpPort)
        }
        // "PVrG" (HTTP/2 preface) and a TLS ClientHello record header.
        0x4772_5650 | 0x0201_0316 => return Err(TransportError::Unsupported),
        _ => {}
    }
    if buf.len() < 8 {
        return Ok(Detected::NeedMore);
    }
    // The first full-transport packet has seq_no 0; obfuscated inits never
    // have zero bytes 4..8 (clients re-roll them).
    if buf[4..8] == [0, 0, 0, 0] {
        return Ok(Detected::Plain {
            kind: FramingKind::Full,
            consume: 0,
        });
    }
    if buf.len() < obfuscated2::INIT_LEN {
        return Ok(Detected::NeedMore);
    }
    Ok(Detected::Obfuscated)
}

#[derive(Debug)]
enum State {
    Detecting,
    Established {
        framing: Framing,
        /// Boxed: only obfuscated connections pay for the two cipher states.
        obfuscation: Option<Box<Obfuscation>>,
    },
}

/// The transport state of one connection.
#[derive(Debug)]
pub struct Transport {
    state: State,
    max_frame: usize,
    /// Bytes at the front of the input buffer that are already deobfuscated.
    deobfuscated: usize,
    dc_id: Option<i16>,
}

impl Transport {
    pub fn new(max_frame: usize) -> Self {
        Self {
            state: State::Detecting,
            max_frame,
            deobfuscated: 0,
            dc_id: None,
        }
    }

    /// The framing once detected.
    pub fn framing(&self) -> Option<FramingKind> {
        match &self.state {
            State::Detecting => None,
            State::Established { framing, .. } => Some(framing.kind()),
        }
    }

    /// The transport's name for metrics and logs, once detected
    /// (`abridged`, `obfuscated_padded_intermediate`, …).
    pub fn name(&self) -> Option<&'static str> {
        let kind = self.framing()?;
        Some(match (self.is_obfuscated(), kind) {
            (false, kind) => kind.as_str(),
            (true, FramingKind::Abridged) => "obfuscated_abridged",
            (true, FramingKind::Intermediate) => "obfuscated_intermediate",
            (true, FramingKind::PaddedIntermediate) => "obfuscated_padded_intermediate",
            (true, FramingKind::Full) => "obfuscated_full",
        })
    }

    pub fn is_obfuscated(&self) -> bool {
        matches!(
            self.state,
            State::Established {
                obfuscation: Some(_),
                ..
            }
        )
    }

    /// DC id from an obfuscated2 init.
    pub fn dc_id(&self) -> Option<i16> {
        self.dc_id
    }

    /// Takes the next complete frame off `buf`. `Ok(None)` means "read more".
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<InboundFrame>, TransportError> {
        if let State::Detecting = self.state {
            match detect(buf)? {
                Detected::NeedMore => return Ok(None),
                Detected::Plain { kind, consume } => {
                    buf.advance(consume);
                    self.state = State::Established {
                        framing: Framing::new(kind),
                        obfuscation: None,
                    };
                }
                Detected::Obfuscated => {
                    let mut init = [0u8; obfuscated2::INIT_LEN];
                    init.copy_from_slice(&buf[..obfuscated2::INIT_LEN]);
                    let accepted = obfuscated2::accept_init(&init)?;
                    buf.advance(obfuscated2::INIT_LEN);
                    self.dc_id = Some(accepted.dc_id);
                    self.deobfuscated = 0;
                    self.state = State::Established {
                        framing: Framing::new(accepted.framing),
                        obfuscation: Some(Box::new(accepted.obfuscation)),
                    };
                }
            }
        }
        let State::Established {
            framing,
            obfuscation,
        } = &mut self.state
        else {
            return Ok(None);
        };
        if let Some(obfuscation) = obfuscation {
            obfuscation.decrypt_inbound(&mut buf[self.deobfuscated..]);
            self.deobfuscated = buf.len();
        }
        let before = buf.len();
        let frame = framing.decode(buf, self.max_frame)?;
        if obfuscation.is_some() {
            self.deobfuscated -= before - buf.len();
        }
        Ok(frame)
    }

    /// Appends a framed (and, when obfuscated, encrypted) payload to `out`.
    pub fn encode_frame<R: RngCore>(&mut self, payload: &[u8], out: &mut BytesMut, rng: &mut R) {
        self.encode_frame_with(payload.len(), out, rng, |out, _| out.put_slice(payload));
    }

    /// Appends a frame whose payload, `len` bytes, `put_payload` appends in
    /// place (see [`Framing::encode_with`]); framed, then obfuscated.
    pub fn encode_frame_with<R: RngCore>(
        &mut self,
        len: usize,
        out: &mut BytesMut,
        rng: &mut R,
        put_payload: impl FnOnce(&mut BytesMut, &mut R),
    ) {
        let State::Established {
            framing,
            obfuscation,
        } = &mut self.state
        else {
            return;
        };
        let start = out.len();
        framing.encode_with(len, out, rng, put_payload);
        if let Some(obfuscation) = obfuscation {
            obfuscation.encrypt_outbound(&mut out[start..]);
        }
    }

    /// Appends a transport error code (e.g. −404) framed for this transport.
    pub fn encode_error(&mut self, code: i32, out: &mut BytesMut, rng: &mut impl RngCore) {
        self.encode_frame(&code.to_le_bytes(), out, rng);
    }

    /// Appends a QuickAck token; returns false when the transport cannot carry one.
    pub fn encode_quick_ack(&mut self, token: u32, out: &mut BytesMut) -> bool {
        let State::Established {
            framing,
            obfuscation,
        } = &mut self.state
        else {
            return false;
        };
        let start = out.len();
        if !framing.encode_quick_ack(token, out) {
            return false;
        }
        if let Some(obfuscation) = obfuscation {
            obfuscation.encrypt_outbound(&mut out[start..]);
        }
        true
    }
}

#[cfg(test)]
mod tests;
