//! The MTProto edge gateway: see `docs/architecture.md` for the path of a byte.

pub mod app;
pub mod authkey;
pub mod config;
mod grpc_frame;
pub mod loops;
pub mod metrics;
pub mod server;
pub mod session;

/// Time since the Unix epoch (zero if the clock is before it), for the IO shell;
/// the sans-IO protocol code takes time as a parameter instead.
pub fn unix_time() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
