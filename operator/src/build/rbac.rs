//! ServiceAccount and the least-privilege Role that lets gateway pods read EndpointSlices of
//! the session Service.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::{common_labels, meta, Names, OWNER_NAMESPACE_LABEL};
use crate::crd::MtprotoGatewaySpec;
use crate::validate::ValidatedGateway;

pub(super) fn service_account(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> ServiceAccount {
    let mut metadata = meta(v, &names.base, owner);
    metadata.annotations = (!spec.service_account.annotations.is_empty())
        .then(|| spec.service_account.annotations.clone());
    ServiceAccount {
        metadata,
        ..ServiceAccount::default()
    }
}

/// The Role lives in the session namespace. Owner references cannot cross namespaces, so when
/// that differs from the gateway's the objects carry a label instead and the finalizer
/// removes them.
pub(super) fn endpoint_reader(
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
) -> (Role, RoleBinding) {
    let metadata = if v.session_namespace == v.namespace {
        meta(v, &names.endpoint_reader, owner)
    } else {
        let mut labels = common_labels(&v.name);
        labels.insert(OWNER_NAMESPACE_LABEL.to_owned(), v.namespace.clone());
        ObjectMeta {
            name: Some(names.cross_namespace_reader(&v.namespace)),
            namespace: Some(v.session_namespace.clone()),
            labels: Some(labels),
            ..ObjectMeta::default()
        }
    };
    let role = Role {
        metadata: metadata.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
            resources: Some(vec!["endpointslices".to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: metadata.name.clone().unwrap_or_default(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: names.base.clone(),
            namespace: Some(v.namespace.clone()),
            ..Subject::default()
        }]),
        metadata,
    };
    (role, binding)
}

#[cfg(test)]
mod tests {
    use super::super::tests::built;
    use super::*;
    use crate::fixtures::{dereferenced, gateway};
    use crate::validate::validate;

    #[test]
    fn service_account_carries_the_spec_annotations() {
        let (_, b) = built();
        assert!(b.service_account.metadata.annotations.is_none());
        let mut gw = gateway();
        gw.spec.service_account.annotations = [(
            "iam.gke.io/gcp-service-account".to_owned(),
            "edge@project.iam.gserviceaccount.com".to_owned(),
        )]
        .into();
        let v = validate(&gw, &dereferenced()).expect("valid");
        let sa = super::super::build(&gw, &v).expect("build").service_account;
        let annotations = sa.metadata.annotations.expect("annotations");
        assert_eq!(
            annotations["iam.gke.io/gcp-service-account"],
            "edge@project.iam.gserviceaccount.com"
        );
    }

    #[test]
    fn cross_namespace_role_is_labelled_not_owned() {
        let (_, b) = built();
        let m = &b.role.metadata;
        assert_eq!(m.namespace.as_deref(), Some("teamgram"));
        assert_eq!(m.name.as_deref(), Some("edge-edge-endpointslice-reader"));
        assert!(m.owner_references.is_none());
        assert_eq!(
            m.labels.as_ref().map(|l| l[OWNER_NAMESPACE_LABEL].as_str()),
            Some("edge")
        );
        let rules = b.role.rules.as_ref().expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["endpointslices".to_owned()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        let subj = &b.role_binding.subjects.as_ref().expect("subjects")[0];
        assert_eq!(
            (subj.name.as_str(), subj.namespace.as_deref()),
            ("edge", Some("edge"))
        );
        assert_eq!(
            b.role_binding.role_ref.name,
            "edge-edge-endpointslice-reader"
        );
    }

    #[test]
    fn same_namespace_role_is_owned() {
        let mut gw = gateway();
        gw.spec.session.service.namespace = None;
        let v = validate(&gw, &dereferenced()).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        assert_eq!(b.role.metadata.namespace.as_deref(), Some("edge"));
        assert_eq!(
            b.role.metadata.name.as_deref(),
            Some("edge-endpointslice-reader")
        );
        assert!(b.role.metadata.owner_references.is_some());
        assert!(b.role_binding.metadata.owner_references.is_some());
    }
}
