//! Generated gRPC types and services for teamgram's `mtproto`, `session` and
//! `gateway` packages. Paths and field numbers are teamgram's, so a Go
//! teamgram session can talk to our gateway and the other way round.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

pub mod mtproto {
    tonic::include_proto!("mtproto");

    impl Bool {
        /// teamgram reads only the predicate name.
        pub fn from_bool(value: bool) -> Self {
            Self {
                predicate_name: if value { "boolTrue" } else { "boolFalse" }.to_string(),
                constructor: if value { BOOL_TRUE } else { BOOL_FALSE },
            }
        }

        pub fn value(&self) -> bool {
            self.predicate_name == "boolTrue"
        }
    }

    /// TL CRC32s as signed ints, as teamgram's `TLConstructor` enum carries them.
    pub const BOOL_TRUE: i32 = 0x9972_75b5_u32 as i32;
    pub const BOOL_FALSE: i32 = 0xbc79_9737_u32 as i32;
    pub const AUTH_KEY_INFO: i32 = 0xccee_efc0_u32 as i32;
    pub const FUTURE_SALT: i32 = 0x0949_d9dc;
}

pub mod session {
    tonic::include_proto!("session");

    pub const SESSION_CLIENT_DATA: i32 = 0x41a2_0c4e;
    pub const SESSION_CLIENT_EVENT: i32 = 0xf17f_375f_u32 as i32;
    pub const QUERY_AUTH_KEY: i32 = 0x6b2d_f851;
    pub const SET_AUTH_KEY: i32 = 0x1d11_490b;
    pub const SEND_DATA_TO_SESSION: i32 = 0x876b_2dec_u32 as i32;
    pub const CLOSE_SESSION: i32 = 0x176f_c253;

    /// The request header with which a gateway asks for its server messages
    /// on its own `SessionDataStream` (`SessionStreamResponse.send_data`, our
    /// extension), and its value. A session that does not know it (teamgram's)
    /// ignores it and keeps using the gateway's reverse path.
    pub const STREAM_REPLIES_HEADER: &str = "mtproto-edge-replies";
    pub const STREAM_REPLIES_VALUE: &str = "stream";
}

pub mod gateway {
    tonic::include_proto!("gateway");

    pub const SEND_DATA_TO_GATEWAY: i32 = 0x2680_7810;
}

#[cfg(test)]
mod golden;
