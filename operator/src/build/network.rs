//! Services and the NetworkPolicy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta, selector_labels, Names};
use crate::crd::{MtprotoGatewaySpec, ServiceType, SessionAffinity, Transport, ADMIN_PORT};
use crate::validate::ValidatedGateway;

/// Label that tells the internal (gRPC + admin) Service apart, for the ServiceMonitor.
pub const INTERNAL_SERVICE_LABEL: &str = "mtproto-edge.io/service";

fn tcp_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// The Service clients connect to: one port per listener.
pub(super) fn client_service(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> Service {
    let mut metadata = meta(v, &names.base, owner);
    if !spec.service.annotations.is_empty() {
        metadata.annotations = Some(spec.service.annotations.clone());
    }
    let affinity = spec.service.session_affinity.unwrap_or(
        if spec
            .listeners
            .iter()
            .any(|l| l.transport == Transport::Http)
        {
            SessionAffinity::ClientIP
        } else {
            SessionAffinity::None
        },
    );
    let load_balancer = spec.service.type_ == ServiceType::LoadBalancer;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.service.type_.as_str().to_owned()),
            session_affinity: Some(affinity.as_str().to_owned()),
            load_balancer_class: spec
                .service
                .load_balancer_class
                .clone()
                .filter(|_| load_balancer),
            load_balancer_source_ranges: (load_balancer
                && !spec.service.load_balancer_source_ranges.is_empty())
            .then(|| spec.service.load_balancer_source_ranges.clone()),
            selector: Some(selector_labels(&v.name)),
            ports: Some(
                spec.listeners
                    .iter()
                    .map(|l| tcp_port(&l.name, l.port))
                    .collect(),
            ),
            external_traffic_policy: spec
                .service
                .external_traffic_policy
                .map(|p| p.as_str().to_owned()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Headless Service over the reverse-path gRPC and admin ports: sessions and Prometheus
/// address individual pods, never a load-balanced VIP.
pub(super) fn grpc_service(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> Service {
    let mut metadata = meta(v, &names.grpc_service, owner);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(INTERNAL_SERVICE_LABEL.to_owned(), "internal".to_owned());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(&v.name)),
            ports: Some(vec![
                tcp_port("grpc", spec.session.grpc_port),
                tcp_port("admin", ADMIN_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn np_port(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }
}

fn namespace_peer(ns: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                ns.to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

/// Ingress only: clients on the listeners, the session Service's pods on gRPC (the whole
/// session namespace while that Service or its selector is unknown), scrapers on admin.
/// Egress stays open because the gateway needs the API server, Redis, MySQL and sessions.
pub(super) fn network_policy(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> Option<NetworkPolicy> {
    if !spec.network_policy.enabled {
        return None;
    }
    let clients = (!spec.network_policy.client_cidrs.is_empty()).then(|| {
        spec.network_policy
            .client_cidrs
            .iter()
            .map(|c| NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: c.clone(),
                    except: None,
                }),
                ..NetworkPolicyPeer::default()
            })
            .collect()
    });
    let np = &spec.network_policy;
    let scrapers = if np.metrics_namespaces.is_empty() {
        vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: np.metrics_pod_selector.clone(),
            ..NetworkPolicyPeer::default()
        }]
    } else {
        np.metrics_namespaces
            .iter()
            .map(|n| NetworkPolicyPeer {
                pod_selector: np.metrics_pod_selector.clone(),
                ..namespace_peer(n)
            })
            .collect()
    };
    // Namespace and pod selector in one peer: both must match.
    let sessions = NetworkPolicyPeer {
        pod_selector: v.session_pod_selector.as_ref().map(|labels| LabelSelector {
            match_labels: Some(labels.clone()),
            ..LabelSelector::default()
        }),
        ..namespace_peer(&v.session_namespace)
    };
    Some(NetworkPolicy {
        metadata: meta(v, &names.base, owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: clients,
                    ports: Some(spec.listeners.iter().map(|l| np_port(l.port)).collect()),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![sessions]),
                    ports: Some(vec![np_port(spec.session.grpc_port)]),
                },
                NetworkPolicyIngressRule {
                    from: Some(scrapers),
                    ports: Some(vec![np_port(ADMIN_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::built;

    #[test]
    fn client_service_exposes_listeners() {
        let (_, b) = built();
        let s = b.client_service.spec.as_ref().expect("spec");
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(s.external_traffic_policy.as_deref(), Some("Local"));
        let ports: Vec<_> = s
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [10443, 8080]);
        assert_eq!(
            b.client_service
                .metadata
                .annotations
                .as_ref()
                .map(|a| a["lb.example/proxy-protocol"].as_str()),
            Some("true")
        );
    }

    #[test]
    fn client_service_affinity_and_load_balancer_fields() {
        use crate::crd::{ServiceType, SessionAffinity, Transport};
        use crate::fixtures::{dereferenced, gateway};
        let svc = |gw: &crate::crd::MtprotoGateway| {
            let v = crate::validate::validate(gw, &dereferenced()).expect("valid");
            super::super::build(gw, &v)
                .expect("build")
                .client_service
                .spec
                .expect("spec")
        };
        let mut gw = gateway();
        assert_eq!(svc(&gw).session_affinity.as_deref(), Some("None"));
        // Several pods break HTTP-transport handshakes without affinity.
        gw.spec.listeners[1].transport = Transport::Http;
        assert_eq!(svc(&gw).session_affinity.as_deref(), Some("ClientIP"));
        gw.spec.service.session_affinity = Some(SessionAffinity::None);
        assert_eq!(svc(&gw).session_affinity.as_deref(), Some("None"));

        gw.spec.service.load_balancer_class = Some("service.k8s.aws/nlb".into());
        gw.spec.service.load_balancer_source_ranges = vec!["10.0.0.0/8".into()];
        let s = svc(&gw);
        assert_eq!(
            s.load_balancer_class.as_deref(),
            Some("service.k8s.aws/nlb")
        );
        assert_eq!(
            s.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_owned()])
        );
        gw.spec.service.type_ = ServiceType::NodePort;
        gw.spec.service.external_traffic_policy = None;
        let s = svc(&gw);
        assert!(s.load_balancer_class.is_none());
        assert!(s.load_balancer_source_ranges.is_none());
    }

    #[test]
    fn grpc_service_is_headless() {
        let (_, b) = built();
        assert_eq!(b.grpc_service.metadata.name.as_deref(), Some("edge-grpc"));
        let s = b.grpc_service.spec.as_ref().expect("spec");
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        let ports: Vec<_> = s
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [20110, 9090]);
    }

    #[test]
    fn network_policy_admits_clients_sessions_and_scrapers() {
        let (_, b) = built();
        let np = b
            .network_policy
            .as_ref()
            .and_then(|n| n.spec.as_ref())
            .expect("netpol");
        let rules = np.ingress.as_ref().expect("ingress");
        assert_eq!(rules.len(), 3);
        let cidr = rules[0]
            .from
            .as_ref()
            .and_then(|f| f[0].ip_block.as_ref())
            .map(|b| b.cidr.as_str());
        assert_eq!(cidr, Some("0.0.0.0/0"));
        let session_ns = rules[1]
            .from
            .as_ref()
            .and_then(|f| f[0].namespace_selector.as_ref())
            .and_then(|s| s.match_labels.as_ref())
            .map(|l| l["kubernetes.io/metadata.name"].as_str());
        assert_eq!(session_ns, Some("teamgram"));
        // The fixture's session Service selects `app: session`.
        let session_pods = rules[1]
            .from
            .as_ref()
            .and_then(|f| f[0].pod_selector.as_ref())
            .and_then(|s| s.match_labels.as_ref())
            .map(|l| l["app"].as_str());
        assert_eq!(session_pods, Some("session"));
        assert_eq!(rules[1].from.as_ref().map(Vec::len), Some(1));
        // Default monitoring: the `monitoring` namespace, any pod in it.
        let scrapers = rules[2].from.as_ref().expect("scrapers");
        assert_eq!(scrapers.len(), 1);
        assert_eq!(
            scrapers[0]
                .namespace_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .map(|l| l["kubernetes.io/metadata.name"].as_str()),
            Some("monitoring")
        );
        assert!(scrapers[0].pod_selector.is_none());
        let ports = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
            r.ports
                .iter()
                .flatten()
                .filter_map(|p| match p.port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        Some(n)
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ports(&rules[0]), [10443, 8080]);
        assert_eq!(ports(&rules[1]), [20110]);
        assert_eq!(ports(&rules[2]), [9090]);
    }

    #[test]
    fn network_policy_is_on_by_default_and_follows_the_monitoring_settings() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        use std::collections::BTreeMap;
        let mut gw = crate::fixtures::gateway();
        gw.spec.network_policy = serde_json::from_str("{}").expect("defaults");
        assert!(gw.spec.network_policy.enabled);
        gw.spec.network_policy.metrics_namespaces = vec![];
        gw.spec.network_policy.metrics_pod_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "prometheus".into())])),
            ..LabelSelector::default()
        });
        // No session Service found: the session namespace as a whole.
        let mut d = crate::fixtures::dereferenced();
        d.session_selector = None;
        let v = crate::validate::validate(&gw, &d).expect("valid");
        let np = super::super::build(&gw, &v)
            .expect("build")
            .network_policy
            .and_then(|n| n.spec)
            .expect("rendered by default");
        let rules = np.ingress.expect("ingress");
        assert!(rules[0].from.is_none(), "clients from anywhere");
        let sessions = &rules[1].from.as_ref().expect("from")[0];
        assert!(sessions.pod_selector.is_none());
        assert!(sessions.namespace_selector.is_some());
        let scraper = &rules[2].from.as_ref().expect("from")[0];
        assert_eq!(
            scraper.namespace_selector,
            Some(LabelSelector::default()),
            "any namespace"
        );
        assert_eq!(
            scraper
                .pod_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .map(|l| l["app"].as_str()),
            Some("prometheus")
        );
    }

    #[test]
    fn network_policy_can_be_disabled() {
        let mut gw = crate::fixtures::gateway();
        gw.spec.network_policy.enabled = false;
        let v = crate::validate::validate(&gw, &crate::fixtures::dereferenced()).expect("valid");
        assert!(super::super::build(&gw, &v)
            .expect("build")
            .network_policy
            .is_none());
    }
}
