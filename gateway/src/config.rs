//! Configuration: defaults, then a TOML file (`--config`), then environment
//! variables (`MTPROTO_GATEWAY_*`, `__` between section and key), then flags.
//! Errors name the field and say how to fix it. The file's types live in
//! `mtproto-config`, shared with the operator that renders them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use mtproto_session::logging::LogFormat;
use serde::Serialize;

pub use mtproto_config::{
    AuthKeysConfig, Config, HandshakeConfig, KeyLookup, KubernetesDiscovery, LimitsConfig,
    Listener, ListenerTransport, ProxyProtocol, RingKind, RuntimeConfig, SessionConfig,
    SessionMode, SessionTls, DEFAULT_WEBSOCKET_PATH, MAX_RUNTIME_THREADS,
};

pub const ENV_PREFIX: &str = "MTPROTO_GATEWAY_";

/// The largest `limits.forward_window`: a connection's forwards are polled
/// together on each of its turns, so their count is its cost per turn.
const MAX_FORWARD_WINDOW: usize = 1024;
/// The most `session.max_reverse_connections`: each may hold up to 32 MiB of
/// unfinished requests.
const MAX_REVERSE_CONNECTIONS: usize = 4096;

/// Top-level settings that environment variables may set. Other variables with
/// the prefix are ignored: Kubernetes injects `MTPROTO_GATEWAY_SERVICE_HOST`
/// and the like for a Service of that name.
const ENV_SETTINGS: [&str; 11] = [
    "admin_listen",
    "log_level",
    "data_dir",
    "rsa_private_keys",
    "accept_legacy_rsa_padding",
    "listeners",
    "session",
    "auth_keys",
    "limits",
    "handshake",
    "runtime",
];

/// Command-line flags. Each one overrides the same setting from the file and environment.
#[derive(Debug, Parser)]
#[command(name = "mtproto-gateway", version, about = "MTProto edge gateway")]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH", env = "MTPROTO_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to accept MTProto TCP clients on (all TCP transports are detected). Repeatable.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Address to accept MTProto over WebSocket on (path /apiws; 11443 by convention). Repeatable.
    #[arg(long = "listen-ws", value_name = "ADDR")]
    pub listen_ws: Vec<SocketAddr>,
    /// Address to accept MTProto's HTTP transport on (POST /api, /apiw, /apiw1). Repeatable.
    #[arg(long = "listen-http", value_name = "ADDR")]
    pub listen_http: Vec<SocketAddr>,
    /// PROXY protocol (v1 and v2) on the --listen, --listen-ws and --listen-http listeners: off, optional or required.
    #[arg(long, value_name = "MODE", value_parser = ["off", "optional", "required"])]
    pub proxy_protocol: Option<String>,
    /// Addresses (CIDR) whose PROXY headers those listeners honour. Repeatable; none: any source.
    #[arg(long = "proxy-trusted-source", value_name = "CIDR")]
    pub proxy_trusted_sources: Vec<ipnet::IpNet>,
    /// Server RSA private key (PEM, PKCS#1 or PKCS#8). Repeatable: the first is
    /// primary, all are offered to clients (key rotation). Without one, a key is
    /// generated and kept in the data directory.
    #[arg(long = "rsa-private-key", value_name = "PATH")]
    pub rsa_private_key: Vec<PathBuf>,
    /// Directory for the generated RSA key and other state.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as human-readable text or as one JSON object each (for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MTPROTO_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Session service instance (`grpc://host:port`). Repeatable: requests are
    /// sharded over them on teamgram's consistent-hash ring. Without one, the
    /// built-in reference session answers in process.
    #[arg(long = "session", value_name = "URL")]
    pub session: Vec<String>,
    /// How to call session services: one gRPC call per message, or teamgram's
    /// bidirectional stream.
    #[arg(long, value_name = "MODE", value_parser = ["unary", "stream"])]
    pub session_mode: Option<String>,
    /// Where this gateway serves `gateway.RPCGateway` for replies from sessions.
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// Admin endpoint (`/metrics`, `/healthz`, `/readyz`); off when unset.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// This gateway's address as sessions should dial it (default: the gRPC
    /// listen address, with $POD_IP when that is 0.0.0.0).
    #[arg(long, value_name = "HOST:PORT")]
    pub server_id: Option<String>,
}

/// Flags that were given, as a figment layer.
#[derive(Debug, Default, Serialize)]
struct CliOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rsa_private_keys: Option<Vec<PathBuf>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listeners: Option<Vec<Listener>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "SessionOverrides::is_empty")]
    session: SessionOverrides,
}

#[derive(Debug, Default, Serialize)]
struct SessionOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<SessionMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_id: Option<String>,
}

impl SessionOverrides {
    fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.endpoints.is_none()
            && self.grpc_listen.is_none()
            && self.server_id.is_none()
    }
}

/// Loading and the settings the gateway derives, on the shared [`Config`].
pub trait ConfigExt: Sized {
    /// Builds the configuration from all layers and validates it.
    fn load(cli: &Cli) -> anyhow::Result<Self>;
    /// The key stores: the configured tiers, else SQLite in the data
    /// directory for the embedded session, else none (memory).
    fn store_urls(&self) -> mtproto_session::store::StoreUrls;
    /// This gateway's `server_id`: configured, or the gRPC listen address
    /// with `$POD_IP` in place of an unspecified host.
    fn server_id(&self) -> anyhow::Result<String>;
    /// `runtime.worker_threads`, else the CPUs this process may use.
    fn worker_threads(&self) -> usize;
    /// `runtime.handshake_threads`, else the CPUs this process may use.
    fn handshake_threads(&self) -> usize;
}

/// The layers and checks behind [`ConfigExt::load`] (a trait: the shared
/// type takes no inherent methods outside its crate).
trait Layers: Sized {
    fn env_filter(env: Env) -> Env;
    fn load_from(cli: &Cli, env: Env) -> anyhow::Result<Self>;
    fn validate(&self) -> anyhow::Result<()>;
}

impl Layers for Config {
    fn env_filter(env: Env) -> Env {
        env.filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            ENV_SETTINGS.iter().any(|s| {
                key.strip_prefix(*s).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('.') || rest.starts_with("__")
                })
            })
        })
    }

    fn load_from(cli: &Cli, env: Env) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &cli.config {
            if !path.exists() {
                anyhow::bail!("--config {}: file not found", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let overrides = CliOverrides {
            log_level: cli.log_level.clone(),
            data_dir: cli.data_dir.clone(),
            rsa_private_keys: (!cli.rsa_private_key.is_empty())
                .then(|| cli.rsa_private_key.clone()),
            listeners: (!cli.listen.is_empty()
                || !cli.listen_ws.is_empty()
                || !cli.listen_http.is_empty())
            .then(|| {
                let proxy = match cli.proxy_protocol.as_deref() {
                    Some("required") => ProxyProtocol::Required,
                    Some("optional") => ProxyProtocol::Optional,
                    _ => ProxyProtocol::Off,
                };
                let listener = |address, transport| Listener {
                    proxy_trusted_sources: cli.proxy_trusted_sources.clone(),
                    ..Listener::new(address, transport, proxy)
                };
                let tcp = cli
                    .listen
                    .iter()
                    .map(|&a| listener(a, ListenerTransport::Tcp));
                let ws = cli
                    .listen_ws
                    .iter()
                    .map(|&a| listener(a, ListenerTransport::Websocket));
                let http = cli
                    .listen_http
                    .iter()
                    .map(|&a| listener(a, ListenerTransport::Http));
                tcp.chain(ws).chain(http).collect()
            }),
            admin_listen: cli.admin_listen,
            session: SessionOverrides {
                mode: match cli.session_mode.as_deref() {
                    Some("stream") => Some(SessionMode::Stream),
                    Some(_) => Some(SessionMode::Unary),
                    None if !cli.session.is_empty() => Some(SessionMode::Unary),
                    None => None,
                },
                endpoints: (!cli.session.is_empty()).then(|| cli.session.clone()),
                grpc_listen: cli.grpc_listen,
                server_id: cli.server_id.clone(),
            },
        };
        let config: Config = figment
            .merge(Self::env_filter(env))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let l = &self.limits;
        let checks: [(bool, &str); 15] = [
            (
                !self.listeners.is_empty(),
                "listeners: at least one listener is needed (e.g. --listen 0.0.0.0:10443)",
            ),
            (
                (1024..=16 << 20).contains(&l.max_frame_bytes),
                "limits.max_frame_bytes must be between 1024 and 16777216",
            ),
            (
                l.handshake_timeout_secs >= 1,
                "limits.handshake_timeout_secs must be at least 1",
            ),
            (
                l.idle_timeout_secs >= 1,
                "limits.idle_timeout_secs must be at least 1",
            ),
            (
                l.write_timeout_secs >= 1,
                "limits.write_timeout_secs must be at least 1",
            ),
            (
                l.outbox_capacity >= 1,
                "limits.outbox_capacity must be at least 1",
            ),
            (
                l.max_sessions_per_connection >= 1,
                "limits.max_sessions_per_connection must be at least 1",
            ),
            (
                l.max_connections >= 1
                    && l.max_connections_per_ip >= 1
                    && l.handshakes_per_ip_per_minute >= 1,
                "limits.max_connections, limits.max_connections_per_ip and limits.handshakes_per_ip_per_minute must be at least 1",
            ),
            (
                (1..=300_000).contains(&l.http_max_wait_ms),
                "limits.http_max_wait_ms must be between 1 and 300000",
            ),
            (
                l.http_queue_bytes >= 1024,
                "limits.http_queue_bytes must be at least 1024",
            ),
            (
                l.frame_timeout_secs >= 1,
                "limits.frame_timeout_secs must be at least 1",
            ),
            (
                l.max_handshakes_in_progress >= 1 && l.max_sessions_per_auth_key >= 1,
                "limits.max_handshakes_in_progress and limits.max_sessions_per_auth_key must be at least 1",
            ),
            (
                l.max_buffered_bytes >= l.max_frame_bytes,
                "limits.max_buffered_bytes must be at least limits.max_frame_bytes (one whole frame must fit); raise it or lower max_frame_bytes",
            ),
            (
                l.http_requests_per_ip_per_minute >= 1,
                "limits.http_requests_per_ip_per_minute must be at least 1",
            ),
            (
                (mtproto_core::dh::MIN_SECRET_BITS..=mtproto_core::dh::SPEC_SECRET_BITS)
                    .contains(&self.handshake.dh_secret_bits),
                "handshake.dh_secret_bits must be between 224 (twice the 112-bit strength of \
                 the 2048-bit group) and 2048 (the spec's length, the default)",
            ),
        ];
        for (ok, message) in checks {
            if !ok {
                anyhow::bail!("invalid configuration: {message}");
            }
        }
        if !(1..=MAX_FORWARD_WINDOW).contains(&l.forward_window) {
            anyhow::bail!(
                "invalid configuration: limits.forward_window must be between 1 and \
                 {MAX_FORWARD_WINDOW} (a connection polls every message it has with the session \
                 on each turn and holds each until it is accepted)"
            );
        }
        for (field, threads) in [
            ("worker_threads", self.runtime.worker_threads),
            ("handshake_threads", self.runtime.handshake_threads),
        ] {
            if threads.is_some_and(|n| !(1..=MAX_RUNTIME_THREADS).contains(&n)) {
                anyhow::bail!(
                    "invalid configuration: runtime.{field} must be between 1 and {MAX_RUNTIME_THREADS}; \
                     leave it unset for one per CPU this process may use"
                );
            }
        }
        if !(1..=i32::MAX as u32).contains(&self.handshake.max_temp_key_expires_secs) {
            anyhow::bail!(
                "invalid configuration: handshake.max_temp_key_expires_secs must be between 1 and \
                 2147483647 (default 86400, a day)"
            );
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let websocket = listener.transport == ListenerTransport::Websocket;
            if !websocket && (listener.path.is_some() || !listener.allowed_origins.is_empty()) {
                anyhow::bail!(
                    "invalid configuration: listeners[{i}]: path and allowed_origins apply only to \
                     transport = \"websocket\"; remove them or change the transport"
                );
            }
            match (&listener.tls_cert, &listener.tls_key) {
                (Some(_), Some(_)) if listener.transport == ListenerTransport::Tcp => anyhow::bail!(
                    "invalid configuration: listeners[{i}].tls_cert: TLS applies only to transport = \"websocket\" \
                     or \"http\" (MTProto over TCP has its own obfuscation); remove tls_cert and tls_key"
                ),
                (Some(_), None) => anyhow::bail!(
                    "invalid configuration: listeners[{i}].tls_key is missing (tls_cert is set); give both or neither"
                ),
                (None, Some(_)) => anyhow::bail!(
                    "invalid configuration: listeners[{i}].tls_cert is missing (tls_key is set); give both or neither"
                ),
                _ => {}
            }
            if !listener.websocket_path().starts_with('/') {
                anyhow::bail!(
                    "invalid configuration: listeners[{i}].path must start with '/' (e.g. \"/apiws\")"
                );
            }
        }
        let s = &self.session;
        match s.mode {
            SessionMode::Embedded if !s.endpoints.is_empty() || s.kubernetes.is_some() => anyhow::bail!(
                "invalid configuration: session.endpoints or session.kubernetes is set but session.mode is embedded; \
                 set session.mode to unary or stream (or pass --session-mode)"
            ),
            SessionMode::Unary | SessionMode::Stream if s.endpoints.is_empty() && s.kubernetes.is_none() => anyhow::bail!(
                "invalid configuration: session.mode {:?} needs session.endpoints (e.g. --session grpc://10.0.0.5:20120) \
                 or session.kubernetes (a Service to discover)",
                s.mode
            ),
            _ => {}
        }
        for endpoint in &s.endpoints {
            session_address(endpoint)?;
        }
        match (&s.tls, s.plaintext, s.mode) {
            (Some(_), true, _) => anyhow::bail!(
                "invalid configuration: session.tls and session.plaintext are both set; \
                 remove session.plaintext to use mutual TLS, or session.tls for plaintext gRPC"
            ),
            (Some(_), _, SessionMode::Embedded) => anyhow::bail!(
                "invalid configuration: session.tls is set but session.mode is embedded (no gRPC); \
                 remove session.tls or set session.mode to unary or stream"
            ),
            _ => {}
        }
        let k = &self.auth_keys;
        if k.lookup == KeyLookup::Store
            && k.redis_url.is_none()
            && k.mysql_url.is_none()
            && k.sqlite_path.is_none()
        {
            anyhow::bail!(
                "invalid configuration: auth_keys.lookup or auth_keys.writer is store but no store is configured; \
                 set auth_keys.redis_url, auth_keys.mysql_url or auth_keys.sqlite_path"
            );
        }
        if k.cache_capacity_bytes < 4096 {
            anyhow::bail!(
                "invalid configuration: auth_keys.cache_capacity_bytes must be at least 4096"
            );
        }
        if s.call_timeout_ms == 0 {
            anyhow::bail!("invalid configuration: session.call_timeout_ms must be at least 1");
        }
        if !(1..=MAX_REVERSE_CONNECTIONS).contains(&s.max_reverse_connections) {
            anyhow::bail!(
                "invalid configuration: session.max_reverse_connections must be between 1 and \
                 {MAX_REVERSE_CONNECTIONS} (one per session instance that replies to this gateway; \
                 default {})",
                mtproto_config::DEFAULT_MAX_REVERSE_CONNECTIONS
            );
        }
        Ok(())
    }
}

impl ConfigExt for Config {
    fn load(cli: &Cli) -> anyhow::Result<Self> {
        Self::load_from(cli, Env::prefixed(ENV_PREFIX).split("__"))
    }

    fn store_urls(&self) -> mtproto_session::store::StoreUrls {
        let k = &self.auth_keys;
        let sqlite_path = k.sqlite_path.clone().or_else(|| {
            (k.redis_url.is_none()
                && k.mysql_url.is_none()
                && self.session.mode == SessionMode::Embedded)
                .then(|| self.data_dir.join("auth_keys.sqlite3"))
        });
        mtproto_session::store::StoreUrls {
            redis_url: k.redis_url.clone(),
            redis_key_prefix: k.redis_key_prefix.clone(),
            mysql_url: k.mysql_url.clone(),
            sqlite_path,
        }
    }

    fn server_id(&self) -> anyhow::Result<String> {
        if let Some(id) = &self.session.server_id {
            return Ok(id.clone());
        }
        let listen = self.session.grpc_listen;
        if !listen.ip().is_unspecified() {
            return Ok(listen.to_string());
        }
        match std::env::var("POD_IP") {
            Ok(ip) if !ip.is_empty() => Ok(format!("{ip}:{}", listen.port())),
            _ => anyhow::bail!(
                "session.server_id: session.grpc_listen is {listen}, so sessions cannot dial it; \
                 set session.server_id (--server-id) or the POD_IP environment variable"
            ),
        }
    }

    fn worker_threads(&self) -> usize {
        self.runtime.worker_threads.unwrap_or_else(usable_cpus)
    }

    fn handshake_threads(&self) -> usize {
        self.runtime.handshake_threads.unwrap_or_else(usable_cpus)
    }
}

/// The CPUs this process may use: its affinity, within its cgroup's quota.
fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `grpc://host:port` or `host:port` → `host:port` (the ring member string).
pub fn session_address(endpoint: &str) -> anyhow::Result<String> {
    let addr = endpoint.strip_prefix("grpc://").unwrap_or(endpoint);
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid {
        anyhow::bail!(
            "invalid configuration: session.endpoints entry {endpoint:?} is not grpc://host:port"
        );
    }
    Ok(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("mtproto-gateway").chain(args.iter().copied()))
    }

    fn no_env() -> Env {
        Env::prefixed("MTPROTO_GATEWAY_TEST_UNUSED_").split("__")
    }

    #[test]
    fn shared_defaults_are_the_protocol_crates_own() {
        assert_eq!(
            mtproto_config::DEFAULT_DH_SECRET_BITS,
            mtproto_core::dh::SPEC_SECRET_BITS
        );
        assert_eq!(
            mtproto_config::DEFAULT_SESSION_PEER_NAME,
            mtproto_session::tls::DEFAULT_SESSION_NAME
        );
    }

    #[test]
    fn defaults_listen_on_10443() {
        let c = Config::load_from(&cli(&[]), no_env()).unwrap();
        assert_eq!(c.listeners[0].address, "0.0.0.0:10443".parse().unwrap());
        assert_eq!(c.limits.max_frame_bytes, 1 << 20);
    }

    #[test]
    fn file_then_flags_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "log_level = \"debug\"\n[limits]\nidle_timeout_secs = 60\nhandshake_timeout_secs = 5\nwrite_timeout_secs = 5\nmax_frame_bytes = 4096\noutbox_capacity = 8\nmax_sessions_per_connection = 4\nshutdown_grace_secs = 1\n[[listeners]]\naddress = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let c = Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.limits.idle_timeout_secs, 60);
        assert_eq!(c.listeners[0].address, "127.0.0.1:7000".parse().unwrap());
        let c = Config::load_from(
            &cli(&[
                "--config",
                path.to_str().unwrap(),
                "--listen",
                "127.0.0.1:7001",
                "--log-level",
                "warn",
            ]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(c.log_level, "warn");
    }

    #[test]
    fn session_flags_select_remote_mode() {
        let c = Config::load_from(
            &cli(&[
                "--session",
                "grpc://127.0.0.1:9000",
                "--grpc-listen",
                "127.0.0.1:9100",
            ]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.session.mode, SessionMode::Unary);
        assert_eq!(c.server_id().unwrap(), "127.0.0.1:9100");
        assert_eq!(
            session_address(&c.session.endpoints[0]).unwrap(),
            "127.0.0.1:9000"
        );
        let c = Config::load_from(
            &cli(&[
                "--session",
                "127.0.0.1:9000",
                "--session-mode",
                "stream",
                "--server-id",
                "gw-1:1",
            ]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.session.mode, SessionMode::Stream);
        assert_eq!(c.server_id().unwrap(), "gw-1:1");
        let err = Config::load_from(&cli(&["--session", "nope"]), no_env()).unwrap_err();
        assert!(err.to_string().contains("session.endpoints"), "{err}");
    }

    #[test]
    fn proxy_protocol_and_connection_limits() {
        let c = Config::load_from(
            &cli(&["--listen", "127.0.0.1:7000", "--proxy-protocol", "required"]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.listeners[0].proxy_protocol, ProxyProtocol::Required);
        assert_eq!(c.limits.max_connections_per_ip, 256);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nproxy_protocol = \"optional\"\n[limits]\nmax_connections_per_ip = 0\n",
        )
        .unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(
            err.to_string().contains("limits.max_connections_per_ip"),
            "{err}"
        );
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nproxy_protocol = \"sometimes\"\n",
        )
        .unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:1\"\npath = \"/ws\"\n",
        )
        .unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(err.to_string().contains("listeners[0]: path"), "{err}");
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:1\"\ntransport = \"websocket\"\nallowed_origins = [\"https://a\"]\n",
        )
        .unwrap();
        let c = Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap();
        assert_eq!(c.listeners[0].websocket_path(), "/apiws");
        let c = Config::load_from(
            &cli(&["--listen", "127.0.0.1:1", "--listen-ws", "127.0.0.1:2"]),
            no_env(),
        )
        .unwrap();
        assert_eq!(c.listeners[1].transport, ListenerTransport::Websocket);
    }

    #[test]
    fn budget_settings_default_and_name_the_field() {
        let c = Config::load_from(&cli(&[]), no_env()).unwrap();
        assert_eq!(c.limits.frame_timeout_secs, 60);
        assert_eq!(c.limits.max_handshakes_in_progress, 1024);
        assert_eq!(c.limits.max_buffered_bytes, 256 << 20);
        assert_eq!(c.limits.max_sessions_per_auth_key, 256);
        assert_eq!(c.limits.http_requests_per_ip_per_minute, 6000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        for (text, field) in [
            ("frame_timeout_secs = 0", "limits.frame_timeout_secs"),
            (
                "max_handshakes_in_progress = 0",
                "limits.max_handshakes_in_progress",
            ),
            (
                "max_sessions_per_auth_key = 0",
                "limits.max_sessions_per_auth_key",
            ),
            ("max_buffered_bytes = 4096", "limits.max_buffered_bytes"),
            ("forward_window = 0", "limits.forward_window"),
            ("forward_window = 1025", "limits.forward_window"),
            (
                "http_requests_per_ip_per_minute = 0",
                "limits.http_requests_per_ip_per_minute",
            ),
        ] {
            std::fs::write(&path, format!("[limits]\n{text}\n")).unwrap();
            let err = Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn http_listeners_and_tls_settings() {
        let c = Config::load_from(&cli(&["--listen-http", "127.0.0.1:8080"]), no_env()).unwrap();
        assert_eq!(c.listeners[0].transport, ListenerTransport::Http);
        assert_eq!(c.limits.http_max_wait_ms, 25_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env())
        };
        let c = load("[[listeners]]\naddress = \"127.0.0.1:1\"\ntransport = \"websocket\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n").unwrap();
        assert_eq!(c.listeners[0].tls_key, Some(PathBuf::from("k.pem")));
        for (text, field) in [
            (
                "transport = \"http\"\ntls_cert = \"c.pem\"\n",
                "listeners[0].tls_key",
            ),
            (
                "transport = \"http\"\ntls_key = \"k.pem\"\n",
                "listeners[0].tls_cert",
            ),
            (
                "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
                "listeners[0].tls_cert",
            ),
            (
                "transport = \"http\"\npath = \"/api\"\n",
                "listeners[0]: path",
            ),
        ] {
            let err =
                load(&format!("[[listeners]]\naddress = \"127.0.0.1:1\"\n{text}")).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        let err = load("[limits]\nhttp_max_wait_ms = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.http_max_wait_ms"), "{err}");
    }

    #[test]
    fn session_tls_and_trusted_proxy_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env())
        };
        let remote = "[session]\nmode = \"unary\"\nendpoints = [\"s:1\"]\n";
        let tls =
            "[session.tls]\nca_file = \"ca.pem\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let c = load(&format!("{remote}{tls}")).unwrap();
        let t = c.session.tls.unwrap();
        assert_eq!(t.peer_name, "mtproto-session");
        assert_eq!(t.ca_file, PathBuf::from("ca.pem"));
        assert!(!c.session.plaintext);
        let err = load(&format!("{remote}plaintext = true\n{tls}")).unwrap_err();
        assert!(err.to_string().contains("session.plaintext"), "{err}");
        let err = load(&format!("[session]\n{tls}")).unwrap_err();
        assert!(
            err.to_string().contains("session.mode is embedded"),
            "{err}"
        );
        let err = load(&format!("{remote}[session.tls]\nca_file = \"ca.pem\"\n")).unwrap_err();
        assert!(err.to_string().contains("cert_file"), "{err}");

        let c = load("[[listeners]]\naddress = \"127.0.0.1:1\"\nproxy_protocol = \"required\"\nproxy_trusted_sources = [\"10.0.0.0/8\", \"fd00::/8\"]\n").unwrap();
        assert_eq!(c.listeners[0].proxy_trusted_sources.len(), 2);
        let err = load(
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nproxy_trusted_sources = [\"10.0.0.1\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("proxy_trusted_sources"), "{err}");
        let c = Config::load_from(
            &cli(&[
                "--listen",
                "127.0.0.1:1",
                "--proxy-protocol",
                "optional",
                "--proxy-trusted-source",
                "192.0.2.0/24",
            ]),
            no_env(),
        )
        .unwrap();
        assert_eq!(
            c.listeners[0].proxy_trusted_sources,
            vec!["192.0.2.0/24".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn dh_secret_bits_defaults_to_the_spec_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env())
        };
        assert_eq!(load("").unwrap().handshake.dh_secret_bits, 2048);
        let c = load("[handshake]\ndh_secret_bits = 256\n").unwrap();
        assert_eq!(c.handshake.dh_secret_bits, 256);
        for bad in [0, 128, 223, 2049, 4096] {
            let err = load(&format!("[handshake]\ndh_secret_bits = {bad}\n")).unwrap_err();
            assert!(
                err.to_string().contains("handshake.dh_secret_bits"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's own error type
    fn runtime_threads_default_to_the_cpus_and_are_checked() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        let c = Config::load_from(&cli(&[]), no_env()).unwrap();
        assert_eq!(c.runtime, RuntimeConfig::default());
        assert_eq!((c.worker_threads(), c.handshake_threads()), (cpus, cpus));
        figment::Jail::expect_with(|jail| {
            jail.set_env("MTPROTO_GATEWAY_RUNTIME__WORKER_THREADS", "3");
            jail.set_env("MTPROTO_GATEWAY_RUNTIME__HANDSHAKE_THREADS", "5");
            let c = Config::load(&cli(&[])).map_err(|e| e.to_string())?;
            assert_eq!((c.worker_threads(), c.handshake_threads()), (3, 5));
            for (field, bad) in [("WORKER_THREADS", "0"), ("HANDSHAKE_THREADS", "1025")] {
                jail.set_env(format!("MTPROTO_GATEWAY_RUNTIME__{field}"), bad);
                let err = Config::load(&cli(&[])).unwrap_err().to_string();
                let name = format!("runtime.{}", field.to_ascii_lowercase());
                assert!(err.contains(&name), "{err}");
                jail.set_env(format!("MTPROTO_GATEWAY_RUNTIME__{field}"), "2");
            }
            Ok(())
        });
    }

    #[test]
    fn partial_sections_keep_the_other_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "[limits]\nidle_timeout_secs = 60\n[session]\nmode = \"stream\"\nendpoints = [\"s:1\"]\n").unwrap();
        let c = Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap();
        assert_eq!(c.limits.idle_timeout_secs, 60);
        assert_eq!(c.limits.max_frame_bytes, 1 << 20);
        assert_eq!(c.session.call_timeout_ms, 5000);
        assert_eq!(c.session.max_reverse_connections, 128);
    }

    #[test]
    fn reverse_connections_are_bounded_and_the_error_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        let load = |value: &str| {
            std::fs::write(&path, format!("[session]\nmode = \"stream\"\nendpoints = [\"s:1\"]\nmax_reverse_connections = {value}\n")).unwrap();
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env())
        };
        assert_eq!(load("512").unwrap().session.max_reverse_connections, 512);
        for bad in ["0", "4097"] {
            let err = load(bad).unwrap_err().to_string();
            assert!(
                err.contains("session.max_reverse_connections must be between 1 and 4096"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[limits]\nidle_timeout_secs = \"soon\"\n").unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(err.to_string().contains("idle_timeout_secs"), "{err}");
        std::fs::write(&path, "listen_on = 1\n").unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
        std::fs::write(
            &path,
            "[[listeners]]\naddress = \"127.0.0.1:1\"\ntransport = \"carrier_pigeon\"\n",
        )
        .unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(err.to_string().contains("carrier_pigeon"), "{err}");
        let err =
            Config::load_from(&cli(&["--config", "/nonexistent.toml"]), no_env()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent.toml"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's own error type
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MTPROTO_GATEWAY_LIMITS__IDLE_TIMEOUT_SECS", "77");
            jail.set_env("MTPROTO_GATEWAY_LOG_LEVEL", "trace");
            jail.set_env("MTPROTO_GATEWAY_SERVICE_HOST", "10.0.0.1");
            jail.set_env("MTPROTO_GATEWAY_BIN", "/usr/bin/true");
            let c = Config::load(&cli(&[])).map_err(|e| e.to_string())?;
            assert_eq!(c.limits.idle_timeout_secs, 77);
            assert_eq!(c.log_level, "trace");
            jail.set_env("MTPROTO_GATEWAY_LIMITS__MAX_FRAME_BYTES", "10");
            let err = Config::load(&cli(&[])).unwrap_err().to_string();
            assert!(err.contains("limits.max_frame_bytes"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn temp_key_lifetime_cap_defaults_to_a_day_and_is_checked() {
        let c = Config::load_from(&cli(&[]), no_env()).unwrap();
        assert_eq!(c.handshake.max_temp_key_expires_secs, 86_400);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, "[handshake]\nmax_temp_key_expires_secs = 3600\n").unwrap();
        let c = Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap();
        assert_eq!(c.handshake.max_temp_key_expires_secs, 3600);
        std::fs::write(&path, "[handshake]\nmax_temp_key_expires_secs = 0\n").unwrap();
        let err =
            Config::load_from(&cli(&["--config", path.to_str().unwrap()]), no_env()).unwrap_err();
        assert!(
            err.to_string()
                .contains("handshake.max_temp_key_expires_secs"),
            "{err}"
        );
    }
}
