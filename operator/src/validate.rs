//! Pure validation: turns a gateway plus the objects it references into a [`ValidatedGateway`]
//! the builders can trust, or an error that names what is wrong.
//!
//! The schema and CEL rules already refuse most bad input at the API server; what remains here
//! needs other objects (Secrets) or is awkward in CEL (CIDR syntax on older servers).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mtproto_core::rsa::ServerKey;
use sha2::{Digest, Sha256};

use crate::crd::{MtprotoGateway, RsaKeyStatus, SecretKeyRef, Transport};
use crate::error::Error;

/// Where the gateway reads its configuration and keys inside the pod.
pub const CONFIG_DIR: &str = "/etc/mtproto-gateway";

/// Data of the Secrets a gateway references, by Secret name then key.
pub type SecretData = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// What the reconciler found in the cluster for one gateway.
#[derive(Debug, Default, Clone)]
pub struct Dereferenced {
    /// Referenced Secrets that exist (missing ones are absent).
    pub secrets: SecretData,
    /// Whether the `ServiceMonitor` API is served.
    pub service_monitor_api: bool,
    /// Namespaces a gateway may name for its session Service (the operator's
    /// `--session-namespaces`); `None` allows any. The operator creates a Role
    /// there, so this bounds where a gateway's author can make it write.
    pub allowed_session_namespaces: Option<BTreeSet<String>>,
    /// The pod selector of the session Service, when it exists and has one.
    pub session_selector: Option<BTreeMap<String, String>>,
}

/// A Secret value mounted as a file (an RSA key, a TLS certificate or key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The Secret key it comes from.
    pub source: SecretKeyRef,
    /// Path of the file relative to [`CONFIG_DIR`].
    pub relative_path: String,
}

impl SecretFile {
    /// Absolute path inside the pod.
    pub fn path(&self) -> String {
        format!("{CONFIG_DIR}/{}", self.relative_path)
    }
}

/// A gateway whose references resolved and whose settings are consistent.
#[derive(Debug, Clone)]
pub struct ValidatedGateway {
    /// Namespace of the gateway (and of everything the operator creates for it, except the
    /// Role that lets it read EndpointSlices in the session namespace).
    pub namespace: String,
    /// Name of the gateway.
    pub name: String,
    /// Namespace of the session Service.
    pub session_namespace: String,
    /// RSA key files in the order the gateway should load them (first = primary).
    pub rsa_keys: Vec<SecretFile>,
    /// What status shows of each key: fingerprint and public key, in the same order.
    pub rsa_status: Vec<RsaKeyStatus>,
    /// Certificate and key files of TLS listeners, by listener name.
    pub listener_tls: BTreeMap<String, (SecretFile, SecretFile)>,
    /// SHA-256 (hex) over every referenced Secret value, so a Secret edit rolls the pods.
    pub secrets_hash: String,
    /// Whether to create a ServiceMonitor.
    pub service_monitor: bool,
    /// Labels of the session pods (the session Service's selector); `None`: unknown, so the
    /// NetworkPolicy admits the whole session namespace on the reverse-path port.
    pub session_pod_selector: Option<BTreeMap<String, String>>,
}

/// Checks `gw` against the objects it references.
pub fn validate(gw: &MtprotoGateway, deref: &Dereferenced) -> Result<ValidatedGateway, Error> {
    let namespace = gw
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = gw
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let spec = &gw.spec;

    let mut seen = Vec::new();
    let mut rsa_keys = Vec::with_capacity(spec.rsa_keys.len());
    let mut rsa_status = Vec::with_capacity(spec.rsa_keys.len());
    for (i, key) in spec.rsa_keys.iter().enumerate() {
        if seen.contains(&key) {
            return Err(Error::Invalid(format!(
                "spec.rsaKeys[{i}]: {}/{} is listed twice",
                key.secret_name, key.key
            )));
        }
        seen.push(key);
        let value = secret_value(deref, key, &format!("spec.rsaKeys[{i}]"))?;
        let invalid = |why: String| {
            Error::Invalid(format!(
                "spec.rsaKeys[{i}]: Secret {} key {} is not a 2048-bit RSA private key in PEM \
                 (make one with `openssl genrsa 2048`): {why}",
                key.secret_name, key.key
            ))
        };
        let pem = std::str::from_utf8(value).map_err(|e| invalid(e.to_string()))?;
        let server_key = ServerKey::from_pem(pem).map_err(|e| invalid(e.to_string()))?;
        rsa_status.push(RsaKeyStatus {
            secret_name: key.secret_name.clone(),
            key: key.key.clone(),
            fingerprint: format!("{:016x}", server_key.fingerprint() as u64),
            public_key: server_key
                .public_pkcs1_pem()
                .map_err(|e| invalid(e.to_string()))?,
        });
        rsa_keys.push(SecretFile {
            source: key.clone(),
            relative_path: rsa_relative_path(key),
        });
    }

    for (i, listener) in spec.listeners.iter().enumerate() {
        for (j, cidr) in listener.proxy_trusted_sources.iter().enumerate() {
            if !is_cidr(cidr) {
                return Err(Error::Invalid(format!(
                    "spec.listeners[{i}].proxyTrustedSources[{j}]: {cidr:?} is not a CIDR"
                )));
            }
        }
    }

    let mut listener_tls = BTreeMap::new();
    for (i, listener) in spec.listeners.iter().enumerate() {
        let Some(tls) = &listener.tls else { continue };
        if listener.transport == Transport::Tcp {
            return Err(Error::Invalid(format!(
                "spec.listeners[{i}].tls: TLS applies only to transport websocket or http \
                 (MTProto over TCP has its own obfuscation)"
            )));
        }
        let file = |key: &SecretKeyRef, what: &str, name: &str| {
            secret_value(deref, key, &format!("spec.listeners[{i}].tls.{what}")).map(|_| {
                SecretFile {
                    source: key.clone(),
                    relative_path: format!("tls/{}/{name}", listener.name),
                }
            })
        };
        let cert = file(&tls.certificate, "certificate", "tls.crt")?;
        let key = file(&tls.private_key, "privateKey", "tls.key")?;
        listener_tls.insert(listener.name.clone(), (cert, key));
    }

    if let Some(r) = &spec.auth_keys.redis_url {
        secret_value(deref, r, "spec.authKeys.redisUrl")?;
    }
    if let Some(m) = &spec.auth_keys.mysql_url {
        secret_value(deref, m, "spec.authKeys.mysqlUrl")?;
    }

    for (i, cidr) in spec.network_policy.client_cidrs.iter().enumerate() {
        if !is_cidr(cidr) {
            return Err(Error::Invalid(format!(
                "spec.networkPolicy.clientCidrs[{i}]: {cidr:?} is not a CIDR"
            )));
        }
    }

    let session_namespace = spec
        .session
        .service
        .namespace
        .clone()
        .unwrap_or_else(|| namespace.clone());
    if let Some(allowed) = &deref.allowed_session_namespaces {
        if session_namespace != namespace && !allowed.contains(&session_namespace) {
            return Err(Error::Invalid(format!(
                "spec.session.service.namespace: {session_namespace} is not among the namespaces \
                 this operator may grant access in ({}); use one of them, or have the operator's \
                 administrator add it to --session-namespaces",
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }

    Ok(ValidatedGateway {
        namespace,
        name,
        session_namespace,
        secrets_hash: hash_referenced(gw, &deref.secrets),
        rsa_keys,
        rsa_status,
        listener_tls,
        service_monitor: spec.metrics.service_monitor.enabled && deref.service_monitor_api,
        session_pod_selector: deref.session_selector.clone().filter(|s| !s.is_empty()),
    })
}

/// Every Secret key a gateway references, in spec order.
pub fn referenced_keys(gw: &MtprotoGateway) -> Vec<&SecretKeyRef> {
    let spec = &gw.spec;
    spec.rsa_keys
        .iter()
        .chain(spec.auth_keys.redis_url.iter())
        .chain(spec.auth_keys.mysql_url.iter())
        .chain(
            spec.listeners
                .iter()
                .filter_map(|l| l.tls.as_ref())
                .flat_map(|t| [&t.certificate, &t.private_key]),
        )
        .collect()
}

fn secret_value<'a>(
    deref: &'a Dereferenced,
    key: &SecretKeyRef,
    field: &str,
) -> Result<&'a [u8], Error> {
    let secret = deref.secrets.get(&key.secret_name).ok_or_else(|| {
        Error::MissingSecret(format!("{field}: Secret {} not found", key.secret_name))
    })?;
    secret.get(&key.key).map(Vec::as_slice).ok_or_else(|| {
        Error::MissingSecret(format!(
            "{field}: Secret {} has no key {}",
            key.secret_name, key.key
        ))
    })
}

/// The file name keeps a `.pem` suffix whether or not the Secret key has one.
fn rsa_relative_path(key: &SecretKeyRef) -> String {
    if key.key.ends_with(".pem") {
        format!("rsa/{}/{}", key.secret_name, key.key)
    } else {
        format!("rsa/{}/{}.pem", key.secret_name, key.key)
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().is_ok_and(|p| p <= max) && !prefix.starts_with('+')
}

/// Hashes only referenced keys, so unrelated keys in a shared Secret do not restart pods.
fn hash_referenced(gw: &MtprotoGateway, secrets: &SecretData) -> String {
    let mut h = Sha256::new();
    for key in referenced_keys(gw) {
        h.update(key.secret_name.as_bytes());
        h.update([0]);
        h.update(key.key.as_bytes());
        h.update([0]);
        if let Some(v) = secrets.get(&key.secret_name).and_then(|s| s.get(&key.key)) {
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{dereferenced, gateway, with_listener_tls};

    #[test]
    fn valid_gateway_resolves_keys_and_namespaces() {
        let gw = gateway();
        let v = validate(&gw, &dereferenced()).expect("valid");
        assert_eq!(v.namespace, "edge");
        assert_eq!(v.session_namespace, "teamgram");
        assert_eq!(v.rsa_keys.len(), 2);
        assert_eq!(
            v.rsa_keys[0].path(),
            "/etc/mtproto-gateway/rsa/rsa-keys/primary.pem"
        );
        assert_eq!(
            v.rsa_keys[1].path(),
            "/etc/mtproto-gateway/rsa/rsa-keys/old.pem"
        );
        assert!(!v.service_monitor, "ServiceMonitor API absent");
    }

    #[test]
    fn listener_tls_is_checked_mounted_and_hashed() {
        let mut gw = gateway();
        let mut d = dereferenced();
        with_listener_tls(&mut gw, 1, &mut d);
        let v = validate(&gw, &d).expect("valid");
        let (cert, key) = &v.listener_tls["ws"];
        assert_eq!(cert.path(), format!("{CONFIG_DIR}/tls/ws/tls.crt"));
        assert_eq!(key.path(), format!("{CONFIG_DIR}/tls/ws/tls.key"));
        // A new certificate rolls the pods.
        let mut renewed = d.clone();
        if let Some(s) = renewed.secrets.get_mut("ws-tls") {
            s.insert("tls.crt".into(), b"renewed".to_vec());
        }
        assert_ne!(
            validate(&gw, &renewed).expect("valid").secrets_hash,
            v.secrets_hash
        );
        let mut missing = d.clone();
        missing.secrets.remove("ws-tls");
        let err = validate(&gw, &missing).expect_err("missing TLS secret");
        assert!(
            err.to_string()
                .contains("spec.listeners[1].tls.certificate"),
            "{err}"
        );
        // MTProto over TCP has no TLS.
        with_listener_tls(&mut gw, 0, &mut d);
        let err = validate(&gw, &d).expect_err("TLS on a TCP listener");
        assert!(err.to_string().contains("spec.listeners[0].tls"), "{err}");
    }

    #[test]
    fn missing_secret_names_the_field() {
        let gw = gateway();
        let mut d = dereferenced();
        d.secrets.remove("rsa-keys");
        let err = validate(&gw, &d).expect_err("missing secret");
        assert!(err.to_string().contains("spec.rsaKeys[0]"), "{err}");
        assert_eq!(err.metric_label(), "missing_secret");
    }

    #[test]
    fn missing_key_is_reported() {
        let gw = gateway();
        let mut d = dereferenced();
        d.secrets.get_mut("store").expect("store").remove("mysql");
        let err = validate(&gw, &d).expect_err("missing key");
        assert!(err.to_string().contains("spec.authKeys.mysqlUrl"), "{err}");
    }

    #[test]
    fn non_pem_key_is_refused() {
        let gw = gateway();
        let mut d = dereferenced();
        d.secrets
            .get_mut("rsa-keys")
            .expect("rsa")
            .insert("old".into(), b"not a key".to_vec());
        let err = validate(&gw, &d).expect_err("not pem");
        assert!(err.to_string().contains("spec.rsaKeys[1]"), "{err}");
    }

    #[test]
    fn status_shows_each_key_with_its_mtproto_fingerprint() {
        let v = validate(&gateway(), &dereferenced()).expect("valid");
        let expected = |pem: &str| {
            let k = ServerKey::from_pem(pem).expect("test key");
            (
                format!("{:016x}", k.fingerprint() as u64),
                k.public_pkcs1_pem().expect("public"),
            )
        };
        let got: Vec<_> = v
            .rsa_status
            .iter()
            .map(|s| {
                (
                    s.secret_name.as_str(),
                    s.key.as_str(),
                    s.fingerprint.clone(),
                    s.public_key.clone(),
                )
            })
            .collect();
        let (fa, pa) = expected(crate::fixtures::PEM);
        let (fb, pb) = expected(crate::fixtures::OTHER_PEM);
        assert_ne!(fa, fb);
        assert_eq!(
            got,
            [
                ("rsa-keys", "primary.pem", fa, pa),
                ("rsa-keys", "old", fb, pb)
            ]
        );
        assert!(v.rsa_status[0]
            .public_key
            .starts_with("-----BEGIN RSA PUBLIC KEY-----"));
    }

    #[test]
    fn session_namespace_must_be_allowed() {
        let gw = gateway();
        let mut d = dereferenced();
        d.allowed_session_namespaces = Some(["sessions".to_owned()].into());
        let err = validate(&gw, &d).expect_err("teamgram is not allowed");
        assert!(
            err.to_string()
                .contains("spec.session.service.namespace: teamgram"),
            "{err}"
        );
        d.allowed_session_namespaces = Some(["teamgram".to_owned()].into());
        validate(&gw, &d).expect("allowed");
        // The gateway's own namespace needs no permission.
        let mut same = gw.clone();
        same.spec.session.service.namespace = None;
        d.allowed_session_namespaces = Some(BTreeSet::new());
        validate(&same, &d).expect("own namespace");
    }

    #[test]
    fn duplicate_rsa_key_is_refused() {
        let mut gw = gateway();
        let first = gw.spec.rsa_keys[0].clone();
        gw.spec.rsa_keys.push(first);
        let err = validate(&gw, &dereferenced()).expect_err("dup");
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn bad_cidr_is_refused() {
        let mut gw = gateway();
        gw.spec.network_policy.client_cidrs = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        let err = validate(&gw, &dereferenced()).expect_err("cidr");
        assert!(err.to_string().contains("clientCidrs[1]"), "{err}");
        let mut gw = gateway();
        gw.spec.listeners[0].proxy_trusted_sources = vec!["10.1.0.0/16".into(), "10.1.0.1".into()];
        let err = validate(&gw, &dereferenced()).expect_err("cidr");
        assert!(
            err.to_string()
                .contains("spec.listeners[0].proxyTrustedSources[1]"),
            "{err}"
        );
        for ok in ["0.0.0.0/0", "2001:db8::/32"] {
            assert!(is_cidr(ok), "{ok}");
        }
        for bad in ["10.0.0.0", "x/8", "10.0.0.0/+8", "::/129"] {
            assert!(!is_cidr(bad), "{bad}");
        }
    }

    #[test]
    fn hash_follows_referenced_values_only() {
        let gw = gateway();
        let d = dereferenced();
        let base = validate(&gw, &d).expect("valid").secrets_hash;

        let mut unrelated = d.clone();
        unrelated
            .secrets
            .get_mut("store")
            .expect("store")
            .insert("unrelated".into(), b"x".to_vec());
        assert_eq!(validate(&gw, &unrelated).expect("valid").secrets_hash, base);

        let mut rotated = d.clone();
        rotated
            .secrets
            .get_mut("store")
            .expect("store")
            .insert("redis".into(), b"redis://other:6379".to_vec());
        assert_ne!(validate(&gw, &rotated).expect("valid").secrets_hash, base);
    }

    #[test]
    fn service_monitor_needs_both_flag_and_api() {
        let mut gw = gateway();
        gw.spec.metrics.service_monitor.enabled = true;
        let mut d = dereferenced();
        assert!(!validate(&gw, &d).expect("valid").service_monitor);
        d.service_monitor_api = true;
        assert!(validate(&gw, &d).expect("valid").service_monitor);
    }
}
