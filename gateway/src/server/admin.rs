//! The admin endpoint: `/metrics` (Prometheus text), `/healthz` (the process
//! runs) and `/readyz` (listening and able to reach a session; false while
//! draining), on its own port so clients never see it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry as MetricRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::Shared;
use crate::session::remote::RemoteSession;

/// Readiness as the orchestrator sees it: listening, not draining, and (with
/// remote sessions) at least one session instance on the ring.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
    remote: Option<Arc<RemoteSession>>,
}

impl Readiness {
    pub fn new(remote: Option<Arc<RemoteSession>>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            remote,
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
            && self.remote.as_ref().is_none_or(|r| !r.members().is_empty())
    }
}

/// Reads the gateway's counters at scrape time.
#[derive(Debug)]
struct GatewayCollector {
    shared: Arc<Shared>,
    remote: Option<Arc<RemoteSession>>,
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.shared.keys.cache.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut encoder,
            "mtproto_auth_key_cache_hits",
            "Auth key lookups answered by the cache.",
            load(&stats.hits),
        )?;
        counter(
            &mut encoder,
            "mtproto_auth_key_cache_negative_hits",
            "Lookups answered by a cached 'unknown key'.",
            load(&stats.negative_hits),
        )?;
        counter(
            &mut encoder,
            "mtproto_auth_key_cache_misses",
            "Lookups the cache could not answer.",
            load(&stats.misses),
        )?;
        counter(
            &mut encoder,
            "mtproto_auth_key_lookups",
            "Lookups sent to the key source (after single-flight).",
            load(&stats.lookups),
        )?;
        counter(
            &mut encoder,
            "mtproto_auth_key_lookup_errors",
            "Lookups that failed (store or session down).",
            load(&stats.lookup_errors),
        )?;
        gauge(
            &mut encoder,
            "mtproto_auth_key_lookups_in_flight",
            "Lookups waiting for the key source now.",
            load(&stats.lookups_in_flight) as i64,
        )?;
        let seconds = ConstCounter::new(load(&stats.lookup_nanos) as f64 / 1e9);
        seconds.encode(encoder.encode_descriptor(
            "mtproto_auth_key_lookup_seconds",
            "Total time spent in key source lookups.",
            None,
            seconds.metric_type(),
        )?)?;
        counter(
            &mut encoder,
            "mtproto_transport_404_sent",
            "Transport errors -404 (unknown or expired key) sent.",
            load(&stats.not_found_sent),
        )?;
        let refused = &self.shared.admission.refused;
        for (name, help, value) in [
            (
                "mtproto_refused_listener_full",
                "Connections closed at accept: listener at limits.max_connections.",
                &refused.listener_full,
            ),
            (
                "mtproto_refused_client_full",
                "Connections closed: client address at limits.max_connections_per_ip.",
                &refused.client_full,
            ),
            (
                "mtproto_refused_handshake_flood",
                "Handshakes refused with -429 (limits.handshakes_per_ip_per_minute).",
                &refused.handshake_flood,
            ),
            (
                "mtproto_refused_proxy_header",
                "Connections closed for a missing or malformed PROXY header.",
                &refused.proxy_header,
            ),
            (
                "mtproto_refused_websocket_upgrade",
                "WebSocket upgrades refused (path, Origin, bad request) or not finished.",
                &refused.websocket_upgrade,
            ),
            (
                "mtproto_refused_tls_handshake",
                "TLS handshakes on wss/https listeners that failed or timed out.",
                &refused.tls_handshake,
            ),
        ] {
            counter(&mut encoder, name, help, load(value))?;
        }
        let http = &self.shared.http.stats;
        for (name, help, value) in [
            (
                "mtproto_http_requests",
                "HTTP transport requests.",
                &http.requests,
            ),
            (
                "mtproto_http_refused_method",
                "HTTP requests refused with 405 (not POST).",
                &http.bad_method,
            ),
            (
                "mtproto_http_refused_path",
                "HTTP requests refused with 404 (not an MTProto path).",
                &http.bad_path,
            ),
            (
                "mtproto_http_refused_too_large",
                "HTTP requests refused with 413 (body over limits.max_frame_bytes).",
                &http.too_large,
            ),
            (
                "mtproto_http_refused_bad_body",
                "HTTP requests refused with 400 (incomplete body, bad MTProto message, failed handshake step).",
                &http.bad_body,
            ),
            (
                "mtproto_http_unavailable",
                "HTTP requests answered 502/503 (session or key store failed, gateway full or stopping).",
                &http.unavailable,
            ),
            (
                "mtproto_http_queue_dropped",
                "Server messages an HTTP session's queue could not hold (reported undelivered) or lost when it expired.",
                &http.queue_dropped,
            ),
            (
                "mtproto_http_sessions_expired",
                "HTTP virtual connections closed after limits.idle_timeout_secs without a request.",
                &http.sessions_expired,
            ),
        ] {
            counter(&mut encoder, name, help, load(value))?;
        }
        gauge(
            &mut encoder,
            "mtproto_http_sessions",
            "HTTP virtual connections (auth key and session) open now.",
            self.shared.http.session_count() as i64,
        )?;
        gauge(
            &mut encoder,
            "mtproto_http_handshakes_pending",
            "HTTP handshakes waiting for their next request.",
            self.shared.http.handshake_count() as i64,
        )?;
        gauge(
            &mut encoder,
            "mtproto_sessions",
            "MTProto sessions with a live connection on this gateway.",
            self.shared.registry.session_count() as i64,
        )?;
        if let Some(remote) = &self.remote {
            gauge(
                &mut encoder,
                "mtproto_session_ring_members",
                "Session instances on the ring.",
                remote.members().len() as i64,
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    metrics: Arc<MetricRegistry>,
    readiness: Arc<Readiness>,
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the admin endpoint until `stop` flips (after the drain).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut registry = MetricRegistry::default();
    shared.metrics.register(&mut registry);
    let remote = readiness.remote.clone();
    registry.register_collector(Box::new(GatewayCollector { shared, remote }));
    let state = AdminState {
        metrics: Arc::new(registry),
        readiness,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .await
}

/// Binds the admin address, naming the setting on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin_listen: cannot listen on {addr}: {e}"))
}
