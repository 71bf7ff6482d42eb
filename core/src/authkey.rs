//! Auth keys and what is known about them, shared by the handshake, the
//! encrypted path and the session layer.

use std::fmt;

use zeroize::Zeroize;

use crate::crypto::sha1;

/// A 2048-bit MTProto auth key with its 64-bit id.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey {
    bytes: Box<[u8; 256]>,
    id: i64,
}

impl AuthKey {
    pub fn new(bytes: [u8; 256]) -> Self {
        let digest = sha1(&[&bytes]);
        let id = i64::from_le_bytes(digest[12..20].try_into().unwrap_or([0; 8]));
        Self {
            bytes: Box::new(bytes),
            id,
        }
    }

    /// Builds a key from stored bytes; `None` unless exactly 256 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; 256] = bytes.try_into().ok()?;
        Some(Self::new(bytes))
    }

    /// `auth_key_id`: the low 64 bits of SHA1(auth_key), little-endian.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// `auth_key_aux_hash`: the high 64 bits of SHA1(auth_key).
    pub fn aux_hash(&self) -> [u8; 8] {
        let digest = sha1(&[&self.bytes[..]]);
        digest[..8].try_into().unwrap_or([0; 8])
    }

    pub fn bytes(&self) -> &[u8; 256] {
        &self.bytes
    }
}

impl Drop for AuthKey {
    /// A dropped key (a closed connection's, an evicted cache entry's) leaves
    /// no copy of itself in freed memory.
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("AuthKey").field("id", &self.id).finish()
    }
}

/// Teamgram's key types (`auth_key_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKeyType {
    Perm = 0,
    Temp = 1,
    MediaTemp = 2,
}

impl AuthKeyType {
    /// From teamgram's `auth_key_type`; `None` for a value it does not define.
    pub fn from_teamgram(value: i32) -> Option<Self> {
        match value {
            0 => Some(AuthKeyType::Perm),
            1 => Some(AuthKeyType::Temp),
            2 => Some(AuthKeyType::MediaTemp),
            _ => None,
        }
    }
}

/// An auth key and its binding, as teamgram's `AuthKeyInfo` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKeyInfo {
    pub key: AuthKey,
    pub key_type: AuthKeyType,
    /// For a perm key, its own id; for a temp key, the perm key it is bound to (0 = unbound).
    pub perm_auth_key_id: i64,
    pub temp_auth_key_id: i64,
    pub media_temp_auth_key_id: i64,
    /// Unix time after which a temp key is no longer valid.
    pub expires_at: Option<i64>,
}

impl AuthKeyInfo {
    /// The info of a freshly created key: its own id goes into the field of its type.
    pub fn new(key: AuthKey, key_type: AuthKeyType, expires_at: Option<i64>) -> Self {
        let id = key.id();
        let mut info = Self {
            key,
            key_type,
            perm_auth_key_id: 0,
            temp_auth_key_id: 0,
            media_temp_auth_key_id: 0,
            expires_at,
        };
        match key_type {
            AuthKeyType::Perm => info.perm_auth_key_id = id,
            AuthKeyType::Temp => info.temp_auth_key_id = id,
            AuthKeyType::MediaTemp => info.media_temp_auth_key_id = id,
        }
        info
    }

    pub fn id(&self) -> i64 {
        self.key.id()
    }

    /// A temp key with no binding known here: it may have been bound since
    /// (through any gateway), so holders read it again before relying on it.
    pub fn is_unbound_temp(&self) -> bool {
        self.key_type != AuthKeyType::Perm && self.perm_auth_key_id == 0
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// A server salt and its validity window, as TL `int` dates (see
/// [`crate::tl::date`]); compare them through [`FutureSalt::since`] and
/// [`FutureSalt::until`], which stay right after 2038.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FutureSalt {
    pub valid_since: i32,
    pub valid_until: i32,
    pub salt: i64,
}

impl FutureSalt {
    /// A salt valid from `since` until `until` (unix seconds).
    pub fn new(since: i64, until: i64, salt: i64) -> Self {
        Self {
            valid_since: crate::tl::date(since),
            valid_until: crate::tl::date(until),
            salt,
        }
    }

    pub fn since(&self) -> i64 {
        crate::tl::unix_from_date(self.valid_since)
    }

    pub fn until(&self) -> i64 {
        crate::tl::unix_from_date(self.valid_until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_low_64_bits_of_sha1_little_endian() {
        let bytes: [u8; 256] = std::array::from_fn(|i| i as u8);
        let key = AuthKey::new(bytes);
        let digest = sha1(&[&bytes]);
        assert_eq!(key.id().to_le_bytes(), digest[12..20]);
        assert_eq!(key.aux_hash(), digest[..8]);
        assert!(!format!("{key:?}").contains("bytes"));
    }

    #[test]
    fn new_info_records_its_own_id_by_type() {
        let key = AuthKey::new([3; 256]);
        let id = key.id();
        let temp = AuthKeyInfo::new(key.clone(), AuthKeyType::Temp, Some(100));
        assert_eq!((temp.perm_auth_key_id, temp.temp_auth_key_id), (0, id));
        assert!(temp.is_expired(100) && !temp.is_expired(99));
        let perm = AuthKeyInfo::new(key, AuthKeyType::Perm, None);
        assert_eq!(perm.perm_auth_key_id, id);
        assert!(!perm.is_expired(i64::MAX));
    }
}
