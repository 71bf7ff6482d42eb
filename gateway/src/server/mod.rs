//! The IO shell: listeners and one task per connection around the sans-IO
//! protocol core.

pub mod admin;
mod forwards;
pub mod http;
pub mod limiter;
pub mod outbox;
pub mod registry;
pub mod reverse;
mod shell;
mod stream;
pub mod tls;
pub mod websocket;

pub use shell::HandshakePool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::authkey::cache::{KeyCache, KeySource};
use crate::config::{Listener, ListenerTransport, ProxyProtocol};
use crate::loops::Loops;
use crate::metrics::{DrainLabels, ListenerLabels, Metrics, ReasonLabels};
use limiter::{Admission, Budgets, ListenerSlots};
use mtproto_core::handshake::HandshakeSettings;
use mtproto_session::store::AuthKeyStore;
use mtproto_session::{SessionClientEvent, SessionService};
use registry::Registry;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// What the connection core enforces on stream connections; the HTTP
    /// transport and the shells read their timeouts and sizes here too.
    pub connection: Arc<mtproto_core::connection::Settings>,
    /// Server messages queued for one connection before delivery reports "not delivered".
    pub outbox_capacity: usize,
    /// Open connections per listener; on HTTP also the number of virtual connections.
    pub max_connections: usize,
    /// Longest an HTTP long-poll is held.
    pub http_max_wait: Duration,
    /// Bytes of server messages an HTTP session queues between requests.
    pub http_queue_bytes: usize,
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
    /// Connection caps and handshake rate, shared by all listeners.
    pub admission: Arc<Admission>,
    /// Handshakes in progress and buffered partial frames, gateway-wide.
    pub budgets: Arc<Budgets>,
    /// This gateway's id as sessions address it.
    pub server_id: Arc<str>,
    pub metrics: Arc<Metrics>,
    /// The HTTP transport's handshakes and virtual connections.
    pub http: http::Hub,
    pub connection_ids: ConnectionIds,
    /// Bounds `session_closeSession` calls in flight: a mass disconnect
    /// (thousands of connections at once) queues its reports here instead of
    /// opening thousands of HTTP/2 streams that time out and get reset.
    pub close_reports: Semaphore,
    /// Where handshakes compute (`runtime.handshake_threads` at once).
    pub handshake_pool: HandshakePool,
    /// What the shutdown drain delivered and did not.
    pub drain: DrainStats,
}

/// Counts of a shutdown drain (stream connections), for its summary line
/// and `mtproto_drain_undelivered_total`: every connection open when the
/// drain begins ends as exactly one of the three closes.
#[derive(Debug, Default)]
pub struct DrainStats {
    /// Connections closed once everything read was answered and written.
    closed_done: AtomicU64,
    /// Connections closed when the grace ended.
    closed_forced: AtomicU64,
    /// Connections the client or an error closed during the drain.
    closed_otherwise: AtomicU64,
    /// Server messages written after the drain began.
    delivered: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
}

impl DrainStats {
    pub(crate) fn closed_done(&self) {
        self.closed_done.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn delivered(&self, messages: u64) {
        self.delivered.fetch_add(messages, Ordering::Relaxed);
    }

    /// A connection closed during the drain before it was done (at the grace
    /// end when `forced`): `in_flight` requests it read had no answer,
    /// `queued` server messages it took were not written.
    pub(crate) fn undelivered(&self, metrics: &Metrics, forced: bool, in_flight: u64, queued: u64) {
        let closed = if forced {
            &self.closed_forced
        } else {
            &self.closed_otherwise
        };
        closed.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(in_flight, Ordering::Relaxed);
        self.queued.fetch_add(queued, Ordering::Relaxed);
        for (what, n) in [("in_flight", in_flight), ("queued", queued)] {
            metrics
                .drain_undelivered
                .get_or_create(&DrainLabels { what })
                .inc_by(n);
        }
    }

    fn log_summary(&self) {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let (in_flight, queued) = (get(&self.in_flight), get(&self.queued));
        info!(
            closed_when_done = get(&self.closed_done),
            closed_at_grace_end = get(&self.closed_forced),
            closed_otherwise = get(&self.closed_otherwise),
            delivered = get(&self.delivered),
            undelivered = in_flight + queued,
            undelivered_in_flight = in_flight,
            undelivered_queued = queued,
            "drain finished"
        );
    }
}

/// `session_closeSession` calls in flight at once, gateway-wide.
pub const CLOSE_REPORTS_IN_FLIGHT: usize = 32;

/// Tells the session that the last connection of a session here closed,
/// waiting for a turn among [`CLOSE_REPORTS_IN_FLIGHT`]; the call itself has 2 s.
pub(crate) async fn report_closed_session(shared: &Shared, event: SessionClientEvent) {
    let Ok(_turn) = shared.close_reports.acquire().await else {
        return;
    };
    match tokio::time::timeout(Duration::from_secs(2), shared.session.close_session(event)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("close_session failed: {e}"),
        Err(_) => debug!("close_session timed out"),
    }
}

/// Numbers connections for logs and the registry.
#[derive(Debug)]
pub struct ConnectionIds(AtomicU64);

impl Default for ConnectionIds {
    fn default() -> Self {
        Self(AtomicU64::new(1))
    }
}

impl ConnectionIds {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// After the drain grace, what the gateway takes to close the connections
/// left and stop its reverse path, at most; the operator keeps this much of
/// the pod's termination grace period for it.
pub const CLOSE_AFTER_GRACE: Duration = Duration::from_secs(mtproto_config::CLOSE_AFTER_GRACE_SECS);

/// Accepts on every listener until `shutdown` flips; then stops accepting
/// and drains: connections read nothing more, deliver the answers to what
/// they read and close once nothing is owed, for up to `grace`; then the
/// rest are closed within [`CLOSE_AFTER_GRACE`], what they could not
/// deliver counted (each closed session is reported to its session
/// service). Ends with one summary line, and returns the time by which the
/// rest of the shutdown must be done. TCP and WebSocket connections run on
/// `loops` if given, else on the calling runtime.
pub async fn serve(
    listeners: Vec<BoundListener>,
    shared: Arc<Shared>,
    loops: Option<Arc<Loops>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> tokio::time::Instant {
    // Each connection holds a clone of `done_tx`; when all are dropped, they are all closed.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (force_tx, force_rx) = watch::channel(false);
    // The same two steps for stream connections, on one watch.
    let (stage_tx, stage_rx) = watch::channel(stream::Stage::Serving);
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let shared = shared.clone();
        let force = force_rx.clone();
        let done_tx = done_tx.clone();
        let draining = shutdown.clone();
        let stage = stage_rx.clone();
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            shared,
            loops.clone(),
            draining,
            force,
            stage,
            done_tx,
        )));
    }
    drop(done_tx);
    let _ = shutdown.wait_for(|stop| *stop).await;
    let _ = stage_tx.send(stream::Stage::Draining);
    for task in &accept_tasks {
        task.abort();
    }
    info!("draining connections for up to {grace:?}");
    let closed_by = tokio::time::Instant::now() + grace + CLOSE_AFTER_GRACE;
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        warn!("grace period over: closing the connections still open");
        let _ = force_tx.send(true);
        let _ = stage_tx.send(stream::Stage::Forced);
        if tokio::time::timeout_at(closed_by, done_rx.recv())
            .await
            .is_err()
        {
            warn!(
                "connections still closing {CLOSE_AFTER_GRACE:?} after the grace period; exiting"
            );
        }
    }
    shared.drain.log_summary();
    closed_by
}

async fn accept_loop(
    bound: BoundListener,
    shared: Arc<Shared>,
    loops: Option<Arc<Loops>>,
    draining: watch::Receiver<bool>,
    force_close: watch::Receiver<bool>,
    stage: watch::Receiver<stream::Stage>,
    done_tx: mpsc::Sender<()>,
) {
    let BoundListener { listener, endpoint } = bound;
    let local = listener.local_addr().ok();
    let slots = Arc::new(ListenerSlots::default());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let listener_kind = endpoint.kind();
                shared
                    .metrics
                    .connections_accepted
                    .get_or_create(&ListenerLabels {
                        listener: listener_kind,
                    })
                    .inc();
                let slot = match shared.admission.enter_listener(&slots) {
                    Ok(slot) => slot,
                    Err(_) => {
                        shared
                            .metrics
                            .connections_closed
                            .get_or_create(&ReasonLabels {
                                reason: "listener_full",
                            })
                            .inc();
                        // Dropping the stream closes it before any per-connection state exists.
                        let total = shared
                            .admission
                            .refused
                            .total(limiter::Refusal::ListenerFull);
                        debug!(listener = ?local, %peer, refused_total = total, "listener at limits.max_connections; closed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let done = done_tx.clone();
                let endpoint = endpoint.clone();
                if endpoint.http {
                    let (draining, force_close) = (draining.clone(), force_close.clone());
                    tokio::spawn(async move {
                        // Boxed: hyper's state would otherwise enlarge every connection's task.
                        Box::pin(http::run(
                            stream,
                            peer,
                            slot,
                            &endpoint,
                            shared,
                            draining,
                            force_close,
                            done,
                        ))
                        .await;
                    });
                } else {
                    let stage = stage.clone();
                    let Some(loops) = &loops else {
                        tokio::spawn(async move {
                            stream::run(stream, peer, slot, &endpoint, shared, stage, None).await;
                            drop(done);
                        });
                        continue;
                    };
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(e) => {
                            warn!(%peer, "cannot hand a connection to an event loop: {e}");
                            continue;
                        }
                    };
                    let start = stream::Start::Accepted {
                        stream,
                        peer,
                        slot,
                        endpoint,
                        shared,
                        shutdown: stage,
                    };
                    stream::place(loops, loops.place(), start, done);
                }
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning.
                warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How a listener's connections start.
#[derive(Debug)]
pub struct Endpoint {
    pub proxy_protocol: ProxyProtocol,
    /// Socket peers whose PROXY headers are honoured; empty: any.
    pub proxy_trusted_sources: Vec<ipnet::IpNet>,
    /// Set on WebSocket listeners.
    pub websocket: Option<websocket::WsOptions>,
    /// MTProto's HTTP transport.
    pub http: bool,
    /// Set when the listener serves TLS itself (`wss://`, `https://`).
    pub tls: Option<tls::Tls>,
}

impl Endpoint {
    /// The listener label of this endpoint's metrics.
    pub fn kind(&self) -> &'static str {
        if self.websocket.is_some() {
            "websocket"
        } else if self.http {
            "http"
        } else {
            "tcp"
        }
    }
}

/// A bound client listener.
#[derive(Debug)]
pub struct BoundListener {
    pub listener: TcpListener,
    pub endpoint: Arc<Endpoint>,
}

impl BoundListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Binds every listener, naming the one that failed. WebSocket messages may
/// be up to `max_frame_bytes` plus room for the obfuscated2 init and a frame header.
pub async fn bind_all(
    listeners: &[Listener],
    max_frame_bytes: usize,
) -> anyhow::Result<Vec<BoundListener>> {
    let mut out = Vec::with_capacity(listeners.len());
    for (i, l) in listeners.iter().enumerate() {
        let tls = match (&l.tls_cert, &l.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(i, cert, key)?),
            _ => None,
        };
        let addr = l.address;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("listeners: cannot listen on {addr}: {e}"))?;
        let websocket =
            (l.transport == ListenerTransport::Websocket).then(|| websocket::WsOptions {
                path: l.websocket_path().to_string(),
                allowed_origins: l.allowed_origins.clone(),
                max_message_bytes: max_frame_bytes + 1024,
            });
        out.push(BoundListener {
            listener,
            endpoint: Arc::new(Endpoint {
                proxy_protocol: l.proxy_protocol,
                proxy_trusted_sources: l.proxy_trusted_sources.clone(),
                websocket,
                http: l.transport == ListenerTransport::Http,
                tls,
            }),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undelivered_replies_are_counted_by_what_and_exported() {
        let metrics = Metrics::default();
        let drain = DrainStats::default();
        drain.undelivered(&metrics, true, 3, 1);
        drain.undelivered(&metrics, false, 0, 2);
        drain.closed_done();
        let get = |what| {
            metrics
                .drain_undelivered
                .get_or_create(&DrainLabels { what })
                .get()
        };
        assert_eq!((get("in_flight"), get("queued")), (3, 3));
        let closes = [
            &drain.closed_done,
            &drain.closed_forced,
            &drain.closed_otherwise,
        ]
        .map(|n| n.load(Ordering::Relaxed));
        assert_eq!(closes, [1, 1, 1]);
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("mtproto_drain_undelivered_total{what=\"in_flight\"} 3"),
            "{text}"
        );
    }
}
