//! The gateway's configuration file: the types `gateway.toml` deserialises
//! into, with their defaults. The gateway loads them (layered with the
//! environment and flags, then validated); the operator renders them from a
//! custom resource. One set of types, so the two cannot drift.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The DNS name sessions' certificates carry by default (the session
/// service's own default identity).
pub const DEFAULT_SESSION_PEER_NAME: &str = "mtproto-session";

/// The server's DH secret length by default: the 2048 bits the spec asks for.
pub const DEFAULT_DH_SECRET_BITS: u32 = 2048;

/// Seconds a gateway takes at most, after `shutdown_grace_secs`, to close
/// what is still open and exit: the pod's termination grace period must
/// cover `drain_delay_secs + shutdown_grace_secs` plus this.
pub const CLOSE_AFTER_GRACE_SECS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub log_level: String,
    pub data_dir: PathBuf,
    pub rsa_private_keys: Vec<PathBuf>,
    /// Accept `p_q_inner_data` padded the pre-RSA_PAD way (Telethon and other older clients).
    pub accept_legacy_rsa_padding: bool,
    pub listeners: Vec<Listener>,
    /// Admin endpoint (`/metrics`, `/healthz`, `/readyz`); off when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    pub session: SessionConfig,
    pub auth_keys: AuthKeysConfig,
    pub limits: LimitsConfig,
    pub handshake: HandshakeConfig,
    #[serde(default, skip_serializing_if = "RuntimeConfig::is_unset")]
    pub runtime: RuntimeConfig,
}

/// The most `runtime.worker_threads` and `runtime.handshake_threads`.
pub const MAX_RUNTIME_THREADS: usize = 1024;

/// How many threads the gateway runs. Unset, each is the number of CPUs the
/// process may use (its CPU affinity and cgroup quota), which in a pod with
/// a CPU request and no limit is every CPU of the node: threads far beyond
/// the CPU a process gets wake and sleep each other for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that serve connections and forward their messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    /// Handshakes' RSA and DH computations run at once, each on a thread of
    /// its own; more wait (within `limits.max_handshakes_in_progress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_threads: Option<usize>,
}

impl RuntimeConfig {
    fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// What handshakes here accept from clients, and their cryptography.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeConfig {
    /// A temp key (`p_q_inner_data_temp`) lives at most this long, whatever
    /// `expires_in` its client asked for.
    pub max_temp_key_expires_secs: u32,
    /// Length of the server's DH secret. 2048 is what the spec asks for; a
    /// shorter secret (at least 224 bits: twice the 112-bit strength of a
    /// 2048-bit safe-prime group, per NIST SP 800-56A and RFC 7919) makes
    /// the server's two exponentiations several times cheaper.
    pub dh_secret_bits: u32,
}

/// Where auth keys are kept and how the gateway caches them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthKeysConfig {
    /// Redis tier (`redis://host:6379/0`), read first; teamgram's key layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prepended to every Redis key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub redis_key_prefix: String,
    /// MySQL/MariaDB tier (`mysql://user:pass@host:3306/db`); teamgram's schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_url: Option<String>,
    /// SQLite file; the embedded default uses `<data_dir>/auth_keys.sqlite3`
    /// when neither Redis nor MySQL is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite_path: Option<PathBuf>,
    /// `session`: look keys up through the session service (teamgram's
    /// `session_queryAuthKey`); `store`: read the tiers above directly.
    pub lookup: KeyLookup,
    /// Where keys made by handshakes here are written: `session`
    /// (`session_setAuthKey`, teamgram's way) or `store` (the tiers above).
    pub writer: KeyLookup,
    pub cache_capacity_bytes: u64,
    pub cache_ttl_secs: u64,
    /// How long an unknown id is remembered as unknown.
    pub negative_cache_ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyLookup {
    Session,
    Store,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub address: SocketAddr,
    #[serde(default)]
    pub transport: ListenerTransport,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Sources (CIDRs) whose PROXY headers are honoured; from others a
    /// header closes the connection (`required`) or is ignored and counted
    /// (`optional`). Empty: any source (only safe behind a firewall).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_trusted_sources: Vec<ipnet::IpNet>,
    /// WebSocket only: the request path (web clients use `/apiws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// WebSocket only: allowed `Origin` header values; empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// WebSocket and HTTP only: certificate chain (PEM) to serve TLS with
    /// (`wss://`, `https://`) where no load balancer terminates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM, PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// The path WebSocket listeners serve unless configured.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/apiws";

impl Listener {
    /// A listener with no PROXY sources, path, origins or TLS.
    pub fn new(
        address: SocketAddr,
        transport: ListenerTransport,
        proxy_protocol: ProxyProtocol,
    ) -> Self {
        Self {
            address,
            transport,
            proxy_protocol,
            proxy_trusted_sources: Vec::new(),
            path: None,
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The WebSocket path, defaulted.
    pub fn websocket_path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_WEBSOCKET_PATH)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerTransport {
    /// Abridged, intermediate, padded intermediate, full and obfuscated2, detected per connection.
    #[default]
    Tcp,
    /// The same byte stream inside binary WebSocket messages (web clients; port 11443 by convention).
    Websocket,
    /// MTProto's HTTP transport: one message per `POST /api` body, long-poll with `http_wait`.
    Http,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// Clients connect directly; the socket peer is the client.
    #[default]
    Off,
    /// A PROXY v1/v2 header is used when present (mixed direct and proxied traffic).
    Optional,
    /// Every connection must start with a PROXY v1/v2 header, else it is closed;
    /// use this whenever a load balancer is the only way in, so clients cannot spoof addresses.
    Required,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub mode: SessionMode,
    /// Static session instances (`grpc://host:port` or `host:port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Address of this gateway's `gateway.RPCGateway` server.
    pub grpc_listen: SocketAddr,
    /// This gateway's id as sessions dial it; derived from `grpc_listen` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// Session connections the reverse path (`grpc_listen`) serves at once;
    /// each session instance that sends replies here holds one.
    pub max_reverse_connections: usize,
    /// Deadline of one session call.
    pub call_timeout_ms: u64,
    /// Retries of a transient session failure (with exponential backoff).
    pub retries: usize,
    /// Find session instances from the EndpointSlices of a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesDiscovery>,
    /// How messages are sharded over session instances.
    #[serde(default)]
    pub ring: RingKind,
    /// Mutual TLS with the session services, both gRPC directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SessionTls>,
    /// Plaintext gRPC by choice (teamgram Go sessions); logged as a warning.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plaintext: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionTls {
    /// CA bundle (PEM) sessions' certificates must chain to.
    pub ca_file: PathBuf,
    /// This gateway's certificate chain (PEM), valid for the gateway name sessions check.
    pub cert_file: PathBuf,
    /// The private key (PEM) of `cert_file`.
    pub key_file: PathBuf,
    /// The DNS SAN sessions' certificates must carry, as servers and as reverse-path callers.
    #[serde(default = "default_session_peer_name")]
    pub peer_name: String,
}

fn default_session_peer_name() -> String {
    DEFAULT_SESSION_PEER_NAME.to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RingKind {
    /// go-zero's consistent hash, as teamgram's sessions use (the only one so far).
    #[default]
    Gozero,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    pub namespace: String,
    /// The session Service.
    pub service: String,
    /// Its named gRPC port; the slices' only port when unset.
    #[serde(default)]
    pub port_name: Option<String>,
    /// How long a NotReady session keeps its place on the ring.
    #[serde(default = "default_not_ready_grace_ms")]
    pub not_ready_grace_ms: u64,
}

/// How long a NotReady session keeps its place on the ring by default.
pub const DEFAULT_NOT_READY_GRACE_MS: u64 = 5000;
/// Session connections the reverse path serves at once by default.
pub const DEFAULT_MAX_REVERSE_CONNECTIONS: usize = 128;

fn default_not_ready_grace_ms() -> u64 {
    DEFAULT_NOT_READY_GRACE_MS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// The built-in reference session, in this process.
    Embedded,
    /// Remote sessions, one unary gRPC call per message.
    Unary,
    /// Remote sessions over teamgram's bidirectional stream.
    Stream,
}

impl SessionMode {
    /// The name in the configuration (`embedded`, `unary`, `stream`).
    pub fn name(self) -> &'static str {
        match self {
            SessionMode::Embedded => "embedded",
            SessionMode::Unary => "unary",
            SessionMode::Stream => "stream",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub max_frame_bytes: usize,
    pub outbox_capacity: usize,
    /// Messages one connection has handed to the session and not yet seen
    /// accepted; at this many the connection stops reading (back-pressure).
    /// They are sent in order; 1 makes each wait for the one before it.
    /// At most 1,024: a connection polls all of them on each turn.
    pub forward_window: usize,
    pub max_sessions_per_connection: usize,
    /// After SIGTERM, seconds of lame duck: readiness is false but listeners
    /// keep accepting, so load balancers notice before connections are refused.
    pub drain_delay_secs: u64,
    /// Then seconds of drain; what is open after it is closed within
    /// [`CLOSE_AFTER_GRACE_SECS`].
    pub shutdown_grace_secs: u64,
    /// Open connections per listener; more are closed at accept.
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per /64); more are closed at once.
    pub max_connections_per_ip: usize,
    /// New handshakes (`req_pq`) per client address per minute, as a burst
    /// refilled evenly; beyond it the client gets transport error -429.
    pub handshakes_per_ip_per_minute: u32,
    /// HTTP transport: the longest an `http_wait` long-poll is held (clients' `max_wait` is capped to it).
    pub http_max_wait_ms: u64,
    /// HTTP transport: bytes of server messages queued per session between requests.
    pub http_queue_bytes: usize,
    /// From a frame's first byte to its last; a slower frame closes its connection.
    pub frame_timeout_secs: u64,
    /// Handshakes from `req_pq` until stored or failed, gateway-wide; beyond
    /// it a new `req_pq` gets -429.
    pub max_handshakes_in_progress: usize,
    /// Client bytes held in partial frames, gateway-wide; the connection
    /// that would pass it gets -429 and is closed.
    pub max_buffered_bytes: usize,
    /// Distinct sessions one auth key may have across all connections; a
    /// connection that adds one more gets -429 and is closed.
    pub max_sessions_per_auth_key: usize,
    /// HTTP transport: requests per client address per minute, as a burst
    /// refilled evenly; beyond it HTTP 429 with -429.
    pub http_requests_per_ip_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            data_dir: PathBuf::from("mtproto-gateway-data"),
            rsa_private_keys: Vec::new(),
            accept_legacy_rsa_padding: true,
            listeners: vec![Listener::new(
                SocketAddr::from(([0, 0, 0, 0], 10443)),
                ListenerTransport::Tcp,
                ProxyProtocol::Off,
            )],
            admin_listen: None,
            session: SessionConfig {
                mode: SessionMode::Embedded,
                endpoints: Vec::new(),
                grpc_listen: SocketAddr::from(([0, 0, 0, 0], 20110)),
                server_id: None,
                max_reverse_connections: DEFAULT_MAX_REVERSE_CONNECTIONS,
                call_timeout_ms: 5000,
                retries: 3,
                kubernetes: None,
                ring: RingKind::Gozero,
                tls: None,
                plaintext: false,
            },
            auth_keys: AuthKeysConfig {
                redis_url: None,
                redis_key_prefix: String::new(),
                mysql_url: None,
                sqlite_path: None,
                lookup: KeyLookup::Session,
                writer: KeyLookup::Session,
                cache_capacity_bytes: 64 << 20,
                cache_ttl_secs: 3600,
                negative_cache_ttl_secs: 10,
            },
            limits: LimitsConfig {
                handshake_timeout_secs: 30,
                idle_timeout_secs: 300,
                write_timeout_secs: 30,
                max_frame_bytes: 1 << 20,
                outbox_capacity: 256,
                forward_window: 16,
                max_sessions_per_connection: 64,
                drain_delay_secs: 0,
                shutdown_grace_secs: 30,
                max_connections: 100_000,
                max_connections_per_ip: 256,
                handshakes_per_ip_per_minute: 120,
                http_max_wait_ms: 25_000,
                http_queue_bytes: 1 << 20,
                frame_timeout_secs: 60,
                max_handshakes_in_progress: 1024,
                max_buffered_bytes: 256 << 20,
                max_sessions_per_auth_key: 256,
                http_requests_per_ip_per_minute: 6000,
            },
            handshake: HandshakeConfig {
                max_temp_key_expires_secs: 86_400,
                dh_secret_bits: DEFAULT_DH_SECRET_BITS,
            },
            runtime: RuntimeConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever serialisation leaves out (unset, empty) comes back as the same value.
    #[test]
    fn a_rendered_config_reads_back_unchanged() {
        let mut full = Config::default();
        full.listeners.push(Listener {
            proxy_trusted_sources: vec!["10.0.0.0/8".parse().expect("cidr")],
            path: Some("/apiws".into()),
            allowed_origins: vec!["https://web.example".into()],
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..Listener::new(
                SocketAddr::from(([0, 0, 0, 0], 11443)),
                ListenerTransport::Websocket,
                ProxyProtocol::Required,
            )
        });
        full.admin_listen = Some(SocketAddr::from(([0, 0, 0, 0], 9090)));
        full.session.mode = SessionMode::Stream;
        full.session.kubernetes = Some(KubernetesDiscovery {
            namespace: "teamgram".into(),
            service: "session".into(),
            port_name: Some("grpc".into()),
            not_ready_grace_ms: DEFAULT_NOT_READY_GRACE_MS,
        });
        full.session.tls = Some(SessionTls {
            ca_file: "ca.pem".into(),
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            peer_name: DEFAULT_SESSION_PEER_NAME.into(),
        });
        full.auth_keys.redis_key_prefix = "gw:".into();
        full.runtime = RuntimeConfig {
            worker_threads: Some(2),
            handshake_threads: Some(4),
        };
        let mut plaintext = Config::default();
        plaintext.session.plaintext = true;
        plaintext.session.endpoints = vec!["grpc://s:1".into()];
        for config in [Config::default(), full, plaintext] {
            let text = toml::to_string(&config).expect("serialises");
            let back: Config = toml::from_str(&text).expect(&text);
            assert_eq!(back, config, "{text}");
        }
    }

    #[test]
    fn unset_and_empty_fields_are_left_out() {
        let text = toml::to_string(&Config::default()).expect("serialises");
        for absent in [
            "admin_listen",
            "endpoints",
            "server_id",
            "kubernetes",
            "tls",
            "plaintext",
            "redis_url",
            "redis_key_prefix",
            "mysql_url",
            "sqlite_path",
            "proxy_trusted_sources",
            "allowed_origins",
            "path",
            "worker_threads",
            "handshake_threads",
        ] {
            assert!(
                !text.lines().any(|l| l.starts_with(&format!("{absent} ="))),
                "{absent} in {text}"
            );
        }
        assert!(!text.contains("[runtime]"), "{text}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = toml::from_str::<Config>("listen_on = 1\n")
            .expect_err("unknown field")
            .to_string();
        assert!(err.contains("listen_on"), "{err}");
    }
}
