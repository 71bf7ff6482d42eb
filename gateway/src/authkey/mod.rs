//! The gateway's auth key cache, in front of the key source (the session, or
//! the stores of `mtproto_session::store`).

pub mod cache;
