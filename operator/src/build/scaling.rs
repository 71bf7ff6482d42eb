//! PodDisruptionBudget and HorizontalPodAutoscaler.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{meta, selector_labels, Names};
use crate::crd::{MtprotoGateway, MtprotoGatewaySpec};
use crate::validate::ValidatedGateway;

/// Per-pod metric the gateway exports for open client connections.
pub const CONNECTIONS_METRIC: &str = "mtproto_connections_open";

pub(super) fn pdb(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> Option<PodDisruptionBudget> {
    spec.disruption_budget.enabled.then(|| PodDisruptionBudget {
        metadata: meta(v, &names.base, owner),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(spec.disruption_budget.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// The HPA scales the MtprotoGateway through its scale subresource rather than the
/// Deployment, so the operator and the HPA never fight over `Deployment.spec.replicas`.
pub(super) fn hpa(
    gw: &MtprotoGateway,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> Option<HorizontalPodAutoscaler> {
    let a = gw.spec.autoscaling.as_ref().filter(|a| a.enabled)?;
    let mut metrics = Vec::new();
    if let Some(cpu) = a.target_cpu_utilization_percentage {
        metrics.push(MetricSpec {
            type_: "Resource".to_owned(),
            resource: Some(ResourceMetricSource {
                name: "cpu".to_owned(),
                target: MetricTarget {
                    type_: "Utilization".to_owned(),
                    average_utilization: Some(cpu),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    if let Some(conns) = a.target_connections_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".to_owned(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: CONNECTIONS_METRIC.to_owned(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".to_owned(),
                    average_value: Some(Quantity(conns.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: meta(v, &names.base, owner),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(owner.api_version.clone()),
                kind: owner.kind.clone(),
                name: owner.name.clone(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            behavior: Some(behavior(a.scale_down_stabilization_seconds)),
        },
        ..HorizontalPodAutoscaler::default()
    })
}

/// Scale-down waits out the stabilisation window and then removes at most 10%
/// of the pods (at least one) a minute, since each removed pod disconnects its
/// clients; scale-up keeps the HPA defaults.
fn behavior(stabilization_seconds: i32) -> HorizontalPodAutoscalerBehavior {
    HorizontalPodAutoscalerBehavior {
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(stabilization_seconds),
            select_policy: Some("Max".to_owned()),
            policies: Some(vec![
                HPAScalingPolicy {
                    type_: "Percent".to_owned(),
                    value: 10,
                    period_seconds: 60,
                },
                HPAScalingPolicy {
                    type_: "Pods".to_owned(),
                    value: 1,
                    period_seconds: 60,
                },
            ]),
            ..HPAScalingRules::default()
        }),
        scale_up: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::built;
    use super::*;

    #[test]
    fn hpa_targets_the_gateway_with_cpu_and_connections() {
        let (_, b) = built();
        let s = &b.hpa.as_ref().expect("hpa").spec;
        assert_eq!(s.scale_target_ref.kind, "MtprotoGateway");
        assert_eq!(
            s.scale_target_ref.api_version.as_deref(),
            Some("mtproto-edge.io/v1alpha1")
        );
        assert_eq!(s.scale_target_ref.name, "edge");
        assert_eq!((s.min_replicas, s.max_replicas), (Some(2), 10));
        let m = s.metrics.as_ref().expect("metrics");
        assert_eq!(
            m[0].resource
                .as_ref()
                .and_then(|r| r.target.average_utilization),
            Some(70)
        );
        let pods = m[1].pods.as_ref().expect("pods metric");
        assert_eq!(pods.metric.name, CONNECTIONS_METRIC);
        assert_eq!(pods.target.average_value, Some(Quantity("20000".into())));
        let down = s
            .behavior
            .as_ref()
            .and_then(|b| b.scale_down.as_ref())
            .expect("scale-down behaviour");
        assert_eq!(down.stabilization_window_seconds, Some(300));
        assert_eq!(down.policies.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn pdb_caps_voluntary_disruption() {
        let (_, b) = built();
        let s = b.pdb.as_ref().and_then(|p| p.spec.as_ref()).expect("pdb");
        assert_eq!(s.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            s.selector.as_ref().and_then(|l| l.match_labels.clone()),
            Some(selector_labels("edge"))
        );
    }

    #[test]
    fn disabled_parts_are_absent() {
        let mut gw = crate::fixtures::gateway();
        gw.spec.disruption_budget.enabled = false;
        if let Some(a) = gw.spec.autoscaling.as_mut() {
            a.enabled = false;
        }
        let v = crate::validate::validate(&gw, &crate::fixtures::dereferenced()).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        assert!(b.pdb.is_none());
        assert!(b.hpa.is_none());
    }
}
