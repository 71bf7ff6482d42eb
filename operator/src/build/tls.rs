//! The Secrets holding the fleet CA and the gRPC certificates, and the cert-manager
//! `Certificate` that replaces them when the gateway names an issuer.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{common_labels, meta, Names, OWNER_NAMESPACE_LABEL};
use crate::certs::{SecretValues, GATEWAY_NAME, SESSION_NAME};
use crate::crd::IssuerRef;
use crate::validate::ValidatedGateway;

/// API resource of cert-manager's `cert-manager.io/v1` Certificate.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// A `kubernetes.io/tls` Secret with `values`, in the gateway's namespace and owned by it.
pub fn owned_secret(
    v: &ValidatedGateway,
    name: &str,
    owner: &OwnerReference,
    values: &SecretValues,
) -> Secret {
    tls_secret(meta(v, name, owner), values)
}

/// Name of the sessions' certificate Secret: `<name>-session-tls`, prefixed with the
/// gateway's namespace when it lives in another namespace, so gateways of the same name in
/// different namespaces sharing one session namespace do not overwrite each other's.
pub fn session_tls_name(names: &Names, namespace: &str, session_namespace: &str) -> String {
    if namespace == session_namespace {
        names.session_tls.clone()
    } else {
        format!("{namespace}-{}", names.session_tls)
    }
}

/// The sessions' certificate Secret, in the session namespace: owned by the gateway when
/// that is its own namespace, else labelled with it so cleanup finds it (owner references
/// cannot cross namespaces).
pub fn session_secret(
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
    values: &SecretValues,
) -> Secret {
    if v.session_namespace == v.namespace {
        return owned_secret(v, &names.session_tls, owner, values);
    }
    let mut labels = common_labels(&v.name);
    labels.insert(OWNER_NAMESPACE_LABEL.to_owned(), v.namespace.clone());
    let metadata = ObjectMeta {
        name: Some(session_tls_name(names, &v.namespace, &v.session_namespace)),
        namespace: Some(v.session_namespace.clone()),
        labels: Some(labels),
        ..ObjectMeta::default()
    };
    tls_secret(metadata, values)
}

fn tls_secret(metadata: ObjectMeta, values: &SecretValues) -> Secret {
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(
            values
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Secret::default()
    }
}

/// A cert-manager Certificate that writes the gateway's gRPC certificate to the same Secret
/// the operator's CA would, so the pods mount one name either way.
pub fn gateway_certificate(
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
    issuer: &IssuerRef,
) -> DynamicObject {
    certificate(v, &names.gateway_tls, GATEWAY_NAME, owner, issuer)
}

/// The sessions' Certificate, when they share the gateway's namespace (an owned object there;
/// in another namespace an `Issuer` would not be reachable and nothing could clean it up).
pub fn session_certificate(
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
    issuer: &IssuerRef,
) -> Option<DynamicObject> {
    (v.session_namespace == v.namespace)
        .then(|| certificate(v, &names.session_tls, SESSION_NAME, owner, issuer))
}

fn certificate(
    v: &ValidatedGateway,
    secret: &str,
    dns_name: &str,
    owner: &OwnerReference,
    issuer: &IssuerRef,
) -> DynamicObject {
    let mut obj = DynamicObject::new(secret, &certificate_resource()).within(&v.namespace);
    obj.metadata = meta(v, secret, owner);
    obj.data = json!({
        "spec": {
            "secretName": secret,
            "commonName": dns_name,
            "dnsNames": [dns_name],
            "usages": ["digital signature", "server auth", "client auth"],
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": issuer.group},
        }
    });
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::owner_ref;
    use crate::fixtures::{dereferenced, gateway};
    use crate::validate::validate;

    #[test]
    fn the_session_secret_lives_with_the_sessions() {
        let gw = gateway();
        let owner = owner_ref(&gw).expect("owner");
        let values = SecretValues::from([("tls.crt".to_owned(), b"pem".to_vec())]);
        let v = validate(&gw, &dereferenced()).expect("valid");
        let s = session_secret(&v, &Names::new("edge"), &owner, &values);
        assert_eq!(s.metadata.namespace.as_deref(), Some("teamgram"));
        assert_eq!(s.metadata.name.as_deref(), Some("edge-edge-session-tls"));
        assert!(s.metadata.owner_references.is_none());
        let labels = s.metadata.labels.expect("labels");
        assert_eq!(labels[OWNER_NAMESPACE_LABEL], "edge");
        assert_eq!(labels["app.kubernetes.io/instance"], "edge");
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));

        let mut same = gateway();
        same.spec.session.service.namespace = None;
        let v = validate(&same, &dereferenced()).expect("valid");
        let s = session_secret(&v, &Names::new("edge"), &owner, &values);
        assert_eq!(s.metadata.namespace.as_deref(), Some("edge"));
        assert_eq!(s.metadata.name.as_deref(), Some("edge-session-tls"));
        assert_eq!(s.metadata.owner_references.map(|o| o.len()), Some(1));
    }

    #[test]
    fn the_certificate_writes_the_mounted_secret_for_the_gateway_name() {
        let gw = gateway();
        let v = validate(&gw, &dereferenced()).expect("valid");
        let issuer = IssuerRef {
            name: "fleet-ca".into(),
            kind: "ClusterIssuer".into(),
            group: "cert-manager.io".into(),
        };
        let c = gateway_certificate(
            &v,
            &Names::new("edge"),
            &owner_ref(&gw).expect("owner"),
            &issuer,
        );
        assert_eq!(c.metadata.name.as_deref(), Some("edge-gateway-tls"));
        assert_eq!(c.data["spec"]["secretName"], "edge-gateway-tls");
        assert_eq!(c.data["spec"]["dnsNames"], json!(["mtproto-gateway"]));
        assert_eq!(c.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        let usages = c.data["spec"]["usages"].as_array().expect("usages");
        assert!(usages.contains(&json!("client auth")) && usages.contains(&json!("server auth")));
    }

    #[test]
    fn the_sessions_certificate_is_made_only_beside_the_gateway() {
        let issuer = IssuerRef {
            name: "fleet-ca".into(),
            kind: "Issuer".into(),
            group: "cert-manager.io".into(),
        };
        let gw = gateway();
        let owner = owner_ref(&gw).expect("owner");
        let v = validate(&gw, &dereferenced()).expect("valid");
        assert!(session_certificate(&v, &Names::new("edge"), &owner, &issuer).is_none());
        let mut same = gateway();
        same.spec.session.service.namespace = None;
        let v = validate(&same, &dereferenced()).expect("valid");
        let c = session_certificate(&v, &Names::new("edge"), &owner, &issuer).expect("made");
        assert_eq!(c.data["spec"]["secretName"], "edge-session-tls");
        assert_eq!(c.data["spec"]["dnsNames"], json!(["mtproto-session"]));
        assert_eq!(c.metadata.namespace.as_deref(), Some("edge"));
    }
}
