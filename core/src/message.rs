//! The MTProto message envelope: telling unencrypted from encrypted frames,
//! MTProto 2.0 decryption with every check the spec asks for, encryption of
//! replies, and the QuickAck token.

use bytes::{BufMut, BytesMut};
use rand::RngCore;
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::crypto::{
    ige_decrypt, ige_decrypt_msg_key_large, ige_encrypt, message_key_iv, msg_key_large, Direction,
};
use crate::authkey::AuthKey;

/// Plaintext header: salt, session_id, msg_id, seq_no, message_data_length.
pub const PLAINTEXT_HEADER: usize = 32;
const MIN_PADDING: usize = 12;
const MAX_PADDING: usize = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("frame of {0} bytes is too short for an MTProto message")]
    TooShort(usize),
    #[error("unencrypted message declares {declared} body bytes but carries {available}")]
    BadPlainLength { declared: usize, available: usize },
    #[error("ciphertext of {0} bytes is not a whole number of 16-byte blocks of at least 32")]
    BadCiphertextLength(usize),
    #[error("msg_key does not match the decrypted message")]
    BadMsgKey,
    #[error("message_data_length {length} does not fit {plaintext} plaintext bytes")]
    BadDataLength { length: usize, plaintext: usize },
    #[error("padding of {0} bytes is outside 12..=1024")]
    BadPadding(usize),
}

impl MessageError {
    pub fn reason(&self) -> &'static str {
        match self {
            MessageError::TooShort(_) => "message_too_short",
            MessageError::BadPlainLength { .. } => "bad_plain_length",
            MessageError::BadCiphertextLength(_) => "bad_ciphertext_length",
            MessageError::BadMsgKey => "bad_msg_key",
            MessageError::BadDataLength { .. } => "bad_data_length",
            MessageError::BadPadding(_) => "bad_padding",
        }
    }
}

/// Reads the `auth_key_id` that starts every MTProto message (0 = unencrypted).
pub fn auth_key_id(payload: &[u8]) -> Result<i64, MessageError> {
    let head: [u8; 8] = payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(MessageError::TooShort(payload.len()))?;
    Ok(i64::from_le_bytes(head))
}

/// An unencrypted (handshake) message.
#[derive(Debug, PartialEq, Eq)]
pub struct PlainMessage<'a> {
    pub msg_id: i64,
    pub body: &'a [u8],
}

/// Parses `auth_key_id = 0 | msg_id | length | body`. Up to 15 trailing bytes
/// are tolerated on padded transports.
pub fn parse_plain(payload: &[u8], padded: bool) -> Result<PlainMessage<'_>, MessageError> {
    if payload.len() < 20 {
        return Err(MessageError::TooShort(payload.len()));
    }
    let msg_id = i64::from_le_bytes(payload[8..16].try_into().unwrap_or([0; 8]));
    let declared = u32::from_le_bytes(payload[16..20].try_into().unwrap_or([0; 4])) as usize;
    let available = payload.len() - 20;
    let slack = if padded { 15 } else { 0 };
    if declared > available || available - declared > slack {
        return Err(MessageError::BadPlainLength {
            declared,
            available,
        });
    }
    Ok(PlainMessage {
        msg_id,
        body: &payload[20..20 + declared],
    })
}

/// Wraps a handshake reply as an unencrypted message.
pub fn encode_plain(msg_id: i64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&0i64.to_le_bytes());
    out.extend_from_slice(&msg_id.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// A decrypted client message. `plaintext` is the whole decrypted buffer
/// (header, body and padding) as teamgram forwards it.
#[derive(Debug)]
pub struct Decrypted<'a> {
    pub plaintext: &'a [u8],
    pub salt: i64,
    pub session_id: i64,
    pub msg_id: i64,
    pub seq_no: i32,
    /// The body: `plaintext[32..32 + message_data_length]`.
    pub body: &'a [u8],
    /// The QuickAck token the client expects if it asked for one.
    pub quick_ack_token: u32,
}

/// Decrypts `auth_key_id | msg_key | ciphertext` in place and checks msg_key
/// (in constant time), the declared length and the padding.
pub fn decrypt<'a>(
    key: &AuthKey,
    payload: &'a mut [u8],
    padded: bool,
) -> Result<Decrypted<'a>, MessageError> {
    if payload.len() < 24 {
        return Err(MessageError::TooShort(payload.len()));
    }
    let mut cipher_len = payload.len() - 24;
    if padded {
        cipher_len -= cipher_len % 16;
    }
    if cipher_len < 32 || !cipher_len.is_multiple_of(16) {
        return Err(MessageError::BadCiphertextLength(cipher_len));
    }
    let msg_key: [u8; 16] = payload[8..24].try_into().unwrap_or([0; 16]);
    let plaintext = &mut payload[24..24 + cipher_len];
    let (aes_key, aes_iv) = message_key_iv(key.bytes(), &msg_key, Direction::ClientToServer);
    let large = ige_decrypt_msg_key_large(
        plaintext,
        &aes_key,
        &aes_iv,
        key.bytes(),
        Direction::ClientToServer,
    );
    if !bool::from(large[8..24].ct_eq(&msg_key)) {
        return Err(MessageError::BadMsgKey);
    }
    let plaintext: &'a [u8] = plaintext;
    let field = |at: usize| -> [u8; 8] { plaintext[at..at + 8].try_into().unwrap_or([0; 8]) };
    let length = u32::from_le_bytes(plaintext[28..32].try_into().unwrap_or([0; 4])) as usize;
    if !length.is_multiple_of(4) || length > cipher_len - PLAINTEXT_HEADER {
        return Err(MessageError::BadDataLength {
            length,
            plaintext: cipher_len,
        });
    }
    let padding = cipher_len - PLAINTEXT_HEADER - length;
    if !(MIN_PADDING..=MAX_PADDING).contains(&padding) {
        return Err(MessageError::BadPadding(padding));
    }
    Ok(Decrypted {
        plaintext,
        salt: i64::from_le_bytes(field(0)),
        session_id: i64::from_le_bytes(field(8)),
        msg_id: i64::from_le_bytes(field(16)),
        seq_no: i32::from_le_bytes(plaintext[24..28].try_into().unwrap_or([0; 4])),
        body: &plaintext[PLAINTEXT_HEADER..PLAINTEXT_HEADER + length],
        quick_ack_token: quick_ack_token(&large),
    })
}

/// The QuickAck token: the first 32 bits of `msg_key_large` (client direction,
/// over the plaintext including padding) with the high bit set.
pub fn quick_ack_token(msg_key_large: &[u8; 32]) -> u32 {
    u32::from_le_bytes([
        msg_key_large[0],
        msg_key_large[1],
        msg_key_large[2],
        msg_key_large[3],
    ]) | 0x8000_0000
}

/// The length of [`encrypt`]'s output for a plaintext of `plaintext_len`
/// bytes: the key id, msg_key, and the plaintext with the least padding
/// that fills the last block.
pub fn encrypted_len(plaintext_len: usize) -> usize {
    24 + plaintext_len + padding_len(plaintext_len)
}

fn padding_len(plaintext_len: usize) -> usize {
    MIN_PADDING + (16 - (plaintext_len + MIN_PADDING) % 16) % 16
}

/// Encrypts a server message (`salt | session_id | msg_id | seq_no | length |
/// body`) with x = 8 and random padding, appending the
/// [`encrypted_len`] bytes to `out`.
pub fn encrypt(key: &AuthKey, plaintext: &[u8], out: &mut BytesMut, rng: &mut impl RngCore) {
    let padding = padding_len(plaintext.len());
    let start = out.len();
    out.reserve(encrypted_len(plaintext.len()));
    out.put_i64_le(key.id());
    out.put_bytes(0, 16);
    let body_at = out.len();
    out.put_slice(plaintext);
    let pad_at = out.len();
    out.put_bytes(0, padding);
    rng.fill_bytes(&mut out[pad_at..]);
    let large = msg_key_large(key.bytes(), &out[body_at..], Direction::ServerToClient);
    let msg_key: [u8; 16] = large[8..24].try_into().unwrap_or([0; 16]);
    out[start + 8..start + 24].copy_from_slice(&msg_key);
    let (aes_key, aes_iv) = message_key_iv(key.bytes(), &msg_key, Direction::ServerToClient);
    ige_encrypt(&mut out[body_at..], &aes_key, &aes_iv);
}

/// Client-side encryption (x = 0), for tests and the load generator.
pub fn encrypt_as_client(
    key: &AuthKey,
    plaintext: &[u8],
    padding: usize,
    rng: &mut impl RngCore,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + plaintext.len() + padding);
    out.extend_from_slice(&key.id().to_le_bytes());
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(plaintext);
    let pad_at = out.len();
    out.resize(pad_at + padding, 0);
    rng.fill_bytes(&mut out[pad_at..]);
    let large = msg_key_large(key.bytes(), &out[24..], Direction::ClientToServer);
    let msg_key: [u8; 16] = large[8..24].try_into().unwrap_or([0; 16]);
    out[8..24].copy_from_slice(&msg_key);
    let (aes_key, aes_iv) = message_key_iv(key.bytes(), &msg_key, Direction::ClientToServer);
    ige_encrypt(&mut out[24..], &aes_key, &aes_iv);
    out
}

/// Decrypts a server message as a client would, for tests and the load generator.
pub fn decrypt_as_server_reply(key: &AuthKey, frame: &[u8]) -> Option<Vec<u8>> {
    if frame.len() < 24 + 32 || !(frame.len() - 24).is_multiple_of(16) {
        return None;
    }
    let msg_key: [u8; 16] = frame[8..24].try_into().ok()?;
    let mut plaintext = frame[24..].to_vec();
    let (aes_key, aes_iv) = message_key_iv(key.bytes(), &msg_key, Direction::ServerToClient);
    ige_decrypt(&mut plaintext, &aes_key, &aes_iv);
    let large = msg_key_large(key.bytes(), &plaintext, Direction::ServerToClient);
    (large[8..24] == msg_key).then_some(plaintext)
}

/// Next server msg_id: time-based, strictly increasing after `last`, and
/// ≡ 1 mod 4 for responses, ≡ 3 mod 4 for other server messages.
///
/// `last` may come from a session service (HTTP containers take an id after
/// the queued messages'), so it can sit at the top of the range: there no
/// larger id exists and the largest one with the right residue is returned.
pub fn next_server_msg_id(last: i64, unix_secs: i64, subsec_nanos: u32, response: bool) -> i64 {
    let base = (unix_secs << 32) | (i64::from(subsec_nanos) << 2);
    let want = if response { 1 } else { 3 };
    let from = base.max(last.saturating_add(1));
    let aligned = from - from.rem_euclid(4) + want;
    if aligned >= from {
        aligned
    } else {
        aligned.checked_add(4).unwrap_or(aligned)
    }
}

/// Builds the plaintext header + body of one message.
pub fn plaintext_message(
    salt: i64,
    session_id: i64,
    msg_id: i64,
    seq_no: i32,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(PLAINTEXT_HEADER + body.len());
    out.extend_from_slice(&salt.to_le_bytes());
    out.extend_from_slice(&session_id.to_le_bytes());
    out.extend_from_slice(&msg_id.to_le_bytes());
    out.extend_from_slice(&seq_no.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::sha256;

    fn key() -> AuthKey {
        AuthKey::new(std::array::from_fn(|i| (i * 7 + 3) as u8))
    }

    #[test]
    fn client_message_decrypts_with_quick_ack_over_plaintext() {
        let key = key();
        let plain = plaintext_message(11, 22, 33 << 2, 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut frame = encrypt_as_client(&key, &plain, 24, &mut rand::thread_rng());
        let d = decrypt(&key, &mut frame, false).unwrap();
        assert_eq!(
            (d.salt, d.session_id, d.msg_id, d.seq_no),
            (11, 22, 33 << 2, 1)
        );
        assert_eq!(d.body, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let expected = sha256(&[&key.bytes()[88..120], d.plaintext]);
        assert_eq!(
            d.quick_ack_token,
            u32::from_le_bytes(expected[..4].try_into().unwrap()) | 0x8000_0000
        );
    }

    #[test]
    fn tampering_fails_the_msg_key_check() {
        let key = key();
        let plain = plaintext_message(1, 2, 4, 1, &[0; 16]);
        let clean = encrypt_as_client(&key, &plain, 16, &mut rand::thread_rng());
        for at in [8, 23, 24, 40, clean.len() - 1] {
            let mut frame = clean.clone();
            frame[at] ^= 0x40;
            assert_eq!(
                decrypt(&key, &mut frame, false).unwrap_err(),
                MessageError::BadMsgKey
            );
        }
    }

    #[test]
    fn short_and_misaligned_ciphertexts_are_refused() {
        let key = key();
        for len in [0usize, 4, 8, 16, 23] {
            let mut frame = vec![0u8; len];
            assert_eq!(
                decrypt(&key, &mut frame, false).unwrap_err(),
                MessageError::TooShort(len)
            );
        }
        // A 16-byte encrypted_data (teamgram panicked on it).
        let mut frame = vec![0u8; 24 + 16];
        assert_eq!(
            decrypt(&key, &mut frame, false).unwrap_err(),
            MessageError::BadCiphertextLength(16)
        );
        let mut frame = vec![0u8; 24 + 50];
        assert_eq!(
            decrypt(&key, &mut frame, false).unwrap_err(),
            MessageError::BadCiphertextLength(50)
        );
    }

    #[test]
    fn padding_below_12_or_above_1024_is_refused() {
        let key = key();
        let plain = plaintext_message(1, 2, 4, 1, &[0; 12]);
        let mut frame = encrypt_as_client(&key, &plain, 4, &mut rand::thread_rng());
        assert_eq!(
            decrypt(&key, &mut frame, false).unwrap_err(),
            MessageError::BadPadding(4)
        );
        let mut frame = encrypt_as_client(&key, &plain, 1028, &mut rand::thread_rng());
        assert_eq!(
            decrypt(&key, &mut frame, false).unwrap_err(),
            MessageError::BadPadding(1028)
        );
    }

    #[test]
    fn declared_length_must_fit() {
        let key = key();
        let mut plain = plaintext_message(1, 2, 4, 1, &[0; 16]);
        plain[28..32].copy_from_slice(&400u32.to_le_bytes());
        let mut frame = encrypt_as_client(&key, &plain, 16, &mut rand::thread_rng());
        assert!(matches!(
            decrypt(&key, &mut frame, false),
            Err(MessageError::BadDataLength { length: 400, .. })
        ));
    }

    #[test]
    fn padded_transport_tail_is_ignored() {
        let key = key();
        let plain = plaintext_message(1, 2, 4, 1, &[9; 8]);
        let mut frame = encrypt_as_client(&key, &plain, 24, &mut rand::thread_rng());
        frame.extend_from_slice(&[0xaa; 7]);
        assert!(decrypt(&key, &mut frame.clone(), false).is_err());
        assert_eq!(decrypt(&key, &mut frame, true).unwrap().body, &[9; 8]);
    }

    #[test]
    fn server_replies_round_trip_with_12_to_27_padding() {
        let key = key();
        for body_len in (0..64).step_by(4) {
            let plain = plaintext_message(5, 6, 7, 8, &vec![1u8; body_len]);
            let mut out = BytesMut::new();
            encrypt(&key, &plain, &mut out, &mut rand::thread_rng());
            let pad = out.len() - 24 - plain.len();
            assert!((12..28).contains(&pad), "padding {pad}");
            let back = decrypt_as_server_reply(&key, &out).unwrap();
            assert_eq!(&back[..plain.len()], &plain[..]);
        }
    }

    #[test]
    fn server_msg_ids_increase_with_the_right_residue() {
        let a = next_server_msg_id(0, 1_800_000_000, 5, true);
        assert_eq!(a % 4, 1);
        assert_eq!(a >> 32, 1_800_000_000);
        let b = next_server_msg_id(a, 1_800_000_000, 5, false);
        assert!(b > a && b % 4 == 3);
        let c = next_server_msg_id(b, 1_799_999_999, 0, true);
        assert!(c > b && c % 4 == 1);
    }

    #[test]
    fn server_msg_ids_at_the_top_of_the_range_do_not_overflow() {
        for last in [
            i64::MAX,
            i64::MAX - 1,
            i64::MAX - 3,
            i64::MAX - 4,
            i64::MAX - 7,
        ] {
            for response in [true, false] {
                let id = next_server_msg_id(last, 1_800_000_000, 5, response);
                assert_eq!(id.rem_euclid(4), if response { 1 } else { 3 });
                assert!(id > last || i64::MAX - id < 4, "{last} -> {id}");
            }
        }
        assert_eq!(next_server_msg_id(i64::MAX - 8, 0, 0, false), i64::MAX - 4);
    }

    #[test]
    fn plain_messages_parse_with_exact_length() {
        let msg = encode_plain(1 << 32, &[1, 2, 3, 4]);
        assert_eq!(auth_key_id(&msg).unwrap(), 0);
        assert_eq!(parse_plain(&msg, false).unwrap().body, &[1, 2, 3, 4]);
        let mut long = msg.clone();
        long.extend_from_slice(&[0; 3]);
        assert!(parse_plain(&long, false).is_err());
        assert!(parse_plain(&long, true).is_ok());
        assert!(parse_plain(&msg[..19], false).is_err());
        assert!(auth_key_id(&msg[..7]).is_err());
    }
}
