//! ServiceMonitor for the Prometheus operator. Built as a dynamic object because its types
//! live in another project's CRD, which may not be installed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::network::INTERNAL_SERVICE_LABEL;
use super::{meta, Names};
use crate::crd::MtprotoGatewaySpec;
use crate::validate::ValidatedGateway;

/// API resource of `monitoring.coreos.com/v1` ServiceMonitor.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

pub(super) fn service_monitor(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> DynamicObject {
    let mut obj = DynamicObject::new(&names.base, &service_monitor_resource()).within(&v.namespace);
    obj.metadata = meta(v, &names.base, owner);
    let mut labels = spec.metrics.service_monitor.labels.clone();
    labels.extend(obj.metadata.labels.take().unwrap_or_default());
    obj.metadata.labels = Some(labels);
    obj.data = json!({
        "spec": {
            "selector": {"matchLabels": {
                "app.kubernetes.io/instance": v.name,
                INTERNAL_SERVICE_LABEL: "internal",
            }},
            "endpoints": [{"port": "admin", "path": "/metrics", "interval": spec.metrics.service_monitor.interval}],
        }
    });
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{dereferenced, gateway};
    use crate::validate::validate;

    #[test]
    fn service_monitor_scrapes_the_admin_port_of_the_internal_service() {
        let mut gw = gateway();
        gw.spec.metrics.service_monitor.enabled = true;
        gw.spec.metrics.service_monitor.labels =
            [("release".to_owned(), "kube-prometheus".to_owned())].into();
        let mut d = dereferenced();
        d.service_monitor_api = true;
        let v = validate(&gw, &d).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        let sm = b.service_monitor.expect("service monitor");
        assert_eq!(
            sm.types.as_ref().map(|t| t.kind.as_str()),
            Some("ServiceMonitor")
        );
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "admin");
        assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "30s");
        assert_eq!(
            sm.data["spec"]["selector"]["matchLabels"][INTERNAL_SERVICE_LABEL],
            "internal"
        );
        assert!(sm.metadata.owner_references.is_some());
        let labels = sm.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["release"], "kube-prometheus");
        assert_eq!(labels["app.kubernetes.io/instance"], "edge");
    }
}
