//! The MTProto edge gateway: see `docs/architecture.md` for the path of a byte.

pub mod app;
pub mod authkey;
pub mod client;
pub mod config;
pub mod protocol;
pub mod server;
pub mod session;
