//! One test per decision of the connection core (the table in
//! docs/architecture.md names them).

use super::*;
use crate::authkey::{AuthKey, AuthKeyType};
use crate::message::encrypt_as_client;
use crate::pq::PqPool;
use crate::rsa::test_key;
use crate::tl::id;
use crate::transport::error_code;

#[derive(Default)]
struct TestHost {
    refuse_handshakes: bool,
    /// Gateway-wide handshake slots; `None`: unlimited.
    handshake_slots: Option<usize>,
    handshakes_in_progress: usize,
    attached: Vec<(i64, i64)>,
    /// Sessions one key may have across connections; `None`: unlimited.
    key_sessions: Option<usize>,
    /// The gateway-wide buffer budget; `None`: unlimited.
    buffer_budget: Option<usize>,
    buffered: usize,
}

impl Host for TestHost {
    fn allow_handshake(&mut self) -> bool {
        !self.refuse_handshakes
    }
    fn begin_handshake(&mut self) -> bool {
        if self
            .handshake_slots
            .is_some_and(|max| self.handshakes_in_progress >= max)
        {
            return false;
        }
        self.handshakes_in_progress += 1;
        true
    }
    fn end_handshake(&mut self) {
        self.handshakes_in_progress -= 1;
    }
    fn attach_session(&mut self, auth_key_id: i64, session_id: i64) -> Attached {
        if self.attached.contains(&(auth_key_id, session_id)) {
            return Attached::Known;
        }
        let of_key = self
            .attached
            .iter()
            .filter(|(key, _)| *key == auth_key_id)
            .count();
        if self.key_sessions.is_some_and(|max| of_key >= max) {
            return Attached::KeyFull(of_key);
        }
        self.attached.push((auth_key_id, session_id));
        Attached::New
    }
    fn buffer_grew(&mut self, bytes: usize) -> bool {
        if self
            .buffer_budget
            .is_some_and(|max| self.buffered + bytes > max)
        {
            return false;
        }
        self.buffered += bytes;
        true
    }
    fn buffer_shrank(&mut self, bytes: usize) {
        self.buffered -= bytes;
    }
}

struct Test {
    conn: Connection,
    host: TestHost,
    start: Instant,
    rng: rand::rngs::ThreadRng,
}

const UNIX: u64 = 1_800_000_000;

fn settings() -> Settings {
    Settings {
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(100),
        write_timeout: Duration::from_secs(5),
        max_frame_bytes: 1 << 20,
        max_sessions: 2,
        forward_window: 2,
        max_unsent_bytes: 4096,
        frame_timeout: Duration::from_secs(20),
    }
}

impl Test {
    fn new() -> Self {
        Self::with(settings())
    }

    fn with(settings: Settings) -> Self {
        let handshake = Arc::new(HandshakeSettings {
            keys: vec![test_key().clone()],
            pq_pool: PqPool::generate(4, &mut rand::thread_rng()),
            accept_legacy_rsa_padding: true,
            max_temp_key_expires_secs: crate::handshake::DEFAULT_MAX_TEMP_KEY_EXPIRES_SECS,
            dh_secret_bits: crate::dh::SPEC_SECRET_BITS,
        });
        let start = Instant::now();
        Self {
            conn: Connection::new(Arc::new(settings), handshake, BytesMut::new(), start),
            host: TestHost::default(),
            start,
            rng: rand::thread_rng(),
        }
    }

    fn at(&self, secs: u64) -> Now {
        Now {
            instant: self.start + Duration::from_secs(secs),
            unix: Duration::from_secs(UNIX + secs),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.feed_at(0, bytes);
    }

    fn feed_at(&mut self, secs: u64, bytes: &[u8]) {
        self.input(bytes);
        let now = self.at(secs);
        self.conn
            .handle_input(bytes.len(), now, &mut self.host, &mut self.rng);
    }

    fn input(&mut self, bytes: &[u8]) {
        let mut slices = [IoSlice::new(&[])];
        self.conn.io_buffers(&mut slices).0.extend_from_slice(bytes);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.conn.poll_action()).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    /// Everything queued for the client, as packets; marks it written.
    fn written(&mut self) -> Vec<Vec<u8>> {
        let mut slices = [IoSlice::new(&[]); 64];
        let (_, n) = self.conn.io_buffers(&mut slices);
        let packets: Vec<Vec<u8>> = slices[..n].iter().map(|s| s.to_vec()).collect();
        let total = packets.iter().map(Vec::len).sum();
        let at = self.at(0).instant;
        self.conn.handle_written(total, at);
        packets
    }

    fn forwarded(&mut self, outcome: Forwarded) {
        let now = self.at(0);
        self.conn
            .handle_forwarded(outcome, now, &mut self.host, &mut self.rng);
    }

    /// Sends the first message (session 1, msg_id 4) on `info` and answers its key lookup.
    fn bind(&mut self, info: &Arc<AuthKeyInfo>) {
        let mut bytes = vec![0xef];
        bytes.extend(abridged(&encrypted(info, 1, 4), false));
        self.feed(&bytes);
        self.key_found(info);
    }

    fn key_found(&mut self, info: &Arc<AuthKeyInfo>) {
        let now = self.at(0);
        self.conn.handle_key(
            KeyLookup::Found(info.clone()),
            now,
            &mut self.host,
            &mut self.rng,
        );
    }
}

/// An abridged frame (the caller sends the 0xef marker once).
fn abridged(payload: &[u8], quick_ack: bool) -> Vec<u8> {
    let words = payload.len() / 4;
    assert!(words < 0x7f);
    let mut out = vec![words as u8 | if quick_ack { 0x80 } else { 0 }];
    out.extend_from_slice(payload);
    out
}

/// What a close with a transport error code writes: one abridged packet.
fn error_packet(code: i32) -> Vec<Vec<u8>> {
    vec![abridged(&code.to_le_bytes(), false)]
}

fn req_pq_multi() -> Vec<u8> {
    req_pq_multi_with((UNIX as i64) << 32)
}

fn req_pq_multi_with(msg_id: i64) -> Vec<u8> {
    let mut msg = vec![0u8; 8];
    msg.extend_from_slice(&msg_id.to_le_bytes());
    msg.extend_from_slice(&20u32.to_le_bytes());
    msg.extend_from_slice(&id::REQ_PQ_MULTI.to_le_bytes());
    msg.extend_from_slice(&[7u8; 16]);
    msg
}

fn key(key_type: AuthKeyType, perm: i64, expires_at: Option<i64>) -> Arc<AuthKeyInfo> {
    let mut bytes = [0u8; 256];
    rand::thread_rng().fill_bytes(&mut bytes);
    let mut info = AuthKeyInfo::new(AuthKey::new(bytes), key_type, expires_at);
    info.perm_auth_key_id = perm;
    Arc::new(info)
}

fn perm_key() -> Arc<AuthKeyInfo> {
    let info = key(AuthKeyType::Perm, 0, None);
    let mut owned = (*info).clone();
    owned.perm_auth_key_id = owned.id();
    Arc::new(owned)
}

/// An encrypted client message of `session_id` with a 4-byte body.
fn encrypted(info: &AuthKeyInfo, session_id: i64, msg_id: i64) -> Vec<u8> {
    let mut plaintext = Vec::new();
    plaintext.extend_from_slice(&42i64.to_le_bytes());
    plaintext.extend_from_slice(&session_id.to_le_bytes());
    plaintext.extend_from_slice(&msg_id.to_le_bytes());
    plaintext.extend_from_slice(&1i32.to_le_bytes());
    plaintext.extend_from_slice(&4u32.to_le_bytes());
    plaintext.extend_from_slice(&[1, 2, 3, 4]);
    encrypt_as_client(&info.key, &plaintext, 12, &mut rand::thread_rng())
}

fn forwards(actions: &[Action]) -> Vec<&Forward> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Forward(f) => Some(f),
            _ => None,
        })
        .collect()
}

#[test]
fn names_the_transport_once_detected() {
    let mut t = Test::new();
    t.feed(&[0xef]);
    assert_eq!(t.events(), vec![Event::Transport("abridged")]);
}

#[test]
fn req_pq_is_answered_with_res_pq() {
    let mut t = Test::new();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&req_pq_multi(), false));
    t.feed(&bytes);
    let packets = t.written();
    assert_eq!(packets.len(), 1);
    // abridged length byte, then auth_key_id 0, msg_id, length, resPQ.
    let reply = &packets[0][1..];
    assert_eq!(&reply[..8], &[0; 8]);
    assert_eq!(&reply[20..24], &id::RES_PQ.to_le_bytes());
    assert!(t.conn.closing().is_none());
}

#[test]
fn handshake_over_the_rate_gets_429_and_closes() {
    let mut t = Test::new();
    t.host.refuse_handshakes = true;
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&req_pq_multi(), false));
    t.feed(&bytes);
    assert!(matches!(t.conn.closing(), Some(Close::HandshakeFlood)));
    let packets = t.written();
    assert_eq!(packets, error_packet(error_code::FLOOD));
    assert!(t.events().contains(&Event::Handshake {
        outcome: "flood",
        elapsed: None
    }));
}

#[test]
fn heavy_handshake_steps_leave_the_thread_and_pause_reading() {
    let mut t = Test::new();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&req_pq_multi(), false));
    t.feed(&bytes);
    t.written();
    // req_DH_params (malformed after the constructor: the step fails when computed).
    let mut msg = vec![0u8; 8];
    msg.extend_from_slice(&((UNIX as i64) << 32 | 4).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&id::REQ_DH_PARAMS.to_le_bytes());
    msg.extend_from_slice(&[0; 4]);
    t.feed(&abridged(&msg, false));
    let mut actions = t.actions();
    let Some(Action::Compute(mut job)) = actions.pop() else {
        panic!("expected a computation, got {actions:?}");
    };
    assert!(!t.conn.wants_read());
    job.run(&mut rand::thread_rng());
    let now = t.at(0);
    t.conn.handle_computed(job, now, &mut t.host, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::Handshake(_))));
    assert!(t.events().iter().any(|e| matches!(
        e,
        Event::HandshakeStep {
            step: "req_DH_params",
            ..
        }
    )));
}

#[test]
fn unknown_key_is_looked_up_then_gets_404() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), false));
    t.feed(&bytes);
    let actions = t.actions();
    assert!(matches!(actions[..], [Action::LookupKey(id)] if id == info.id()));
    assert!(
        !t.conn.wants_read(),
        "a frame waiting for its key holds reading"
    );
    let now = t.at(0);
    t.conn
        .handle_key(KeyLookup::NotFound, now, &mut t.host, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::UnknownKey(_))));
    assert_eq!(t.written(), error_packet(error_code::AUTH_KEY_NOT_FOUND));
}

#[test]
fn failed_lookup_closes_without_404() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), false));
    t.feed(&bytes);
    t.actions();
    let now = t.at(0);
    t.conn.handle_key(
        KeyLookup::Failed("redis down".into()),
        now,
        &mut t.host,
        &mut t.rng,
    );
    assert!(matches!(t.conn.closing(), Some(Close::KeyLookup(_))));
    assert!(t.written().is_empty());
}

#[test]
fn expired_key_gets_404_and_is_forgotten() {
    let mut t = Test::new();
    let info = key(AuthKeyType::Temp, 0, Some(UNIX as i64 - 1));
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), false));
    t.feed(&bytes);
    t.actions();
    t.key_found(&info);
    assert!(matches!(t.conn.closing(), Some(Close::ExpiredKey(_))));
    assert!(matches!(t.actions()[..], [Action::ForgetKey(id)] if id == info.id()));
    assert_eq!(t.written().len(), 1);
}

#[test]
fn found_key_is_bound_and_messages_forwarded_with_conn_type() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), false));
    t.feed(&bytes);
    t.actions();
    t.key_found(&info);
    let actions = t.actions();
    let first = forwards(&actions);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].conn_type, 1, "a session new to the gateway");
    assert_eq!(first[0].session_id, 1);
    assert_eq!(first[0].perm_auth_key_id, info.id());
    assert_eq!(
        &first[0].payload[..8],
        &4i64.to_le_bytes(),
        "msg_id onwards"
    );
    t.forwarded(Forwarded::Accepted);
    // The bound key is not looked up again.
    t.feed(&abridged(&encrypted(&info, 1, 8), false));
    let actions = t.actions();
    let second = forwards(&actions);
    assert_eq!(actions.len(), 1);
    assert_eq!(second[0].conn_type, 0);
}

#[test]
fn quick_ack_goes_out_before_the_session_answers() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), true));
    t.feed(&bytes);
    t.key_found(&info);
    let packets = t.written();
    assert_eq!(packets.len(), 1);
    // Abridged QuickAck: the token big-endian with the high bit set.
    assert_eq!(packets[0].len(), 4);
    assert_eq!(packets[0][0] & 0x80, 0x80);
    assert!(t.events().contains(&Event::QuickAck));
}

/// Found by the `connection` fuzz target: a client that never reads and
/// sends frames asking for QuickAcks queued 4 bytes per frame without bound.
#[test]
fn no_quick_ack_once_the_unsent_budget_is_used() {
    let mut t = Test::with(Settings {
        max_unsent_bytes: 64,
        ..settings()
    });
    let info = perm_key();
    t.bind(&info);
    let now = t.at(0);
    assert!(t.conn.send_server_message(&[5u8; 48], now, &mut t.rng));
    assert!(!t.conn.accepts_server_messages());
    t.forwarded(Forwarded::Accepted);
    t.actions();
    t.events();
    t.feed(&abridged(&encrypted(&info, 1, 8), true));
    assert_eq!(
        forwards(&t.actions()).len(),
        1,
        "the message itself goes on"
    );
    assert!(!t.events().contains(&Event::QuickAck));
    let packets = t.written();
    assert_eq!(packets.len(), 1, "only the server message: {packets:?}");
    // Once written, QuickAcks come back.
    t.forwarded(Forwarded::Accepted);
    t.feed(&abridged(&encrypted(&info, 1, 12), true));
    assert!(t.events().contains(&Event::QuickAck));
}

#[test]
fn reading_pauses_at_the_forward_window_and_resumes_in_order() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    for msg_id in [4, 8, 12] {
        bytes.extend(abridged(&encrypted(&info, 1, msg_id), false));
    }
    t.feed(&bytes);
    t.key_found(&info);
    let actions = t.actions();
    let ids: Vec<i64> = forwards(&actions)
        .iter()
        .map(|f| i64::from_le_bytes(f.payload[..8].try_into().unwrap()))
        .collect();
    assert_eq!(ids, vec![4, 8], "two in flight at a window of 2");
    assert!(!t.conn.wants_read());
    t.forwarded(Forwarded::Accepted);
    let actions = t.actions();
    let ids: Vec<i64> = forwards(&actions)
        .iter()
        .map(|f| i64::from_le_bytes(f.payload[..8].try_into().unwrap()))
        .collect();
    assert_eq!(ids, vec![12]);
}

#[test]
fn session_that_does_not_know_the_key_gets_404() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::UnknownKey);
    assert!(matches!(t.conn.closing(), Some(Close::KeyUnregistered(_))));
    assert_eq!(t.written(), error_packet(error_code::AUTH_KEY_NOT_FOUND));
}

#[test]
fn session_failure_closes_without_an_error_code() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::Failed("unavailable".into()));
    assert!(matches!(t.conn.closing(), Some(Close::Session(_))));
    assert!(t.written().is_empty());
}

#[test]
fn too_many_sessions_close_the_connection() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::Accepted);
    t.feed(&abridged(&encrypted(&info, 2, 8), false));
    t.forwarded(Forwarded::Accepted);
    t.feed(&abridged(&encrypted(&info, 3, 12), false));
    assert!(matches!(t.conn.closing(), Some(Close::TooManySessions(2))));
}

#[test]
fn another_key_on_a_bound_connection_closes_it() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.feed(&abridged(&encrypted(&perm_key(), 1, 8), false));
    assert!(matches!(t.conn.closing(), Some(Close::KeyChanged { .. })));
}

#[test]
fn unbound_temp_key_is_read_again_and_a_failed_read_keeps_it() {
    let mut t = Test::new();
    let temp = key(AuthKeyType::Temp, 0, Some(UNIX as i64 + 3600));
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&temp, 1, 4), false));
    t.feed(&bytes);
    t.key_found(&temp);
    t.actions();
    t.forwarded(Forwarded::Accepted);
    t.feed(&abridged(&encrypted(&temp, 1, 8), false));
    assert!(matches!(t.actions()[..], [Action::LookupKey(_)]));
    let now = t.at(0);
    t.conn.handle_key(
        KeyLookup::Failed("blip".into()),
        now,
        &mut t.host,
        &mut t.rng,
    );
    assert!(t.conn.closing().is_none());
    assert_eq!(forwards(&t.actions()).len(), 1);
    // Once bound, the perm id is forwarded.
    t.forwarded(Forwarded::Accepted);
    let mut bound = (*temp).clone();
    bound.perm_auth_key_id = 99;
    t.feed(&abridged(&encrypted(&temp, 1, 12), false));
    t.key_found(&Arc::new(bound));
    let actions = t.actions();
    assert_eq!(forwards(&actions)[0].perm_auth_key_id, 99);
}

#[test]
fn bound_key_that_expires_gets_404() {
    let mut t = Test::new();
    let temp = key(AuthKeyType::Temp, 5, Some(UNIX as i64 + 10));
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&temp, 1, 4), false));
    t.feed(&bytes);
    t.key_found(&temp);
    t.forwarded(Forwarded::Accepted);
    t.input(&abridged(&encrypted(&temp, 1, 8), false));
    let later = t.at(20);
    t.conn.handle_input(1, later, &mut t.host, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::ExpiredKey(_))));
}

#[test]
fn no_key_within_the_handshake_deadline_closes() {
    let mut t = Test::new();
    t.feed(&[0xef]);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(10).instant));
    let now = t.at(10);
    t.conn.handle_timeout(now, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::HandshakeTimeout)));
    assert!(t.written().is_empty());
}

#[test]
fn idle_connection_closes_after_the_idle_timeout() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(100).instant));
    let now = t.at(100);
    t.conn.handle_timeout(now, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::IdleTimeout)));
}

#[test]
fn server_messages_are_encrypted_framed_and_bounded() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    let plaintext = [5u8; 48];
    let now = t.at(0);
    assert!(t.conn.send_server_message(&plaintext, now, &mut t.rng));
    let packets = t.written();
    assert_eq!(packets.len(), 1);
    let reply = crate::message::decrypt_as_server_reply(&info.key, &packets[0][1..]).unwrap();
    assert_eq!(&reply[..48], &plaintext);
    // A client that does not read: past max_unsent_bytes no more is taken.
    while t.conn.accepts_server_messages() {
        assert!(t.conn.send_server_message(&plaintext, now, &mut t.rng));
    }
    assert!(t.conn.has_transmit());
}

/// Replies queued together are encrypted in place, into one buffer while
/// they fit: each still comes out as its own whole packet.
#[test]
fn replies_queued_together_are_each_a_whole_packet() {
    let mut t = Test::with(Settings {
        max_unsent_bytes: 1 << 16,
        ..settings()
    });
    let info = perm_key();
    t.bind(&info);
    let sizes = [48, 64, 1024, 4096, 16];
    let now = t.at(0);
    for (i, &size) in sizes.iter().enumerate() {
        let plaintext = vec![i as u8; size];
        assert!(t.conn.send_server_message(&plaintext, now, &mut t.rng));
    }
    let first = &t.conn.transmit[0].bytes;
    assert_eq!(
        first.as_ptr().wrapping_add(first.len()),
        t.conn.transmit[1].bytes.as_ptr(),
        "small replies share a buffer"
    );
    let packets = t.written();
    assert_eq!(packets.len(), sizes.len());
    for (i, (packet, &size)) in packets.iter().zip(&sizes).enumerate() {
        let header = if packet[0] == 0x7f { 4 } else { 1 };
        let words = if header == 4 {
            u32::from_le_bytes([packet[1], packet[2], packet[3], 0]) as usize
        } else {
            usize::from(packet[0])
        };
        assert_eq!(words * 4, packet.len() - header, "packet {i}'s length");
        assert_eq!(packet.len() - header, crate::message::encrypted_len(size));
        let reply = crate::message::decrypt_as_server_reply(&info.key, &packet[header..])
            .unwrap_or_else(|| panic!("packet {i} decrypts"));
        assert_eq!(&reply[..size], &vec![i as u8; size][..]);
    }
    assert_eq!(t.conn.scratch.capacity(), 0, "nothing kept once written");
}

#[test]
fn a_write_without_progress_times_out() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    let now = t.at(0);
    t.conn.send_server_message(&[5u8; 48], now, &mut t.rng);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(5).instant));
    // Progress moves the deadline.
    t.conn.handle_written(10, t.at(3).instant);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(8).instant));
    let now = t.at(8);
    t.conn.handle_timeout(now, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::Write)));
    assert!(!t.conn.has_transmit());
    // The message given up is still counted as not written.
    assert_eq!(t.conn.unwritten_server_messages(), 1);
}

#[test]
fn byte_by_byte_input_decodes_like_bulk() {
    let info = perm_key();
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&encrypted(&info, 1, 4), false));
    let mut t = Test::new();
    for b in &bytes {
        t.feed(std::slice::from_ref(b));
    }
    assert!(matches!(t.actions()[..], [Action::LookupKey(_)]));
    t.key_found(&info);
    assert_eq!(forwards(&t.actions()).len(), 1);
}

#[test]
fn malformed_frames_close_with_the_transport_error() {
    let mut t = Test::new();
    // Intermediate with a zero-length frame.
    t.feed(&[0xee, 0xee, 0xee, 0xee, 0, 0, 0, 0]);
    assert!(matches!(t.conn.closing(), Some(Close::Transport(_))));
    let mut t = Test::new();
    // A 4-byte frame is too short for any message.
    t.feed(&[0xef, 1, 0, 0, 0, 0]);
    assert!(matches!(t.conn.closing(), Some(Close::Message(_))));
}

#[test]
fn plain_msg_id_outside_the_window_or_not_a_multiple_of_4_closes_without_a_code() {
    let now = UNIX as i64;
    for (msg_id, ok) in [
        (now << 32, true),
        ((now - 300) << 32, true),
        ((now + 30) << 32 | 0xffff_fffc, true),
        ((now - 301) << 32 | 0xffff_fffc, false),
        ((now + 31) << 32, false),
        (now << 32 | 1, false),
        (now << 32 | 2, false),
        (0, true),
        (-4, false),
        (4, false),
    ] {
        let mut t = Test::new();
        let mut bytes = vec![0xef];
        bytes.extend(abridged(&req_pq_multi_with(msg_id), false));
        t.feed(&bytes);
        if ok {
            assert!(t.conn.closing().is_none(), "{msg_id:#x}");
            assert_eq!(t.written().len(), 1, "resPQ for {msg_id:#x}");
        } else {
            assert!(
                matches!(t.conn.closing(), Some(Close::BadPlainMsgId { msg_id: m }) if *m == msg_id),
                "{msg_id:#x}: {:?}",
                t.conn.closing()
            );
            assert!(t.written().is_empty(), "no transport code");
            assert_eq!(t.host.handshakes_in_progress, 0);
        }
    }
}

#[test]
fn handshake_beyond_the_gateway_slots_gets_429_and_slots_come_back() {
    let mut a = Test::new();
    a.host.handshake_slots = Some(1);
    let mut bytes = vec![0xef];
    bytes.extend(abridged(&req_pq_multi(), false));
    a.feed(&bytes);
    assert_eq!(a.host.handshakes_in_progress, 1);
    // A handshake restarted on the same connection keeps its one slot.
    a.feed(&abridged(&req_pq_multi(), false));
    assert!(a.conn.closing().is_none());
    assert_eq!(a.host.handshakes_in_progress, 1);
    assert_eq!(a.written().len(), 2);

    // Another connection while every slot is taken.
    let mut b = Test::new();
    b.host.handshake_slots = Some(1);
    b.host.handshakes_in_progress = 1;
    b.feed(&bytes);
    assert!(matches!(b.conn.closing(), Some(Close::HandshakesBusy)));
    assert_eq!(b.written(), error_packet(error_code::FLOOD));
    assert!(b.events().contains(&Event::Handshake {
        outcome: "busy",
        elapsed: None
    }));
    assert_eq!(b.host.handshakes_in_progress, 1, "nothing taken");

    // A failed step gives the slot back.
    let mut msg = vec![0u8; 8];
    msg.extend_from_slice(&((UNIX as i64) << 32 | 4).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&id::REQ_DH_PARAMS.to_le_bytes());
    msg.extend_from_slice(&[0; 4]);
    a.feed(&abridged(&msg, false));
    let Some(Action::Compute(mut job)) = a.actions().pop() else {
        panic!("expected a computation");
    };
    job.run(&mut rand::thread_rng());
    let now = a.at(0);
    a.conn.handle_computed(job, now, &mut a.host, &mut a.rng);
    assert!(matches!(a.conn.closing(), Some(Close::Handshake(_))));
    assert_eq!(a.host.handshakes_in_progress, 0);

    // So does a connection that binds a key instead of finishing its handshake.
    let mut c = Test::new();
    c.feed(&bytes);
    assert_eq!(c.host.handshakes_in_progress, 1);
    c.written();
    let info = perm_key();
    c.feed(&abridged(&encrypted(&info, 1, 4), false));
    c.key_found(&info);
    assert_eq!(c.host.handshakes_in_progress, 0);
    assert_eq!(forwards(&c.actions()).len(), 1);
}

#[test]
fn a_frame_not_completed_within_the_frame_timeout_closes() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::Accepted);
    let frame = abridged(&encrypted(&info, 1, 8), false);
    // Idle: only the idle deadline.
    assert_eq!(t.conn.poll_timeout(), Some(t.at(100).instant));
    t.feed_at(1, &frame[..10]);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(21).instant));
    // More bytes of the same frame do not move the deadline.
    t.feed_at(15, &frame[10..20]);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(21).instant));
    let now = t.at(21);
    t.conn.handle_timeout(now, &mut t.rng);
    assert!(matches!(t.conn.closing(), Some(Close::FrameTimeout)));
    assert!(t.written().is_empty(), "no transport code");
}

#[test]
fn a_completed_frame_ends_its_deadline_and_a_paused_reader_is_not_late() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    let first = abridged(&encrypted(&info, 1, 8), false);
    t.feed_at(1, &first[..10]);
    t.feed_at(2, &first[10..]);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(102).instant), "idle only");
    // Two forwards in flight: reading pauses with the next frame half read.
    assert!(!t.conn.wants_read());
    let second = abridged(&encrypted(&info, 1, 12), false);
    t.input(&second[..10]);
    let now = t.at(3);
    t.conn.handle_input(10, now, &mut t.host, &mut t.rng);
    assert_eq!(t.conn.poll_timeout(), Some(t.at(103).instant), "paused");
    let now = t.at(30);
    t.conn.handle_timeout(now, &mut t.rng);
    assert!(t.conn.closing().is_none());
    // Reading resumes: the partial frame now has its deadline.
    t.forwarded(Forwarded::Accepted);
    assert!(t.conn.wants_read());
    assert_eq!(t.conn.poll_timeout(), Some(t.at(23).instant));
}

#[test]
fn buffered_input_is_counted_and_past_the_budget_gets_429() {
    let mut t = Test::new();
    t.host.buffer_budget = Some(100);
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::Accepted);
    let frame = abridged(&encrypted(&info, 1, 8), false);
    assert!(frame.len() > 60);
    t.feed(&frame[..50]);
    assert_eq!(t.host.buffered, 50);
    t.feed(&frame[50..]);
    assert_eq!(t.host.buffered, 0, "a completed frame is no longer counted");
    t.forwarded(Forwarded::Accepted);
    // Other connections hold 80 of the 100 bytes: 50 more do not fit.
    t.host.buffered = 80;
    t.feed(&frame[..50]);
    assert!(matches!(t.conn.closing(), Some(Close::BufferBudget)));
    assert_eq!(t.written(), error_packet(error_code::FLOOD));
    assert_eq!(t.host.buffered, 80, "nothing of this connection counted");
}

#[test]
fn sessions_beyond_the_key_cap_get_429() {
    let mut t = Test::new();
    t.host.key_sessions = Some(1);
    let info = perm_key();
    // Another connection carries a session of this key.
    t.host.attached.push((info.id(), 99));
    t.bind(&info);
    assert!(matches!(t.conn.closing(), Some(Close::KeySessionsFull(1))));
    assert!(forwards(&t.actions()).is_empty());
    assert_eq!(t.written(), error_packet(error_code::FLOOD));
}

#[test]
fn an_idle_connection_holds_no_queue_storage() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.actions();
    t.forwarded(Forwarded::Accepted);
    let now = t.at(0);
    assert!(t.conn.send_server_message(&[5u8; 48], now, &mut t.rng));
    t.events();
    t.written();
    assert_eq!(t.conn.actions.capacity(), 0);
    assert_eq!(t.conn.events.capacity(), 0);
    assert_eq!(t.conn.transmit.capacity(), 0);
    assert_eq!(t.conn.scratch.capacity(), 0);
    assert_eq!(t.conn.input.capacity(), 0);
}

/// A server message answering `req_msg_id` with an `rpc_result`.
fn rpc_result_for(req_msg_id: i64) -> Vec<u8> {
    let mut m = Vec::new();
    for field in [42i64, 1, 0x1000] {
        m.extend_from_slice(&field.to_le_bytes());
    }
    m.extend_from_slice(&1i32.to_le_bytes());
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&id::RPC_RESULT.to_le_bytes());
    m.extend_from_slice(&req_msg_id.to_le_bytes());
    m.extend_from_slice(&0x9972_75b5u32.to_le_bytes());
    m
}

/// Writes everything queued; returns how many server messages that completed.
fn write_all(t: &mut Test) -> usize {
    let mut slices = [IoSlice::new(&[]); 64];
    let (_, n) = t.conn.io_buffers(&mut slices);
    let total = slices[..n].iter().map(|s| s.len()).sum();
    let at = t.at(0).instant;
    t.conn.handle_written(total, at)
}

#[test]
fn a_draining_connection_reads_no_more_but_answers_what_it_read() {
    let mut t = Test::new();
    let info = perm_key();
    let mut bytes = vec![0xef];
    for msg_id in [4, 8, 12] {
        bytes.extend(abridged(&encrypted(&info, 1, msg_id), false));
    }
    t.feed(&bytes);
    t.key_found(&info);
    assert_eq!(forwards(&t.actions()).len(), 2, "a window of 2");
    t.conn.drain();
    assert!(!t.conn.wants_read());
    assert!(!t.conn.drained());
    // The frame already read is handled once the window opens.
    t.forwarded(Forwarded::Accepted);
    assert_eq!(forwards(&t.actions()).len(), 1);
    t.forwarded(Forwarded::Accepted);
    t.forwarded(Forwarded::Accepted);
    assert!(!t.conn.wants_read());
    assert_eq!(t.conn.awaited_replies(), 3, "forwarded, not answered");
    assert!(!t.conn.drained());
    let now = t.at(0);
    for msg_id in [4, 8] {
        assert!(t
            .conn
            .send_server_message(&rpc_result_for(msg_id), now, &mut t.rng));
    }
    assert_eq!(t.conn.awaited_replies(), 1);
    assert_eq!(t.conn.unwritten_server_messages(), 2);
    assert_eq!(write_all(&mut t), 2);
    assert!(!t.conn.drained(), "12 still awaits its answer");
    assert!(t
        .conn
        .send_server_message(&rpc_result_for(12), now, &mut t.rng));
    assert!(!t.conn.drained(), "framed, not yet written");
    assert_eq!(write_all(&mut t), 1);
    assert!(t.conn.drained());
    assert_eq!(t.conn.unwritten_server_messages(), 0);
}

#[test]
fn an_answer_that_will_not_be_written_is_not_also_awaited() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.forwarded(Forwarded::Accepted);
    assert_eq!(t.conn.awaited_replies(), 1);
    t.conn.undeliverable(&rpc_result_for(4));
    assert_eq!(t.conn.awaited_replies(), 0);
}

#[test]
fn quick_acks_and_error_codes_are_not_counted_as_server_messages() {
    let mut t = Test::new();
    let info = perm_key();
    t.bind(&info);
    t.feed(&abridged(&encrypted(&info, 1, 8), true));
    assert!(t.events().contains(&Event::QuickAck));
    assert_eq!(t.conn.unwritten_server_messages(), 0);
    assert_eq!(write_all(&mut t), 0);
    // Not draining: never drained, however idle.
    t.forwarded(Forwarded::Accepted);
    t.forwarded(Forwarded::Accepted);
    assert!(!t.conn.drained());
    t.conn.drain();
    assert!(!t.conn.drained(), "two requests await their answers");
}
