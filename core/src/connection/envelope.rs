//! The encrypted path's decisions that every transport shares: which key
//! lookups end in −404, and what of a decrypted frame goes to the session.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::Close;
use crate::authkey::AuthKeyInfo;
use crate::message;

/// What the key cache (and the store or session behind it) said.
#[derive(Debug)]
pub enum KeyLookup {
    Found(Arc<AuthKeyInfo>),
    NotFound,
    /// The store did not answer: the key may exist.
    Failed(String),
}

/// Turns a lookup into the key to use. −404 only for a key that is truly
/// unknown or expired: a blind −404 makes clients drop good keys. A failed
/// lookup keeps `held` (an unbound temp key being re-read) when there is one.
pub fn resolve_key(
    auth_key_id: i64,
    lookup: KeyLookup,
    held: Option<&Arc<AuthKeyInfo>>,
    unix_secs: i64,
) -> Result<Arc<AuthKeyInfo>, Close> {
    match (lookup, held) {
        (KeyLookup::Found(info), _) if info.is_expired(unix_secs) => {
            Err(Close::ExpiredKey(auth_key_id))
        }
        (KeyLookup::Found(info), _) => Ok(info),
        (KeyLookup::NotFound, _) => Err(Close::UnknownKey(auth_key_id)),
        (KeyLookup::Failed(_), Some(held)) => Ok(held.clone()),
        (KeyLookup::Failed(e), None) => Err(Close::KeyLookup(e)),
    }
}

/// A decrypted client message, cut for teamgram's `SessionClientData`.
#[derive(Debug)]
pub struct Opened {
    pub salt: i64,
    pub session_id: i64,
    pub msg_id: i64,
    pub seq_no: i32,
    pub quick_ack_token: u32,
    /// Plaintext from byte 16 (msg_id onwards, padding included), as
    /// teamgram forwards it. Shares the frame's buffer.
    pub payload: Bytes,
}

impl Opened {
    /// The message body (after the 16-byte msg_id/seq_no/length header).
    pub fn body(&self) -> &[u8] {
        let len = self
            .payload
            .get(12..16)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        self.payload.get(16..16 + len).unwrap_or_default()
    }
}

/// Decrypts `auth_key_id | msg_key | ciphertext` in place and keeps the part
/// the session gets, without copying.
pub fn open(info: &AuthKeyInfo, mut frame: BytesMut, padded: bool) -> Result<Opened, Close> {
    let decrypted = message::decrypt(&info.key, &mut frame, padded)?;
    let (salt, session_id, msg_id, seq_no, quick_ack_token) = (
        decrypted.salt,
        decrypted.session_id,
        decrypted.msg_id,
        decrypted.seq_no,
        decrypted.quick_ack_token,
    );
    let plaintext_len = decrypted.plaintext.len();
    // auth_key_id and msg_key (24 bytes), then salt and session_id (16).
    frame.advance(24 + 16);
    frame.truncate(plaintext_len - 16);
    Ok(Opened {
        salt,
        session_id,
        msg_id,
        seq_no,
        quick_ack_token,
        payload: frame.freeze(),
    })
}
