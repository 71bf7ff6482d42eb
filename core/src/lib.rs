//! Sans-IO MTProto: everything here is pure functions and state machines over
//! bytes. No sockets, no tokio, no clocks: time and randomness are passed in.
//! The crate has no async runtime among its dependencies, so Cargo keeps it so.

pub mod authkey;
pub mod bind;
pub mod connection;
pub mod crypto;
pub mod dh;
pub mod handshake;
pub mod longpoll;
pub mod message;
pub mod pq;
pub mod proxy;
pub mod reference;
pub mod rsa;
pub mod tl;
pub mod transport;
