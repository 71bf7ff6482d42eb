//! Renders `gateway.toml`, the gateway's config file, from a validated gateway.
//!
//! Serialised from typed structs (not string templates) so values are always escaped and the
//! shape matches the gateway's config contract.

use serde::Serialize;

use crate::crd::{MtprotoGatewaySpec, ADMIN_PORT};
use crate::error::Error;
use crate::validate::ValidatedGateway;

/// Where the gateway keeps state; an emptyDir.
pub const DATA_DIR: &str = "/var/lib/mtproto-gateway";

#[derive(Serialize)]
struct GatewayConfig<'a> {
    log_level: &'a str,
    data_dir: &'a str,
    rsa_private_keys: Vec<String>,
    admin_listen: String,
    listeners: Vec<ListenerConfig<'a>>,
    session: SessionConfig<'a>,
    auth_keys: AuthKeysConfig,
    limits: LimitsConfig,
}

#[derive(Serialize)]
struct ListenerConfig<'a> {
    address: String,
    transport: &'a str,
    proxy_protocol: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    proxy_trusted_sources: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<String>,
}

#[derive(Serialize)]
struct SessionConfig<'a> {
    mode: &'a str,
    ring: &'a str,
    grpc_listen: String,
    kubernetes: SessionKubernetes<'a>,
}

#[derive(Serialize)]
struct SessionKubernetes<'a> {
    namespace: &'a str,
    service: &'a str,
    port_name: &'a str,
}

#[derive(Serialize)]
struct AuthKeysConfig {
    cache_capacity_bytes: i64,
    cache_ttl_secs: i64,
}

#[derive(Serialize)]
struct LimitsConfig {
    max_connections: i64,
    max_connections_per_ip: i64,
    handshake_timeout_secs: i64,
    idle_timeout_secs: i64,
    shutdown_grace_secs: i64,
}

/// What the gateway keeps of the pod's termination grace period after its
/// drain: closing the connections left and reporting their sessions.
const CLOSE_AFTER_DRAIN_SECS: i64 = 5;

/// The contents of the ConfigMap key `gateway.toml`. Redis and MySQL URLs are not here: they
/// reach the pod as env vars from Secrets so the ConfigMap holds no credentials.
pub fn render(spec: &MtprotoGatewaySpec, v: &ValidatedGateway) -> Result<String, Error> {
    let cfg = GatewayConfig {
        log_level: spec.log_level.as_str(),
        data_dir: DATA_DIR,
        rsa_private_keys: v.rsa_keys.iter().map(|k| k.path()).collect(),
        admin_listen: format!("0.0.0.0:{ADMIN_PORT}"),
        listeners: spec
            .listeners
            .iter()
            .map(|l| {
                let tls = v.listener_tls.get(&l.name);
                ListenerConfig {
                    address: format!("0.0.0.0:{}", l.port),
                    transport: l.transport.as_str(),
                    proxy_protocol: l.proxy_protocol.as_str(),
                    proxy_trusted_sources: &l.proxy_trusted_sources,
                    tls_cert: tls.map(|(cert, _)| cert.path()),
                    tls_key: tls.map(|(_, key)| key.path()),
                }
            })
            .collect(),
        session: SessionConfig {
            mode: spec.session.mode.as_str(),
            ring: spec.session.ring.as_str(),
            grpc_listen: format!("0.0.0.0:{}", spec.session.grpc_port),
            kubernetes: SessionKubernetes {
                namespace: &v.session_namespace,
                service: &spec.session.service.name,
                port_name: &spec.session.service.port_name,
            },
        },
        auth_keys: AuthKeysConfig {
            cache_capacity_bytes: spec.auth_keys.cache_capacity_bytes,
            cache_ttl_secs: spec.auth_keys.cache_ttl_seconds,
        },
        limits: LimitsConfig {
            max_connections: spec.limits.max_connections,
            max_connections_per_ip: spec.limits.max_connections_per_ip,
            handshake_timeout_secs: spec.limits.handshake_timeout_seconds,
            idle_timeout_secs: spec.limits.idle_timeout_seconds,
            shutdown_grace_secs: (spec.termination_grace_period_seconds - CLOSE_AFTER_DRAIN_SECS)
                .max(0),
        },
    };
    Ok(toml::to_string(&cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{dereferenced, gateway, with_listener_tls};
    use crate::validate::{validate, CONFIG_DIR};

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
        // terminationGracePeriodSeconds 60 by default, 5 s kept for closing.
        assert_eq!(doc["limits"]["shutdown_grace_secs"].as_integer(), Some(55));
        assert!(
            !text.contains("redis://"),
            "credentials stay out of the ConfigMap"
        );
    }
}
