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
    shared.keys.cache.stats.register(&mut registry);
    shared.admission.refused.register(&mut registry);
    shared.http.stats.register(&mut registry);
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
