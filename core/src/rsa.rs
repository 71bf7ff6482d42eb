//! Server RSA keys: loading (PKCS#1 or PKCS#8 PEM), generation, Telegram
//! fingerprints, and undoing the client's padding of `p_q_inner_data`
//! (RSA_PAD, and optionally the legacy SHA1 scheme older clients still use).

use rand::{CryptoRng, RngCore};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey, EncodeRsaPublicKey, LineEnding};
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPrivateKey, RsaPublicKey};
use thiserror::Error;
use zeroize::Zeroizing;

use super::crypto::{ige_decrypt, sha1, sha256};
use super::tl::TlWrite;

#[derive(Debug, Error)]
pub enum RsaKeyError {
    #[error("not a PKCS#1 or PKCS#8 RSA private key PEM: {0}")]
    Parse(String),
    #[error("RSA key is {0} bits; MTProto needs 2048")]
    WrongSize(usize),
    #[error("could not encode key: {0}")]
    Encode(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RsaDecryptError {
    #[error("encrypted_data is {0} bytes, expected 256")]
    WrongLength(usize),
    #[error("encrypted_data is not below the modulus")]
    NotBelowModulus,
    #[error("RSA private operation failed")]
    Private,
    #[error("neither RSA_PAD nor the legacy padding checks out")]
    BadPadding,
}

/// One server key and its Telegram fingerprint. The `rsa` crate reads,
/// writes and generates the key; the private operation on client data runs
/// in OpenSSL (blinded, constant-time, several times faster than `rsa`'s, and
/// free of the Marvin timing issue RUSTSEC-2023-0071 reports for it).
/// Its `Debug` shows the fingerprint only, so logs never carry the key.
#[derive(Clone)]
pub struct ServerKey {
    private: RsaPrivateKey,
    operation: openssl::rsa::Rsa<openssl::pkey::Private>,
    fingerprint: i64,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerKey {{ fingerprint: {:#018x} }}", self.fingerprint)
    }
}

/// Which padding scheme the client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    RsaPad,
    LegacySha1,
}

impl ServerKey {
    pub fn from_private(private: RsaPrivateKey) -> Result<Self, RsaKeyError> {
        let bits = private.n().bits();
        if bits != 2048 {
            return Err(RsaKeyError::WrongSize(bits));
        }
        let fingerprint = fingerprint(&private.to_public_key());
        let der = private
            .to_pkcs1_der()
            .map_err(|e| RsaKeyError::Encode(e.to_string()))?;
        let operation = openssl::rsa::Rsa::private_key_from_der(der.as_bytes())
            .map_err(|e| RsaKeyError::Parse(e.to_string()))?;
        Ok(Self {
            private,
            operation,
            fingerprint,
        })
    }

    pub fn from_pem(pem: &str) -> Result<Self, RsaKeyError> {
        let private = RsaPrivateKey::from_pkcs1_pem(pem)
            .or_else(|_| RsaPrivateKey::from_pkcs8_pem(pem))
            .map_err(|e| RsaKeyError::Parse(e.to_string()))?;
        Self::from_private(private)
    }

    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Result<Self, RsaKeyError> {
        let private =
            RsaPrivateKey::new(rng, 2048).map_err(|e| RsaKeyError::Encode(e.to_string()))?;
        Self::from_private(private)
    }

    pub fn fingerprint(&self) -> i64 {
        self.fingerprint
    }

    pub fn private_pkcs1_pem(&self) -> Result<String, RsaKeyError> {
        self.private
            .to_pkcs1_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| RsaKeyError::Encode(e.to_string()))
    }

    /// The public half as clients embed it (`-----BEGIN RSA PUBLIC KEY-----`).
    pub fn public_pkcs1_pem(&self) -> Result<String, RsaKeyError> {
        self.private
            .to_public_key()
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| RsaKeyError::Encode(e.to_string()))
    }

    pub fn public_key(&self) -> RsaPublicKey {
        self.private.to_public_key()
    }

    /// Raw RSA (CRT, blinded, result verified) of `encrypted_data`, 256 bytes
    /// with leading zeros kept.
    pub fn decrypt_raw(&self, encrypted: &[u8]) -> Result<[u8; 256], RsaDecryptError> {
        if encrypted.len() != 256 {
            return Err(RsaDecryptError::WrongLength(encrypted.len()));
        }
        if &BigUint::from_bytes_be(encrypted) >= self.private.n() {
            return Err(RsaDecryptError::NotBelowModulus);
        }
        let mut m = [0u8; 256];
        match self
            .operation
            .private_decrypt(encrypted, &mut m, openssl::rsa::Padding::NONE)
        {
            Ok(256) => Ok(m),
            _ => Err(RsaDecryptError::Private),
        }
    }
}

/// Big-endian bytes left-padded with zeros to 256 (a bignum's encoding drops
/// leading zeros; forgetting this fails about 1 in 256 handshakes).
pub fn left_pad_256(bytes: &[u8]) -> [u8; 256] {
    let mut out = [0u8; 256];
    let len = bytes.len().min(256);
    out[256 - len..].copy_from_slice(&bytes[bytes.len() - len..]);
    out
}

/// Telegram's fingerprint: the low 64 bits of SHA1 of the TL-serialised
/// `rsa_public_key n:bytes e:bytes`.
pub fn fingerprint(key: &RsaPublicKey) -> i64 {
    let mut tl = Vec::new();
    tl.put_bytes(&key.n().to_bytes_be());
    tl.put_bytes(&key.e().to_bytes_be());
    let digest = sha1(&[&tl]);
    i64::from_le_bytes(digest[12..20].try_into().unwrap_or([0; 8]))
}

/// Undoes the client's padding of the decrypted block `m`. `inner_len` gives
/// the TL length of the inner object at the start of a slice (for the legacy
/// scheme, whose SHA1 covers exactly that object). Returns the inner data
/// (with any trailing padding) and the scheme used.
pub fn unpad(
    m: &[u8; 256],
    accept_legacy: bool,
    inner_len: impl Fn(&[u8]) -> Option<usize>,
) -> Result<(Zeroizing<Vec<u8>>, Padding), RsaDecryptError> {
    // RSA_PAD: m = temp_key_xor(32) | aes_encrypted(224).
    let aes_encrypted = &m[32..];
    let hash = sha256(&[aes_encrypted]);
    // The temporary key and the decrypted block (which holds new_nonce) are wiped after use.
    let temp_key = Zeroizing::new(std::array::from_fn::<u8, 32, _>(|i| m[i] ^ hash[i]));
    let mut data_with_hash = Zeroizing::new([0u8; 224]);
    data_with_hash.copy_from_slice(aes_encrypted);
    ige_decrypt(&mut data_with_hash[..], &temp_key, &[0u8; 32]);
    let mut data_with_padding = Zeroizing::new(data_with_hash[..192].to_vec());
    data_with_padding.reverse();
    if sha256(&[&temp_key[..], &data_with_padding[..]])[..] == data_with_hash[192..] {
        return Ok((data_with_padding, Padding::RsaPad));
    }
    // Legacy: m = 0 | SHA1(data) | data | random padding.
    if accept_legacy && m[0] == 0 {
        let rest = &m[21..];
        if let Some(len) = inner_len(rest).filter(|&l| l <= rest.len()) {
            if sha1(&[&rest[..len]])[..] == m[1..21] {
                return Ok((Zeroizing::new(rest.to_vec()), Padding::LegacySha1));
            }
        }
    }
    Err(RsaDecryptError::BadPadding)
}

/// Client-side RSA_PAD encryption as the spec describes it, for tests and the
/// load generator. `data` must be at most 144 bytes.
pub fn encrypt_rsa_pad(
    key: &RsaPublicKey,
    data: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Option<Vec<u8>> {
    use super::crypto::ige_encrypt;
    if data.len() > 144 {
        return None;
    }
    loop {
        let mut data_with_padding = [0u8; 192];
        data_with_padding[..data.len()].copy_from_slice(data);
        rng.fill_bytes(&mut data_with_padding[data.len()..]);
        let mut temp_key = [0u8; 32];
        rng.fill_bytes(&mut temp_key);
        let mut data_with_hash = [0u8; 224];
        data_with_hash[..192].copy_from_slice(&data_with_padding);
        data_with_hash[..192].reverse();
        data_with_hash[192..].copy_from_slice(&sha256(&[&temp_key, &data_with_padding]));
        ige_encrypt(&mut data_with_hash, &temp_key, &[0u8; 32]);
        let hash = sha256(&[&data_with_hash]);
        let mut block = [0u8; 256];
        for i in 0..32 {
            block[i] = temp_key[i] ^ hash[i];
        }
        block[32..].copy_from_slice(&data_with_hash);
        let m = BigUint::from_bytes_be(&block);
        if &m < key.n() {
            let c = rsa::hazmat::rsa_encrypt(key, &m).ok()?;
            return Some(left_pad_256(&c.to_bytes_be()).to_vec());
        }
    }
}

/// Client-side legacy encryption (`SHA1(data) | data | padding`), as Telethon 1.45 does it.
pub fn encrypt_legacy(
    key: &RsaPublicKey,
    data: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Option<Vec<u8>> {
    if data.len() > 235 {
        return None;
    }
    let mut block = Vec::with_capacity(255);
    block.extend_from_slice(&sha1(&[data]));
    block.extend_from_slice(data);
    let mut padding = vec![0u8; 235 - data.len()];
    rng.fill_bytes(&mut padding);
    block.extend_from_slice(&padding);
    let c = rsa::hazmat::rsa_encrypt(key, &BigUint::from_bytes_be(&block)).ok()?;
    Some(left_pad_256(&c.to_bytes_be()).to_vec())
}

/// One generated key shared by the tests of this crate (key generation is slow).
#[cfg(test)]
pub(crate) fn test_key() -> &'static ServerKey {
    static KEY: std::sync::OnceLock<ServerKey> = std::sync::OnceLock::new();
    KEY.get_or_init(|| ServerKey::generate(&mut rand::thread_rng()).expect("keygen"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_fingerprint() {
        let key = test_key();
        let pem = key.private_pkcs1_pem().unwrap();
        let back = ServerKey::from_pem(&pem).unwrap();
        assert_eq!(back.fingerprint(), key.fingerprint());
        assert!(key
            .public_pkcs1_pem()
            .unwrap()
            .starts_with("-----BEGIN RSA PUBLIC KEY-----"));
        assert!(ServerKey::from_pem("not a key").is_err());
    }

    /// Telegram's published production key has fingerprint 0xd09d1d85de64fd85
    /// (−3414540481677951611), as Telethon 1.45's `_compute_fingerprint` also gives.
    #[test]
    fn fingerprint_matches_telegram_published_key() {
        use rsa::pkcs1::DecodeRsaPublicKey;
        let pem = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEA6LszBcC1LGzyr992NzE0ieY+BSaOW622Aa9Bd4ZHLl+TuFQ4lo4g
5nKaMBwK/BIb9xUfg0Q29/2mgIR6Zr9krM7HjuIcCzFvDtr+L0GQjae9H0pRB2OO
62cECs5HKhT5DZ98K33vmWiLowc621dQuwKWSQKjWf50XYFw42h21P2KXUGyp2y/
+aEyZ+uVgLLQbRA1dEjSDZ2iGRy12Mk5gpYc397aYp438fsJoHIgJ2lgMv5h7WY9
t6N/byY9Nw9p21Og3AoXSL2q/2IJ1WRUhebgAdGVMlV1fkuOQoEzR7EdpqtQD9Cs
5+bfo3Nhmcyvk5ftB0WkJ9z6bNZ7yxrP8wIDAQAB
-----END RSA PUBLIC KEY-----";
        let key = RsaPublicKey::from_pkcs1_pem(pem).unwrap();
        assert_eq!(fingerprint(&key) as u64, 0xd09d_1d85_de64_fd85);
    }

    #[test]
    fn rsa_pad_and_legacy_both_unwrap() {
        let key = test_key();
        let data: Vec<u8> = (0..96).collect();
        let len_fn = |_: &[u8]| Some(96usize);
        let mut rng = rand::thread_rng();
        let c = encrypt_rsa_pad(&key.public_key(), &data, &mut rng).unwrap();
        let m = key.decrypt_raw(&c).unwrap();
        let (inner, scheme) = unpad(&m, false, len_fn).unwrap();
        assert_eq!(scheme, Padding::RsaPad);
        assert_eq!(&inner[..96], &data[..]);

        let c = encrypt_legacy(&key.public_key(), &data, &mut rng).unwrap();
        let m = key.decrypt_raw(&c).unwrap();
        assert_eq!(unpad(&m, false, len_fn), Err(RsaDecryptError::BadPadding));
        let (inner, scheme) = unpad(&m, true, len_fn).unwrap();
        assert_eq!(scheme, Padding::LegacySha1);
        assert_eq!(&inner[..96], &data[..]);
    }

    #[test]
    fn corrupted_ciphertexts_are_refused() {
        let key = test_key();
        let mut rng = rand::thread_rng();
        let data = [5u8; 96];
        let mut c = encrypt_rsa_pad(&key.public_key(), &data, &mut rng).unwrap();
        c[100] ^= 1;
        let m = key.decrypt_raw(&c).unwrap();
        assert_eq!(
            unpad(&m, true, |_| Some(96)),
            Err(RsaDecryptError::BadPadding)
        );
        assert_eq!(
            key.decrypt_raw(&[0xff; 256]).unwrap_err(),
            RsaDecryptError::NotBelowModulus
        );
        assert_eq!(
            key.decrypt_raw(&[1; 255]).unwrap_err(),
            RsaDecryptError::WrongLength(255)
        );
    }

    #[test]
    fn debug_shows_the_fingerprint_only() {
        let key = test_key();
        let shown = format!("{key:?}");
        assert_eq!(
            shown,
            format!("ServerKey {{ fingerprint: {:#018x} }}", key.fingerprint())
        );
    }

    #[test]
    fn left_pad_keeps_leading_zeros() {
        let out = left_pad_256(&[1, 2, 3]);
        assert_eq!(&out[..253], &[0u8; 253][..]);
        assert_eq!(&out[253..], &[1, 2, 3]);
    }
}
