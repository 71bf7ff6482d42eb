//! PROXY protocol v1/v2 detection on any stream start: never panics, a
//! header never claims more bytes than arrived, and detection is
//! prefix-consistent (every shorter prefix says "need more", the header's
//! own bytes give the same header).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtproto_core::proxy::{detect, Detected};

fuzz_target!(|data: &[u8]| {
    let Ok(result) = detect(data) else { return };
    match result {
        Detected::Header(h) => {
            assert!(h.len <= data.len() && h.len >= 8);
            assert_eq!(detect(&data[..h.len]), Ok(Detected::Header(h)));
            for cut in 0..h.len {
                assert_eq!(detect(&data[..cut]), Ok(Detected::NeedMore), "prefix {cut}");
            }
        }
        Detected::NeedMore => assert!(data.len() < 16 + 2048),
        Detected::Absent => {
            if !data.is_empty() {
                // Absent is decided on the first bytes and stays so.
                let mut more = data.to_vec();
                more.extend_from_slice(b"\r\n\r\n");
                assert_eq!(detect(&more), Ok(Detected::Absent));
            }
        }
    }
});
