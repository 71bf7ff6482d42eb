//! The HTTP transport's message logic: `longpoll::inspect` on any decrypted
//! body, the wait it implies (capped), and merging queued server messages
//! into one response body.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mtproto_core::longpoll::{self, HttpWait, Sequence, MAX_CONTAINER_MESSAGES};
use mtproto_core::tl::TlReader;
use mtproto_core_fuzz::{Cursor, NOW};

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let (msg_id, seq_no) = (c.i64(), c.i32());
    let cap = Duration::from_millis(u64::from(c.u16()) * 16);
    let split = usize::from(c.u16());
    let body = c.rest();

    let info = longpoll::inspect(msg_id, seq_no, body);
    assert!(info.content_msg_ids.len() <= MAX_CONTAINER_MESSAGES);
    let wait = HttpWait::for_request(&info, cap);
    assert!(wait.max_delay <= cap && wait.wait_after <= cap && wait.max_wait <= cap);
    let t0 = Instant::now();
    let at = wait.respond_at(t0, Some((t0, t0 + cap)));
    assert!(at <= t0 + cap + cap);
    assert!(wait.respond_at(t0, None) <= t0 + cap);

    // The same bytes as queued server messages (split in two).
    let split = split.min(body.len());
    let messages: [&[u8]; 2] = [&body[..split], &body[split..]];
    for queued in [&messages[..1], &messages[..]] {
        let mut seq = Sequence::default();
        if let Ok(merged) = longpoll::merge(queued, &mut seq, NOW, 5) {
            let mut r = TlReader::new(&merged);
            let (_, _, _, _) = (r.i64(), r.i64(), r.i64(), r.i32());
            let len = r.u32().expect("merged header") as usize;
            assert_eq!(
                r.remaining().len(),
                len,
                "merged message is exactly its body"
            );
        }
    }
    let mut seq = Sequence::default();
    let ack = longpoll::ack(1, 2, &info.content_msg_ids, &mut seq, NOW, 0);
    assert_eq!(ack.len(), 32 + 12 + 8 * info.content_msg_ids.len());
});
