//! The auth key creation handshake as a per-connection state machine:
//! `req_pq(_multi)` → `resPQ`, `req_DH_params` → `server_DH_params_ok`,
//! `set_client_DH_params` → (store the key) → `dh_gen_ok | dh_gen_retry | dh_gen_fail`.
//!
//! Every check the spec asks for is made; any failure is an error the caller
//! answers by closing the connection. Time and randomness come from the caller.

use std::sync::Arc;

use rand::{CryptoRng, RngCore};
use rsa::BigUint;
use thiserror::Error;
use zeroize::Zeroizing;

use super::crypto::{handshake_key_iv, ige_decrypt, ige_encrypt, sha1};
use super::dh;
use super::pq::{be_u64, PqPair, PqPool};
use super::rsa::{left_pad_256, unpad, Padding, RsaDecryptError, ServerKey};
use super::tl::{id, TlError, TlReader, TlWrite};
use crate::authkey::{AuthKey, AuthKeyInfo, AuthKeyType, FutureSalt};

/// How long the first server salt is valid.
pub const FIRST_SALT_LIFETIME_SECS: i64 = 1800;

/// Default of [`HandshakeSettings::max_temp_key_expires_secs`]: a day.
pub const DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS: i32 = 86_400;

/// Server keys offered in `resPQ`; the first is the primary.
#[derive(Debug)]
pub struct HandshakeSettings {
    pub keys: Vec<ServerKey>,
    pub pq_pool: PqPool,
    /// Accept `p_q_inner_data` padded the pre-RSA_PAD way (SHA1 | data | padding),
    /// as Telethon and other older clients still send it.
    pub accept_legacy_rsa_padding: bool,
    /// A temp key lives at most this long, whatever `expires_in` its client
    /// asked for (the client learns of the earlier end from −404, and makes
    /// a new one, as after any expiry).
    pub max_temp_key_expires_secs: i32,
    /// Length of the server's DH secret `a` ([`dh::SPEC_SECRET_BITS`] by default).
    pub dh_secret_bits: u32,
}

impl HandshakeSettings {
    fn key(&self, fingerprint: i64) -> Option<&ServerKey> {
        self.keys.iter().find(|k| k.fingerprint() == fingerprint)
    }
}

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("malformed handshake message: {0}")]
    Tl(#[from] TlError),
    #[error("{0} is not expected in handshake state {1}")]
    OutOfOrder(&'static str, &'static str),
    #[error("unexpected handshake constructor {0:#010x}")]
    UnknownConstructor(u32),
    #[error("nonce or server_nonce does not match this handshake")]
    NonceMismatch,
    #[error("p and q do not factor the pq this server sent")]
    BadPq,
    #[error("no server key with fingerprint {0:#018x}")]
    UnknownFingerprint(i64),
    #[error("encrypted_data: {0}")]
    Rsa(#[from] RsaDecryptError),
    #[error("inner data fields disagree with the outer request")]
    InnerMismatch,
    #[error("temp key with expires_in {0}")]
    BadExpiresIn(i32),
    #[error("encrypted_data of set_client_DH_params has bad length {0}")]
    BadClientDhLength(usize),
    #[error("SHA1 of client_DH_inner_data does not match")]
    BadClientDhHash,
    #[error("retry_id {got} does not match the previous attempt's {expected}")]
    BadRetryId { expected: i64, got: i64 },
    #[error("g_b is outside the allowed range")]
    GbOutOfRange,
    /// OpenSSL failed (allocation): not the client's fault, but the handshake ends.
    #[error("crypto library: {0}")]
    Crypto(String),
}

impl HandshakeError {
    /// The step that failed, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Tl(_) => "malformed",
            HandshakeError::OutOfOrder(..) => "out_of_order",
            HandshakeError::UnknownConstructor(_) => "unknown_constructor",
            HandshakeError::NonceMismatch => "nonce_mismatch",
            HandshakeError::BadPq => "bad_pq",
            HandshakeError::UnknownFingerprint(_) => "unknown_fingerprint",
            HandshakeError::Rsa(_) => "rsa",
            HandshakeError::InnerMismatch => "inner_mismatch",
            HandshakeError::BadExpiresIn(_) => "bad_expires_in",
            HandshakeError::BadClientDhLength(_) => "bad_client_dh_length",
            HandshakeError::BadClientDhHash => "bad_client_dh_hash",
            HandshakeError::BadRetryId { .. } => "bad_retry_id",
            HandshakeError::GbOutOfRange => "g_b_out_of_range",
            HandshakeError::Crypto(_) => "crypto",
        }
    }
}

/// A key the handshake created, to be stored before the client is told.
#[derive(Debug, Clone)]
pub struct NewAuthKey {
    pub info: AuthKeyInfo,
    pub first_salt: FutureSalt,
    /// `expires_in` of a temp key, as the client asked.
    pub expires_in: i32,
    /// DC id from `p_q_inner_data_dc`/`_temp_dc`, if the client sent one.
    pub dc: Option<i32>,
}

/// What the caller must do next.
#[derive(Debug)]
pub enum Step {
    /// Send this TL body as an unencrypted message.
    Reply(Vec<u8>),
    /// Store this key, then call [`Handshake::on_store_result`].
    StoreKey(NewAuthKey),
    /// Nothing to send (e.g. `msgs_ack` during the handshake).
    Nothing,
}

/// How storing the new key went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// The id already exists: the client must retry with a new g_b.
    Collision,
    /// The store failed: the client must start over.
    Failed,
}

struct Exchange {
    nonce: [u8; 16],
    server_nonce: [u8; 16],
    new_nonce: Zeroizing<[u8; 32]>,
    a: dh::DhSecret,
    key_type: AuthKeyType,
    expires_in: i32,
    dc: Option<i32>,
    tmp_key: Zeroizing<[u8; 32]>,
    tmp_iv: Zeroizing<[u8; 32]>,
    /// aux hash of the key from the previous attempt, after a `dh_gen_retry`.
    retry_aux_hash: Option<[u8; 8]>,
}

enum State {
    Idle,
    PqSent {
        nonce: [u8; 16],
        server_nonce: [u8; 16],
        pq: PqPair,
    },
    DhSent(Box<Exchange>),
    Storing(Box<Exchange>, AuthKey),
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::PqSent { .. } => "pq_sent",
            State::DhSent(_) => "dh_params_sent",
            State::Storing(..) => "storing_key",
            State::Done => "done",
        }
    }
}

/// One connection's handshake.
pub struct Handshake {
    settings: Arc<HandshakeSettings>,
    state: State,
    /// How long the last RSA private-key operation took: a reading for
    /// metrics, never an input to the protocol.
    rsa_decrypt_time: Option<std::time::Duration>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("state", &self.state.name())
            .finish()
    }
}

impl Handshake {
    pub fn new(settings: Arc<HandshakeSettings>) -> Self {
        Self {
            settings,
            state: State::Idle,
            rsa_decrypt_time: None,
        }
    }

    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// The duration of the RSA operation of the last `req_DH_params`, once.
    pub fn take_rsa_decrypt_time(&mut self) -> Option<std::time::Duration> {
        self.rsa_decrypt_time.take()
    }

    /// The constructor of a handshake message (to tell cheap from heavy steps).
    pub fn constructor(body: &[u8]) -> Option<u32> {
        TlReader::new(body).u32().ok()
    }

    /// Handles one unencrypted message body. `now` is unix time in seconds.
    pub fn on_message(
        &mut self,
        body: &[u8],
        now: i64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Step, HandshakeError> {
        let mut r = TlReader::new(body);
        let constructor = r.u32()?;
        match constructor {
            id::REQ_PQ | id::REQ_PQ_MULTI => self.req_pq(&mut r, rng),
            id::REQ_DH_PARAMS => self.req_dh_params(&mut r, now, rng),
            id::SET_CLIENT_DH_PARAMS => self.set_client_dh_params(&mut r, now),
            id::MSGS_ACK => Ok(Step::Nothing),
            other => Err(HandshakeError::UnknownConstructor(other)),
        }
    }

    fn req_pq(
        &mut self,
        r: &mut TlReader<'_>,
        rng: &mut impl RngCore,
    ) -> Result<Step, HandshakeError> {
        if let State::Storing(..) = self.state {
            return Err(HandshakeError::OutOfOrder("req_pq", self.state.name()));
        }
        let nonce = r.int128()?;
        let mut server_nonce = [0u8; 16];
        rng.fill_bytes(&mut server_nonce);
        let pq = self.settings.pq_pool.pick(rng);
        let mut out = Vec::with_capacity(64 + 8 * self.settings.keys.len());
        out.put_u32(id::RES_PQ);
        out.put_raw(&nonce);
        out.put_raw(&server_nonce);
        out.put_bytes(&pq.pq().to_be_bytes());
        out.put_u32(id::VECTOR);
        out.put_u32(self.settings.keys.len() as u32);
        for key in &self.settings.keys {
            out.put_i64(key.fingerprint());
        }
        self.state = State::PqSent {
            nonce,
            server_nonce,
            pq,
        };
        Ok(Step::Reply(out))
    }

    fn req_dh_params(
        &mut self,
        r: &mut TlReader<'_>,
        now: i64,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Step, HandshakeError> {
        let State::PqSent {
            nonce,
            server_nonce,
            pq,
        } = self.state
        else {
            return Err(HandshakeError::OutOfOrder(
                "req_DH_params",
                self.state.name(),
            ));
        };
        if r.int128()? != nonce || r.int128()? != server_nonce {
            return Err(HandshakeError::NonceMismatch);
        }
        let p = r.bytes()?;
        let q = r.bytes()?;
        if be_u64(p) != Some(u64::from(pq.p)) || be_u64(q) != Some(u64::from(pq.q)) {
            return Err(HandshakeError::BadPq);
        }
        let fingerprint = r.i64()?;
        let encrypted = r.bytes()?;
        let key = self
            .settings
            .key(fingerprint)
            .ok_or(HandshakeError::UnknownFingerprint(fingerprint))?;
        let started = std::time::Instant::now();
        let m = key.decrypt_raw(encrypted);
        self.rsa_decrypt_time = Some(started.elapsed());
        let m = m?;
        let (inner_bytes, _padding): (Zeroizing<Vec<u8>>, Padding) =
            unpad(&m, self.settings.accept_legacy_rsa_padding, |b| {
                parse_inner(b).ok().map(|(_, len)| len)
            })?;
        let (inner, _) = parse_inner(&inner_bytes)?;
        if inner.nonce != nonce
            || inner.server_nonce != server_nonce
            || be_u64(inner.pq) != Some(pq.pq())
            || be_u64(inner.p) != Some(u64::from(pq.p))
            || be_u64(inner.q) != Some(u64::from(pq.q))
        {
            return Err(HandshakeError::InnerMismatch);
        }
        let key_type = match (inner.expires_in, inner.dc) {
            (None, _) => AuthKeyType::Perm,
            (Some(_), Some(dc)) if dc < 0 => AuthKeyType::MediaTemp,
            (Some(_), _) => AuthKeyType::Temp,
        };
        let expires_in = inner.expires_in.unwrap_or(0);
        if key_type != AuthKeyType::Perm && expires_in <= 0 {
            return Err(HandshakeError::BadExpiresIn(expires_in));
        }
        let expires_in = expires_in.min(self.settings.max_temp_key_expires_secs);

        let params = dh::params();
        let (a, g_a) = params.new_secret(self.settings.dh_secret_bits, rng);
        let mut dh_inner = Vec::with_capacity(600);
        dh_inner.put_u32(id::SERVER_DH_INNER_DATA);
        dh_inner.put_raw(&nonce);
        dh_inner.put_raw(&server_nonce);
        dh_inner.put_u32(dh::G);
        dh_inner.put_bytes(&params.prime_bytes);
        dh_inner.put_bytes(&left_pad_256(&g_a.to_bytes_be()));
        dh_inner.put_i32(crate::tl::date(now));

        let mut answer = Vec::with_capacity(dh_inner.len() + 36);
        answer.put_raw(&sha1(&[&dh_inner]));
        answer.put_raw(&dh_inner);
        let padding = (16 - answer.len() % 16) % 16;
        let pad_at = answer.len();
        answer.resize(pad_at + padding, 0);
        rng.fill_bytes(&mut answer[pad_at..]);
        let (tmp_key, tmp_iv) = handshake_key_iv(&inner.new_nonce, &server_nonce);
        ige_encrypt(&mut answer, &tmp_key, &tmp_iv);

        let mut out = Vec::with_capacity(answer.len() + 48);
        out.put_u32(id::SERVER_DH_PARAMS_OK);
        out.put_raw(&nonce);
        out.put_raw(&server_nonce);
        out.put_bytes(&answer);
        self.state = State::DhSent(Box::new(Exchange {
            nonce,
            server_nonce,
            new_nonce: Zeroizing::new(inner.new_nonce),
            a,
            key_type,
            expires_in,
            dc: inner.dc,
            tmp_key,
            tmp_iv,
            retry_aux_hash: None,
        }));
        Ok(Step::Reply(out))
    }

    fn set_client_dh_params(
        &mut self,
        r: &mut TlReader<'_>,
        now: i64,
    ) -> Result<Step, HandshakeError> {
        let State::DhSent(ex) = &self.state else {
            return Err(HandshakeError::OutOfOrder(
                "set_client_DH_params",
                self.state.name(),
            ));
        };
        if r.int128()? != ex.nonce || r.int128()? != ex.server_nonce {
            return Err(HandshakeError::NonceMismatch);
        }
        let encrypted = r.bytes()?;
        if encrypted.len() < 48 || encrypted.len() % 16 != 0 {
            return Err(HandshakeError::BadClientDhLength(encrypted.len()));
        }
        let mut plain = encrypted.to_vec();
        ige_decrypt(&mut plain, &ex.tmp_key, &ex.tmp_iv);
        let (hash, data) = plain.split_at(20);
        let mut inner = TlReader::new(data);
        inner.expect(id::CLIENT_DH_INNER_DATA, "client_DH_inner_data")?;
        let nonce = inner.int128()?;
        let server_nonce = inner.int128()?;
        let retry_id = inner.i64()?;
        let g_b = BigUint::from_bytes_be(inner.bytes()?);
        let inner_len = inner.position();
        if sha1(&[&data[..inner_len]])[..] != hash[..] || data.len() - inner_len >= 16 {
            return Err(HandshakeError::BadClientDhHash);
        }
        if nonce != ex.nonce || server_nonce != ex.server_nonce {
            return Err(HandshakeError::NonceMismatch);
        }
        let expected_retry = ex.retry_aux_hash.map_or(0, i64::from_le_bytes);
        if retry_id != expected_retry {
            return Err(HandshakeError::BadRetryId {
                expected: expected_retry,
                got: retry_id,
            });
        }
        let params = dh::params();
        if !params.in_safe_range(&g_b) {
            return Err(HandshakeError::GbOutOfRange);
        }
        let shared = params
            .shared_key(&g_b, &ex.a)
            .map_err(|e| HandshakeError::Crypto(e.to_string()))?;
        let key = AuthKey::new(*shared);

        let salt = i64::from_le_bytes(std::array::from_fn(|i| {
            ex.new_nonce[i] ^ ex.server_nonce[i]
        }));
        let expires_at = (ex.key_type != AuthKeyType::Perm).then(|| now + i64::from(ex.expires_in));
        let new_key = NewAuthKey {
            info: AuthKeyInfo::new(key.clone(), ex.key_type, expires_at),
            first_salt: FutureSalt::new(now, now + FIRST_SALT_LIFETIME_SECS, salt),
            expires_in: ex.expires_in,
            dc: ex.dc,
        };
        let State::DhSent(ex) = std::mem::replace(&mut self.state, State::Idle) else {
            return Err(HandshakeError::OutOfOrder("set_client_DH_params", "idle"));
        };
        self.state = State::Storing(ex, key);
        Ok(Step::StoreKey(new_key))
    }

    /// Answers the client once the new key's fate is known.
    pub fn on_store_result(&mut self, outcome: StoreOutcome) -> Result<Vec<u8>, HandshakeError> {
        let State::Storing(mut ex, key) = std::mem::replace(&mut self.state, State::Idle) else {
            return Err(HandshakeError::OutOfOrder(
                "store result",
                self.state.name(),
            ));
        };
        let (constructor, number) = match outcome {
            StoreOutcome::Stored => (id::DH_GEN_OK, 1),
            StoreOutcome::Collision => (id::DH_GEN_RETRY, 2),
            StoreOutcome::Failed => (id::DH_GEN_FAIL, 3),
        };
        let aux = key.aux_hash();
        let hash = sha1(&[&ex.new_nonce[..], &[number], &aux]);
        let mut out = Vec::with_capacity(52);
        out.put_u32(constructor);
        out.put_raw(&ex.nonce);
        out.put_raw(&ex.server_nonce);
        out.put_raw(&hash[4..20]);
        self.state = match outcome {
            StoreOutcome::Stored => State::Done,
            StoreOutcome::Collision => {
                ex.retry_aux_hash = Some(aux);
                State::DhSent(ex)
            }
            StoreOutcome::Failed => State::Idle,
        };
        Ok(out)
    }
}

/// Fields of any of the four `p_q_inner_data` variants.
struct InnerData<'a> {
    pq: &'a [u8],
    p: &'a [u8],
    q: &'a [u8],
    nonce: [u8; 16],
    server_nonce: [u8; 16],
    new_nonce: [u8; 32],
    dc: Option<i32>,
    expires_in: Option<i32>,
}

/// Parses a `p_q_inner_data*` and returns it with its encoded length.
fn parse_inner(bytes: &[u8]) -> Result<(InnerData<'_>, usize), TlError> {
    let mut r = TlReader::new(bytes);
    let constructor = r.u32()?;
    let (has_dc, has_expiry) = match constructor {
        id::P_Q_INNER_DATA => (false, false),
        id::P_Q_INNER_DATA_DC => (true, false),
        id::P_Q_INNER_DATA_TEMP => (false, true),
        id::P_Q_INNER_DATA_TEMP_DC => (true, true),
        got => {
            return Err(TlError::UnexpectedConstructor {
                got,
                expected: "p_q_inner_data",
            })
        }
    };
    let inner = InnerData {
        pq: r.bytes()?,
        p: r.bytes()?,
        q: r.bytes()?,
        nonce: r.int128()?,
        server_nonce: r.int128()?,
        new_nonce: r.int256()?,
        dc: if has_dc { Some(r.i32()?) } else { None },
        expires_in: if has_expiry { Some(r.i32()?) } else { None },
    };
    Ok((inner, r.position()))
}

#[cfg(test)]
mod tests;
