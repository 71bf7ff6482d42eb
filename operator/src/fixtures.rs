//! Test fixtures shared by the unit tests.

use serde_json::json;

use crate::crd::{ListenerTls, MtprotoGateway, SecretKeyRef};
use crate::validate::Dereferenced;

/// Test-only 2048-bit RSA keys (PKCS#1 and PKCS#8), made with `openssl genrsa`.
pub const PEM: &str = include_str!("testdata/rsa-a.pem");
pub const OTHER_PEM: &str = include_str!("testdata/rsa-b.pem");

/// A gateway using most features, as the API server would return it (defaults filled in by
/// serde, generation and uid set).
pub fn gateway() -> MtprotoGateway {
    serde_json::from_value(json!({
        "apiVersion": "mtproto-edge.io/v1alpha1",
        "kind": "MtprotoGateway",
        "metadata": {"name": "edge", "namespace": "edge", "uid": "0000-1111", "generation": 3},
        "spec": {
            "replicas": 3,
            "image": "ghcr.io/example/mtproto-gateway:1.0",
            "listeners": [
                {"name": "tcp", "port": 10443},
                {"name": "ws", "port": 8080, "transport": "websocket", "proxyProtocol": "required",
                 "proxyTrustedSources": ["10.0.0.0/24"]}
            ],
            "rsaKeys": [
                {"secretName": "rsa-keys", "key": "primary.pem"},
                {"secretName": "rsa-keys", "key": "old"}
            ],
            "session": {"mode": "stream", "service": {"name": "session", "namespace": "teamgram"}},
            "authKeys": {
                "redisUrl": {"secretName": "store", "key": "redis"},
                "mysqlUrl": {"secretName": "store", "key": "mysql"}
            },
            "service": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                        "annotations": {"lb.example/proxy-protocol": "true"}},
            "autoscaling": {"enabled": true, "minReplicas": 2, "maxReplicas": 10,
                            "targetCpuUtilizationPercentage": 70, "targetConnectionsPerPod": 20000},
            "networkPolicy": {"enabled": true, "clientCidrs": ["0.0.0.0/0"]}
        }
    }))
    .expect("fixture parses")
}

/// Secrets that satisfy every reference of `gateway()`.
pub fn dereferenced() -> Dereferenced {
    let mut d = Dereferenced::default();
    d.secrets.insert(
        "rsa-keys".into(),
        [
            ("primary.pem".to_owned(), PEM.as_bytes().to_vec()),
            ("old".to_owned(), OTHER_PEM.as_bytes().to_vec()),
        ]
        .into_iter()
        .collect(),
    );
    d.secrets.insert(
        "store".into(),
        [
            ("redis".to_owned(), b"redis://redis:6379".to_vec()),
            ("mysql".to_owned(), b"mysql://u:p@mysql/teamgram".to_vec()),
        ]
        .into_iter()
        .collect(),
    );
    d.session_selector = Some([("app".to_owned(), "session".to_owned())].into());
    d
}

/// Puts TLS from the Secret `ws-tls` on `gw`'s listener `listener` and adds that Secret to `d`.
pub fn with_listener_tls(gw: &mut MtprotoGateway, listener: usize, d: &mut Dereferenced) {
    let key = |key: &str| SecretKeyRef {
        secret_name: "ws-tls".into(),
        key: key.into(),
    };
    gw.spec.listeners[listener].tls = Some(ListenerTls {
        certificate: key("tls.crt"),
        private_key: key("tls.key"),
    });
    d.secrets.insert(
        "ws-tls".into(),
        [
            (
                "tls.crt".to_owned(),
                b"-----BEGIN CERTIFICATE-----".to_vec(),
            ),
            (
                "tls.key".to_owned(),
                b"-----BEGIN PRIVATE KEY-----".to_vec(),
            ),
        ]
        .into_iter()
        .collect(),
    );
}
