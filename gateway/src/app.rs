//! Assembles the gateway from its configuration: keys, session, listeners.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::authkey::cache::{KeyCache, KeySource, StoreKeySource};
use crate::config::{session_address, Config, ConfigExt, KeyLookup, SessionMode};
use crate::loops::{self, Loops};
use crate::metrics::{BuildLabels, Metrics};
use crate::server::admin::{self, Readiness};
use crate::server::limiter::{Admission, Budgets};
use crate::server::registry::Registry;
use crate::server::reverse::ReversePath;
use crate::server::{self, BoundListener, Keys, Limits, Shared};
use crate::session::remote::{Mode, RemoteSession, RemoteSettings};
use crate::session::SessionKeySource;
use mtproto_core::handshake::HandshakeSettings;
use mtproto_core::pq::PqPool;
use mtproto_core::rsa::ServerKey;
use mtproto_session::discovery;
use mtproto_session::embedded::EmbeddedSession;
use mtproto_session::store;
use mtproto_session::tls::{GrpcSecurity, TlsFiles, TlsSettings};
use mtproto_session::SessionService;

/// File names of the generated key in the data directory.
pub const GENERATED_PRIVATE_KEY: &str = "server-rsa-private.pem";
pub const GENERATED_PUBLIC_KEY: &str = "server-rsa-public.pem";

/// Loads the configured RSA keys, or loads/generates the one in the data directory.
pub fn load_keys(config: &Config) -> anyhow::Result<Vec<ServerKey>> {
    if !config.rsa_private_keys.is_empty() {
        return config
            .rsa_private_keys
            .iter()
            .map(|path| {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("rsa_private_keys: cannot read {}", path.display()))?;
                ServerKey::from_pem(&pem).with_context(|| {
                    format!("rsa_private_keys: {} is not a usable key", path.display())
                })
            })
            .collect();
    }
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("data_dir: cannot create {}", dir.display()))?;
    let private_path = dir.join(GENERATED_PRIVATE_KEY);
    let key = if private_path.exists() {
        let pem = std::fs::read_to_string(&private_path)
            .with_context(|| format!("cannot read {}", private_path.display()))?;
        ServerKey::from_pem(&pem)
            .with_context(|| format!("{} is not a usable key", private_path.display()))?
    } else {
        let key = ServerKey::generate(&mut rand::thread_rng())?;
        write_private(&private_path, &key.private_pkcs1_pem()?)?;
        key
    };
    let public_path = dir.join(GENERATED_PUBLIC_KEY);
    std::fs::write(&public_path, key.public_pkcs1_pem()?)
        .with_context(|| format!("cannot write {}", public_path.display()))?;
    info!(
        fingerprint = format!("{:016x}", key.fingerprint() as u64),
        public_key = %public_path.display(),
        "using the generated server RSA key; give clients this public key"
    );
    Ok(vec![key])
}

fn write_private(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(pem.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How the session gRPC links are secured: `session.tls`, explicit
/// plaintext, or nothing configured (plaintext with a louder warning).
fn grpc_security(s: &crate::config::SessionConfig) -> anyhow::Result<GrpcSecurity> {
    match (&s.tls, s.plaintext) {
        (Some(t), _) => {
            let files = TlsFiles::load(TlsSettings {
                ca_file: t.ca_file.clone(),
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                peer_name: t.peer_name.clone(),
            })
            .map_err(|e| anyhow::anyhow!("session.tls: {e}"))?;
            Ok(GrpcSecurity::Tls(files))
        }
        (None, true) => Ok(GrpcSecurity::Plaintext),
        (None, false) => Ok(GrpcSecurity::Unconfigured),
    }
}

/// Encrypted bytes a connection holds for a client that reads slowly before
/// it stops taking server messages (they wait in its outbox, then delivery
/// reports them undelivered). One frame always fits.
const UNSENT_BYTES_PER_CONNECTION: usize = 256 * 1024;

/// How long the reverse-path gRPC server may take to close its session
/// connections after the drain (less when the close after the grace has
/// used up [`server::CLOSE_AFTER_GRACE`]).
const GRPC_STOP: Duration = Duration::from_secs(5);

/// A configured gateway, bound and ready to serve.
#[derive(Debug)]
pub struct Gateway {
    listeners: Vec<BoundListener>,
    /// The reverse-path gRPC server, in remote session modes (TLS when set).
    grpc: Option<(TcpListener, ReversePath, Option<Arc<TlsFiles>>)>,
    admin: Option<TcpListener>,
    readiness: Arc<Readiness>,
    shared: Arc<Shared>,
    /// With a remote session, the event loops of TCP and WebSocket
    /// connections; they stop when serving ends.
    loops: Option<(Arc<Loops>, loops::Running)>,
    /// Lame duck after SIGTERM, before accepting stops.
    drain_delay: Duration,
    grace: Duration,
}

impl Gateway {
    pub async fn build(config: &Config) -> anyhow::Result<Self> {
        let keys = load_keys(config)?;
        for key in &keys {
            info!(
                fingerprint = format!("{:016x}", key.fingerprint() as u64),
                "serving RSA key"
            );
        }
        // The DH group's table of powers of g, built now rather than by the first handshake.
        mtproto_core::dh::params();
        let handshake = Arc::new(HandshakeSettings {
            keys,
            pq_pool: PqPool::generate(256, &mut rand::thread_rng()),
            accept_legacy_rsa_padding: config.accept_legacy_rsa_padding,
            max_temp_key_expires_secs: config.handshake.max_temp_key_expires_secs as i32,
            dh_secret_bits: config.handshake.dh_secret_bits,
        });
        let l = &config.limits;
        let metrics = Arc::new(Metrics::default());
        metrics
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                session_mode: config.session.mode.name(),
            })
            .set(1);
        metrics
            .connections_limit
            .set(i64::try_from(l.max_connections).unwrap_or(i64::MAX));
        let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
        let handshake_threads = config.handshake_threads();
        metrics
            .worker_threads
            .set(i64::try_from(worker_threads).unwrap_or(i64::MAX));
        metrics
            .handshake_threads
            .set(i64::try_from(handshake_threads).unwrap_or(i64::MAX));
        info!(worker_threads, handshake_threads, "runtime");
        let registry = Arc::new(Registry::new(
            metrics.clone(),
            config.limits.max_sessions_per_auth_key,
        ));
        let urls = config.store_urls();
        let key_store = store::open(&urls, &metrics.store)
            .await
            .map_err(|e| anyhow::anyhow!("auth_keys: {e}"))?;
        info!(
            redis = urls.redis_url.is_some(),
            mysql = urls.mysql_url.is_some(),
            sqlite = ?urls.sqlite_path,
            "auth key store"
        );
        let s = &config.session;
        let mut remote_session = None;
        let (session, grpc, server_id): (Arc<dyn SessionService>, _, _) = match s.mode {
            SessionMode::Embedded => (
                Arc::new(EmbeddedSession::with_unpack_budget(
                    key_store.clone(),
                    registry.clone(),
                    l.max_frame_bytes as u64,
                )),
                None,
                "embedded".to_string(),
            ),
            SessionMode::Unary | SessionMode::Stream => {
                let members = s
                    .endpoints
                    .iter()
                    .map(|e| session_address(e))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let settings = RemoteSettings {
                    mode: if s.mode == SessionMode::Stream {
                        Mode::Stream
                    } else {
                        Mode::Unary
                    },
                    call_timeout: Duration::from_millis(s.call_timeout_ms),
                    retries: s.retries,
                    backoff: Duration::from_millis(50),
                };
                let server_id = config.server_id()?;
                let security = grpc_security(s)?;
                security.log("session", "session.tls (ca_file, cert_file, key_file)");
                let listener = TcpListener::bind(s.grpc_listen).await.with_context(|| {
                    format!("session.grpc_listen: cannot listen on {}", s.grpc_listen)
                })?;
                info!(members = ?members, mode = ?s.mode, %server_id, "forwarding to session services");
                let remote = Arc::new(
                    RemoteSession::new(members, settings, metrics.session_rpc.clone())
                        .with_tls(security.tls())
                        .with_stream_replies(
                            registry.clone(),
                            metrics.session_stream_replies.clone(),
                        ),
                );
                if let Some(k) = &s.kubernetes {
                    let client = kube::Client::try_default().await.context(
                        "session.kubernetes: no Kubernetes client config (in-cluster or KUBECONFIG)",
                    )?;
                    let target = discovery::Target {
                        namespace: k.namespace.clone(),
                        service: k.service.clone(),
                        port_name: k.port_name.clone(),
                        not_ready_grace: Duration::from_millis(k.not_ready_grace_ms),
                    };
                    info!(namespace = %k.namespace, service = %k.service, "discovering sessions from EndpointSlices");
                    let ring = remote.clone();
                    tokio::spawn(discovery::run(client, target, move |members| {
                        ring.set_members(members)
                    }));
                }
                remote_session = Some(remote.clone());
                (
                    remote,
                    Some((
                        listener,
                        ReversePath::new(
                            registry.clone(),
                            metrics.clone(),
                            config.session.max_reverse_connections,
                        ),
                        security.tls(),
                    )),
                    server_id,
                )
            }
        };
        // With a remote session, a connection's work (its socket, its session
        // link, the replies) stays on one thread: see `crate::loops`. The
        // embedded session's workers run on the main runtime, and its
        // connections stay there with them.
        let loops = match s.mode {
            SessionMode::Embedded => None,
            SessionMode::Unary | SessionMode::Stream => {
                info!(
                    event_loops = worker_threads,
                    "TCP and WebSocket connections run on event loops"
                );
                let loops = Loops::start(worker_threads, metrics.clone())
                    .context("cannot start the event loops")?;
                Some(loops)
            }
        };
        let limits = Limits {
            connection: Arc::new(mtproto_core::connection::Settings {
                handshake_timeout: Duration::from_secs(l.handshake_timeout_secs),
                idle_timeout: Duration::from_secs(l.idle_timeout_secs),
                write_timeout: Duration::from_secs(l.write_timeout_secs),
                max_frame_bytes: l.max_frame_bytes,
                max_sessions: l.max_sessions_per_connection,
                forward_window: l.forward_window,
                max_unsent_bytes: UNSENT_BYTES_PER_CONNECTION.max(l.max_frame_bytes),
                frame_timeout: Duration::from_secs(l.frame_timeout_secs),
            }),
            outbox_capacity: l.outbox_capacity,
            max_connections: l.max_connections,
            http_max_wait: Duration::from_millis(l.http_max_wait_ms),
            http_queue_bytes: l.http_queue_bytes,
        };
        let key_writer = (config.auth_keys.writer == KeyLookup::Store).then(|| key_store.clone());
        let key_source: Arc<dyn KeySource> = match config.auth_keys.lookup {
            KeyLookup::Session => Arc::new(SessionKeySource(session.clone())),
            KeyLookup::Store => Arc::new(StoreKeySource(key_store)),
        };
        let listeners = server::bind_all(&config.listeners, l.max_frame_bytes).await?;
        for listener in &listeners {
            if let Some(addr) = listener.local_addr() {
                let endpoint = &listener.endpoint;
                let tls = endpoint.tls.is_some();
                if endpoint.proxy_protocol != crate::config::ProxyProtocol::Off
                    && endpoint.proxy_trusted_sources.is_empty()
                {
                    warn!(%addr, "PROXY headers are honoured from any source: clients that reach this port directly can choose their address; set proxy_trusted_sources to the load balancers' CIDRs");
                }
                match &endpoint.websocket {
                    Some(ws) => {
                        info!(%addr, path = %ws.path, tls, proxy_protocol = ?endpoint.proxy_protocol, "listening for MTProto WebSocket clients")
                    }
                    None if endpoint.http => {
                        info!(%addr, tls, proxy_protocol = ?endpoint.proxy_protocol, "listening for MTProto HTTP clients")
                    }
                    None => {
                        info!(%addr, proxy_protocol = ?endpoint.proxy_protocol, "listening for MTProto TCP clients")
                    }
                }
            }
        }
        let shared = Arc::new(Shared {
            handshake,
            session,
            registry,
            keys: Keys {
                cache: KeyCache::new(
                    config.auth_keys.cache_capacity_bytes,
                    Duration::from_secs(config.auth_keys.cache_ttl_secs),
                    Duration::from_secs(config.auth_keys.negative_cache_ttl_secs),
                ),
                source: key_source,
                writer: key_writer,
            },
            limits,
            admission: Arc::new(Admission::new(
                l.max_connections,
                l.max_connections_per_ip,
                l.handshakes_per_ip_per_minute,
                l.http_requests_per_ip_per_minute,
            )),
            budgets: Arc::new(Budgets::new(
                l.max_handshakes_in_progress,
                metrics.handshakes_in_progress.clone(),
                l.max_buffered_bytes,
                metrics.buffered_bytes.clone(),
            )),
            server_id: server_id.into(),
            metrics,
            connection_ids: Default::default(),
            http: Default::default(),
            close_reports: tokio::sync::Semaphore::new(server::CLOSE_REPORTS_IN_FLIGHT),
            handshake_pool: server::HandshakePool::new(handshake_threads),
            drain: Default::default(),
        });
        let admin = match config.admin_listen {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            listeners,
            grpc,
            admin,
            readiness: Arc::new(Readiness::new(remote_session)),
            shared,
            loops,
            drain_delay: Duration::from_secs(l.drain_delay_secs),
            grace: Duration::from_secs(l.shutdown_grace_secs),
        })
    }

    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(BoundListener::local_addr)
            .collect()
    }

    /// The event loops serving TCP and WebSocket connections (remote
    /// session modes).
    pub fn event_loops(&self) -> Option<&Arc<Loops>> {
        self.loops.as_ref().map(|(loops, _)| loops)
    }

    pub async fn serve(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        // The reverse path and the admin endpoint outlive the drain: draining
        // connections still get their replies, and probes still get answers.
        let (after_drain, drained) = watch::channel(false);
        let grpc = self.grpc.map(|(listener, reverse, tls)| {
            let addr = listener.local_addr().ok();
            info!(?addr, "serving gateway.RPCGateway for session replies");
            tokio::spawn(reverse.serve(listener, tls, drained.clone()))
        });
        let admin = self.admin.map(|listener| {
            info!(addr = ?listener.local_addr().ok(), "serving /metrics, /healthz, /readyz");
            tokio::spawn(admin::serve(
                listener,
                self.shared.clone(),
                self.readiness.clone(),
                drained,
            ))
        });
        // Readiness turns false at SIGTERM; accepting stops only after the
        // lame-duck delay, while endpoints and load balancers catch up.
        let (stop_accepting_tx, stop_accepting) = watch::channel(false);
        let readiness = self.readiness.clone();
        let drain_delay = self.drain_delay;
        let mut draining = shutdown;
        tokio::spawn(async move {
            if draining.wait_for(|stop| *stop).await.is_ok() {
                readiness.start_draining();
                if !drain_delay.is_zero() {
                    info!(
                        delay = ?drain_delay,
                        "lame duck: not ready, still accepting connections"
                    );
                    tokio::time::sleep(drain_delay).await;
                }
            }
            // Also reached when the sender is dropped: stop then too.
            let _ = stop_accepting_tx.send(true);
        });
        let (loops, running) = self.loops.unzip();
        let closed_by = server::serve(
            self.listeners,
            self.shared,
            loops,
            stop_accepting,
            self.grace,
        )
        .await;
        // Whatever is left on the loops (connections still closing at the
        // deadline) is dropped with them.
        drop(running);
        let _ = after_drain.send(true);
        if let Some(task) = admin {
            task.await.context("admin task")?.context("admin server")?;
        }
        if let Some(mut task) = grpc {
            // A graceful HTTP/2 close waits for each peer to answer a ping:
            // a session that hangs (or is stopped) would hold the exit forever.
            let stop_by = closed_by.min(tokio::time::Instant::now() + GRPC_STOP);
            match tokio::time::timeout_at(stop_by, &mut task).await {
                Ok(stopped) => stopped.context("gRPC server task")?,
                Err(_) => {
                    warn!("the reverse-path gRPC server did not stop in time: a session peer does not answer; closing it");
                    task.abort();
                }
            }
        }
        Ok(())
    }
}
