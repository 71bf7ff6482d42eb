//! The IO shell: listeners and one task per connection around the sans-IO
//! protocol core.

pub mod admin;
mod connection;
pub mod registry;
pub mod reverse;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::authkey::cache::{KeyCache, KeySource};
use crate::authkey::store::AuthKeyStore;
use crate::protocol::handshake::HandshakeSettings;
use crate::session::SessionService;
use registry::Registry;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept until the connection's first valid encrypted message.
    pub handshake_timeout: Duration,
    /// Without traffic in either direction.
    pub idle_timeout: Duration,
    /// A write that cannot complete in this time closes the connection (slow reader).
    pub write_timeout: Duration,
    pub max_frame_bytes: usize,
    /// Server messages queued for one connection before delivery reports "not delivered".
    pub outbox_capacity: usize,
    /// Distinct session ids one connection may carry.
    pub max_sessions_per_connection: usize,
}

/// How connections find and record auth keys.
#[derive(Debug)]
pub struct Keys {
    pub cache: KeyCache,
    /// Where `cache` looks on a miss.
    pub source: Arc<dyn KeySource>,
    /// Where new keys are written when not through the session.
    pub writer: Option<Arc<dyn AuthKeyStore>>,
}

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub handshake: Arc<HandshakeSettings>,
    pub session: Arc<dyn SessionService>,
    pub registry: Arc<Registry>,
    pub keys: Keys,
    pub limits: Limits,
    /// This gateway's id as sessions address it.
    pub server_id: String,
    next_connection_id: AtomicU64,
}

impl Shared {
    pub fn new(
        handshake: Arc<HandshakeSettings>,
        session: Arc<dyn SessionService>,
        registry: Arc<Registry>,
        keys: Keys,
        limits: Limits,
        server_id: String,
    ) -> Self {
        Self {
            handshake,
            session,
            registry,
            keys,
            limits,
            server_id,
            next_connection_id: AtomicU64::new(1),
        }
    }
}

/// Accepts on every listener until `shutdown` flips; then stops accepting,
/// lets open connections finish for up to `grace`, and closes what is left
/// (each closed session is reported to its session service).
pub async fn serve(
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    // Each connection holds a clone of `done_tx`; when all are dropped, they are all closed.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (force_tx, force_rx) = watch::channel(false);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let shared = shared.clone();
        let force = force_rx.clone();
        let done_tx = done_tx.clone();
        accept_tasks.push(tokio::spawn(accept_loop(listener, shared, force, done_tx)));
    }
    drop(done_tx);
    let _ = shutdown.wait_for(|stop| *stop).await;
    for task in &accept_tasks {
        task.abort();
    }
    info!("draining connections for up to {grace:?}");
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        warn!("grace period over: closing the connections still open");
        let _ = force_tx.send(true);
        if tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .is_err()
        {
            warn!("connections did not close within 10 s of the grace period");
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    force_close: watch::Receiver<bool>,
    done_tx: mpsc::Sender<()>,
) {
    let local = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let force_close = force_close.clone();
                let done = done_tx.clone();
                tokio::spawn(async move {
                    connection::run(stream, peer, shared, force_close).await;
                    drop(done);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Binds every address, naming the one that failed.
pub async fn bind_all(addresses: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(addresses.len());
    for addr in addresses {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        out.push(listener);
    }
    Ok(out)
}
