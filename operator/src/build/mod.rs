//! Pure builders: a validated gateway in, the Kubernetes objects it should own out.
//!
//! Nothing here talks to the API server, so every field can be checked in unit tests.

pub mod config;
mod monitor;
mod network;
mod rbac;
mod scaling;
pub mod tls;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::DynamicObject;
use kube::Resource;

use crate::crd::MtprotoGateway;
use crate::error::Error;
use crate::validate::ValidatedGateway;

pub use monitor::service_monitor_resource;

/// Field manager for every server-side apply the operator makes.
pub const MANAGER: &str = "mtproto-operator";
/// Pod template annotation carrying the config and Secret hash; a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "mtproto-edge.io/config-hash";
/// Label on objects that live outside the gateway's namespace, naming it, for cleanup.
pub const OWNER_NAMESPACE_LABEL: &str = "mtproto-edge.io/owner-namespace";
/// ConfigMap key holding the gateway config.
pub const CONFIG_KEY: &str = "gateway.toml";

/// Everything one gateway owns. Optional parts are `None` when disabled; the reconciler
/// deletes them then.
#[derive(Debug, Clone)]
pub struct Built {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub client_service: Service,
    pub grpc_service: Service,
    pub deployment: Deployment,
    pub pdb: Option<PodDisruptionBudget>,
    pub hpa: Option<HorizontalPodAutoscaler>,
    pub network_policy: Option<NetworkPolicy>,
    pub service_monitor: Option<DynamicObject>,
}

/// Names of the owned objects, derived from the gateway name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub base: String,
    pub config: String,
    pub grpc_service: String,
    pub endpoint_reader: String,
    /// The operator-run CA of this gateway (certificate, key and trust bundle).
    pub ca_secret: String,
    /// The gateway's gRPC certificate, mounted into its pods.
    pub gateway_tls: String,
    /// The sessions' gRPC certificate, in the session namespace, for the sessions to mount.
    pub session_tls: String,
}

impl Names {
    /// Names for gateway `name`.
    pub fn new(name: &str) -> Self {
        Self {
            base: name.to_owned(),
            config: format!("{name}-config"),
            grpc_service: format!("{name}-grpc"),
            endpoint_reader: format!("{name}-endpointslice-reader"),
            ca_secret: format!("{name}-ca"),
            gateway_tls: format!("{name}-gateway-tls"),
            session_tls: format!("{name}-session-tls"),
        }
    }

    /// Name of the Role/RoleBinding in a session namespace other than the gateway's; it
    /// carries the gateway namespace so two gateways of the same name do not collide.
    pub fn cross_namespace_reader(&self, gateway_namespace: &str) -> String {
        format!("{gateway_namespace}-{}", self.endpoint_reader)
    }
}

/// Labels that select the gateway's pods.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "mtproto-gateway".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
    ])
}

/// The pod selector as a string, for `status.selector` (scale subresource, HPA).
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every owned object.
pub fn common_labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert(
        "app.kubernetes.io/component".to_owned(),
        "gateway".to_owned(),
    );
    l.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        MANAGER.to_owned(),
    );
    l
}

/// The controller owner reference that lets garbage collection follow the gateway; with
/// `blockOwnerDeletion` a foreground delete of the gateway waits for its children.
pub fn owner_ref(gw: &MtprotoGateway) -> Result<OwnerReference, Error> {
    let mut owner = gw
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

fn meta(v: &ValidatedGateway, name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(v.namespace.clone()),
        labels: Some(common_labels(&v.name)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Builds every object `gw` should own.
pub fn build(gw: &MtprotoGateway, v: &ValidatedGateway) -> Result<Built, Error> {
    let owner = owner_ref(gw)?;
    let names = Names::new(&v.name);
    let spec = &gw.spec;
    let config_text = config::render(spec, v)?;
    let config_map = workload::config_map(v, &names, &owner, config_text.clone());
    let deployment = workload::deployment(spec, v, &names, &owner, &config_text);
    let (role, role_binding) = rbac::endpoint_reader(v, &names, &owner);
    Ok(Built {
        config_map,
        service_account: rbac::service_account(spec, v, &names, &owner),
        role,
        role_binding,
        client_service: network::client_service(spec, v, &names, &owner),
        grpc_service: network::grpc_service(spec, v, &names, &owner),
        deployment,
        pdb: scaling::pdb(spec, v, &names, &owner),
        hpa: scaling::hpa(gw, v, &names, &owner),
        network_policy: network::network_policy(spec, v, &names, &owner),
        service_monitor: v
            .service_monitor
            .then(|| monitor::service_monitor(spec, v, &names, &owner)),
    })
}

/// Client-facing address reported in status: the Service DNS name and the first listener.
pub fn endpoint(gw: &MtprotoGateway, v: &ValidatedGateway) -> Option<String> {
    gw.spec
        .listeners
        .first()
        .map(|l| format!("{}.{}.svc:{}", v.name, v.namespace, l.port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{dereferenced, gateway};
    use crate::validate::validate;

    pub(super) fn built() -> (MtprotoGateway, Built) {
        let gw = gateway();
        let v = validate(&gw, &dereferenced()).expect("valid");
        let b = build(&gw, &v).expect("build");
        (gw, b)
    }

    #[test]
    fn every_object_is_owned_by_the_gateway_and_labelled() {
        let (gw, b) = built();
        let metas = [
            &b.config_map.metadata,
            &b.service_account.metadata,
            &b.client_service.metadata,
            &b.grpc_service.metadata,
            &b.deployment.metadata,
            &b.pdb.as_ref().expect("pdb").metadata,
            &b.hpa.as_ref().expect("hpa").metadata,
            &b.network_policy.as_ref().expect("netpol").metadata,
        ];
        for m in metas {
            let owners = m.owner_references.as_ref().expect("owners");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "MtprotoGateway");
            assert_eq!(owners[0].uid, "0000-1111");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(owners[0].block_owner_deletion, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("edge"));
            let labels = m.labels.as_ref().expect("labels");
            assert_eq!(labels["app.kubernetes.io/instance"], "edge");
            assert_eq!(labels["app.kubernetes.io/managed-by"], MANAGER);
        }
        assert_eq!(gw.metadata.name.as_deref(), Some("edge"));
    }

    #[test]
    fn missing_uid_is_an_error() {
        let mut gw = gateway();
        gw.metadata.uid = None;
        let v = validate(&gw, &dereferenced()).expect("valid");
        assert!(matches!(
            build(&gw, &v),
            Err(Error::MissingField("metadata.uid"))
        ));
    }

    #[test]
    fn selector_string_matches_labels() {
        assert_eq!(
            selector_string("edge"),
            "app.kubernetes.io/instance=edge,app.kubernetes.io/name=mtproto-gateway"
        );
    }

    #[test]
    fn endpoint_uses_first_listener() {
        let gw = gateway();
        let v = validate(&gw, &dereferenced()).expect("valid");
        assert_eq!(endpoint(&gw, &v).as_deref(), Some("edge.edge.svc:10443"));
    }
}
