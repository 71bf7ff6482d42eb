//! `auth.bindTempAuthKey`: binding a temp key to a perm key. The request
//! carries `bind_auth_key_inner` encrypted with the *perm* key using MTProto
//! 1.0; every inner field is checked against the outer request and the key
//! and session it arrived on before anything records the binding.

use rand::RngCore;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::authkey::AuthKey;
use crate::crypto::{ige_decrypt, ige_encrypt, message_key_iv_v1, sha1, Direction};
use crate::tl::{TlReader, TlWrite};

pub const BIND_TEMP_AUTH_KEY: u32 = 0xcdd4_2a05;
pub const BIND_AUTH_KEY_INNER: u32 = 0x75a3_f765;

/// `auth.bindTempAuthKey perm_auth_key_id:long nonce:long expires_at:int encrypted_message:bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindRequest {
    pub perm_auth_key_id: i64,
    pub nonce: i64,
    pub expires_at: i32,
    pub encrypted_message: Vec<u8>,
}

impl BindRequest {
    pub fn parse(body: &[u8]) -> Option<Self> {
        let mut r = TlReader::new(body);
        r.expect(BIND_TEMP_AUTH_KEY, "auth.bindTempAuthKey").ok()?;
        Some(Self {
            perm_auth_key_id: r.i64().ok()?,
            nonce: r.i64().ok()?,
            expires_at: r.i32().ok()?,
            encrypted_message: r.bytes().ok()?.to_vec(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.encrypted_message.len());
        out.put_u32(BIND_TEMP_AUTH_KEY);
        out.put_i64(self.perm_auth_key_id);
        out.put_i64(self.nonce);
        out.put_i32(self.expires_at);
        out.put_bytes(&self.encrypted_message);
        out
    }
}

/// What the outer (temp-key) message says about itself.
#[derive(Debug, Clone, Copy)]
pub struct Outer {
    pub msg_id: i64,
    pub temp_auth_key_id: i64,
    pub session_id: i64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BindError {
    #[error("encrypted_message is not for perm key {0}")]
    WrongPermKey(i64),
    #[error("encrypted_message is malformed")]
    Malformed,
    #[error("encrypted_message fails its MTProto 1.0 msg_key check")]
    BadMsgKey,
    #[error("bind_auth_key_inner field {0} does not match")]
    Mismatch(&'static str),
}

/// Checks the request against the perm key it names and the message it came in.
pub fn verify(req: &BindRequest, perm: &AuthKey, outer: &Outer) -> Result<(), BindError> {
    if perm.id() != req.perm_auth_key_id {
        return Err(BindError::Mismatch("perm_auth_key_id"));
    }
    let msg = &req.encrypted_message;
    if msg.len() < 24 + 32 || !(msg.len() - 24).is_multiple_of(16) {
        return Err(BindError::Malformed);
    }
    let key_id = i64::from_le_bytes(msg[..8].try_into().map_err(|_| BindError::Malformed)?);
    if key_id != perm.id() {
        return Err(BindError::WrongPermKey(key_id));
    }
    let msg_key: [u8; 16] = msg[8..24].try_into().map_err(|_| BindError::Malformed)?;
    let mut plain = msg[24..].to_vec();
    let (key, iv) = message_key_iv_v1(perm.bytes(), &msg_key, Direction::ClientToServer);
    ige_decrypt(&mut plain, &key, &iv);
    let len =
        u32::from_le_bytes(plain[28..32].try_into().map_err(|_| BindError::Malformed)?) as usize;
    if len > plain.len() - 32 || plain.len() - 32 - len >= 16 {
        return Err(BindError::Malformed);
    }
    let expected = sha1(&[&plain[..32 + len]]);
    if !bool::from(expected[4..20].ct_eq(&msg_key)) {
        return Err(BindError::BadMsgKey);
    }
    let msg_id = i64::from_le_bytes(plain[16..24].try_into().map_err(|_| BindError::Malformed)?);
    if msg_id != outer.msg_id {
        return Err(BindError::Mismatch("msg_id"));
    }
    let mut r = TlReader::new(&plain[32..32 + len]);
    r.expect(BIND_AUTH_KEY_INNER, "bind_auth_key_inner")
        .map_err(|_| BindError::Malformed)?;
    let field = |r: &mut TlReader<'_>| r.i64().map_err(|_| BindError::Malformed);
    if field(&mut r)? != req.nonce {
        return Err(BindError::Mismatch("nonce"));
    }
    if field(&mut r)? != outer.temp_auth_key_id {
        return Err(BindError::Mismatch("temp_auth_key_id"));
    }
    if field(&mut r)? != req.perm_auth_key_id {
        return Err(BindError::Mismatch("perm_auth_key_id"));
    }
    if field(&mut r)? != outer.session_id {
        return Err(BindError::Mismatch("temp_session_id"));
    }
    if r.i32().map_err(|_| BindError::Malformed)? != req.expires_at {
        return Err(BindError::Mismatch("expires_at"));
    }
    Ok(())
}

/// The client's side: builds the request for binding the temp key `outer`
/// came on to `perm` (used by tests and the load generator).
pub fn build_request(
    perm: &AuthKey,
    outer: &Outer,
    nonce: i64,
    expires_at: i32,
    rng: &mut impl RngCore,
) -> BindRequest {
    let mut inner = Vec::with_capacity(40);
    inner.put_u32(BIND_AUTH_KEY_INNER);
    inner.put_i64(nonce);
    inner.put_i64(outer.temp_auth_key_id);
    inner.put_i64(perm.id());
    inner.put_i64(outer.session_id);
    inner.put_i32(expires_at);
    let mut plain = Vec::with_capacity(96);
    plain.put_i64(rng.next_u64() as i64);
    plain.put_i64(rng.next_u64() as i64);
    plain.put_i64(outer.msg_id);
    plain.put_i32(0);
    plain.put_u32(inner.len() as u32);
    plain.put_raw(&inner);
    let msg_key: [u8; 16] = sha1(&[&plain])[4..20].try_into().unwrap_or([0; 16]);
    while plain.len() % 16 != 0 {
        plain.push(rng.next_u32() as u8);
    }
    let (key, iv) = message_key_iv_v1(perm.bytes(), &msg_key, Direction::ClientToServer);
    ige_encrypt(&mut plain, &key, &iv);
    let mut encrypted_message = Vec::with_capacity(24 + plain.len());
    encrypted_message.put_i64(perm.id());
    encrypted_message.put_raw(&msg_key);
    encrypted_message.put_raw(&plain);
    BindRequest {
        perm_auth_key_id: perm.id(),
        nonce,
        expires_at,
        encrypted_message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (AuthKey, AuthKey) {
        (
            AuthKey::new([1; 256]),
            AuthKey::new(std::array::from_fn(|i| i as u8)),
        )
    }

    fn outer(temp: &AuthKey) -> Outer {
        Outer {
            msg_id: 1_800_000_000 << 32,
            temp_auth_key_id: temp.id(),
            session_id: 77,
        }
    }

    #[test]
    fn a_well_formed_request_verifies() {
        let (perm, temp) = keys();
        let req = build_request(
            &perm,
            &outer(&temp),
            5,
            1_800_086_400,
            &mut rand::thread_rng(),
        );
        let parsed = BindRequest::parse(&req.encode()).unwrap();
        assert_eq!(parsed, req);
        assert_eq!(verify(&parsed, &perm, &outer(&temp)), Ok(()));
    }

    #[test]
    fn every_inner_field_is_checked_against_the_outer_request() {
        let (perm, temp) = keys();
        let o = outer(&temp);
        let req = build_request(&perm, &o, 5, 100, &mut rand::thread_rng());
        let other = AuthKey::new([9; 256]);
        assert_eq!(
            verify(&req, &other, &o),
            Err(BindError::Mismatch("perm_auth_key_id"))
        );
        assert_eq!(
            verify(
                &req,
                &perm,
                &Outer {
                    msg_id: o.msg_id + 4,
                    ..o
                }
            ),
            Err(BindError::Mismatch("msg_id"))
        );
        assert_eq!(
            verify(
                &req,
                &perm,
                &Outer {
                    temp_auth_key_id: 3,
                    ..o
                }
            ),
            Err(BindError::Mismatch("temp_auth_key_id"))
        );
        assert_eq!(
            verify(
                &req,
                &perm,
                &Outer {
                    session_id: 78,
                    ..o
                }
            ),
            Err(BindError::Mismatch("temp_session_id"))
        );
        assert_eq!(
            verify(
                &BindRequest {
                    nonce: 6,
                    ..req.clone()
                },
                &perm,
                &o
            ),
            Err(BindError::Mismatch("nonce"))
        );
        assert_eq!(
            verify(
                &BindRequest {
                    expires_at: 101,
                    ..req.clone()
                },
                &perm,
                &o
            ),
            Err(BindError::Mismatch("expires_at"))
        );
        let mut tampered = req.clone();
        let last = tampered.encrypted_message.len() - 20;
        tampered.encrypted_message[last] ^= 1;
        assert_eq!(verify(&tampered, &perm, &o), Err(BindError::BadMsgKey));
        for cut in [0, 8, 24, 40, 71] {
            let mut short = req.clone();
            short.encrypted_message.truncate(cut);
            assert!(verify(&short, &perm, &o).is_err());
        }
        assert!(BindRequest::parse(&[0x05, 0x2a, 0xd4, 0xcd, 1]).is_none());
    }
}
