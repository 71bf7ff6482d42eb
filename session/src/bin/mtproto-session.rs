//! `mtproto-session`: the reference session as a gRPC service, wire-compatible
//! with teamgram's `session.RPCSession`/`RPCSessionStream`. It answers MTProto
//! service messages and refuses API calls, like the gateway's embedded session.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::info;

use mtproto_session::discovery;
use mtproto_session::embedded::EmbeddedSession;
use mtproto_session::grpc_server::{self, RemoteGateways, SessionGrpc};
use mtproto_session::logging::{self, LogFormat};
use mtproto_session::metrics::StoreMetrics;
use mtproto_session::ring::Ring;
use mtproto_session::store::{self, StoreUrls};
use mtproto_session::tls::{self, GrpcSecurity, TlsFiles, TlsSettings};

#[derive(Debug, Parser)]
#[command(
    name = "mtproto-session",
    version,
    about = "Reference MTProto session service"
)]
struct Cli {
    /// gRPC listen address.
    #[arg(long, default_value = "0.0.0.0:20120", env = "MTPROTO_SESSION_LISTEN")]
    listen: SocketAddr,
    /// This instance's ring member string (`podIP:port`); default: the listen
    /// address, with $POD_IP for an unspecified host.
    #[arg(long, env = "MTPROTO_SESSION_ADVERTISE")]
    advertise: Option<String>,
    /// Every session instance on the ring, this one included (repeatable).
    /// Messages for keys another member owns get `REDIRECT_TO_<owner>`.
    /// Outside Kubernetes; with --kubernetes-service the ring follows the
    /// Service instead.
    #[arg(
        long = "member",
        value_name = "HOST:PORT",
        conflicts_with = "kubernetes_service"
    )]
    members: Vec<String>,
    /// Follow this Service's EndpointSlices for the ring (ready endpoints as
    /// `podIP:port`, as the gateways see them); in-cluster config or KUBECONFIG.
    #[arg(long, env = "MTPROTO_SESSION_KUBERNETES_SERVICE")]
    kubernetes_service: Option<String>,
    /// Namespace of --kubernetes-service (default: $POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    kubernetes_namespace: String,
    /// The Service's port name (default: the slices' only port).
    #[arg(long, env = "MTPROTO_SESSION_KUBERNETES_PORT_NAME")]
    kubernetes_port_name: Option<String>,
    /// How long a NotReady endpoint keeps its place on the ring (as the gateways' setting).
    #[arg(long, default_value_t = 5000)]
    kubernetes_not_ready_grace_ms: u64,
    /// Redis tier for auth keys (teamgram layout), read first.
    #[arg(long, env = "MTPROTO_SESSION_REDIS_URL")]
    redis_url: Option<String>,
    /// MySQL/MariaDB tier for auth keys (teamgram schema).
    #[arg(long, env = "MTPROTO_SESSION_MYSQL_URL")]
    mysql_url: Option<String>,
    /// SQLite file for auth keys. With no store at all, keys live in memory.
    #[arg(long)]
    sqlite_path: Option<std::path::PathBuf>,
    /// How long a gateway may leave a reply unanswered (and take to connect)
    /// before its delivery stream or call is given up.
    #[arg(long, default_value_t = 5000)]
    gateway_timeout_ms: u64,
    /// CA bundle (PEM) gateways' certificates must chain to; with --tls-cert
    /// and --tls-key, turns on mutual TLS for both gRPC directions (re-read
    /// when the files change).
    #[arg(long, env = "MTPROTO_SESSION_TLS_CA", requires_all = ["tls_cert", "tls_key"], conflicts_with = "plaintext")]
    tls_ca: Option<PathBuf>,
    /// This session's certificate chain (PEM), valid for the session name gateways check.
    #[arg(long, env = "MTPROTO_SESSION_TLS_CERT", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "MTPROTO_SESSION_TLS_KEY", requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// The DNS SAN gateways' certificates must carry, as callers and as reply targets.
    #[arg(long, env = "MTPROTO_SESSION_TLS_PEER_NAME", default_value = tls::DEFAULT_GATEWAY_NAME)]
    tls_peer_name: String,
    /// Serve and dial gateways without TLS (teamgram Go gateways); logged as a warning.
    #[arg(long, env = "MTPROTO_SESSION_PLAINTEXT")]
    plaintext: bool,
    #[arg(long, default_value = "info", env = "MTPROTO_SESSION_LOG_LEVEL")]
    log_level: String,
    /// Log lines as human-readable text or as one JSON object each.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MTPROTO_LOG_FORMAT")]
    log_format: LogFormat,
}

fn security(cli: &Cli) -> anyhow::Result<GrpcSecurity> {
    if cli.plaintext {
        return Ok(GrpcSecurity::Plaintext);
    }
    let (Some(ca_file), Some(cert_file), Some(key_file)) =
        (&cli.tls_ca, &cli.tls_cert, &cli.tls_key)
    else {
        return Ok(GrpcSecurity::Unconfigured);
    };
    let files = TlsFiles::load(TlsSettings {
        ca_file: ca_file.clone(),
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
        peer_name: cli.tls_peer_name.clone(),
    })
    .context("--tls-ca/--tls-cert/--tls-key/--tls-peer-name")?;
    Ok(GrpcSecurity::Tls(files))
}

fn advertise(cli: &Cli) -> anyhow::Result<String> {
    if let Some(a) = &cli.advertise {
        return Ok(a.clone());
    }
    if !cli.listen.ip().is_unspecified() {
        return Ok(cli.listen.to_string());
    }
    let ip = std::env::var("POD_IP").context(
        "--advertise: the listen address is unspecified; pass --advertise HOST:PORT or set POD_IP",
    )?;
    Ok(format!("{ip}:{}", cli.listen.port()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    let me = advertise(&cli)?;
    let security = security(&cli)?;
    security.log("session", "--tls-ca, --tls-cert and --tls-key");
    let members = if cli.members.is_empty() {
        vec![me.clone()]
    } else {
        cli.members.clone()
    };
    let gateways = Arc::new(
        RemoteGateways::new(Duration::from_millis(cli.gateway_timeout_ms)).with_tls(security.tls()),
    );
    let urls = StoreUrls {
        redis_url: cli.redis_url.clone(),
        redis_key_prefix: String::new(),
        mysql_url: cli.mysql_url.clone(),
        sqlite_path: cli.sqlite_path.clone(),
    };
    let key_store = store::open(&urls, &StoreMetrics::default())
        .await
        .context("auth key store")?;
    let session = Arc::new(EmbeddedSession::new(key_store, gateways.clone()));
    let service = Arc::new(
        SessionGrpc::new(session, Ring::new(members.clone()), me.clone())
            .with_stream_replies(gateways),
    );
    if let Some(name) = &cli.kubernetes_service {
        let client = kube::Client::try_default().await.context(
            "--kubernetes-service: no Kubernetes client config (in-cluster or KUBECONFIG)",
        )?;
        let target = discovery::Target {
            namespace: cli.kubernetes_namespace.clone(),
            service: name.clone(),
            port_name: cli.kubernetes_port_name.clone(),
            not_ready_grace: Duration::from_millis(cli.kubernetes_not_ready_grace_ms),
        };
        info!(namespace = %target.namespace, service = %name, "ring follows the Service's EndpointSlices");
        let ring = service.clone();
        tokio::spawn(discovery::run(client, target, move |members| {
            ring.set_members(members)
        }));
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {}", cli.listen))?;
    info!(listen = %cli.listen, %me, ?members, "mtproto-session serving session.RPCSession");
    let stopping = Arc::new(tokio::sync::Notify::new());
    let server = tonic::transport::Server::builder()
        .add_routes(grpc_server::routes(service))
        .serve_with_incoming_shutdown(tls::incoming(listener, security.tls()), {
            let stopping = stopping.clone();
            async move { stopping.notified().await }
        });
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served.context("gRPC server")?,
        () = shutdown_signal() => {
            // Calls in progress finish; a gateway's open stream never would.
            stopping.notify_one();
            match tokio::time::timeout(STOP_GRACE, server).await {
                Ok(served) => served.context("gRPC server")?,
                Err(_) => info!("streams still open after {STOP_GRACE:?}; closing them"),
            }
        }
    }
    info!("stopped");
    Ok(())
}

/// How long calls in progress may take after SIGTERM before the session exits.
const STOP_GRACE: Duration = Duration::from_secs(5);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
