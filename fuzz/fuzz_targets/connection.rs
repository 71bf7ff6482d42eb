//! The connection core as a whole: a `Connection` fed client bytes in
//! input-chosen pieces (raw, or framed for the transport the input picks:
//! encrypted messages under fixed keys, handshake messages a client builds
//! from the server's own replies), with input-chosen answers to its actions
//! (key lookups found / not found / failed, handshake jobs run inline, store
//! and forward outcomes), writes, server messages, and time advancing by
//! input-chosen steps with `handle_timeout`.
//!
//! Invariants: no panic (draining included); once closing, no new action;
//! the requests awaiting an answer stay bounded; the server's output
//! is always well framed for the client; a QuickAck never joins a transmit
//! queue already at `max_unsent_bytes`; server messages are only taken
//! below that budget.
#![no_main]

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mtproto_core::authkey::{AuthKey, AuthKeyInfo, AuthKeyType};
use mtproto_core::connection::{
    Action, Attached, Connection, Forwarded, Host, KeyLookup, Now, Settings, MAX_AWAITED,
};
use mtproto_core::handshake::StoreOutcome;
use mtproto_core::message;
use mtproto_core::rsa::encrypt_rsa_pad;
use mtproto_core_fuzz::{
    client_dh_inner, client_g_b, handshake_settings, inner_data, parse_res_pq, req_dh_params_body,
    req_pq_body, rng, server_key, set_client_dh_body, ClientWire, Cursor, ServerPacket, NOW,
    TRANSPORTS,
};

/// Packets the driver looks at per check (the queue may hold more).
const SLICES: usize = 512;

/// The per-address handshake rate, as a budget for the connection; the
/// gateway-wide budgets, with input-chosen room.
struct FuzzHost {
    handshakes_left: u8,
    handshake_slots: u8,
    buffer_left: usize,
}

impl Host for FuzzHost {
    fn allow_handshake(&mut self) -> bool {
        if self.handshakes_left == 0 {
            return false;
        }
        self.handshakes_left -= 1;
        true
    }
    fn begin_handshake(&mut self) -> bool {
        if self.handshake_slots == 0 {
            return false;
        }
        self.handshake_slots -= 1;
        true
    }
    fn end_handshake(&mut self) {
        self.handshake_slots += 1;
    }
    fn attach_session(&mut self, auth_key_id: i64, session_id: i64) -> Attached {
        match (auth_key_id ^ session_id) & 3 {
            0 => Attached::New,
            3 => Attached::KeyFull(3),
            _ => Attached::Known,
        }
    }
    fn buffer_grew(&mut self, bytes: usize) -> bool {
        let Some(left) = self.buffer_left.checked_sub(bytes) else {
            return false;
        };
        self.buffer_left = left;
        true
    }
    fn buffer_shrank(&mut self, bytes: usize) {
        self.buffer_left += bytes;
    }
}

fn info(
    seed: u8,
    key_type: AuthKeyType,
    perm: Option<i64>,
    expires_at: Option<i64>,
) -> Arc<AuthKeyInfo> {
    let key = AuthKey::new(std::array::from_fn(|i| (i as u8).wrapping_mul(seed) ^ seed));
    let mut info = AuthKeyInfo::new(key, key_type, expires_at);
    if let Some(perm) = perm {
        info.perm_auth_key_id = perm;
    }
    Arc::new(info)
}

/// The client's view of its handshake, from the server's replies.
#[derive(Default)]
struct ClientHandshake {
    nonce: [u8; 16],
    server_nonce: Option<[u8; 16]>,
    new_nonce: [u8; 32],
}

struct Driver<'a> {
    c: Cursor<'a>,
    conn: Connection,
    host: FuzzHost,
    rng: rand::rngs::StdRng,
    start: Instant,
    elapsed: Duration,
    settings: Arc<Settings>,
    wire: Option<ClientWire>,
    keys: Vec<Arc<AuthKeyInfo>>,
    created: Option<Arc<AuthKeyInfo>>,
    waiting: VecDeque<Action>,
    forwards: usize,
    client_hs: ClientHandshake,
    closed: bool,
}

impl Driver<'_> {
    fn now(&self) -> Now {
        Now {
            instant: self.start + self.elapsed,
            unix: Duration::from_secs(NOW as u64) + self.elapsed,
        }
    }

    /// Transmit queue: (packet lengths, total bytes), first SLICES packets.
    fn queue(&mut self) -> (Vec<usize>, usize) {
        let mut slices = [IoSlice::new(&[]); SLICES];
        let (_, n) = self.conn.io_buffers(&mut slices);
        let lens: Vec<usize> = slices[..n].iter().map(|s| s.len()).collect();
        let total = lens.iter().sum();
        (lens, total)
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut slices = [IoSlice::new(&[])];
        self.conn.io_buffers(&mut slices).0.extend_from_slice(bytes);
        let now = self.now();
        self.conn
            .handle_input(bytes.len(), now, &mut self.host, &mut self.rng);
    }

    /// A payload framed for the transport (raw when the input chose none).
    fn send(&mut self, payload: &[u8], quick_ack: bool) {
        let pad_len = usize::from(self.c.u8() % 16);
        let padding = self.c.take(pad_len).to_vec();
        let bytes = match &mut self.wire {
            Some(wire) => wire.frame(payload, quick_ack, &padding),
            None => payload.to_vec(),
        };
        // Sometimes in two pieces.
        let cut = usize::from(self.c.u8()).min(bytes.len());
        self.feed(&bytes[..cut]);
        self.feed(&bytes[cut..]);
    }

    fn encrypted(&mut self) {
        let which = usize::from(self.c.u8());
        let key = match (&self.created, which % (self.keys.len() + 1)) {
            (Some(created), i) if i == self.keys.len() => created.clone(),
            (_, i) => self.keys[i % self.keys.len()].clone(),
        };
        let session_id = i64::from(self.c.u8() % 4);
        let (salt, msg_id, seq_no) = (self.c.i64(), self.c.i64(), self.c.i32());
        let body = self.c.chunk();
        let body = &body[..body.len() / 4 * 4];
        let plaintext = message::plaintext_message(salt, session_id, msg_id, seq_no, body);
        let padding =
            12 + (16 - (plaintext.len() + 12) % 16) % 16 + 16 * usize::from(self.c.u8() % 4);
        let mut frame = message::encrypt_as_client(&key.key, &plaintext, padding, &mut self.rng);
        if self.c.u8().is_multiple_of(16) {
            let at = usize::from(self.c.u8()) % frame.len();
            frame[at] ^= 1;
        }
        let quick_ack = self.c.bool();
        let repeat = 1 + usize::from(self.c.u8() % 4) * usize::from(self.c.u8() % 16);
        for _ in 0..repeat {
            self.send(&frame, quick_ack);
        }
    }

    fn handshake_message(&mut self) {
        let body = match self.c.u8() % 4 {
            0 => {
                self.client_hs.nonce = self.c.array();
                req_pq_body(self.c.bool(), self.client_hs.nonce)
            }
            1 => {
                let Some(server_nonce) = self.client_hs.server_nonce else {
                    return;
                };
                self.client_hs.new_nonce = self.c.array();
                let variant = self.c.u8();
                let expires_in = i32::from(self.c.u8()) * 60 - 60;
                let nonce = self.client_hs.nonce;
                let inner = inner_data(
                    variant,
                    &nonce,
                    &server_nonce,
                    &self.client_hs.new_nonce,
                    2,
                    expires_in,
                );
                let Some(encrypted) =
                    encrypt_rsa_pad(&server_key().public_key(), &inner, &mut self.rng)
                else {
                    return;
                };
                req_dh_params_body(
                    &nonce,
                    &server_nonce,
                    server_key().fingerprint(),
                    &encrypted,
                )
            }
            2 => {
                let Some(server_nonce) = self.client_hs.server_nonce else {
                    return;
                };
                let nonce = self.client_hs.nonce;
                let retry_id = if self.c.u8().is_multiple_of(4) {
                    self.c.i64()
                } else {
                    0
                };
                let inner = client_dh_inner(&nonce, &server_nonce, retry_id, client_g_b());
                set_client_dh_body(
                    &nonce,
                    &server_nonce,
                    &self.client_hs.new_nonce,
                    &inner,
                    &[],
                )
            }
            _ => self.c.chunk().to_vec(),
        };
        let msg_id = (NOW << 32) + i64::from(self.c.u16()) * 4;
        let plain = message::encode_plain(msg_id, &body);
        self.send(&plain, false);
    }

    /// Answers the oldest lookup, computation or store.
    fn answer(&mut self) {
        let Some(action) = self.waiting.pop_front() else {
            return;
        };
        let now = self.now();
        match action {
            Action::LookupKey(id) => {
                let known = self
                    .keys
                    .iter()
                    .chain(self.created.iter())
                    .find(|k| k.id() == id)
                    .cloned();
                let lookup = match (self.c.u8() % 4, known) {
                    (0, _) => KeyLookup::NotFound,
                    (1, _) => KeyLookup::Failed("store down".into()),
                    (_, Some(info)) => KeyLookup::Found(info),
                    (_, None) => KeyLookup::NotFound,
                };
                self.conn
                    .handle_key(lookup, now, &mut self.host, &mut self.rng);
            }
            Action::Compute(mut job) => {
                job.run(&mut self.rng);
                self.conn
                    .handle_computed(job, now, &mut self.host, &mut self.rng);
            }
            Action::StoreKey(new_key) => {
                let outcome = match self.c.u8() % 4 {
                    0 => StoreOutcome::Collision,
                    1 => StoreOutcome::Failed,
                    _ => {
                        self.created = Some(Arc::new(new_key.info));
                        StoreOutcome::Stored
                    }
                };
                self.conn
                    .handle_stored(outcome, now, &mut self.host, &mut self.rng);
            }
            Action::ForgetKey(_) | Action::Forward(_) => {}
        }
    }

    fn forwarded(&mut self) {
        if self.forwards == 0 {
            return;
        }
        self.forwards -= 1;
        let outcome = match self.c.u8() % 8 {
            0 => Forwarded::UnknownKey,
            1 => Forwarded::Failed("unavailable".into()),
            _ => Forwarded::Accepted,
        };
        let now = self.now();
        self.conn
            .handle_forwarded(outcome, now, &mut self.host, &mut self.rng);
    }

    /// The client reads up to n bytes of what the server queued.
    fn write(&mut self, n: usize) {
        let mut slices = [IoSlice::new(&[]); 64];
        let (_, count) = self.conn.io_buffers(&mut slices);
        let bytes: Vec<u8> = slices[..count]
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        let n = n.min(bytes.len());
        if n == 0 {
            return;
        }
        let at = self.now().instant;
        self.conn.handle_written(n, at);
        let Some(wire) = &mut self.wire else { return };
        let packets = wire
            .receive(&bytes[..n])
            .expect("the server's output is well framed");
        for packet in packets {
            let ServerPacket::Frame(payload) = packet else {
                continue;
            };
            if payload.len() == 4 {
                continue; // a transport error code
            }
            if message::auth_key_id(&payload) != Ok(0) {
                continue;
            }
            let plain = message::parse_plain(&payload, true).expect("handshake replies parse");
            if let Some(res) = parse_res_pq(plain.body) {
                // The nonce of the last req_pq (the input may send its own).
                self.client_hs.nonce = res.nonce;
                self.client_hs.server_nonce = Some(res.server_nonce);
            }
        }
    }

    fn step(&mut self) {
        self.step_once();
        // What a connection owes the client is bounded whatever it sent.
        assert!(self.conn.awaited_replies() <= MAX_AWAITED);
    }

    fn step_once(&mut self) {
        let now = self.now();
        match self.c.u8() % 16 {
            0 | 1 => {
                let chunk = self.c.chunk();
                let bytes = match &mut self.wire {
                    Some(wire) => wire.raw(chunk),
                    None => chunk.to_vec(),
                };
                self.feed(&bytes);
            }
            2..=4 => self.encrypted(),
            5 | 6 => self.handshake_message(),
            7 | 8 => self.answer(),
            9 | 10 => self.forwarded(),
            11 => {
                const STEPS_MS: [u64; 8] =
                    [1, 100, 1_000, 4_000, 6_000, 11_000, 101_000, 3_601_000];
                self.elapsed += Duration::from_millis(STEPS_MS[usize::from(self.c.u8() % 8)]);
                if self
                    .conn
                    .poll_timeout()
                    .is_some_and(|at| at <= self.now().instant)
                    || self.c.bool()
                {
                    let now = self.now();
                    self.conn.handle_timeout(now, &mut self.rng);
                }
            }
            12 | 13 => {
                let n = usize::from(self.c.u16());
                self.write(n);
            }
            14 => {
                if self.conn.accepts_server_messages() {
                    let mut plaintext = message::plaintext_message(1, 0, 5, 1, self.c.chunk());
                    plaintext.truncate(plaintext.len() / 4 * 4);
                    let sent = self
                        .conn
                        .send_server_message(&plaintext, now, &mut self.rng);
                    assert_eq!(sent, self.conn.key().is_some());
                }
            }
            _ => match self.c.u8() {
                0 => self.conn.close(
                    mtproto_core::connection::Close::ClientClosed,
                    now,
                    &mut self.rng,
                ),
                1 => self.conn.drain(),
                _ => {}
            },
        }
    }
}

/// FUZZ_TRACE=1 prints the driver's state after each step (to check seeds).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let seed = c.u8();
    let choice = usize::from(c.u8() % 8);
    let settings = Arc::new(Settings {
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(100),
        write_timeout: Duration::from_secs(5),
        max_frame_bytes: 1 << 14,
        max_sessions: 1 + usize::from(c.u8() % 3),
        forward_window: 1 + usize::from(c.u8() % 4),
        max_unsent_bytes: 64 << (c.u8() % 7),
        frame_timeout: Duration::from_secs(1 + u64::from(c.u8() % 30)),
    });
    let start = Instant::now();
    let perm = info(3, AuthKeyType::Perm, None, None);
    let keys = vec![
        perm.clone(),
        info(5, AuthKeyType::Temp, None, Some(NOW + 3600)),
        info(7, AuthKeyType::Temp, Some(perm.id()), Some(NOW + 30)),
        info(9, AuthKeyType::MediaTemp, Some(perm.id()), Some(NOW - 1)),
    ];
    let mut d = Driver {
        conn: Connection::new(
            settings.clone(),
            handshake_settings(),
            BytesMut::new(),
            start,
        ),
        host: FuzzHost {
            handshakes_left: c.u8() % 8,
            handshake_slots: c.u8() % 3,
            buffer_left: usize::from(c.u16()) * 4,
        },
        c,
        rng: rng(u64::from(seed)),
        start,
        elapsed: Duration::ZERO,
        settings,
        wire: None,
        keys,
        created: None,
        waiting: VecDeque::new(),
        forwards: 0,
        client_hs: ClientHandshake::default(),
        closed: false,
    };
    if let Some(&(kind, obfuscated)) = TRANSPORTS.get(choice) {
        let random = d.c.array();
        let (wire, opening) = ClientWire::start(kind, obfuscated, random);
        d.wire = Some(wire);
        d.feed(&opening);
    }

    for _ in 0..96 {
        if d.c.is_empty() {
            break;
        }
        let (before, before_total) = d.queue();
        d.step();
        if trace() {
            eprintln!(
                "queue {:?} waiting {:?} forwards {} closing {:?} created {}",
                d.queue(),
                d.waiting
                    .iter()
                    .map(std::mem::discriminant)
                    .collect::<Vec<_>>(),
                d.forwards,
                d.conn.closing(),
                d.created.is_some()
            );
        }
        // Actions: none once closing (those queued before the close aside).
        while let Some(action) = d.conn.poll_action() {
            assert!(!d.closed, "action {action:?} after the connection closed");
            match action {
                Action::Forward(_) => d.forwards += 1,
                Action::ForgetKey(_) => {}
                other => d.waiting.push_back(other),
            }
        }
        while d.conn.poll_event().is_some() {}
        if d.conn.closing().is_some() {
            d.closed = true;
        }
        // What joined the queue: a QuickAck (the only 4-byte packet) only
        // below the budget. Writes and write timeouts only take packets away.
        let (after, _) = d.queue();
        if before.len() < SLICES
            && after.len() > before.len()
            && after[..before.len()] == before[..]
        {
            let mut unsent = before_total;
            for &len in &after[before.len()..] {
                if len == 4 {
                    assert!(
                        unsent < d.settings.max_unsent_bytes,
                        "QuickAck queued behind {unsent} unsent bytes (budget {})",
                        d.settings.max_unsent_bytes
                    );
                }
                unsent += len;
            }
        }
        if d.conn.accepts_server_messages() {
            assert!(d.queue().1 < d.settings.max_unsent_bytes || after.len() >= SLICES);
        }
    }
});
