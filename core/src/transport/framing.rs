//! Length framing of the four MTProto TCP transports. Pure functions over
//! byte buffers; the caller owns the socket.

use bytes::{Buf, BufMut, BytesMut};
use rand::RngCore;

use super::{FramingKind, InboundFrame, TransportError};

/// Per-connection framing state (only the full transport keeps counters).
#[derive(Debug)]
pub enum Framing {
    Abridged,
    Intermediate,
    PaddedIntermediate,
    Full { recv_seq: u32, send_seq: u32 },
}

impl Framing {
    pub fn new(kind: FramingKind) -> Self {
        match kind {
            FramingKind::Abridged => Framing::Abridged,
            FramingKind::Intermediate => Framing::Intermediate,
            FramingKind::PaddedIntermediate => Framing::PaddedIntermediate,
            FramingKind::Full => Framing::Full {
                recv_seq: 0,
                send_seq: 0,
            },
        }
    }

    pub fn kind(&self) -> FramingKind {
        match self {
            Framing::Abridged => FramingKind::Abridged,
            Framing::Intermediate => FramingKind::Intermediate,
            Framing::PaddedIntermediate => FramingKind::PaddedIntermediate,
            Framing::Full { .. } => FramingKind::Full,
        }
    }

    /// Takes one complete frame off the front of `buf`, or returns `None`
    /// when more bytes are needed. Lengths are checked before any slicing.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_frame: usize,
    ) -> Result<Option<InboundFrame>, TransportError> {
        match self {
            Framing::Abridged => {
                let Some(&first) = buf.first() else {
                    return Ok(None);
                };
                let quick_ack = first & 0x80 != 0;
                let (words, header) = if first & 0x7f == 0x7f {
                    if buf.len() < 4 {
                        return Ok(None);
                    }
                    let words =
                        usize::from(buf[1]) | usize::from(buf[2]) << 8 | usize::from(buf[3]) << 16;
                    (words, 4)
                } else {
                    (usize::from(first & 0x7f), 1)
                };
                let len = words * 4;
                check_len(len, max_frame)?;
                if buf.len() < header + len {
                    return Ok(None);
                }
                buf.advance(header);
                Ok(Some(InboundFrame {
                    payload: buf.split_to(len),
                    quick_ack,
                    padded: false,
                }))
            }
            Framing::Intermediate | Framing::PaddedIntermediate => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let raw = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let quick_ack = raw & 0x8000_0000 != 0;
                let len = (raw & 0x7fff_ffff) as usize;
                check_len(len, max_frame)?;
                if buf.len() < 4 + len {
                    return Ok(None);
                }
                buf.advance(4);
                Ok(Some(InboundFrame {
                    payload: buf.split_to(len),
                    quick_ack,
                    padded: matches!(self, Framing::PaddedIntermediate),
                }))
            }
            Framing::Full { recv_seq, .. } => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let total = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if total < 12 {
                    return Err(TransportError::FrameTooShort(total));
                }
                check_len(total - 12, max_frame)?;
                if buf.len() < total {
                    return Ok(None);
                }
                let seq = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let crc_at = total - 4;
                let expected_crc = u32::from_le_bytes([
                    buf[crc_at],
                    buf[crc_at + 1],
                    buf[crc_at + 2],
                    buf[crc_at + 3],
                ]);
                if crc32fast::hash(&buf[..crc_at]) != expected_crc {
                    return Err(TransportError::BadCrc);
                }
                if seq != *recv_seq {
                    return Err(TransportError::BadSeq {
                        expected: *recv_seq,
                        got: seq,
                    });
                }
                *recv_seq = recv_seq.wrapping_add(1);
                buf.advance(8);
                let payload = buf.split_to(total - 12);
                buf.advance(4);
                Ok(Some(InboundFrame {
                    payload,
                    quick_ack: false,
                    padded: false,
                }))
            }
        }
    }

    /// Appends one framed payload to `out`. Payloads are whole MTProto
    /// messages or 4-byte codes, so their length is a multiple of 4.
    pub fn encode<R: RngCore>(&mut self, payload: &[u8], out: &mut BytesMut, rng: &mut R) {
        self.encode_with(payload.len(), out, rng, |out, _| out.put_slice(payload));
    }

    /// Appends one frame whose payload, `len` bytes, `put_payload` appends
    /// between the header and any trailer: a payload made in place (an
    /// encrypted message) needs no buffer of its own and no copy.
    pub fn encode_with<R: RngCore>(
        &mut self,
        len: usize,
        out: &mut BytesMut,
        rng: &mut R,
        put_payload: impl FnOnce(&mut BytesMut, &mut R),
    ) {
        let put_payload = |out: &mut BytesMut, rng: &mut R| {
            let at = out.len();
            put_payload(out, rng);
            debug_assert_eq!(out.len() - at, len, "the payload's announced length");
        };
        match self {
            Framing::Abridged => {
                let words = len / 4;
                if words < 0x7f {
                    out.put_u8(words as u8);
                } else {
                    out.put_u32_le(((words as u32) << 8) | 0x7f);
                }
                put_payload(out, rng);
            }
            Framing::Intermediate => {
                out.put_u32_le(len as u32);
                put_payload(out, rng);
            }
            Framing::PaddedIntermediate => {
                // 0..=3 padding bytes: valid for every client, and Telethon
                // 1.45 misreads frames carrying 4 or more.
                let mut pad = [0u8; 4];
                rng.fill_bytes(&mut pad);
                let pad_len = usize::from(pad[3] & 3);
                out.put_u32_le((len + pad_len) as u32);
                put_payload(out, rng);
                out.put_slice(&pad[..pad_len]);
            }
            Framing::Full { send_seq, .. } => {
                let start = out.len();
                out.put_u32_le((len + 12) as u32);
                out.put_u32_le(*send_seq);
                put_payload(out, rng);
                let crc = crc32fast::hash(&out[start..]);
                out.put_u32_le(crc);
                *send_seq = send_seq.wrapping_add(1);
            }
        }
    }

    /// Appends a quick-ack token. Returns false for the full transport,
    /// which has no way to carry one.
    pub fn encode_quick_ack(&self, token: u32, out: &mut BytesMut) -> bool {
        match self {
            // Abridged sends the token big-endian so its first byte has the high bit set,
            // which is how clients tell it from a length byte.
            Framing::Abridged => out.put_u32(token),
            Framing::Intermediate | Framing::PaddedIntermediate => out.put_u32_le(token),
            Framing::Full { .. } => return false,
        }
        true
    }
}

fn check_len(len: usize, max_frame: usize) -> Result<(), TransportError> {
    if len == 0 {
        Err(TransportError::EmptyFrame)
    } else if len > max_frame {
        Err(TransportError::FrameTooLarge {
            len,
            max: max_frame,
        })
    } else {
        Ok(())
    }
}
