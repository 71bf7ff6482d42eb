//! MTProto symmetric crypto: AES-256-IGE in place, the MTProto 2.0 key
//! derivation, `msg_key`, and the handshake's temporary AES key.

use aes::cipher::consts::U16;
use aes::cipher::{
    generic_array::GenericArray, BlockBackend, BlockClosure, BlockDecrypt, BlockEncrypt,
    BlockSizeUser, KeyInit,
};
use aes::{Aes256Dec, Aes256Enc};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Which side produced a message; selects the `x` offset into the auth key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server, `x = 0`.
    ClientToServer,
    /// Server to client, `x = 8`.
    ServerToClient,
}

impl Direction {
    fn x(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 8,
        }
    }
}

/// AES-256-IGE encryption in place. `data.len()` must be a multiple of 16
/// (callers check before calling; a remainder is left untouched).
pub fn ige_encrypt(data: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
    Aes256Enc::new(GenericArray::from_slice(key)).encrypt_with_backend(IgeEncrypt { data, iv });
}

/// AES-256-IGE decryption in place; the counterpart of [`ige_encrypt`].
pub fn ige_decrypt(data: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
    Aes256Dec::new(GenericArray::from_slice(key)).decrypt_with_backend(IgeDecrypt {
        data,
        iv,
        hash: None,
    });
}

/// [`ige_decrypt`] and then [`msg_key_large`] of the plaintext, in one pass:
/// each 64 bytes are hashed as soon as they are decrypted, while they are in
/// the L1 cache and while the chained AES rounds (which wait on each other)
/// leave the CPU's other units free for SHA-256.
pub fn ige_decrypt_msg_key_large(
    data: &mut [u8],
    key: &[u8; 32],
    iv: &[u8; 32],
    auth_key: &[u8; 256],
    dir: Direction,
) -> [u8; 32] {
    let x = dir.x();
    let mut hash = Sha256::new_with_prefix(&auth_key[88 + x..120 + x]);
    Aes256Dec::new(GenericArray::from_slice(key)).decrypt_with_backend(IgeDecrypt {
        data,
        iv,
        hash: Some(&mut hash),
    });
    hash.finalize().into()
}

/// Bytes decrypted between two hash updates.
const HASH_STRIDE: usize = 64;

/// The IGE loops run as closures inside the AES backend (which is compiled
/// for AES-NI when the CPU has it), so the round keys stay in registers
/// across blocks instead of being reloaded for each one.
struct IgeEncrypt<'a> {
    data: &'a mut [u8],
    iv: &'a [u8; 32],
}

impl BlockSizeUser for IgeEncrypt<'_> {
    type BlockSize = U16;
}

impl BlockClosure for IgeEncrypt<'_> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let (mut prev_cipher, mut prev_plain) = split_iv(self.iv);
        for chunk in self.data.chunks_exact_mut(16) {
            let block = Block::from_mut_slice(chunk);
            let plain = *block;
            xor_block(block, &prev_cipher);
            backend.proc_block(block.into());
            xor_block(block, &prev_plain);
            prev_cipher = *block;
            prev_plain = plain;
        }
    }
}

struct IgeDecrypt<'a> {
    data: &'a mut [u8],
    iv: &'a [u8; 32],
    hash: Option<&'a mut Sha256>,
}

impl BlockSizeUser for IgeDecrypt<'_> {
    type BlockSize = U16;
}

impl BlockClosure for IgeDecrypt<'_> {
    fn call<B: BlockBackend<BlockSize = U16>>(mut self, backend: &mut B) {
        let (mut prev_plain, mut prev_cipher) = {
            let (c, p) = split_iv(self.iv);
            (p, c)
        };
        let whole = self.data.len() / 16 * 16;
        for stride in self.data[..whole].chunks_mut(HASH_STRIDE) {
            for chunk in stride.chunks_exact_mut(16) {
                let block = Block::from_mut_slice(chunk);
                let encrypted = *block;
                xor_block(block, &prev_plain);
                backend.proc_block(block.into());
                xor_block(block, &prev_cipher);
                prev_plain = *block;
                prev_cipher = encrypted;
            }
            if let Some(hash) = self.hash.as_deref_mut() {
                hash.update(&*stride);
            }
        }
    }
}

type Block = GenericArray<u8, U16>;

/// IGE's IV: the first half stands for the previous ciphertext block, the
/// second for the previous plaintext block.
fn split_iv(iv: &[u8; 32]) -> (Block, Block) {
    (*Block::from_slice(&iv[..16]), *Block::from_slice(&iv[16..]))
}

fn xor_block(block: &mut Block, other: &Block) {
    for (b, o) in block.iter_mut().zip(other) {
        *b ^= o;
    }
}

/// MTProto 2.0: `msg_key_large = SHA256(auth_key[88+x..120+x] ‖ plaintext)`.
/// The real `msg_key` is bytes 8..24; the quick-ack token is bytes 0..4.
pub fn msg_key_large(auth_key: &[u8; 256], plaintext: &[u8], dir: Direction) -> [u8; 32] {
    let x = dir.x();
    Sha256::new()
        .chain_update(&auth_key[88 + x..120 + x])
        .chain_update(plaintext)
        .finalize()
        .into()
}

/// MTProto 2.0 AES key and IV for a message with the given `msg_key`.
pub fn message_key_iv(
    auth_key: &[u8; 256],
    msg_key: &[u8; 16],
    dir: Direction,
) -> ([u8; 32], [u8; 32]) {
    let x = dir.x();
    let a: [u8; 32] = Sha256::new()
        .chain_update(msg_key)
        .chain_update(&auth_key[x..x + 36])
        .finalize()
        .into();
    let b: [u8; 32] = Sha256::new()
        .chain_update(&auth_key[40 + x..76 + x])
        .chain_update(msg_key)
        .finalize()
        .into();
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&a[..8]);
    key[8..24].copy_from_slice(&b[8..24]);
    key[24..].copy_from_slice(&a[24..]);
    let mut iv = [0u8; 32];
    iv[..8].copy_from_slice(&b[..8]);
    iv[8..24].copy_from_slice(&a[8..24]);
    iv[24..].copy_from_slice(&b[24..]);
    (key, iv)
}

/// MTProto 1.0 AES key and IV (SHA1-based), still required for the
/// `bind_auth_key_inner` message of `auth.bindTempAuthKey`.
pub fn message_key_iv_v1(
    auth_key: &[u8; 256],
    msg_key: &[u8; 16],
    dir: Direction,
) -> ([u8; 32], [u8; 32]) {
    let x = dir.x();
    let a = sha1(&[msg_key, &auth_key[x..x + 32]]);
    let b = sha1(&[
        &auth_key[32 + x..48 + x],
        msg_key,
        &auth_key[48 + x..64 + x],
    ]);
    let c = sha1(&[&auth_key[64 + x..96 + x], msg_key]);
    let d = sha1(&[msg_key, &auth_key[96 + x..128 + x]]);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&a[..8]);
    key[8..20].copy_from_slice(&b[8..20]);
    key[20..].copy_from_slice(&c[4..16]);
    let mut iv = [0u8; 32];
    iv[..12].copy_from_slice(&a[8..20]);
    iv[12..20].copy_from_slice(&b[..8]);
    iv[20..24].copy_from_slice(&c[16..20]);
    iv[24..].copy_from_slice(&d[..8]);
    (key, iv)
}

/// The handshake's temporary AES key and IV, derived from `new_nonce` and
/// `server_nonce`, that protect `server_DH_inner_data` and `client_DH_inner_data`;
/// wiped when dropped.
pub fn handshake_key_iv(
    new_nonce: &[u8; 32],
    server_nonce: &[u8; 16],
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let ns = Zeroizing::new(<[u8; 20]>::from(
        Sha1::new()
            .chain_update(new_nonce)
            .chain_update(server_nonce)
            .finalize(),
    ));
    let sn = Zeroizing::new(<[u8; 20]>::from(
        Sha1::new()
            .chain_update(server_nonce)
            .chain_update(new_nonce)
            .finalize(),
    ));
    let nn = Zeroizing::new(<[u8; 20]>::from(
        Sha1::new()
            .chain_update(new_nonce)
            .chain_update(new_nonce)
            .finalize(),
    ));
    let mut key = Zeroizing::new([0u8; 32]);
    key[..20].copy_from_slice(&ns[..]);
    key[20..].copy_from_slice(&sn[..12]);
    let mut iv = Zeroizing::new([0u8; 32]);
    iv[..8].copy_from_slice(&sn[12..]);
    iv[8..28].copy_from_slice(&nn[..]);
    iv[28..].copy_from_slice(&new_nonce[..4]);
    (key, iv)
}

pub fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors computed with Telethon 1.45 (`telethon.crypto.AES.encrypt_ige`,
    /// `MTProtoState._calc_key`, and its SHA256 `msg_key_large`), a client
    /// that talks to Telegram's servers.
    #[test]
    fn ige_matches_telethon() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let iv: [u8; 32] = std::array::from_fn(|i| i as u8);
        let mut data = [0u8; 32];
        ige_encrypt(&mut data, &key, &iv);
        assert_eq!(
            hex::encode(data),
            "4a7f16441cee6781e8374f261edeb88dc77147ebd5121de8d0fae7762423b6bf"
        );
        ige_decrypt(&mut data, &key, &iv);
        assert_eq!(data, [0u8; 32]);
    }

    fn telethon_auth_key() -> [u8; 256] {
        std::array::from_fn(|i| ((i * 7 + 3) % 256) as u8)
    }

    #[test]
    fn kdf_matches_telethon() {
        let auth_key = telethon_auth_key();
        let msg_key: [u8; 16] = std::array::from_fn(|i| 100 + i as u8);
        let (key, iv) = message_key_iv(&auth_key, &msg_key, Direction::ClientToServer);
        assert_eq!(
            hex::encode(key),
            "fb190693c4409d1b210eca74a7603428a6d75aa2263fffe159b44647eacb53b3"
        );
        assert_eq!(
            hex::encode(iv),
            "094f96f29c1e7a6d8969f5247598b0e9a2e8119536506e729e7a07d448f018f6"
        );
        let (key, iv) = message_key_iv(&auth_key, &msg_key, Direction::ServerToClient);
        assert_eq!(
            hex::encode(key),
            "b152ee12906d00ce5ad2e6a0a589e87177200cfb673c1e89ec5578545af87ccb"
        );
        assert_eq!(
            hex::encode(iv),
            "376603355ed14036081de8d7a35e49ab7a1b4e2bb1c516b96f5d69b8d87b0d33"
        );
    }

    #[test]
    fn msg_key_large_matches_telethon() {
        let auth_key = telethon_auth_key();
        let plaintext: Vec<u8> = (0..64).collect();
        assert_eq!(
            hex::encode(msg_key_large(
                &auth_key,
                &plaintext,
                Direction::ClientToServer
            )),
            "476b5c6715531cb7f4862c4e6d0cc477bb7550e3f5b0f4bd078bc2e84d227617"
        );
        assert_eq!(
            hex::encode(msg_key_large(
                &auth_key,
                &plaintext,
                Direction::ServerToClient
            )),
            "0eb33b67aa7ab277c938d3873af7dc3d3ad4a39045f6c36556ca4359f17affae"
        );
    }

    #[test]
    fn fused_decrypt_and_hash_match_the_separate_steps() {
        let auth_key = telethon_auth_key();
        let (key, iv) = ([3u8; 32], [4u8; 32]);
        for blocks in [2, 3, 4, 5, 8, 9, 1024] {
            let original: Vec<u8> = (0..blocks * 16).map(|i| (i * 7) as u8).collect();
            for dir in [Direction::ClientToServer, Direction::ServerToClient] {
                let mut separate = original.clone();
                ige_decrypt(&mut separate, &key, &iv);
                let expected = msg_key_large(&auth_key, &separate, dir);
                let mut fused = original.clone();
                let got = ige_decrypt_msg_key_large(&mut fused, &key, &iv, &auth_key, dir);
                assert_eq!(fused, separate, "{blocks} blocks");
                assert_eq!(got, expected, "{blocks} blocks");
            }
        }
    }

    #[test]
    fn ige_round_trips_random_lengths() {
        let key = [7u8; 32];
        let iv = [9u8; 32];
        for blocks in 1..20 {
            let original: Vec<u8> = (0..blocks * 16).map(|i| (i * 31) as u8).collect();
            let mut data = original.clone();
            ige_encrypt(&mut data, &key, &iv);
            assert_ne!(data, original);
            ige_decrypt(&mut data, &key, &iv);
            assert_eq!(data, original);
        }
    }
}
