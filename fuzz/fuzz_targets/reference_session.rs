//! The reference session's answers (`reference::respond`: the msg_id and
//! seq_no window, containers, gzip_packed, service messages) to any body,
//! sent twice on one session. What comes back is bounded: replies per
//! message, bytes per reply, and bytes kept for binds; the second copy is
//! never processed again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::reference::{self, Context, MsgWindow, DEFAULT_MAX_UNPACKED_BYTES};
use mtproto_core_fuzz::{rng, Cursor, NOW};

/// One container holds at most 1024 messages; each gets at most one reply.
const MAX_REPLIES: usize = 1024;
/// msgs_state_info for 8192 ids is the largest single reply.
const MAX_REPLY_BYTES: usize = 4 + 8 + 4 + 8192;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let msg_id = c.i64();
    let ctx = Context {
        session_id: c.i64(),
        now: NOW + i64::from(c.u16()),
        current_salt: c.i64(),
        unbound_temp_key: flags & 1 == 1,
        max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
    };
    let seq_no = c.i32();
    let body = c.rest();
    let mut window = MsgWindow::default();
    let mut rng = rng(u64::from(flags));
    let out = reference::respond(msg_id, seq_no, body, &ctx, &mut window, &mut rng);
    let again = reference::respond(msg_id, seq_no, body, &ctx, &mut window, &mut rng);
    assert!(again.binds.is_empty() && again.new_salts.is_empty());
    assert!(
        out.replies.len() <= MAX_REPLIES,
        "{} replies",
        out.replies.len()
    );
    for reply in &out.replies {
        assert!(
            reply.body.len() <= MAX_REPLY_BYTES,
            "reply of {} bytes",
            reply.body.len()
        );
        assert_eq!(reply.body.len() % 4, 0);
    }
    assert!(out.new_salts.len() <= MAX_REPLIES * 63);
    // Bind requests are kept whole: no more than the message and one
    // decompression budget.
    let kept: usize = out.binds.iter().map(|(_, b)| b.len()).sum();
    assert!(
        kept as u64 <= body.len() as u64 + DEFAULT_MAX_UNPACKED_BYTES,
        "{kept} bytes of binds from a {}-byte body",
        body.len()
    );
});
