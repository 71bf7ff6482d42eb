//! Helpers shared by the fuzz targets: a cursor that turns fuzz input into
//! choices, a fixed server key and handshake settings, the client's side of
//! the handshake, and a client-side transport (framing, QuickAck flag,
//! obfuscated2) to build wire bytes and read the server's.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use mtproto_core::crypto::{handshake_key_iv, ige_encrypt, sha1};
use mtproto_core::dh;
use mtproto_core::handshake::{Handshake, HandshakeSettings, Step};
use mtproto_core::pq::{factorize, PqPool};
use mtproto_core::rsa::ServerKey;
use mtproto_core::tl::{id, TlReader, TlWrite};
use mtproto_core::transport::obfuscated2::{self, Obfuscation};
use mtproto_core::transport::FramingKind;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Unix time the targets run at (seconds).
pub const NOW: i64 = 1_800_000_000;

/// Reads choices off the fuzz input; past its end every read gives zeros,
/// so any input is a complete program.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.array())
    }

    pub fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.array())
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }

    /// A length-prefixed chunk: one byte of length (0 = up to 1 KiB more).
    pub fn chunk(&mut self) -> &'a [u8] {
        match self.u8() {
            0 => {
                let n = usize::from(self.u16() % 1024);
                self.take(n)
            }
            n => self.take(usize::from(n)),
        }
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// A deterministic CSPRNG (runs must reproduce).
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The server's RSA key, generated once per process from a fixed seed.
pub fn server_key() -> &'static ServerKey {
    static KEY: OnceLock<ServerKey> = OnceLock::new();
    KEY.get_or_init(|| ServerKey::generate(&mut rng(0x5eed)).expect("keygen"))
}

/// Handshake settings with the one server key and one pq pair, so the
/// client knows p and q without factorizing per run.
pub fn handshake_settings() -> Arc<HandshakeSettings> {
    static SETTINGS: OnceLock<Arc<HandshakeSettings>> = OnceLock::new();
    SETTINGS
        .get_or_init(|| {
            Arc::new(HandshakeSettings {
                keys: vec![server_key().clone()],
                pq_pool: PqPool::generate(1, &mut rng(7)),
                accept_legacy_rsa_padding: true,
                max_temp_key_expires_secs:
                    mtproto_core::handshake::DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS,
                dh_secret_bits: dh::SPEC_SECRET_BITS,
            })
        })
        .clone()
}

/// (p, q, pq) of the pool's one pair.
pub fn pq() -> (u32, u32, u64) {
    static PQ: OnceLock<(u32, u32, u64)> = OnceLock::new();
    *PQ.get_or_init(|| {
        let mut hs = Handshake::new(handshake_settings());
        let Ok(Step::Reply(res_pq)) = hs.on_message(&req_pq_body(false, [0; 16]), NOW, &mut rng(1))
        else {
            panic!("req_pq failed");
        };
        let res = parse_res_pq(&res_pq).expect("resPQ");
        let (p, q) = factorize(res.pq).expect("factorize");
        (p as u32, q as u32, res.pq)
    })
}

/// A valid client g_b (g^b mod p for a fixed b), computed once.
pub fn client_g_b() -> &'static [u8] {
    static G_B: OnceLock<Vec<u8>> = OnceLock::new();
    G_B.get_or_init(|| {
        let (_, g_b) = dh::params()
            .new_secret(dh::SPEC_SECRET_BITS, &mut rng(3));
        g_b.to_bytes_be()
    })
}

pub fn req_pq_body(multi: bool, nonce: [u8; 16]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(20);
    msg.put_u32(if multi { id::REQ_PQ_MULTI } else { id::REQ_PQ });
    msg.put_raw(&nonce);
    msg
}

/// What a client reads from `resPQ`.
#[derive(Debug, Clone, Copy)]
pub struct ResPq {
    pub nonce: [u8; 16],
    pub server_nonce: [u8; 16],
    pub pq: u64,
    pub fingerprint: i64,
}

pub fn parse_res_pq(body: &[u8]) -> Option<ResPq> {
    let mut r = TlReader::new(body);
    r.expect(id::RES_PQ, "resPQ").ok()?;
    let nonce = r.int128().ok()?;
    let server_nonce = r.int128().ok()?;
    let pq_bytes = r.bytes().ok()?;
    if pq_bytes.len() > 8 {
        return None;
    }
    let mut be = [0u8; 8];
    be[8 - pq_bytes.len()..].copy_from_slice(pq_bytes);
    let fingerprints = r.vector_i64(16).ok()?;
    Some(ResPq {
        nonce,
        server_nonce,
        pq: u64::from_be_bytes(be),
        fingerprint: *fingerprints.first()?,
    })
}

/// `p_q_inner_data` (variant 0..=3: plain, _dc, _temp, _temp_dc).
pub fn inner_data(
    variant: u8,
    nonce: &[u8; 16],
    server_nonce: &[u8; 16],
    new_nonce: &[u8; 32],
    dc: i32,
    expires_in: i32,
) -> Vec<u8> {
    let (p, q, pq) = pq();
    let mut d = Vec::with_capacity(96);
    d.put_u32(match variant % 4 {
        0 => id::P_Q_INNER_DATA,
        1 => id::P_Q_INNER_DATA_DC,
        2 => id::P_Q_INNER_DATA_TEMP,
        _ => id::P_Q_INNER_DATA_TEMP_DC,
    });
    d.put_bytes(&pq.to_be_bytes());
    d.put_bytes(&p.to_be_bytes());
    d.put_bytes(&q.to_be_bytes());
    d.put_raw(nonce);
    d.put_raw(server_nonce);
    d.put_raw(new_nonce);
    if variant % 4 == 1 || variant % 4 == 3 {
        d.put_i32(dc);
    }
    if variant % 4 >= 2 {
        d.put_i32(expires_in);
    }
    d
}

pub fn req_dh_params_body(
    nonce: &[u8; 16],
    server_nonce: &[u8; 16],
    fingerprint: i64,
    encrypted: &[u8],
) -> Vec<u8> {
    let (p, q, _) = pq();
    let mut msg = Vec::with_capacity(64 + encrypted.len());
    msg.put_u32(id::REQ_DH_PARAMS);
    msg.put_raw(nonce);
    msg.put_raw(server_nonce);
    msg.put_bytes(&p.to_be_bytes());
    msg.put_bytes(&q.to_be_bytes());
    msg.put_i64(fingerprint);
    msg.put_bytes(encrypted);
    msg
}

/// `client_DH_inner_data` as a client sends it: SHA1, data, padding, then
/// AES-IGE with the key from new_nonce and server_nonce.
pub fn set_client_dh_body(
    nonce: &[u8; 16],
    server_nonce: &[u8; 16],
    new_nonce: &[u8; 32],
    inner: &[u8],
    padding: &[u8],
) -> Vec<u8> {
    let mut data = sha1(&[inner]).to_vec();
    data.extend_from_slice(inner);
    data.extend_from_slice(padding);
    while !data.len().is_multiple_of(16) {
        data.push(0);
    }
    let (key, iv) = handshake_key_iv(new_nonce, server_nonce);
    ige_encrypt(&mut data, &key, &iv);
    let mut msg = Vec::with_capacity(40 + data.len());
    msg.put_u32(id::SET_CLIENT_DH_PARAMS);
    msg.put_raw(nonce);
    msg.put_raw(server_nonce);
    msg.put_bytes(&data);
    msg
}

pub fn client_dh_inner(
    nonce: &[u8; 16],
    server_nonce: &[u8; 16],
    retry_id: i64,
    g_b: &[u8],
) -> Vec<u8> {
    let mut inner = Vec::with_capacity(300);
    inner.put_u32(id::CLIENT_DH_INNER_DATA);
    inner.put_raw(nonce);
    inner.put_raw(server_nonce);
    inner.put_i64(retry_id);
    inner.put_bytes(g_b);
    inner
}

/// The transports a client may pick, by index.
pub const TRANSPORTS: [(FramingKind, bool); 7] = [
    (FramingKind::Abridged, false),
    (FramingKind::Intermediate, false),
    (FramingKind::PaddedIntermediate, false),
    (FramingKind::Full, false),
    (FramingKind::Abridged, true),
    (FramingKind::Intermediate, true),
    (FramingKind::PaddedIntermediate, true),
];

/// A client's side of one transport: frames payloads (with the QuickAck
/// flag where the framing has one), obfuscates, and reads the server's
/// packets back.
#[derive(Debug)]
pub struct ClientWire {
    pub kind: FramingKind,
    obfuscation: Option<Obfuscation>,
    send_seq: u32,
    recv_seq: u32,
    inbound: BytesMut,
}

/// One packet from the server, as a client reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerPacket {
    Frame(Vec<u8>),
    QuickAck(u32),
}

impl ClientWire {
    /// The client and the bytes it opens the connection with.
    pub fn start(kind: FramingKind, obfuscated: bool, random: [u8; 64]) -> (Self, Vec<u8>) {
        if obfuscated {
            let mut random = random;
            // Re-roll what a client never sends first (see detect in core).
            random[0] = 0x11;
            random[4] = 0x22;
            let (init, obfuscation) = obfuscated2::client_init(random, kind, 2);
            let wire = Self {
                kind,
                obfuscation: Some(obfuscation),
                send_seq: 0,
                recv_seq: 0,
                inbound: BytesMut::new(),
            };
            return (wire, init.to_vec());
        }
        let marker = match kind {
            FramingKind::Abridged => vec![0xef],
            FramingKind::Intermediate => vec![0xee; 4],
            FramingKind::PaddedIntermediate => vec![0xdd; 4],
            FramingKind::Full => Vec::new(),
        };
        let wire = Self {
            kind,
            obfuscation: None,
            send_seq: 0,
            recv_seq: 0,
            inbound: BytesMut::new(),
        };
        (wire, marker)
    }

    /// Raw bytes as they go on the wire after this point (obfuscated if so).
    pub fn raw(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        if let Some(o) = &mut self.obfuscation {
            o.encrypt_outbound(&mut out);
        }
        out
    }

    /// One framed payload; `padding` bytes are appended on the padded transport.
    pub fn frame(&mut self, payload: &[u8], quick_ack: bool, padding: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 16);
        let qa = if quick_ack { 0x80 } else { 0 };
        match self.kind {
            FramingKind::Abridged => {
                let words = payload.len() / 4;
                if words < 0x7f {
                    out.push(words as u8 | qa);
                } else {
                    out.push(0x7f | qa);
                    out.extend_from_slice(&(words as u32).to_le_bytes()[..3]);
                }
                out.extend_from_slice(&payload[..words * 4]);
            }
            FramingKind::Intermediate => {
                out.extend_from_slice(&(payload.len() as u32 | u32::from(qa) << 24).to_le_bytes());
                out.extend_from_slice(payload);
            }
            FramingKind::PaddedIntermediate => {
                let pad = &padding[..padding.len().min(15)];
                out.extend_from_slice(
                    &((payload.len() + pad.len()) as u32 | u32::from(qa) << 24).to_le_bytes(),
                );
                out.extend_from_slice(payload);
                out.extend_from_slice(pad);
            }
            FramingKind::Full => {
                out.extend_from_slice(&(payload.len() as u32 + 12).to_le_bytes());
                out.extend_from_slice(&(self.send_seq).to_le_bytes());
                out.extend_from_slice(payload);
                let crc = crc32fast::hash(&out);
                out.extend_from_slice(&(crc).to_le_bytes());
                self.send_seq = self.send_seq.wrapping_add(1);
            }
        }
        if let Some(o) = &mut self.obfuscation {
            o.encrypt_outbound(&mut out);
        }
        out
    }

    /// Takes bytes the server wrote; returns the packets now complete, or
    /// `Err` with what the client could not parse (the server broke framing).
    pub fn receive(&mut self, bytes: &[u8]) -> Result<Vec<ServerPacket>, String> {
        let start = self.inbound.len();
        self.inbound.extend_from_slice(bytes);
        if let Some(o) = &mut self.obfuscation {
            o.decrypt_inbound(&mut self.inbound[start..]);
        }
        let mut packets = Vec::new();
        loop {
            let buf = &self.inbound[..];
            let (header, len, quick_ack) = match self.kind {
                FramingKind::Abridged => {
                    let Some(&first) = buf.first() else { break };
                    if first & 0x80 != 0 {
                        (0, 4, true)
                    } else if first == 0x7f {
                        if buf.len() < 4 {
                            break;
                        }
                        let words = u32::from_le_bytes([buf[1], buf[2], buf[3], 0]) as usize;
                        (4, words * 4, false)
                    } else {
                        (1, usize::from(first) * 4, false)
                    }
                }
                FramingKind::Intermediate | FramingKind::PaddedIntermediate => {
                    if buf.len() < 4 {
                        break;
                    }
                    let raw = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    if raw & 0x8000_0000 != 0 {
                        (0, 4, true)
                    } else {
                        (4, raw as usize, false)
                    }
                }
                FramingKind::Full => {
                    if buf.len() < 4 {
                        break;
                    }
                    let total = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if total < 12 {
                        return Err(format!("full packet of {total} bytes"));
                    }
                    if buf.len() < total {
                        break;
                    }
                    let seq = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    let crc =
                        u32::from_le_bytes(buf[total - 4..total].try_into().unwrap_or([0; 4]));
                    if seq != self.recv_seq || crc32fast::hash(&buf[..total - 4]) != crc {
                        return Err("full packet with bad seq or crc".into());
                    }
                    self.recv_seq += 1;
                    let payload = buf[8..total - 4].to_vec();
                    let _ = self.inbound.split_to(total);
                    packets.push(ServerPacket::Frame(payload));
                    continue;
                }
            };
            if buf.len() < header + len {
                break;
            }
            let packet = self.inbound.split_to(header + len);
            if quick_ack {
                let token = match self.kind {
                    FramingKind::Abridged => {
                        u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]])
                    }
                    _ => u32::from_le_bytes([packet[0], packet[1], packet[2], packet[3]]),
                };
                packets.push(ServerPacket::QuickAck(token));
            } else {
                packets.push(ServerPacket::Frame(packet[header..].to_vec()));
            }
        }
        Ok(packets)
    }
}
