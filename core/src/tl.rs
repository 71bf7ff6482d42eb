//! The small subset of the TL binary encoding the gateway needs: little-endian
//! integers, `int128`/`int256`, `bytes`/`string` with 4-byte alignment, and
//! bare vectors. Reading never panics: every read is bounds-checked.

use thiserror::Error;

/// Constructor ids of the TL objects the gateway and the reference session use.
pub mod id {
    pub const REQ_PQ: u32 = 0x6046_9778;
    pub const REQ_PQ_MULTI: u32 = 0xbe7e_8ef1;
    pub const RES_PQ: u32 = 0x0516_2463;
    pub const REQ_DH_PARAMS: u32 = 0xd712_e4be;
    pub const P_Q_INNER_DATA: u32 = 0x83c9_5aec;
    pub const P_Q_INNER_DATA_DC: u32 = 0xa9f5_5f95;
    pub const P_Q_INNER_DATA_TEMP: u32 = 0x3c6a_84d4;
    pub const P_Q_INNER_DATA_TEMP_DC: u32 = 0x56fd_df88;
    pub const SERVER_DH_PARAMS_FAIL: u32 = 0x79cb_045d;
    pub const SERVER_DH_PARAMS_OK: u32 = 0xd0e8_075c;
    pub const SERVER_DH_INNER_DATA: u32 = 0xb589_0dba;
    pub const SET_CLIENT_DH_PARAMS: u32 = 0xf504_5f1f;
    pub const CLIENT_DH_INNER_DATA: u32 = 0x6643_b654;
    pub const DH_GEN_OK: u32 = 0x3bcb_f734;
    pub const DH_GEN_RETRY: u32 = 0x46dc_1fb9;
    pub const DH_GEN_FAIL: u32 = 0xa69d_ae02;

    pub const VECTOR: u32 = 0x1cb5_c415;
    pub const MSG_CONTAINER: u32 = 0x73f1_f8dc;
    pub const GZIP_PACKED: u32 = 0x3072_cfa1;
    pub const RPC_RESULT: u32 = 0xf35c_6d01;
    pub const RPC_ERROR: u32 = 0x2144_ca19;
    pub const PING: u32 = 0x7abe_77ec;
    pub const PING_DELAY_DISCONNECT: u32 = 0xf342_7b8c;
    pub const PONG: u32 = 0x3477_73c5;
    pub const MSGS_ACK: u32 = 0x62d6_b459;
    pub const NEW_SESSION_CREATED: u32 = 0x9ec2_0908;
    pub const BAD_SERVER_SALT: u32 = 0xedab_447b;
    pub const BAD_MSG_NOTIFICATION: u32 = 0xa7ef_f811;
    pub const GET_FUTURE_SALTS: u32 = 0xb921_bd04;
    pub const FUTURE_SALTS: u32 = 0xae50_0895;
    pub const DESTROY_SESSION: u32 = 0xe751_2126;
    pub const DESTROY_SESSION_OK: u32 = 0xe220_45fc;
    pub const DESTROY_SESSION_NONE: u32 = 0x62d3_50c9;
    pub const HTTP_WAIT: u32 = 0x9299_359f;
    pub const MSGS_STATE_REQ: u32 = 0xda69_fb52;
    pub const MSGS_STATE_INFO: u32 = 0x04de_b57d;
    pub const MSGS_ALL_INFO: u32 = 0x8cc0_d131;
    pub const MSG_RESEND_REQ: u32 = 0x7d86_1a08;
    pub const MSG_RESEND_ANS_REQ: u32 = 0x8610_baeb;
    pub const RPC_DROP_ANSWER: u32 = 0x58e4_a740;
    pub const RPC_ANSWER_UNKNOWN: u32 = 0x5e2a_d36e;
    pub const INVOKE_WITH_LAYER: u32 = 0xda9b_0d0d;
    pub const INVOKE_WITHOUT_UPDATES: u32 = 0xbf9459b7;
    pub const INIT_CONNECTION: u32 = 0xc1cd_5ea9;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TlError {
    #[error("TL data ended early: needed {needed} more bytes at offset {offset}")]
    UnexpectedEnd { offset: usize, needed: usize },
    #[error("unexpected TL constructor {got:#010x}, expected {expected}")]
    UnexpectedConstructor { got: u32, expected: &'static str },
    #[error("TL vector of {0} elements is longer than allowed")]
    VectorTooLong(u32),
}

/// Unix time as a TL `int` date (server_time, future salts, teamgram's
/// stored salts): its low 32 bits. From 2038-01-19 the value no longer fits a
/// signed `int`; it wraps to a negative one whose bits are the unsigned time,
/// which is how [`unix_from_date`] (and clients that read dates as unsigned,
/// e.g. tdlib) take it back, valid until 2106. Arithmetic stays in `i64`.
pub fn date(unix: i64) -> i32 {
    unix as u32 as i32
}

/// The unix time a TL `int` date stands for (see [`date`]).
pub fn unix_from_date(date: i32) -> i64 {
    i64::from(date as u32)
}

/// A bounds-checked cursor over TL-encoded bytes.
#[derive(Debug, Clone)]
pub struct TlReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> TlReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], TlError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(TlError::UnexpectedEnd {
                offset: self.pos,
                needed: n - available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], TlError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u32(&mut self) -> Result<u32, TlError> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn i32(&mut self) -> Result<i32, TlError> {
        self.array().map(i32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, TlError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, TlError> {
        self.array().map(i64::from_le_bytes)
    }

    pub fn int128(&mut self) -> Result<[u8; 16], TlError> {
        self.array()
    }

    pub fn int256(&mut self) -> Result<[u8; 32], TlError> {
        self.array()
    }

    /// Reads a constructor id and checks it.
    pub fn expect(&mut self, constructor: u32, name: &'static str) -> Result<(), TlError> {
        let got = self.u32()?;
        if got == constructor {
            Ok(())
        } else {
            Err(TlError::UnexpectedConstructor {
                got,
                expected: name,
            })
        }
    }

    /// Reads a TL `bytes`/`string`, consuming its alignment padding.
    pub fn bytes(&mut self) -> Result<&'a [u8], TlError> {
        let first = self.take(1)?[0];
        let (len, header) = if first == 254 {
            let b = self.take(3)?;
            (
                usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16,
                4,
            )
        } else {
            (usize::from(first), 1)
        };
        let data = self.take(len)?;
        let padding = (4 - (header + len) % 4) % 4;
        self.take(padding)?;
        Ok(data)
    }

    /// Reads a boxed `Vector<long>`, refusing more than `max` elements.
    pub fn vector_i64(&mut self, max: u32) -> Result<Vec<i64>, TlError> {
        self.expect(id::VECTOR, "vector")?;
        let count = self.u32()?;
        if count > max {
            return Err(TlError::VectorTooLong(count));
        }
        (0..count).map(|_| self.i64()).collect()
    }
}

/// Appends TL encodings to a byte vector.
pub trait TlWrite {
    fn put_u32(&mut self, v: u32);
    fn put_i32(&mut self, v: i32);
    fn put_i64(&mut self, v: i64);
    fn put_u64(&mut self, v: u64);
    fn put_raw(&mut self, v: &[u8]);
    /// Writes a TL `bytes`/`string` with its length header and alignment padding.
    fn put_bytes(&mut self, v: &[u8]);
}

impl TlWrite for Vec<u8> {
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i32(&mut self, v: i32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i64(&mut self, v: i64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_raw(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
    fn put_bytes(&mut self, v: &[u8]) {
        let header = if v.len() <= 253 {
            // Lengths up to 253 fit the one-byte header.
            self.push(v.len() as u8);
            1
        } else {
            self.push(254);
            self.extend_from_slice(&(v.len() as u32).to_le_bytes()[..3]);
            4
        };
        self.extend_from_slice(v);
        let padding = (4 - (header + v.len()) % 4) % 4;
        self.extend(std::iter::repeat_n(0u8, padding));
    }
}

/// A `msg_container` of `(msg_id, seq_no, body)` messages, in order.
pub fn msg_container<B: AsRef<[u8]>>(messages: &[(i64, i32, B)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        8 + messages
            .iter()
            .map(|(_, _, body)| 16 + body.as_ref().len())
            .sum::<usize>(),
    );
    out.put_u32(id::MSG_CONTAINER);
    out.put_u32(messages.len() as u32);
    for (msg_id, seq_no, body) in messages {
        let body = body.as_ref();
        out.put_i64(*msg_id);
        out.put_i32(*seq_no);
        out.put_u32(body.len() as u32);
        out.put_raw(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_short_and_long() {
        for len in [0usize, 1, 3, 4, 253, 254, 255, 1000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            out.put_bytes(&data);
            assert_eq!(out.len() % 4, 0, "len {len}");
            let mut r = TlReader::new(&out);
            assert_eq!(r.bytes().unwrap(), &data[..]);
            assert!(r.remaining().is_empty());
        }
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        out.put_bytes(&[7u8; 300]);
        for cut in 0..out.len() {
            assert!(TlReader::new(&out[..cut]).bytes().is_err());
        }
        assert!(TlReader::new(&[1, 2]).u32().is_err());
    }

    #[test]
    fn vector_length_is_capped() {
        let mut out = Vec::new();
        out.put_u32(id::VECTOR);
        out.put_u32(1_000_000);
        assert_eq!(
            TlReader::new(&out).vector_i64(1024),
            Err(TlError::VectorTooLong(1_000_000))
        );
    }
}
