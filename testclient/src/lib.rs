//! A minimal MTProto client over the intermediate transport: creates perm
//! and temp auth keys (RSA_PAD) and exchanges encrypted messages. It drives
//! the load generator and the tests that need what third-party clients do not
//! offer (temp keys and `auth.bindTempAuthKey`).

use std::net::SocketAddr;

use rsa::RsaPublicKey;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use mtproto_core::authkey::AuthKey;
use mtproto_core::crypto::{handshake_key_iv, ige_decrypt, ige_encrypt, sha1};
use mtproto_core::dh;
use mtproto_core::message::{
    decrypt_as_server_reply, encode_plain, encrypt_as_client, plaintext_message,
};
use mtproto_core::pq::{be_u64, factorize};
use mtproto_core::rsa::{encrypt_rsa_pad, fingerprint};
use mtproto_core::tl::{id, TlReader, TlWrite};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("server sent transport error {0}")]
    TransportError(i32),
    #[error("protocol: {0}")]
    Protocol(String),
}

fn protocol(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

/// A key this client created, with the first salt the server derived.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key: AuthKey,
    pub salt: i64,
}

/// What the client knows mid-handshake.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    pub nonce: [u8; 16],
    pub server_nonce: [u8; 16],
    pub new_nonce: [u8; 32],
    pub pq: u64,
    pub p: u64,
    pub q: u64,
}

pub fn req_pq_multi(nonce: &[u8; 16]) -> Vec<u8> {
    let mut req = Vec::with_capacity(20);
    req.put_u32(id::REQ_PQ_MULTI);
    req.put_raw(nonce);
    req
}

/// `req_DH_params` with `p_q_inner_data_dc` (or `_temp_dc` with `expires_in`)
/// encrypted with RSA_PAD for `server`.
pub fn req_dh_params(ex: &Exchange, server: &RsaPublicKey, temp: Option<i32>) -> Option<Vec<u8>> {
    let mut inner = Vec::with_capacity(128);
    inner.put_u32(if temp.is_some() {
        id::P_Q_INNER_DATA_TEMP_DC
    } else {
        id::P_Q_INNER_DATA_DC
    });
    inner.put_bytes(&ex.pq.to_be_bytes());
    inner.put_bytes(&(ex.p as u32).to_be_bytes());
    inner.put_bytes(&(ex.q as u32).to_be_bytes());
    inner.put_raw(&ex.nonce);
    inner.put_raw(&ex.server_nonce);
    inner.put_raw(&ex.new_nonce);
    inner.put_i32(2);
    if let Some(expires_in) = temp {
        inner.put_i32(expires_in);
    }
    let encrypted = encrypt_rsa_pad(server, &inner, &mut rand::thread_rng())?;
    let mut req = Vec::with_capacity(320);
    req.put_u32(id::REQ_DH_PARAMS);
    req.put_raw(&ex.nonce);
    req.put_raw(&ex.server_nonce);
    req.put_bytes(&(ex.p as u32).to_be_bytes());
    req.put_bytes(&(ex.q as u32).to_be_bytes());
    req.put_i64(fingerprint(server));
    req.put_bytes(&encrypted);
    Some(req)
}

/// `set_client_DH_params` carrying `g_b` (it does not depend on the server's answer).
pub fn set_client_dh_params(ex: &Exchange, g_b: &rsa::BigUint) -> Vec<u8> {
    let mut inner = Vec::with_capacity(300);
    inner.put_u32(id::CLIENT_DH_INNER_DATA);
    inner.put_raw(&ex.nonce);
    inner.put_raw(&ex.server_nonce);
    inner.put_i64(0);
    inner.put_bytes(&g_b.to_bytes_be());
    let mut data = sha1(&[&inner]).to_vec();
    data.extend_from_slice(&inner);
    while !data.len().is_multiple_of(16) {
        data.push(rand::random());
    }
    let (key, iv) = handshake_key_iv(&ex.new_nonce, &ex.server_nonce);
    ige_encrypt(&mut data, &key, &iv);
    let mut req = Vec::with_capacity(data.len() + 48);
    req.put_u32(id::SET_CLIENT_DH_PARAMS);
    req.put_raw(&ex.nonce);
    req.put_raw(&ex.server_nonce);
    req.put_bytes(&data);
    req
}

/// Reads `resPQ` and factors pq: the exchange so far.
pub fn read_res_pq(
    res_pq: &[u8],
    nonce: &[u8; 16],
    server: &RsaPublicKey,
) -> Result<Exchange, ClientError> {
    let tl = |e: mtproto_core::tl::TlError| protocol(e.to_string());
    let mut r = TlReader::new(res_pq);
    r.expect(id::RES_PQ, "resPQ").map_err(tl)?;
    if &r.int128().map_err(tl)? != nonce {
        return Err(protocol("resPQ nonce"));
    }
    let server_nonce = r.int128().map_err(tl)?;
    let pq = be_u64(r.bytes().map_err(tl)?).ok_or_else(|| protocol("pq"))?;
    if !r.vector_i64(64).map_err(tl)?.contains(&fingerprint(server)) {
        return Err(protocol("server does not offer our key"));
    }
    let (p, q) = factorize(pq).ok_or_else(|| protocol("cannot factor pq"))?;
    Ok(Exchange {
        nonce: *nonce,
        server_nonce,
        new_nonce: rand::random(),
        pq,
        p,
        q,
    })
}

#[derive(Debug)]
pub struct Client {
    /// Reads are buffered (a pipelining client reads several frames per
    /// syscall); writes go straight to the socket.
    stream: BufReader<TcpStream>,
    last_msg_id: i64,
    /// Content-related messages sent: the next one's seq_no is twice this
    /// plus one. One count for all sessions of the connection keeps each
    /// session's seq_nos growing with its msg_ids, as the session checks.
    content_sent: i32,
    /// Length of the client's DH secret `b` (the spec's 2048 unless set).
    dh_secret_bits: u32,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Self, ClientError> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&[0xee; 4]).await?;
        Ok(Self {
            stream: BufReader::with_capacity(64 << 10, stream),
            last_msg_id: 0,
            content_sent: 0,
            dh_secret_bits: dh::SPEC_SECRET_BITS,
        })
    }

    /// A shorter client DH secret for handshakes made from now on (a load
    /// generator that wants to spend its CPU on the server's part).
    pub fn set_dh_secret_bits(&mut self, bits: u32) {
        self.dh_secret_bits = bits;
    }

    /// A fresh client msg_id (time-based, divisible by 4, increasing).
    pub fn next_msg_id(&mut self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = ((now.as_secs() as i64) << 32 | i64::from(now.subsec_nanos()) << 2) & !3;
        self.last_msg_id = id.max(self.last_msg_id + 4);
        self.last_msg_id
    }

    pub async fn send_frame(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        self.stream.get_mut().write_all(&frame).await?;
        Ok(())
    }

    pub async fn recv_frame(&mut self) -> Result<Vec<u8>, ClientError> {
        let len = self.stream.read_u32_le().await? as usize;
        if len > 16 << 20 {
            return Err(protocol(format!("frame of {len} bytes")));
        }
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).await?;
        if len == 4 {
            let code = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
            return Err(ClientError::TransportError(code));
        }
        Ok(payload)
    }

    async fn plain_call(&mut self, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        let msg_id = self.next_msg_id();
        self.send_frame(&encode_plain(msg_id, body)).await?;
        let reply = self.recv_frame().await?;
        if reply.len() < 20 {
            return Err(protocol("short handshake reply"));
        }
        Ok(reply[20..].to_vec())
    }

    /// Runs the handshake against `server`; `temp` = Some(expires_in) makes a temp key.
    pub async fn create_key(
        &mut self,
        server: &RsaPublicKey,
        temp: Option<i32>,
    ) -> Result<CreatedKey, ClientError> {
        let nonce: [u8; 16] = rand::random();
        let res_pq = self.plain_call(&req_pq_multi(&nonce)).await?;
        let ex = read_res_pq(&res_pq, &nonce, server)?;
        let (server_nonce, new_nonce) = (ex.server_nonce, ex.new_nonce);
        let tl = |e: mtproto_core::tl::TlError| protocol(e.to_string());
        let req = req_dh_params(&ex, server, temp).ok_or_else(|| protocol("rsa"))?;
        let dh_ok = self.plain_call(&req).await?;
        let mut r = TlReader::new(&dh_ok);
        r.expect(id::SERVER_DH_PARAMS_OK, "server_DH_params_ok")
            .map_err(tl)?;
        r.int128().map_err(tl)?;
        r.int128().map_err(tl)?;
        let mut answer = r.bytes().map_err(tl)?.to_vec();
        let (tmp_key, tmp_iv) = handshake_key_iv(&new_nonce, &server_nonce);
        if answer.len() % 16 != 0 || answer.len() < 32 {
            return Err(protocol("encrypted_answer length"));
        }
        ige_decrypt(&mut answer, &tmp_key, &tmp_iv);
        let mut r = TlReader::new(&answer[20..]);
        r.expect(id::SERVER_DH_INNER_DATA, "server_DH_inner_data")
            .map_err(tl)?;
        r.int128().map_err(tl)?;
        r.int128().map_err(tl)?;
        let g = r.u32().map_err(tl)?;
        let params = dh::params();
        if g != dh::G || r.bytes().map_err(tl)? != &params.prime_bytes[..] {
            return Err(protocol("unexpected DH parameters"));
        }
        let g_a = rsa::BigUint::from_bytes_be(r.bytes().map_err(tl)?);
        if !params.in_safe_range(&g_a) {
            return Err(protocol("g_a out of range"));
        }
        let crypto = |e: openssl::error::ErrorStack| protocol(e.to_string());
        let (b, g_b) = params.new_secret(self.dh_secret_bits, &mut rand::thread_rng());
        let shared = params.shared_key(&g_a, &b).map_err(crypto)?;
        let key = AuthKey::new(*shared);
        let req = set_client_dh_params(&ex, &g_b);
        let answer = self.plain_call(&req).await?;
        let mut r = TlReader::new(&answer);
        r.expect(id::DH_GEN_OK, "dh_gen_ok").map_err(tl)?;
        r.int128().map_err(tl)?;
        r.int128().map_err(tl)?;
        let hash = sha1(&[&new_nonce, &[1], &key.aux_hash()]);
        if r.int128().map_err(tl)?[..] != hash[4..20] {
            return Err(protocol("new_nonce_hash1"));
        }
        let salt = i64::from_le_bytes(std::array::from_fn(|i| new_nonce[i] ^ server_nonce[i]));
        Ok(CreatedKey { key, salt })
    }

    /// Sends one encrypted content-related message (each call takes the
    /// next odd seq_no; callers take msg_ids from [`Client::next_msg_id`]).
    pub async fn send(
        &mut self,
        key: &AuthKey,
        salt: i64,
        session_id: i64,
        msg_id: i64,
        body: &[u8],
    ) -> Result<(), ClientError> {
        let seq_no = self.content_sent.wrapping_mul(2).wrapping_add(1);
        self.content_sent = self.content_sent.wrapping_add(1);
        let plain = plaintext_message(salt, session_id, msg_id, seq_no, body);
        let padding = 12 + (16 - (plain.len() + 12) % 16) % 16;
        let frame = encrypt_as_client(key, &plain, padding, &mut rand::thread_rng());
        self.send_frame(&frame).await
    }

    /// Receives and decrypts one server message: (msg_id, body).
    pub async fn recv(&mut self, key: &AuthKey) -> Result<(i64, Vec<u8>), ClientError> {
        let frame = self.recv_frame().await?;
        let plain = decrypt_as_server_reply(key, &frame)
            .ok_or_else(|| protocol("reply does not decrypt"))?;
        let msg_id = i64::from_le_bytes(plain[16..24].try_into().map_err(|_| protocol("header"))?);
        let len =
            u32::from_le_bytes(plain[28..32].try_into().map_err(|_| protocol("header"))?) as usize;
        let body = plain
            .get(32..32 + len)
            .ok_or_else(|| protocol("length"))?
            .to_vec();
        Ok((msg_id, body))
    }
}
