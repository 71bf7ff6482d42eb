//! Pure computation of the gateway's status conditions from the Deployment it owns.
//!
//! `lastTransitionTime` only moves when a condition's status flips, so watchers can tell
//! "still not ready" from "became not ready again".

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The fleet serves clients: at least one pod is available. Scaling and
/// rollouts leave it alone, so it (not `Ready`) is what alerts and Events follow.
pub const AVAILABLE: &str = "Available";
/// All desired pods are ready and updated.
pub const READY: &str = "Ready";
/// A rollout or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Something needs attention: an invalid spec, a failed apply or a stuck rollout.
pub const DEGRADED: &str = "Degraded";

/// Whether the gRPC between gateways and sessions is plaintext: `True` is a
/// warning (auth keys and messages cross the pod network in the clear).
pub const PLAINTEXT_SESSION_RPC: &str = "PlaintextSessionRPC";
/// The gateway's gRPC certificate is issued (by the operator's CA or cert-manager).
pub const CERTIFICATES_READY: &str = "CertificatesReady";

/// Inputs that decide the conditions.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// `metadata.generation` of the gateway.
    pub generation: i64,
    /// Desired replicas.
    pub replicas: i32,
    /// The owned Deployment as last read (after apply), if any.
    pub deployment: Option<&'a Deployment>,
    /// Why this reconcile failed, if it did: (reason, message).
    pub failure: Option<(&'a str, &'a str)>,
    /// Conditions decided elsewhere (session gRPC security), passed through.
    pub extra: &'a [Decision],
}

/// Replica counts taken from the Deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replicas {
    pub total: i32,
    pub ready: i32,
}

/// Replica counts as the Deployment reports them.
pub fn replicas(deployment: Option<&Deployment>) -> Replicas {
    let status = deployment.and_then(|d| d.status.as_ref());
    Replicas {
        total: status.and_then(|s| s.replicas).unwrap_or(0),
        ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
    }
}

fn deployment_condition<'a>(
    d: &'a Deployment,
    type_: &str,
) -> Option<&'a k8s_openapi::api::apps::v1::DeploymentCondition> {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == type_))
}

/// Computes `Available`, `Ready`, `Progressing` and `Degraded`, keeping transition times
/// from `previous` for conditions whose status did not change.
pub fn compute(o: &Observed<'_>, previous: &[Condition], now: Time) -> Vec<Condition> {
    let (ready, progressing, degraded) = decide(o);
    [availability(o), ready, progressing, degraded]
        .into_iter()
        .chain(o.extra.iter().cloned())
        .map(|(type_, status, reason, message)| {
            let status = if status { "True" } else { "False" }.to_owned();
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation: Some(o.generation),
                last_transition_time,
            }
        })
        .collect()
}

/// A condition as decided: type, status, reason, message.
pub type Decision = (&'static str, bool, &'static str, String);

/// The session gRPC security conditions: plaintext is a standing warning;
/// otherwise `certificates` says whether the gateway certificate is there
/// (`None` while not known, e.g. after a failed reconcile).
pub fn session_security(plaintext: bool, certificates: Option<Decision>) -> Vec<Decision> {
    if plaintext {
        return vec![(
            PLAINTEXT_SESSION_RPC,
            true,
            "PlaintextByChoice",
            "spec.session.tls.mode is plaintext: anyone on the pod network can read auth keys \
             and messages between gateways and sessions, call sessions as a gateway and push \
             messages to clients through the gateways; use mode mutual once the sessions \
             support TLS"
                .to_owned(),
        )];
    }
    let mut out = vec![(
        PLAINTEXT_SESSION_RPC,
        false,
        "MutualTLS",
        "gateways and sessions authenticate each other with certificates of the fleet's CA"
            .to_owned(),
    )];
    out.extend(certificates);
    out
}

/// From the Deployment alone: a failed reconcile does not stop pods that serve.
fn availability(o: &Observed<'_>) -> Decision {
    let Some(d) = o.deployment else {
        return (
            AVAILABLE,
            false,
            "DeploymentMissing",
            "the Deployment does not exist yet".to_owned(),
        );
    };
    let available = d
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    if o.replicas == 0 {
        (
            AVAILABLE,
            false,
            "ScaledToZero",
            "no replicas requested".to_owned(),
        )
    } else if available > 0 {
        (
            AVAILABLE,
            true,
            "MinimumReplicasAvailable",
            format!("{available}/{} replicas available", o.replicas),
        )
    } else {
        (
            AVAILABLE,
            false,
            "NoReplicasAvailable",
            format!("0/{} replicas available", o.replicas),
        )
    }
}

fn decide(o: &Observed<'_>) -> (Decision, Decision, Decision) {
    let counts = replicas(o.deployment);
    let want = o.replicas;

    if let Some((reason, message)) = o.failure {
        let reason = reason_const(reason);
        return (
            (READY, false, reason, message.to_owned()),
            (
                PROGRESSING,
                false,
                reason,
                "reconcile failed; retrying".to_owned(),
            ),
            (DEGRADED, true, reason, message.to_owned()),
        );
    }

    let Some(d) = o.deployment else {
        return (
            (
                READY,
                false,
                "DeploymentMissing",
                "the Deployment does not exist yet".to_owned(),
            ),
            (
                PROGRESSING,
                true,
                "Creating",
                "creating the Deployment".to_owned(),
            ),
            (DEGRADED, false, "AsExpected", String::new()),
        );
    };
    let status = d.status.as_ref();
    let observed = status.and_then(|s| s.observed_generation).unwrap_or(0);
    let d_gen = d.metadata.generation.unwrap_or(0);
    let updated = status.and_then(|s| s.updated_replicas).unwrap_or(0);
    let available = status.and_then(|s| s.available_replicas).unwrap_or(0);
    let settled = observed >= d_gen
        && updated == want
        && counts.ready == want
        && available == want
        && counts.total == want;

    let stuck = deployment_condition(d, "Progressing").is_some_and(|c| {
        c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let replica_failure = deployment_condition(d, "ReplicaFailure").filter(|c| c.status == "True");

    let ready = if settled && want == 0 {
        (
            READY,
            true,
            "ScaledToZero",
            "no replicas requested".to_owned(),
        )
    } else if settled {
        (
            READY,
            true,
            "AllReplicasReady",
            format!("{want}/{want} replicas ready"),
        )
    } else {
        (
            READY,
            false,
            "ReplicasNotReady",
            format!("{}/{want} replicas ready, {updated} updated", counts.ready),
        )
    };
    let progressing = if settled {
        (PROGRESSING, false, "RolloutComplete", String::new())
    } else if stuck {
        (
            PROGRESSING,
            false,
            "ProgressDeadlineExceeded",
            "rollout stalled".to_owned(),
        )
    } else {
        (
            PROGRESSING,
            true,
            "RollingOut",
            format!("{updated}/{want} replicas updated"),
        )
    };
    let degraded = if stuck {
        (
            DEGRADED,
            true,
            "ProgressDeadlineExceeded",
            "the Deployment rollout exceeded its deadline".to_owned(),
        )
    } else if let Some(c) = replica_failure {
        (
            DEGRADED,
            true,
            "ReplicaFailure",
            c.message.clone().unwrap_or_default(),
        )
    } else {
        (DEGRADED, false, "AsExpected", String::new())
    };
    (ready, progressing, degraded)
}

/// Condition reasons must be static CamelCase; map error labels onto them.
fn reason_const(label: &str) -> &'static str {
    match label {
        "missing_secret" => "SecretNotFound",
        "invalid_spec" => "InvalidSpec",
        "apply" => "ApplyFailed",
        _ => "ReconcileFailed",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plaintext_is_a_warning_condition_naming_the_risk() {
        let c = super::compute(
            &super::Observed {
                extra: &super::session_security(true, None),
                ..observed(None, 3)
            },
            &[],
            t(10),
        );
        let p = get(&c, super::PLAINTEXT_SESSION_RPC);
        assert_eq!(p.status, "True");
        assert_eq!(p.reason, "PlaintextByChoice");
        assert!(p.message.contains("auth keys"));
        assert!(c.iter().all(|c| c.type_ != super::CERTIFICATES_READY));

        let cert = (
            super::CERTIFICATES_READY,
            false,
            "CertManagerMissing",
            "install cert-manager".to_owned(),
        );
        let mutual = super::session_security(false, Some(cert));
        let c = super::compute(
            &super::Observed {
                extra: &mutual,
                ..observed(None, 3)
            },
            &[],
            t(10),
        );
        assert_eq!(get(&c, super::PLAINTEXT_SESSION_RPC).status, "False");
        assert_eq!(
            get(&c, super::CERTIFICATES_READY).reason,
            "CertManagerMissing"
        );
    }

    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::Timestamp;

    fn deployment(
        generation: i64,
        observed: i64,
        total: i32,
        ready: i32,
        updated: i32,
    ) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(total),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("timestamp"))
    }

    fn get<'a>(c: &'a [Condition], type_: &str) -> &'a Condition {
        c.iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    fn observed(d: Option<&Deployment>, replicas: i32) -> Observed<'_> {
        Observed {
            generation: 4,
            replicas,
            deployment: d,
            failure: None,
            extra: &[],
        }
    }

    #[test]
    fn settled_deployment_is_ready() {
        let d = deployment(2, 2, 3, 3, 3);
        let c = compute(&observed(Some(&d), 3), &[], t(10));
        assert_eq!(get(&c, READY).status, "True");
        assert_eq!(get(&c, READY).reason, "AllReplicasReady");
        assert_eq!(get(&c, PROGRESSING).status, "False");
        assert_eq!(get(&c, DEGRADED).status, "False");
        assert!(c.iter().all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn rollout_in_progress_is_not_ready() {
        for d in [
            deployment(3, 2, 3, 3, 3),
            deployment(2, 2, 4, 3, 1),
            deployment(2, 2, 3, 2, 3),
        ] {
            let c = compute(&observed(Some(&d), 3), &[], t(10));
            assert_eq!(get(&c, READY).status, "False", "{d:?}");
            assert_eq!(get(&c, PROGRESSING).status, "True");
            assert_eq!(get(&c, PROGRESSING).reason, "RollingOut");
        }
    }

    #[test]
    fn scaled_to_zero_is_ready() {
        let d = deployment(2, 2, 0, 0, 0);
        let c = compute(&observed(Some(&d), 0), &[], t(10));
        assert_eq!(get(&c, READY).reason, "ScaledToZero");
        assert_eq!(get(&c, READY).status, "True");
    }

    #[test]
    fn missing_deployment_is_progressing() {
        let c = compute(&observed(None, 3), &[], t(10));
        assert_eq!(get(&c, READY).status, "False");
        assert_eq!(get(&c, PROGRESSING).reason, "Creating");
    }

    #[test]
    fn stalled_rollout_is_degraded() {
        let mut d = deployment(2, 2, 3, 1, 3);
        if let Some(s) = d.status.as_mut() {
            s.conditions = Some(vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                ..DeploymentCondition::default()
            }]);
        }
        let c = compute(&observed(Some(&d), 3), &[], t(10));
        assert_eq!(get(&c, DEGRADED).status, "True");
        assert_eq!(get(&c, PROGRESSING).status, "False");
        assert_eq!(get(&c, READY).status, "False");
    }

    #[test]
    fn failure_sets_degraded_with_reason() {
        let o = Observed {
            failure: Some(("missing_secret", "spec.rsaKeys[0]: Secret rsa not found")),
            ..observed(None, 3)
        };
        let c = compute(&o, &[], t(10));
        assert_eq!(get(&c, DEGRADED).status, "True");
        assert_eq!(get(&c, DEGRADED).reason, "SecretNotFound");
        assert!(get(&c, READY).message.contains("spec.rsaKeys[0]"));
    }

    #[test]
    fn scaling_and_failures_leave_available_alone() {
        let serving = deployment(2, 2, 3, 3, 3);
        let c = compute(&observed(Some(&serving), 3), &[], t(10));
        assert_eq!(get(&c, AVAILABLE).status, "True");
        // Scaling up: Ready flips, Available does not.
        let scaling = compute(&observed(Some(&serving), 5), &c, t(20));
        assert_eq!(get(&scaling, READY).status, "False");
        assert_eq!(get(&scaling, AVAILABLE).status, "True");
        assert_eq!(get(&scaling, AVAILABLE).last_transition_time, t(10));
        // A failed reconcile does not take serving pods away.
        let o = Observed {
            failure: Some(("apply", "conflict")),
            ..observed(Some(&serving), 3)
        };
        let failed = compute(&o, &c, t(30));
        assert_eq!(get(&failed, DEGRADED).status, "True");
        assert_eq!(get(&failed, AVAILABLE).status, "True");

        let none = deployment(2, 2, 3, 0, 3);
        let c = compute(&observed(Some(&none), 3), &[], t(10));
        assert_eq!(get(&c, AVAILABLE).status, "False");
        assert_eq!(get(&c, AVAILABLE).reason, "NoReplicasAvailable");
        let zero = deployment(2, 2, 0, 0, 0);
        let c = compute(&observed(Some(&zero), 0), &[], t(10));
        assert_eq!(get(&c, AVAILABLE).reason, "ScaledToZero");
        let c = compute(&observed(None, 3), &[], t(10));
        assert_eq!(get(&c, AVAILABLE).status, "False");
    }

    #[test]
    fn transition_time_moves_only_on_flip() {
        let d = deployment(2, 2, 3, 3, 3);
        let first = compute(&observed(Some(&d), 3), &[], t(10));
        let again = compute(&observed(Some(&d), 3), &first, t(20));
        assert_eq!(get(&again, READY).last_transition_time, t(10));

        let scaling = deployment(3, 3, 3, 3, 3);
        let flipped = compute(&observed(Some(&scaling), 5), &again, t(30));
        assert_eq!(get(&flipped, READY).last_transition_time, t(30));
        assert_eq!(get(&flipped, DEGRADED).last_transition_time, t(10));
    }
}
