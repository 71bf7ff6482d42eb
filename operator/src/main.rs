//! `mtproto-operator`: serves health and metrics, waits for leadership, then reconciles
//! `MtprotoGateway` objects until SIGTERM or until leadership is lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::Client;
use mtproto_operator::controller::{self, Scope};
use mtproto_operator::crd::MtprotoGateway;
use mtproto_operator::leader::{Elector, Timing};
use mtproto_operator::metrics::Metrics;
use tokio::sync::watch;
use tracing::{error, info};

/// Command line; every flag also reads an env var so the chart can set it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Namespace of the leader Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "OPERATOR_LEASE_NAME",
        default_value = "mtproto-operator-leader"
    )]
    lease_name: String,
    /// Seconds a lease lasts without renewal; a standby takes over after this.
    #[arg(long, env = "OPERATOR_LEASE_TTL_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_ttl_seconds: u64,
    /// This replica's identity in the Lease and in Events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconcile gateways only in these namespaces (comma separated), so
    /// namespaced Roles there suffice instead of a ClusterRole. Unset: all.
    #[arg(long, env = "OPERATOR_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Namespaces a gateway may name for its session Service besides its own
    /// (the operator creates an EndpointSlice reader Role there), comma
    /// separated. Unset: any namespace, or with --watch-namespaces those.
    #[arg(long, env = "OPERATOR_SESSION_NAMESPACES", value_delimiter = ',')]
    session_namespaces: Vec<String>,
    /// Log lines as human-readable text or as JSON objects (for log collectors).
    #[arg(long, env = "OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Checks a running installation (the chart's `helm test`): the MtprotoGateway API is
    /// served to this ServiceAccount and some replica holds the leader Lease, renewed
    /// within its TTL. Exits non-zero, saying what is wrong, otherwise.
    Check,
}

impl Args {
    fn scope(&self) -> Scope {
        let list = |v: &[String]| {
            let v: Vec<String> = v
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            (!v.is_empty()).then_some(v)
        };
        let watch_namespaces = list(&self.watch_namespaces);
        let session_namespaces = list(&self.session_namespaces)
            .or_else(|| watch_namespaces.clone())
            .map(|v| v.into_iter().collect());
        Scope {
            watch_namespaces,
            session_namespaces,
        }
    }
}

#[derive(Debug)]
struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    match args.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Some(Command::Check) = args.command {
        return check(&args).await;
    }
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("mtproto-operator-{}", std::process::id()));

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    info!(addr = %args.http_addr, %identity, "serving /metrics /healthz /readyz");
    tokio::spawn(serve(listener, health.clone()));

    let client = Client::try_default()
        .await
        .context("building a Kubernetes client")?;
    let scope = args.scope();
    info!(?scope, "scope");
    probe_gateway_api(&client, &scope).await?;
    health.ready.store(true, Ordering::SeqCst);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        // The receiver lives until main returns; a send error only means we are exiting.
        let _ = stop_tx.send(true);
    });

    let timing = Timing::from_ttl(Duration::from_secs(args.lease_ttl_seconds));
    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        timing,
    );
    tokio::select! {
        () = elector.acquire() => {}
        () = stopped(stop_rx.clone()) => return Ok(()),
    }
    metrics.set_leader(true);

    let reconciling = controller::run(client, metrics.clone(), &identity, scope, stop_rx.clone());
    tokio::select! {
        () = reconciling => {
            metrics.set_leader(false);
            elector.release().await;
            Ok(())
        }
        reason = elector.hold() => {
            metrics.set_leader(false);
            error!(%reason, "lost leadership; exiting so a fresh start rejoins the election");
            std::process::exit(1)
        }
    }
}

/// Lists one MtprotoGateway where this operator looks: the CRD is installed and
/// this identity may read it.
async fn probe_gateway_api(client: &Client, scope: &Scope) -> anyhow::Result<()> {
    let api: Api<MtprotoGateway> = match scope.watch_namespaces.as_deref() {
        Some([first, ..]) => Api::namespaced(client.clone(), first),
        _ => Api::all(client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .context("MtprotoGateway CRD is not queryable (or this operator may not list it); install it with `kubectl apply -f crds/` or the Helm chart")?;
    Ok(())
}

async fn check(args: &Args) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("building a Kubernetes client")?;
    probe_gateway_api(&client, &args.scope()).await?;
    let leases: Api<Lease> = Api::namespaced(client, &args.lease_namespace);
    let lease = leases
        .get(&args.lease_name)
        .await
        .with_context(|| format!("reading Lease {}/{}", args.lease_namespace, args.lease_name))?;
    let spec = lease.spec.unwrap_or_default();
    let holder = spec
        .holder_identity
        .filter(|h| !h.is_empty())
        .context("no operator replica holds the leader Lease")?;
    let renewed = spec
        .renew_time
        .with_context(|| format!("the Lease held by {holder} was never renewed"))?;
    let age = Timestamp::now().as_second() - renewed.0.as_second();
    let ttl = i64::try_from(args.lease_ttl_seconds).unwrap_or(i64::MAX);
    anyhow::ensure!(
        age <= ttl,
        "the leader {holder} last renewed the Lease {age} s ago (TTL {ttl} s)"
    );
    println!("ok: MtprotoGateway API served; {holder} leads (renewed {age} s ago)");
    Ok(())
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "health/metrics server stopped");
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(
    State(h): State<Arc<Health>>,
) -> (
    StatusCode,
    [(axum::http::HeaderName, &'static str); 1],
    String,
) {
    let content_type = [(
        axum::http::header::CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    match h.metrics.encode() {
        Ok(body) => (StatusCode::OK, content_type, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            content_type,
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(args: &[&str]) -> Scope {
        Args::parse_from(std::iter::once("mtproto-operator").chain(args.iter().copied())).scope()
    }

    #[test]
    fn scope_flags() {
        let s = scope(&[]);
        assert!(s.watch_namespaces.is_none() && s.session_namespaces.is_none());
        // Namespaced: sessions may only be in the watched namespaces unless listed.
        let s = scope(&["--watch-namespaces", "edge, web"]);
        assert_eq!(
            s.watch_namespaces,
            Some(vec!["edge".to_owned(), "web".to_owned()])
        );
        assert_eq!(
            s.session_namespaces,
            Some(["edge".to_owned(), "web".to_owned()].into())
        );
        let s = scope(&[
            "--watch-namespaces",
            "edge",
            "--session-namespaces",
            "teamgram",
        ]);
        assert_eq!(s.session_namespaces, Some(["teamgram".to_owned()].into()));
        let s = scope(&["--session-namespaces", "teamgram,"]);
        assert!(s.watch_namespaces.is_none());
        assert_eq!(s.session_namespaces, Some(["teamgram".to_owned()].into()));
    }
}
