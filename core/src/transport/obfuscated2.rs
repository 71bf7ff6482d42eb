//! obfuscated2: a 64-byte random init from the client, then AES-256-CTR over
//! every byte in both directions. No MTProxy secret is mixed in: the gateway
//! is the server, not a proxy.

use aes::Aes256;
use cipher::{KeyIvInit, StreamCipher};

use super::{FramingKind, TransportError};

type AesCtr = ctr::Ctr128BE<Aes256>;

pub const INIT_LEN: usize = 64;

/// The two CTR streams of one obfuscated connection.
pub struct Obfuscation {
    inbound: AesCtr,
    outbound: AesCtr,
}

impl std::fmt::Debug for Obfuscation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Obfuscation { .. }")
    }
}

/// What the client's init block told us.
#[derive(Debug)]
pub struct ObfuscatedInit {
    pub obfuscation: Obfuscation,
    pub framing: FramingKind,
    /// DC id as the client wrote it (signed little-endian i16; negative for media DCs).
    pub dc_id: i16,
}

/// Derives both streams from the client's 64-byte init and reads the protocol
/// tag and DC id from its decrypted tail.
pub fn accept_init(init: &[u8; INIT_LEN]) -> Result<ObfuscatedInit, TransportError> {
    let mut inbound = AesCtr::new(init[8..40].into(), init[40..56].into());
    let mut reversed = [0u8; 48];
    reversed.copy_from_slice(&init[8..56]);
    reversed.reverse();
    let outbound = AesCtr::new(reversed[..32].into(), reversed[32..].into());

    let mut decrypted = *init;
    inbound.apply_keystream(&mut decrypted);
    let tag = u32::from_le_bytes([decrypted[56], decrypted[57], decrypted[58], decrypted[59]]);
    let framing = match tag {
        0xefef_efef => FramingKind::Abridged,
        0xeeee_eeee => FramingKind::Intermediate,
        0xdddd_dddd => FramingKind::PaddedIntermediate,
        other => return Err(TransportError::BadObfuscatedTag(other)),
    };
    let dc_id = i16::from_le_bytes([decrypted[60], decrypted[61]]);
    Ok(ObfuscatedInit {
        obfuscation: Obfuscation { inbound, outbound },
        framing,
        dc_id,
    })
}

impl Obfuscation {
    pub fn decrypt_inbound(&mut self, data: &mut [u8]) {
        self.inbound.apply_keystream(data);
    }

    pub fn encrypt_outbound(&mut self, data: &mut [u8]) {
        self.outbound.apply_keystream(data);
    }
}

/// Builds a client init block the way clients do (used by tests and the load
/// generator): random bytes with the tag and DC id encrypted into the tail.
/// Returns the init and the client's (send, receive) streams.
pub fn client_init(
    random: [u8; INIT_LEN],
    framing: FramingKind,
    dc_id: i16,
) -> ([u8; INIT_LEN], Obfuscation) {
    let mut init = random;
    let tag: u32 = match framing {
        FramingKind::Abridged => 0xefef_efef,
        FramingKind::Intermediate => 0xeeee_eeee,
        FramingKind::PaddedIntermediate => 0xdddd_dddd,
        FramingKind::Full => 0,
    };
    init[56..60].copy_from_slice(&tag.to_le_bytes());
    init[60..62].copy_from_slice(&dc_id.to_le_bytes());
    let mut send = AesCtr::new(init[8..40].into(), init[40..56].into());
    let mut reversed = [0u8; 48];
    reversed.copy_from_slice(&init[8..56]);
    reversed.reverse();
    let receive = AesCtr::new(reversed[..32].into(), reversed[32..].into());
    let mut encrypted = init;
    send.apply_keystream(&mut encrypted);
    init[56..64].copy_from_slice(&encrypted[56..64]);
    // From the client's side, "inbound" is what the server sends.
    (
        init,
        Obfuscation {
            inbound: receive,
            outbound: send,
        },
    )
}
