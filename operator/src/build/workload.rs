//! The ConfigMap with the rendered config and the Deployment that runs the gateway.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SeccompProfile,
    SecretKeySelector, SecretProjection, SecretVolumeSource, SecurityContext, Sysctl, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::config::{DATA_DIR, SESSION_TLS_DIR};
use super::{common_labels, meta, selector_labels, Names, CONFIG_HASH_ANNOTATION, CONFIG_KEY};
use crate::certs::{CA_KEY, CERT_KEY, KEY_KEY};
use crate::crd::{
    default_image, GrpcBind, MtprotoGatewaySpec, SecretKeyRef, SessionTlsMode, ADMIN_PORT,
};
use crate::validate::{ValidatedGateway, CONFIG_DIR};

/// Non-root uid/gid the gateway runs as (the distroless "nonroot" user).
const RUN_AS: i64 = 65532;
/// Env var the gateway reads its Redis URL from.
pub const REDIS_ENV: &str = "MTPROTO_GATEWAY_AUTH_KEYS__REDIS_URL";
/// Env var the gateway reads its MySQL URL from.
pub const MYSQL_ENV: &str = "MTPROTO_GATEWAY_AUTH_KEYS__MYSQL_URL";
/// Env var the gateway reads its log format from.
pub const LOG_FORMAT_ENV: &str = "MTPROTO_LOG_FORMAT";

pub(super) fn config_map(
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
    text: String,
) -> ConfigMap {
    ConfigMap {
        metadata: meta(v, &names.config, owner),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), text)])),
        ..ConfigMap::default()
    }
}

/// Hash of the config text and the referenced Secret values.
fn config_hash(config_text: &str, secrets_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(config_text.as_bytes());
    h.update([0]);
    h.update(secrets_hash.as_bytes());
    hex::encode(&h.finalize()[..16])
}

pub(super) fn deployment(
    spec: &MtprotoGatewaySpec,
    v: &ValidatedGateway,
    names: &Names,
    owner: &OwnerReference,
    config_text: &str,
) -> Deployment {
    let mut pod_labels = spec.pod.labels.clone();
    pod_labels.extend(common_labels(&v.name));
    let mut annotations = spec.pod.annotations.clone();
    annotations.insert(
        CONFIG_HASH_ANNOTATION.to_owned(),
        config_hash(config_text, &v.secrets_hash),
    );
    let low_port = spec.listeners.iter().any(|l| l.port < 1024);

    Deployment {
        metadata: meta(v, &names.base, owner),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..LabelSelector::default()
            },
            // Surge first by default, so capacity never dips while pods drain their connections.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(spec.rollout.max_surge.clone()),
                    max_unavailable: Some(spec.rollout.max_unavailable.clone()),
                }),
            }),
            min_ready_seconds: (spec.rollout.min_ready_seconds > 0)
                .then_some(spec.rollout.min_ready_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names.base.clone()),
                    priority_class_name: spec.pod.priority_class_name.clone(),
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        // Lets the non-root, capability-free process bind ports below 1024.
                        sysctls: low_port.then(|| {
                            vec![Sysctl {
                                name: "net.ipv4.ip_unprivileged_port_start".to_owned(),
                                value: "0".to_owned(),
                            }]
                        }),
                        ..PodSecurityContext::default()
                    }),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                        spec.image_pull_secrets
                            .iter()
                            .map(|n| LocalObjectReference { name: n.clone() })
                            .collect()
                    }),
                    containers: vec![container(spec)],
                    volumes: Some(volumes(spec, v, names)),
                    node_selector: (!spec.placement.node_selector.is_empty())
                        .then(|| spec.placement.node_selector.clone()),
                    tolerations: (!spec.placement.tolerations.is_empty())
                        .then(|| spec.placement.tolerations.clone()),
                    affinity: spec.placement.affinity.clone(),
                    topology_spread_constraints: (!spec
                        .placement
                        .topology_spread_constraints
                        .is_empty())
                    .then(|| spec.placement.topology_spread_constraints.clone()),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn container(spec: &MtprotoGatewaySpec) -> Container {
    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|l| ContainerPort {
            name: Some(l.name.clone()),
            container_port: l.port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("grpc".to_owned()),
        container_port: spec.session.grpc_port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });
    ports.push(ContainerPort {
        name: Some("admin".to_owned()),
        container_port: ADMIN_PORT,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });

    let mut env = vec![EnvVar {
        name: "POD_IP".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.podIP".to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    if let Some(r) = &spec.auth_keys.redis_url {
        env.push(secret_env(REDIS_ENV, r));
    }
    if let Some(m) = &spec.auth_keys.mysql_url {
        env.push(secret_env(MYSQL_ENV, m));
    }
    env.push(EnvVar {
        name: LOG_FORMAT_ENV.to_owned(),
        value: Some(spec.log_format.as_str().to_owned()),
        ..EnvVar::default()
    });
    let mut args = vec!["--config".to_owned(), format!("{CONFIG_DIR}/{CONFIG_KEY}")];
    // The kubelet expands `$(POD_IP)` from the env above: each pod binds its own IP.
    if spec.session.grpc_bind == GrpcBind::PodIp {
        args.push(format!(
            "--grpc-listen=$(POD_IP):{}",
            spec.session.grpc_port
        ));
    }
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_owned(),
            mount_path: CONFIG_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "data".to_owned(),
            mount_path: DATA_DIR.to_owned(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        },
    ];
    if spec.session.tls.mode == SessionTlsMode::Mutual {
        mounts.push(VolumeMount {
            name: SESSION_TLS_VOLUME.to_owned(),
            mount_path: SESSION_TLS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    Container {
        name: "gateway".to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(default_image)),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(vec!["mtproto-gateway".to_owned()]),
        args: Some(args),
        ports: Some(ports),
        env: Some(env),
        resources: Some(effective_resources(spec)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// The gateway container's resources: the spec's, else [`default_resources`].
pub(super) fn effective_resources(spec: &MtprotoGatewaySpec) -> ResourceRequirements {
    spec.resources.clone().unwrap_or_else(default_resources)
}

/// Requests only: a limit would throttle handshakes under bursts, and an HPA
/// CPU target is a percentage of the request.
fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("100m".to_owned())),
            ("memory".to_owned(), Quantity("128Mi".to_owned())),
        ])),
        ..ResourceRequirements::default()
    }
}

fn secret_env(name: &str, r: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.secret_name.clone(),
                key: r.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Volume of the gateway's gRPC certificate Secret.
const SESSION_TLS_VOLUME: &str = "session-tls";

/// One projected volume holds the config, every RSA key and every listener's
/// TLS files at the paths the config names (their hash rolls the pods). The
/// gRPC certificate is a volume of its own, outside the hash: its renewals
/// reach the files in place and the gateway reloads them.
fn volumes(spec: &MtprotoGatewaySpec, v: &ValidatedGateway, names: &Names) -> Vec<Volume> {
    let mut sources = vec![VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: names.config.clone(),
            items: Some(vec![KeyToPath {
                key: CONFIG_KEY.to_owned(),
                path: CONFIG_KEY.to_owned(),
                ..KeyToPath::default()
            }]),
            optional: Some(false),
        }),
        ..VolumeProjection::default()
    }];
    let mut by_secret: BTreeMap<&str, Vec<KeyToPath>> = BTreeMap::new();
    let tls_files = v.listener_tls.values().flat_map(|(cert, key)| [cert, key]);
    for k in v.rsa_keys.iter().chain(tls_files) {
        by_secret
            .entry(k.source.secret_name.as_str())
            .or_default()
            .push(KeyToPath {
                key: k.source.key.clone(),
                path: k.relative_path.clone(),
                mode: Some(0o440),
            });
    }
    sources.extend(
        by_secret
            .into_iter()
            .map(|(secret, items)| VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret.to_owned(),
                    items: Some(items),
                    optional: Some(false),
                }),
                ..VolumeProjection::default()
            }),
    );

    let session_tls = (spec.session.tls.mode == SessionTlsMode::Mutual).then(|| Volume {
        name: SESSION_TLS_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(names.gateway_tls.clone()),
            items: Some(
                [CA_KEY, CERT_KEY, KEY_KEY]
                    .into_iter()
                    .map(|k| KeyToPath {
                        key: k.to_owned(),
                        path: k.to_owned(),
                        mode: Some(0o440),
                    })
                    .collect(),
            ),
            optional: Some(false),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    [
        Volume {
            name: "config".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "data".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
    .into_iter()
    .chain(session_tls)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::built;
    use super::*;
    use crate::fixtures::{dereferenced, gateway};
    use crate::validate::validate;

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    #[test]
    fn deployment_runs_the_gateway_contract() {
        let (_, b) = built();
        let d = &b.deployment;
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.selector.match_labels, Some(selector_labels("edge")));
        let p = pod(d);
        assert_eq!(p.termination_grace_period_seconds, Some(60));
        assert_eq!(p.service_account_name.as_deref(), Some("edge"));
        let c = &p.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/example/mtproto-gateway:1.0")
        );
        assert_eq!(
            c.args.as_deref(),
            Some(
                &[
                    "--config".to_owned(),
                    "/etc/mtproto-gateway/gateway.toml".to_owned(),
                    "--grpc-listen=$(POD_IP):20110".to_owned()
                ][..]
            )
        );
        let env = c.env.as_ref().expect("env");
        let pod_ip = env.iter().find(|e| e.name == "POD_IP").expect("POD_IP");
        assert_eq!(
            pod_ip
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("status.podIP")
        );
        let redis = env.iter().find(|e| e.name == REDIS_ENV).expect("redis env");
        let sel = redis
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .expect("secretKeyRef");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("store", "redis"));
        assert!(env.iter().any(|e| e.name == MYSQL_ENV));
        let log_format = env.iter().find(|e| e.name == LOG_FORMAT_ENV);
        assert_eq!(
            log_format.and_then(|e| e.value.as_deref()),
            Some("json"),
            "JSON logs on Kubernetes by default"
        );

        let ports: Vec<_> = c
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("tcp".to_owned(), 10443),
                ("ws".to_owned(), 8080),
                ("grpc".to_owned(), 20110),
                ("admin".to_owned(), 9090)
            ]
        );
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness");
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        let live = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("liveness");
        assert_eq!(live.path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn pass_through_and_defaults_reach_the_pod() {
        let (_, b) = built();
        let c = &pod(&b.deployment).containers[0];
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .expect("default requests");
        assert_eq!(requests["cpu"], Quantity("100m".into()));
        assert_eq!(requests["memory"], Quantity("128Mi".into()));

        let mut gw = gateway();
        gw.spec.image = None;
        gw.spec.pod.annotations = BTreeMap::from([
            ("team".to_owned(), "edge".to_owned()),
            (CONFIG_HASH_ANNOTATION.to_owned(), "mine".to_owned()),
        ]);
        gw.spec.pod.labels = BTreeMap::from([
            ("tier".to_owned(), "front".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "hijack".to_owned()),
        ]);
        gw.spec.pod.priority_class_name = Some("edge-critical".into());
        gw.spec.rollout.max_surge = IntOrString::Int(1);
        gw.spec.rollout.max_unavailable = IntOrString::String("10%".into());
        gw.spec.rollout.min_ready_seconds = 15;
        let v = validate(&gw, &dereferenced()).expect("valid");
        let d = super::super::build(&gw, &v).expect("build").deployment;
        let p = pod(&d);
        assert_eq!(
            p.containers[0].image.as_deref(),
            Some(
                format!(
                    "ghcr.io/mtproto-edge/mtproto-gateway:{}",
                    env!("CARGO_PKG_VERSION")
                )
                .as_str()
            )
        );
        assert_eq!(p.priority_class_name.as_deref(), Some("edge-critical"));
        let spec = d.spec.as_ref().expect("spec");
        let t = spec.template.metadata.as_ref().expect("template meta");
        let annotations = t.annotations.as_ref().expect("annotations");
        assert_eq!(annotations["team"], "edge");
        assert_ne!(annotations[CONFIG_HASH_ANNOTATION], "mine");
        let labels = t.labels.as_ref().expect("labels");
        assert_eq!(labels["tier"], "front");
        assert_eq!(
            labels["app.kubernetes.io/instance"], "edge",
            "selector labels win"
        );
        let ru = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .expect("rolling update");
        assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(ru.max_unavailable, Some(IntOrString::String("10%".into())));
        assert_eq!(spec.min_ready_seconds, Some(15));
    }

    #[test]
    fn pods_are_locked_down() {
        let (_, b) = built();
        let p = pod(&b.deployment);
        let psc = p.security_context.as_ref().expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert!(psc.sysctls.is_none(), "no low ports in the fixture");
        let sc = p.containers[0]
            .security_context
            .as_ref()
            .expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        assert!(sc
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none());
    }

    #[test]
    fn low_port_gets_unprivileged_port_sysctl() {
        let mut gw = gateway();
        gw.spec.listeners[0].port = 443;
        let v = validate(&gw, &dereferenced()).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        let sysctls = pod(&b.deployment)
            .security_context
            .as_ref()
            .and_then(|s| s.sysctls.clone())
            .expect("sysctls");
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
    }

    /// The sources of the pod's projected config volume.
    fn projected(b: &super::super::Built) -> Vec<VolumeProjection> {
        pod(&b.deployment).volumes.as_ref().expect("volumes")[0]
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .expect("projected")
    }

    /// (Secret key, path) of each item projected from `secret`.
    fn items(sources: &[VolumeProjection], secret: &str) -> Vec<(String, String)> {
        sources
            .iter()
            .filter_map(|s| s.secret.as_ref())
            .find(|s| s.name == secret)
            .and_then(|s| s.items.as_ref())
            .expect("secret projected")
            .iter()
            .map(|i| (i.key.clone(), i.path.clone()))
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_grpc_certificate_is_mounted_outside_the_rolling_hash() {
        let (_, b) = built();
        let p = pod(&b.deployment);
        let volume = p
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == SESSION_TLS_VOLUME)
            .and_then(|v| v.secret.as_ref())
            .expect("session-tls volume");
        assert_eq!(volume.secret_name.as_deref(), Some("edge-gateway-tls"));
        let keys: Vec<_> = volume
            .items
            .iter()
            .flatten()
            .map(|i| i.path.as_str())
            .collect();
        assert_eq!(keys, [CA_KEY, CERT_KEY, KEY_KEY]);
        assert!(p.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == SESSION_TLS_VOLUME && m.mount_path == SESSION_TLS_DIR));
        // Not projected with the config: the template's hash never sees it.
        assert!(projected(&b)
            .iter()
            .filter_map(|s| s.secret.as_ref())
            .all(|s| s.name != "edge-gateway-tls"));
        // A renewal is a new Secret value: the template must stay the same.
        let mut d = dereferenced();
        d.secrets.insert(
            "edge-gateway-tls".into(),
            [("tls.crt".to_owned(), b"renewed".to_vec())].into(),
        );
        let gw = gateway();
        let renewed = super::super::build(&gw, &validate(&gw, &d).expect("valid")).expect("build");
        assert_eq!(
            renewed.deployment.spec.map(|s| s.template),
            b.deployment.spec.map(|s| s.template)
        );
    }

    #[test]
    fn plaintext_and_any_bind_mount_nothing_and_pass_no_pod_ip() {
        let mut gw = gateway();
        gw.spec.session.tls.mode = crate::crd::SessionTlsMode::Plaintext;
        gw.spec.session.grpc_bind = GrpcBind::Any;
        let v = validate(&gw, &dereferenced()).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        let p = pod(&b.deployment);
        assert!(p
            .volumes
            .iter()
            .flatten()
            .all(|v| v.name != SESSION_TLS_VOLUME));
        let c = &p.containers[0];
        assert!(c
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != SESSION_TLS_VOLUME));
        assert_eq!(c.args.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn listener_tls_files_are_projected() {
        let mut gw = gateway();
        let mut d = dereferenced();
        crate::fixtures::with_listener_tls(&mut gw, 1, &mut d);
        let v = validate(&gw, &d).expect("valid");
        let b = super::super::build(&gw, &v).expect("build");
        assert_eq!(
            items(&projected(&b), "ws-tls"),
            pairs(&[("tls.crt", "tls/ws/tls.crt"), ("tls.key", "tls/ws/tls.key")])
        );
    }

    #[test]
    fn keys_and_config_are_projected_where_the_config_points() {
        let (_, b) = built();
        let sources = projected(&b);
        assert_eq!(
            sources[0].config_map.as_ref().map(|c| c.name.as_str()),
            Some("edge-config")
        );
        assert_eq!(
            items(&sources, "rsa-keys"),
            pairs(&[
                ("primary.pem", "rsa/rsa-keys/primary.pem"),
                ("old", "rsa/rsa-keys/old.pem")
            ])
        );
        let mounts = pod(&b.deployment).containers[0]
            .volume_mounts
            .clone()
            .expect("mounts");
        assert!(mounts
            .iter()
            .any(|m| m.mount_path == CONFIG_DIR && m.name == "config"));
        assert!(mounts
            .iter()
            .any(|m| m.mount_path == DATA_DIR && m.name == "data"));
    }

    fn hash_of(d: &Deployment) -> String {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
            .expect("hash annotation")
    }

    #[test]
    fn config_or_secret_change_rolls_the_template() {
        let gw = gateway();
        let d = dereferenced();
        let base = hash_of(
            &super::super::build(&gw, &validate(&gw, &d).expect("valid"))
                .expect("b")
                .deployment,
        );

        let mut rotated = d.clone();
        rotated
            .secrets
            .get_mut("rsa-keys")
            .expect("rsa")
            .insert("old".into(), crate::fixtures::PEM.as_bytes().to_vec());
        let after_secret = hash_of(
            &super::super::build(&gw, &validate(&gw, &rotated).expect("valid"))
                .expect("b")
                .deployment,
        );
        assert_ne!(base, after_secret);

        let mut gw2 = gw.clone();
        gw2.spec.limits.max_connections = 5;
        let after_config = hash_of(
            &super::super::build(&gw2, &validate(&gw2, &d).expect("valid"))
                .expect("b")
                .deployment,
        );
        assert_ne!(base, after_config);

        let mut gw3 = gw.clone();
        gw3.spec.replicas = 7;
        let after_scale = hash_of(
            &super::super::build(&gw3, &validate(&gw3, &d).expect("valid"))
                .expect("b")
                .deployment,
        );
        assert_eq!(base, after_scale, "scaling must not restart pods");
    }
}
