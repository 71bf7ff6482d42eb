//! Renders `gateway.toml`, the gateway's config file, from a validated gateway.
//!
//! Built as the gateway's own config types (`mtproto-config`), starting from their defaults,
//! and serialised with `toml`: values are always escaped and the shape is the one the gateway
//! parses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use mtproto_config as gateway;

use super::workload::effective_resources;

use crate::certs::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::crd::{
    KeyLookup, MtprotoGatewaySpec, ProxyProtocol, RingMode, SessionMode, SessionTlsMode, Transport,
    ADMIN_PORT,
};
use crate::error::Error;
use crate::validate::ValidatedGateway;

/// Where the gateway keeps state; an emptyDir.
pub const DATA_DIR: &str = "/var/lib/mtproto-gateway";
/// Where the gateway's gRPC certificate Secret is mounted: a Secret volume of its own (not
/// part of the projected config), so renewals reach the files without a rollout.
pub const SESSION_TLS_DIR: &str = "/var/run/mtproto-gateway/session-tls";

impl From<KeyLookup> for gateway::KeyLookup {
    fn from(k: KeyLookup) -> Self {
        match k {
            KeyLookup::Session => Self::Session,
            KeyLookup::Store => Self::Store,
        }
    }
}

impl From<Transport> for gateway::ListenerTransport {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Tcp => Self::Tcp,
            Transport::Websocket => Self::Websocket,
            Transport::Http => Self::Http,
        }
    }
}

impl From<ProxyProtocol> for gateway::ProxyProtocol {
    fn from(p: ProxyProtocol) -> Self {
        match p {
            ProxyProtocol::Off => Self::Off,
            ProxyProtocol::Optional => Self::Optional,
            ProxyProtocol::Required => Self::Required,
        }
    }
}

impl From<SessionMode> for gateway::SessionMode {
    fn from(m: SessionMode) -> Self {
        match m {
            SessionMode::Unary => Self::Unary,
            SessionMode::Stream => Self::Stream,
        }
    }
}

impl From<RingMode> for gateway::RingKind {
    fn from(r: RingMode) -> Self {
        match r {
            RingMode::Gozero => Self::Gozero,
        }
    }
}

/// `value` as the gateway's integer type. The CRD schema's ranges keep values in bounds; one
/// that got past them (an object stored before a schema change) is named, never wrapped.
fn int<T: TryFrom<i64>>(field: &str, value: i64) -> Result<T, Error> {
    T::try_from(value).map_err(|_| {
        Error::Invalid(format!(
            "{field}: {value} does not fit the gateway's setting (negative or too large); \
             use a value within the CRD's range"
        ))
    })
}

/// `0.0.0.0:port`, all interfaces of the pod.
fn any_address(field: &str, port: i32) -> Result<SocketAddr, Error> {
    Ok(SocketAddr::from(([0, 0, 0, 0], int(field, port.into())?)))
}

/// The contents of the ConfigMap key `gateway.toml`. Redis and MySQL URLs are not here: they
/// reach the pod as env vars from Secrets so the ConfigMap holds no credentials.
pub fn render(spec: &MtprotoGatewaySpec, v: &ValidatedGateway) -> Result<String, Error> {
    let mut cfg = gateway::Config {
        log_level: spec.log_level.as_str().to_owned(),
        data_dir: DATA_DIR.into(),
        rsa_private_keys: v.rsa_keys.iter().map(|k| k.path().into()).collect(),
        admin_listen: Some(any_address("the admin port", ADMIN_PORT)?),
        ..gateway::Config::default()
    };
    cfg.listeners = spec
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let tls = v.listener_tls.get(&l.name);
            let proxy_trusted_sources = l
                .proxy_trusted_sources
                .iter()
                .map(|s| {
                    s.parse().map_err(|_| {
                        Error::Invalid(format!(
                            "spec.listeners[{i}].proxyTrustedSources: {s:?} is not a CIDR"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(gateway::Listener {
                proxy_trusted_sources,
                path: l.path.clone(),
                allowed_origins: l.allowed_origins.clone(),
                tls_cert: tls.map(|(cert, _)| PathBuf::from(cert.path())),
                tls_key: tls.map(|(_, key)| PathBuf::from(key.path())),
                ..gateway::Listener::new(
                    any_address(&format!("spec.listeners[{i}].port"), l.port)?,
                    l.transport.into(),
                    l.proxy_protocol.into(),
                )
            })
        })
        .collect::<Result<_, Error>>()?;

    let session = &mut cfg.session;
    session.mode = spec.session.mode.into();
    session.ring = spec.session.ring.into();
    session.grpc_listen = any_address("spec.session.grpcPort", spec.session.grpc_port)?;
    session.kubernetes = Some(gateway::KubernetesDiscovery {
        namespace: v.session_namespace.clone(),
        service: spec.session.service.name.clone(),
        port_name: Some(spec.session.service.port_name.clone()),
        not_ready_grace_ms: gateway::DEFAULT_NOT_READY_GRACE_MS,
    });
    session.tls = (spec.session.tls.mode == SessionTlsMode::Mutual).then(|| gateway::SessionTls {
        ca_file: format!("{SESSION_TLS_DIR}/{CA_KEY}").into(),
        cert_file: format!("{SESSION_TLS_DIR}/{CERT_KEY}").into(),
        key_file: format!("{SESSION_TLS_DIR}/{KEY_KEY}").into(),
        peer_name: gateway::DEFAULT_SESSION_PEER_NAME.to_owned(),
    });
    session.plaintext = spec.session.tls.mode == SessionTlsMode::Plaintext;

    let keys = &mut cfg.auth_keys;
    let a = &spec.auth_keys;
    keys.lookup = a.effective_lookup().into();
    keys.writer = a.effective_writer().into();
    keys.cache_capacity_bytes = int("spec.authKeys.cacheCapacityBytes", a.cache_capacity_bytes)?;
    keys.cache_ttl_secs = int("spec.authKeys.cacheTtlSeconds", a.cache_ttl_seconds)?;

    let limits = &mut cfg.limits;
    let l = &spec.limits;
    limits.max_connections = int("spec.limits.maxConnections", l.max_connections)?;
    limits.max_connections_per_ip =
        int("spec.limits.maxConnectionsPerIp", l.max_connections_per_ip)?;
    limits.handshake_timeout_secs = int(
        "spec.limits.handshakeTimeoutSeconds",
        l.handshake_timeout_seconds,
    )?;
    limits.idle_timeout_secs = int("spec.limits.idleTimeoutSeconds", l.idle_timeout_seconds)?;
    limits.write_timeout_secs = int("spec.limits.writeTimeoutSeconds", l.write_timeout_seconds)?;
    limits.max_frame_bytes = int("spec.limits.maxFrameBytes", l.max_frame_bytes)?;
    limits.handshakes_per_ip_per_minute = int(
        "spec.limits.handshakesPerIpPerMinute",
        l.handshakes_per_ip_per_minute,
    )?;
    limits.drain_delay_secs = int("spec.drainDelaySeconds", spec.drain_delay_seconds)?;
    limits.shutdown_grace_secs = int(
        "spec.terminationGracePeriodSeconds",
        // What the gateway takes after the drain is kept out of it.
        (spec.termination_grace_period_seconds
            - spec.drain_delay_seconds
            - gateway::CLOSE_AFTER_GRACE_SECS as i64)
            .max(0),
    )?;
    cfg.runtime = runtime(&effective_resources(spec))?;
    Ok(toml::to_string(&cfg)?)
}

/// The gateway's thread counts from its container's CPU. A limit caps what
/// the pod may use, so both counts follow it. With a request alone, the
/// workers follow the request and handshakes may still burst into the
/// node's idle CPU, as a pod without a limit may. Without either, the
/// gateway takes the CPUs it sees.
fn runtime(resources: &ResourceRequirements) -> Result<gateway::RuntimeConfig, Error> {
    let cpus = |which: &str, amounts: &Option<BTreeMap<String, Quantity>>| {
        amounts
            .as_ref()
            .and_then(|a| a.get("cpu"))
            .map(|q| whole_cpus(&format!("spec.resources.{which}.cpu"), &q.0))
            .transpose()
    };
    let limit = cpus("limits", &resources.limits)?;
    let request = cpus("requests", &resources.requests)?;
    Ok(gateway::RuntimeConfig {
        worker_threads: limit.or(request),
        handshake_threads: limit,
    })
}

/// A CPU amount (`2`, `0.5`, `1500m`) in whole CPUs, rounded up: at least 1,
/// at most the gateway's [`gateway::MAX_RUNTIME_THREADS`].
fn whole_cpus(field: &str, amount: &str) -> Result<usize, Error> {
    let invalid = || {
        Error::Invalid(format!(
            "{field}: {amount:?} is not a CPU amount the operator reads; \
             write cores (2, 0.5) or millicores (1500m)"
        ))
    };
    let (number, millis_per_unit) = match amount.strip_suffix('m') {
        Some(n) => (n, 1),
        None => (amount, 1000),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty())
        || !digits(whole)
        || !digits(fraction)
        || (millis_per_unit == 1 && !fraction.is_empty())
    {
        return Err(invalid());
    }
    // Only digits are left, so a failed parse is a number too large to matter.
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().unwrap_or(u64::MAX)
    };
    // Digits past the thousandths cannot add more than a millicore.
    let thousandths = format!("{fraction:0<3}");
    let (kept, rest) = thousandths.split_at(3);
    let mut millis = whole.saturating_mul(millis_per_unit);
    millis = millis.saturating_add(kept.parse::<u64>().map_err(|_| invalid())?);
    if rest.bytes().any(|b| b != b'0') {
        millis = millis.saturating_add(1);
    }
    let cpus = usize::try_from(millis.div_ceil(1000)).unwrap_or(usize::MAX);
    Ok(cpus.clamp(1, gateway::MAX_RUNTIME_THREADS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build, CONFIG_KEY};
    use crate::crd::{MtprotoGateway, SessionMode, Transport};
    use crate::fixtures::{dereferenced, gateway, with_listener_tls};
    use crate::validate::{validate, Dereferenced, CONFIG_DIR};
    use clap::Parser;
    use mtproto_gateway::config::{self as gateway_config, Cli, Config, ConfigExt};

    /// Loads the rendered config the way the pod does: the gateway's own
    /// `Config::load` with the container's arguments and environment (Secret
    /// values taken from `d`), so the operator and the gateway cannot drift.
    /// Also returns the `server_id` the gateway derives in that environment.
    #[allow(clippy::result_large_err)] // figment's own error type, in its test jail
    fn load_in_pod(gw: &MtprotoGateway, d: &Dereferenced) -> Result<(Config, String), String> {
        let v = validate(gw, d).map_err(|e| e.to_string())?;
        let b = build(gw, &v).map_err(|e| e.to_string())?;
        let text = b
            .config_map
            .data
            .as_ref()
            .and_then(|m| m.get(CONFIG_KEY).cloned())
            .ok_or("no gateway.toml")?;
        let container = b
            .deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|p| p.containers[0].clone())
            .ok_or("no container")?;
        let mut loaded = None;
        figment::Jail::try_with(|jail| {
            jail.create_file(CONFIG_KEY, &text)?;
            let mut env = Vec::new();
            for e in container.env.iter().flatten() {
                let from = e.value_from.as_ref();
                let value = match (&e.value, from.and_then(|f| f.secret_key_ref.as_ref())) {
                    (Some(v), _) => v.clone(),
                    (None, Some(s)) => d
                        .secrets
                        .get(&s.name)
                        .and_then(|k| k.get(&s.key))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .ok_or_else(|| format!("env {} names a missing Secret key", e.name))?,
                    // The downward API: the pod's IP.
                    (None, None) => "10.0.0.7".to_owned(),
                };
                jail.set_env(&e.name, &value);
                env.push((e.name.clone(), value));
            }
            let config_path = format!("{CONFIG_DIR}/{CONFIG_KEY}");
            // The kubelet's `$(VAR)` expansion of the container's env in args.
            let expand = |a: &String| {
                env.iter()
                    .fold(a.clone(), |a, (k, v)| a.replace(&format!("$({k})"), v))
            };
            let args = container.args.iter().flatten().map(|a| {
                if *a == config_path {
                    CONFIG_KEY.to_owned()
                } else {
                    expand(a)
                }
            });
            let cli = Cli::parse_from(container.command.iter().flatten().cloned().chain(args));
            loaded = Some(
                Config::load(&cli)
                    .and_then(|c| c.server_id().map(|id| (c, id)))
                    .map_err(|e| e.to_string()),
            );
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        loaded.ok_or("not loaded")?
    }

    #[test]
    fn every_rendered_config_loads_in_the_gateway() {
        let mut variants = vec![("fixture", gateway(), dereferenced())];

        let mut gw = gateway();
        let mut d = dereferenced();
        with_listener_tls(&mut gw, 1, &mut d);
        gw.spec.listeners[1].path = Some("/apiws".into());
        gw.spec.listeners[1].allowed_origins = vec!["https://web.example".into()];
        variants.push(("tls websocket with path and origins", gw, d));

        let mut gw = gateway();
        gw.spec.listeners[1].transport = Transport::Http;
        gw.spec.listeners[1].proxy_protocol = crate::crd::ProxyProtocol::Optional;
        gw.spec.auth_keys.redis_url = None;
        gw.spec.auth_keys.mysql_url = None;
        gw.spec.session.mode = SessionMode::Unary;
        gw.spec.session.service.namespace = None;
        variants.push(("http, no stores, unary", gw, dereferenced()));

        let mut gw = gateway();
        gw.spec.termination_grace_period_seconds = 0;
        gw.spec.drain_delay_seconds = 0;
        gw.spec.auth_keys.mysql_url = None;
        gw.spec.limits.max_frame_bytes = 16 << 20;
        variants.push(("no grace, redis only, largest frames", gw, dereferenced()));

        let mut gw = gateway();
        gw.spec.session.tls.mode = SessionTlsMode::Plaintext;
        gw.spec.session.grpc_bind = crate::crd::GrpcBind::Any;
        variants.push(("plaintext session gRPC on 0.0.0.0", gw, dereferenced()));

        for (what, gw, d) in variants {
            let (c, _) = load_in_pod(&gw, &d).unwrap_or_else(|e| panic!("{what}: {e}"));
            let spec = &gw.spec;
            assert_eq!(c.listeners.len(), spec.listeners.len(), "{what}");
            assert_eq!(
                c.limits.drain_delay_secs as i64, spec.drain_delay_seconds,
                "{what}"
            );
            assert_eq!(
                c.limits.max_frame_bytes as i64, spec.limits.max_frame_bytes,
                "{what}"
            );
            assert_eq!(
                c.auth_keys.redis_url.is_some(),
                spec.auth_keys.redis_url.is_some(),
                "{what}"
            );
            let store = |k: crate::crd::KeyLookup| k == crate::crd::KeyLookup::Store;
            assert_eq!(
                c.auth_keys.lookup == gateway_config::KeyLookup::Store,
                store(spec.auth_keys.effective_lookup()),
                "{what}"
            );
            assert_eq!(
                c.auth_keys.writer == gateway_config::KeyLookup::Store,
                store(spec.auth_keys.effective_writer()),
                "{what}"
            );
            let k = c.session.kubernetes.as_ref().expect("discovery");
            assert_eq!(k.service, spec.session.service.name, "{what}");
            match spec.session.tls.mode {
                SessionTlsMode::Mutual => {
                    let tls = c.session.tls.as_ref().expect("mutual TLS configured");
                    assert_eq!(
                        tls.cert_file,
                        std::path::Path::new(SESSION_TLS_DIR).join(CERT_KEY),
                        "{what}"
                    );
                    assert_eq!(
                        tls.ca_file,
                        std::path::Path::new(SESSION_TLS_DIR).join(CA_KEY),
                        "{what}"
                    );
                    assert_eq!(
                        tls.peer_name,
                        mtproto_session::tls::DEFAULT_SESSION_NAME,
                        "{what}: the session certificates' name"
                    );
                    assert!(!c.session.plaintext, "{what}");
                }
                SessionTlsMode::Plaintext => {
                    assert!(c.session.tls.is_none(), "{what}");
                    assert!(c.session.plaintext, "{what}");
                }
            }
            let bind = match spec.session.grpc_bind {
                crate::crd::GrpcBind::PodIp => "10.0.0.7:20110",
                crate::crd::GrpcBind::Any => "0.0.0.0:20110",
            };
            assert_eq!(c.session.grpc_listen.to_string(), bind, "{what}");
        }
    }

    #[test]
    fn the_stores_named_in_the_spec_are_the_ones_consulted() {
        let (c, server_id) = load_in_pod(&gateway(), &dereferenced()).expect("loads");
        assert_eq!(c.auth_keys.redis_url.as_deref(), Some("redis://redis:6379"));
        assert_eq!(
            c.auth_keys.mysql_url.as_deref(),
            Some("mysql://u:p@mysql/teamgram")
        );
        assert_eq!(c.auth_keys.lookup, gateway_config::KeyLookup::Store);
        assert_eq!(c.auth_keys.writer, gateway_config::KeyLookup::Store);
        assert_eq!(c.session.mode, gateway_config::SessionMode::Stream);
        assert_eq!(server_id, "10.0.0.7:20110");
    }

    #[test]
    fn the_gateways_threads_follow_its_cpu() {
        let cpu = |requests: Option<&str>, limits: Option<&str>| {
            let amounts = |cpu: Option<&str>| {
                cpu.map(|c| BTreeMap::from([("cpu".to_owned(), Quantity(c.to_owned()))]))
            };
            let mut gw = gateway();
            gw.spec.resources = Some(ResourceRequirements {
                requests: amounts(requests),
                limits: amounts(limits),
                ..ResourceRequirements::default()
            });
            let (c, _) = load_in_pod(&gw, &dereferenced()).expect("loads");
            (c.runtime.worker_threads, c.runtime.handshake_threads)
        };
        assert_eq!(cpu(Some("500m"), Some("1500m")), (Some(2), Some(2)));
        assert_eq!(cpu(Some("2.5"), None), (Some(3), None));
        assert_eq!(cpu(None, Some("4")), (Some(4), Some(4)));
        assert_eq!(cpu(None, None), (None, None));
        // Unset resources are the defaults: a request of 100m, no limit.
        let (c, _) = load_in_pod(&gateway(), &dereferenced()).expect("loads");
        assert_eq!(c.runtime.worker_threads, Some(1));
        assert_eq!(c.runtime.handshake_threads, None);
    }

    #[test]
    fn cpu_amounts_round_up_to_whole_cpus() {
        for (amount, cpus) in [
            ("1", 1),
            ("2", 2),
            ("0.5", 1),
            (".5", 1),
            ("1.001", 2),
            ("1.0001", 2),
            ("1.000", 1),
            ("100m", 1),
            ("1000m", 1),
            ("1001m", 2),
            ("0", 1),
            ("0m", 1),
            ("100000", 1024),
            ("99999999999999999999999", 1024),
        ] {
            assert_eq!(whole_cpus("f", amount).expect(amount), cpus, "{amount}");
        }
        for bad in ["", "m", ".", "1.5m", "2k", "1e3", "-1", "one", "1.2.3"] {
            let err = whole_cpus("spec.resources.limits.cpu", bad)
                .expect_err(bad)
                .to_string();
            assert!(err.contains("spec.resources.limits.cpu"), "{bad}: {err}");
        }
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let mut gw = gateway();
        gw.spec.auth_keys.cache_ttl_seconds = -1;
        gw.spec.listeners[1].port = 70_000;
        let v = validate(&gw, &dereferenced()).expect("valid");
        let err = render(&gw.spec, &v)
            .expect_err("port past 65535")
            .to_string();
        assert!(err.contains("spec.listeners[1].port: 70000"), "{err}");
        gw.spec.listeners[1].port = 8080;
        let err = render(&gw.spec, &v).expect_err("negative TTL").to_string();
        assert!(err.contains("spec.authKeys.cacheTtlSeconds: -1"), "{err}");
    }

    #[test]
    fn tls_listeners_point_at_the_mounted_files() {
        let mut gw = gateway();
        let mut d = dereferenced();
        with_listener_tls(&mut gw, 1, &mut d);
        let v = validate(&gw, &d).expect("valid");
        let text = render(&gw.spec, &v).expect("renders");
        let doc: toml::Table = text.parse().expect("valid TOML");
        let listeners = doc["listeners"].as_array().expect("listeners");
        assert_eq!(
            listeners[1]["tls_cert"].as_str(),
            Some(format!("{CONFIG_DIR}/tls/ws/tls.crt").as_str())
        );
        assert_eq!(
            listeners[1]["tls_key"].as_str(),
            Some(format!("{CONFIG_DIR}/tls/ws/tls.key").as_str())
        );
        assert!(listeners[0].get("tls_cert").is_none());
    }

    #[test]
    fn renders_the_contract_shape() {
        let gw = gateway();
        let v = validate(&gw, &dereferenced()).expect("valid");
        let text = render(&gw.spec, &v).expect("render");
        let doc: toml::Table = text.parse().expect("valid TOML");

        assert_eq!(doc["log_level"].as_str(), Some("info"));
        assert_eq!(doc["data_dir"].as_str(), Some(DATA_DIR));
        assert_eq!(doc["admin_listen"].as_str(), Some("0.0.0.0:9090"));
        let keys: Vec<_> = doc["rsa_private_keys"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "/etc/mtproto-gateway/rsa/rsa-keys/primary.pem",
                "/etc/mtproto-gateway/rsa/rsa-keys/old.pem"
            ]
        );

        let listeners = doc["listeners"].as_array().expect("listeners");
        assert_eq!(listeners.len(), 2);
        assert_eq!(listeners[1]["address"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(listeners[1]["transport"].as_str(), Some("websocket"));
        assert_eq!(listeners[1]["proxy_protocol"].as_str(), Some("required"));
        assert_eq!(listeners[0]["proxy_protocol"].as_str(), Some("off"));
        assert_eq!(
            listeners[1]["proxy_trusted_sources"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert_eq!(
            listeners[1]["proxy_trusted_sources"][0].as_str(),
            Some("10.0.0.0/24")
        );
        assert!(listeners[0].get("proxy_trusted_sources").is_none());

        let session = doc["session"].as_table().expect("session");
        assert_eq!(session["mode"].as_str(), Some("stream"));
        assert_eq!(session["ring"].as_str(), Some("gozero"));
        assert_eq!(session["grpc_listen"].as_str(), Some("0.0.0.0:20110"));
        let k = session["kubernetes"].as_table().expect("kubernetes");
        assert_eq!(k["namespace"].as_str(), Some("teamgram"));
        assert_eq!(k["service"].as_str(), Some("session"));
        assert_eq!(k["port_name"].as_str(), Some("grpc"));

        assert_eq!(
            doc["auth_keys"]["cache_capacity_bytes"].as_integer(),
            Some(67_108_864)
        );
        assert_eq!(doc["auth_keys"]["cache_ttl_secs"].as_integer(), Some(3600));
        assert_eq!(doc["limits"]["max_connections"].as_integer(), Some(100_000));
        assert_eq!(
            doc["limits"]["max_connections_per_ip"].as_integer(),
            Some(256)
        );
        assert_eq!(
            doc["limits"]["handshake_timeout_secs"].as_integer(),
            Some(30)
        );
        assert_eq!(doc["limits"]["idle_timeout_secs"].as_integer(), Some(300));
        // terminationGracePeriodSeconds 60 by default: 5 s lame duck, 5 s kept for closing.
        assert_eq!(doc["limits"]["drain_delay_secs"].as_integer(), Some(5));
        assert_eq!(doc["limits"]["shutdown_grace_secs"].as_integer(), Some(50));
        assert_eq!(doc["limits"]["write_timeout_secs"].as_integer(), Some(30));
        assert_eq!(doc["limits"]["max_frame_bytes"].as_integer(), Some(1 << 20));
        assert_eq!(
            doc["limits"]["handshakes_per_ip_per_minute"].as_integer(),
            Some(120)
        );
        // The fixture names Redis and MySQL: the gateway must consult them.
        assert_eq!(doc["auth_keys"]["lookup"].as_str(), Some("store"));
        assert_eq!(doc["auth_keys"]["writer"].as_str(), Some("store"));
        assert!(
            !text.contains("redis://"),
            "credentials stay out of the ConfigMap"
        );
        // Unset and empty settings are left out, so the ConfigMap stays readable.
        assert!(doc["auth_keys"].get("redis_key_prefix").is_none());
        assert!(session.get("endpoints").is_none());
        assert!(session.get("plaintext").is_none(), "mutual TLS by default");
    }
}
