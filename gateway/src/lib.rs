//! The MTProto edge gateway: see `docs/architecture.md` for the path of a byte.

pub mod authkey;
pub mod protocol;
