//! Undoing the client's RSA padding on any 256-byte block: RSA_PAD and the
//! legacy SHA1 scheme, with any inner length the TL parser could report.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::rsa::{unpad, Padding};
use mtproto_core_fuzz::Cursor;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    // The inner length the closure reports (may exceed the block).
    let inner_len = usize::from(c.u16());
    let m: [u8; 256] = c.array();
    let accept_legacy = flags & 1 == 1;
    let report = flags & 2 == 2;
    match unpad(&m, accept_legacy, |b| {
        report.then_some(inner_len.min(b.len() + 8))
    }) {
        Ok((data, Padding::RsaPad)) => assert_eq!(data.len(), 192),
        Ok((data, Padding::LegacySha1)) => {
            assert!(accept_legacy);
            assert_eq!(data.len(), 235);
            assert_eq!(m[0], 0);
        }
        Err(_) => {}
    }
});
