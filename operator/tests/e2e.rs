//! End-to-end tests against a real API server (the e2e/k8s control plane: kube-apiserver,
//! kube-controller-manager, kube-scheduler, etcd and kwok for pods) with real operator
//! processes running beside it. Run through `e2e/operator/run.sh`, which starts everything
//! and sets:
//!
//! - `KUBECONFIG`: admin access for the test itself;
//! - `E2E_OPERATORS`: `identity:pid:http_port` of each running operator, comma separated;
//! - `E2E_LEASE_NAMESPACE`, `E2E_LEASE_NAME`: the Lease the operators elect on;
//! - `E2E_REPORT` (optional): file to append measurements to;
//! - `E2E_READY_BUDGET_MS` (optional, default 5000): upper bound for apply→Ready.
//!
//! Every test makes its own namespace, so they do not depend on one another, except
//! `leader_failover`, which kills the leader and must run last (run.sh runs it alone).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mtproto_operator::crd::MtprotoGateway;

/// Session namespace the tests point gateways at (the example CR says `teamgram`; tests use
/// their own so a shared control plane's namespaces are left alone).
const SESSION_NS: &str = "e2e-operator-sessions";
/// Label on every namespace the tests create, so run.sh can remove them while the
/// operators still run (gateways carry a finalizer).
const E2E_LABEL: &str = "mtproto-edge.io/e2e";
const POLL: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(30);

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG points at the e2e control plane")
}

/// Polls `f` until it yields `Some`, panicking with `what` after `timeout`.
async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

fn kubectl(args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .args(args)
        .output()
        .expect("kubectl on PATH")
}

fn report(line: &str) {
    println!("{line}");
    if let Ok(path) = std::env::var("E2E_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn rsa_pem() -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["genrsa", "2048"])
        .output()
        .expect("openssl on PATH");
    assert!(out.status.success(), "openssl genrsa failed");
    out.stdout
}

async fn ensure_namespace(c: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(c.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(E2E_LABEL.to_owned(), "true".to_owned())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A fresh namespace holding the Secrets the example gateway references.
async fn namespace_with_secrets(c: &Client, prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let ns = format!("{prefix}-{nanos:x}");
    ensure_namespace(c, &ns).await;
    ensure_namespace(c, SESSION_NS).await;
    let secrets: Api<Secret> = Api::namespaced(c.clone(), &ns);
    for (name, data) in [
        (
            "gateway-rsa",
            BTreeMap::from([
                ("primary.pem".to_owned(), ByteString(rsa_pem())),
                ("previous.pem".to_owned(), ByteString(rsa_pem())),
            ]),
        ),
        (
            "gateway-store",
            BTreeMap::from([
                (
                    "redis".to_owned(),
                    ByteString(b"redis://redis:6379/0".to_vec()),
                ),
                (
                    "mysql".to_owned(),
                    ByteString(b"mysql://gw:pw@mysql:3306/teamgram".to_vec()),
                ),
            ]),
        ),
    ] {
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        };
        secrets
            .create(&PostParams::default(), &s)
            .await
            .expect("create secret");
    }
    ns
}

/// The example CR shipped in e2e/operator/gateway.yaml.
fn example(ns: &str) -> MtprotoGateway {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/operator/gateway.yaml");
    let text = std::fs::read_to_string(path).expect("read example CR");
    let mut gw: MtprotoGateway = serde_saphyr::from_str(&text).expect("example CR parses");
    gw.metadata.namespace = Some(ns.to_owned());
    gw.spec.session.service.namespace = Some(SESSION_NS.to_owned());
    gw
}

async fn apply_gateway(c: &Client, gw: &MtprotoGateway) -> MtprotoGateway {
    let ns = gw.namespace().expect("namespace");
    Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .patch(
            &gw.name_any(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(gw),
        )
        .await
        .expect("apply MtprotoGateway")
}

fn condition<'a>(gw: &'a MtprotoGateway, type_: &str) -> Option<&'a Condition> {
    gw.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits for Ready=True describing the current generation.
async fn wait_ready(c: &Client, ns: &str, name: &str, timeout: Duration) -> MtprotoGateway {
    let api: Api<MtprotoGateway> = Api::namespaced(c.clone(), ns);
    wait_until(&format!("{ns}/{name} Ready"), timeout, || async {
        let gw = api.get(name).await.ok()?;
        let ready = condition(&gw, "Ready")?;
        (ready.status == "True"
            && ready.observed_generation == gw.metadata.generation
            && gw.status.as_ref()?.observed_generation == gw.metadata.generation)
            .then_some(gw)
    })
    .await
}

async fn ready_example(c: &Client, prefix: &str) -> (String, MtprotoGateway) {
    let ns = namespace_with_secrets(c, prefix).await;
    let gw = apply_gateway(c, &example(&ns)).await;
    let gw = wait_ready(c, &ns, &gw.name_any(), WAIT).await;
    (ns, gw)
}

fn assert_owned(meta: &ObjectMeta, gw: &MtprotoGateway) {
    let owners = meta.owner_references.as_ref().expect("owner references");
    let o = owners
        .iter()
        .find(|o| o.kind == "MtprotoGateway")
        .expect("owned by the gateway");
    assert_eq!(
        Some(o.uid.as_str()),
        gw.metadata.uid.as_deref(),
        "{:?}",
        meta.name
    );
    assert_eq!(o.controller, Some(true));
    assert_eq!(o.block_owner_deletion, Some(true));
    assert_eq!(o.api_version, "mtproto-edge.io/v1alpha1");
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn example_cr_becomes_a_ready_fleet() -> TestResult {
    let c = client().await;
    let ns = namespace_with_secrets(&c, "e2e-fleet").await;

    let started = Instant::now();
    let applied = apply_gateway(&c, &example(&ns)).await;
    let gw = wait_ready(&c, &ns, "edge", WAIT).await;
    let elapsed = started.elapsed();
    report(&format!(
        "apply->Ready: {} ms (3 replicas)",
        elapsed.as_millis()
    ));
    let budget = std::env::var("E2E_READY_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000u128);
    assert!(
        elapsed.as_millis() <= budget,
        "apply->Ready took {elapsed:?} (budget {budget} ms)"
    );
    assert_eq!(applied.metadata.uid, gw.metadata.uid);

    // Status.
    let status = gw.status.clone().expect("status");
    assert_eq!(status.observed_generation, gw.metadata.generation);
    assert_eq!((status.replicas, status.ready_replicas), (3, 3));
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=edge,app.kubernetes.io/name=mtproto-gateway")
    );
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("edge.{ns}.svc:10443").as_str())
    );
    assert_eq!(status.rsa_keys.len(), 2);
    for (k, name) in status.rsa_keys.iter().zip(["primary.pem", "previous.pem"]) {
        assert_eq!(
            (k.secret_name.as_str(), k.key.as_str()),
            ("gateway-rsa", name)
        );
        assert_eq!(k.fingerprint.len(), 16, "{k:?}");
        assert!(
            k.fingerprint.chars().all(|c| c.is_ascii_hexdigit()),
            "{k:?}"
        );
        assert!(k.public_key.starts_with("-----BEGIN RSA PUBLIC KEY-----"));
    }
    assert_ne!(
        status.rsa_keys[0].fingerprint,
        status.rsa_keys[1].fingerprint
    );
    for (type_, want) in [
        ("Available", "True"),
        ("Ready", "True"),
        ("Progressing", "False"),
        ("Degraded", "False"),
    ] {
        let cond = condition(&gw, type_).unwrap_or_else(|| panic!("{type_} condition"));
        assert_eq!(cond.status, want, "{type_}: {cond:?}");
        assert_eq!(cond.observed_generation, gw.metadata.generation);
        assert!(!cond.reason.is_empty());
    }
    assert_eq!(gw.finalizers(), ["mtproto-edge.io/cleanup"]);

    // Deployment.
    let d = Api::<Deployment>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&d.metadata, &gw);
    let spec = d.spec.as_ref().expect("deployment spec");
    assert_eq!(spec.replicas, Some(3));
    let tmpl = &spec.template;
    let annotations = tmpl
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert!(annotations.contains_key("mtproto-edge.io/config-hash"));
    let pod = tmpl.spec.as_ref().expect("pod spec");
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    assert_eq!(pod.service_account_name.as_deref(), Some("edge"));
    let ctr = &pod.containers[0];
    assert_eq!(
        ctr.image.as_deref(),
        Some("ghcr.io/mtproto-edge/mtproto-gateway:0.1.0")
    );
    assert_eq!(
        ctr.args.clone().unwrap_or_default(),
        [
            "--config",
            "/etc/mtproto-gateway/gateway.toml",
            "--grpc-listen=$(POD_IP):20110"
        ]
    );
    let env: Vec<_> = ctr.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env,
        [
            "POD_IP",
            "MTPROTO_GATEWAY_AUTH_KEYS__REDIS_URL",
            "MTPROTO_GATEWAY_AUTH_KEYS__MYSQL_URL",
            "MTPROTO_LOG_FORMAT"
        ]
    );
    let sc = ctr.security_context.as_ref().expect("security context");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(ctr.readiness_probe.is_some() && ctr.liveness_probe.is_some());

    // Services.
    let svcs: Api<Service> = Api::namespaced(c.clone(), &ns);
    let client_svc = svcs.get("edge").await?;
    assert_owned(&client_svc.metadata, &gw);
    let s = client_svc.spec.as_ref().expect("service spec");
    assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(s.external_traffic_policy.as_deref(), Some("Local"));
    let ports: Vec<_> = s.ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [10443, 10080]);
    let grpc = svcs.get("edge-grpc").await?;
    assert_owned(&grpc.metadata, &gw);
    assert_eq!(
        grpc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None")
    );

    // Config.
    let cm = Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .get("edge-config")
        .await?;
    assert_owned(&cm.metadata, &gw);
    let toml_text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("gateway.toml"))
        .expect("gateway.toml");
    let cfg: toml::Table = toml_text.parse()?;
    assert_eq!(
        cfg["listeners"][0]["address"].as_str(),
        Some("0.0.0.0:10443")
    );
    assert_eq!(cfg["listeners"][1]["transport"].as_str(), Some("websocket"));
    assert_eq!(
        cfg["session"]["kubernetes"]["namespace"].as_str(),
        Some(SESSION_NS)
    );
    assert_eq!(
        cfg["rsa_private_keys"][0].as_str(),
        Some("/etc/mtproto-gateway/rsa/gateway-rsa/primary.pem")
    );
    // The Redis and MySQL the CR names are the stores the gateway consults.
    assert_eq!(cfg["auth_keys"]["lookup"].as_str(), Some("store"));
    assert_eq!(cfg["auth_keys"]["writer"].as_str(), Some("store"));

    // PDB, HPA, NetworkPolicy, ServiceAccount.
    let pdb = Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&pdb.metadata, &gw);
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&hpa.metadata, &gw);
    assert_eq!(hpa.spec.scale_target_ref.kind, "MtprotoGateway");
    assert_eq!(
        (hpa.spec.min_replicas, hpa.spec.max_replicas),
        (Some(2), 10)
    );
    let np = Api::<NetworkPolicy>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&np.metadata, &gw);
    let sa = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&sa.metadata, &gw);

    // Least-privilege RBAC in the session namespace.
    let reader = format!("{ns}-edge-endpointslice-reader");
    let role = Api::<Role>::namespaced(c.clone(), SESSION_NS)
        .get(&reader)
        .await?;
    let rules = role.rules.unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.clone().unwrap_or_default(),
        ["endpointslices"]
    );
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    let rb = Api::<RoleBinding>::namespaced(c.clone(), SESSION_NS)
        .get(&reader)
        .await?;
    let subject = &rb.subjects.unwrap_or_default()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("edge", Some(ns.as_str()))
    );

    // Printer columns.
    let out = kubectl(&["get", "mtprotogateways", "-n", &ns]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let mut lines = table.lines();
    let header: Vec<_> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "AVAILABLE",
            "READY",
            "REPLICAS",
            "READY-PODS",
            "AGE"
        ],
        "{table}"
    );
    let row: Vec<_> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[..5], ["edge", "True", "True", "3", "3"], "{table}");

    // Events tell the story.
    let events = Api::<Event>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    let reasons: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("edge"))
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(reasons.iter().any(|r| r == "Applied"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "Available"), "{reasons:?}");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn kubectl_scale_changes_the_deployment() -> TestResult {
    let c = client().await;
    let (ns, gw) = ready_example(&c, "e2e-scale").await;
    let out = kubectl(&["scale", "mtprotogateway/edge", "--replicas=5", "-n", &ns]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    wait_until("Deployment scaled to 5", WAIT, || async {
        let d = deployments.get("edge").await.ok()?;
        (d.spec?.replicas == Some(5)).then_some(())
    })
    .await;
    let after = wait_ready(&c, &ns, "edge", WAIT).await;
    assert!(after.metadata.generation > gw.metadata.generation);
    let status = after.status.expect("status");
    assert_eq!((status.replicas, status.ready_replicas), (5, 5));

    let scale = kubectl(&[
        "get",
        "mtprotogateway/edge",
        "-n",
        &ns,
        "--subresource=scale",
        "-o",
        "jsonpath={.spec.replicas}/{.status.replicas}",
    ]);
    assert_eq!(String::from_utf8_lossy(&scale.stdout), "5/5");
    Ok(())
}

fn template_hash(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get("mtproto-edge.io/config-hash")
        .cloned()
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn editing_a_referenced_secret_rolls_the_pods() -> TestResult {
    let c = client().await;
    let (ns, _) = ready_example(&c, "e2e-roll").await;
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let before = template_hash(&deployments.get("edge").await?).expect("hash");
    let rs_before: Vec<_> = Api::<ReplicaSet>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert_eq!(rs_before.len(), 1);

    let patch = serde_json::json!({"data": {"primary.pem": ByteString(rsa_pem())}});
    Api::<Secret>::namespaced(c.clone(), &ns)
        .patch(
            "gateway-rsa",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;

    let after = wait_until("pod template hash to change", WAIT, || async {
        let h = template_hash(&deployments.get("edge").await.ok()?)?;
        (h != before).then_some(h)
    })
    .await;
    assert_ne!(after, before);
    let rs_after = wait_until("a second ReplicaSet", WAIT, || async {
        let rs = Api::<ReplicaSet>::namespaced(c.clone(), &ns)
            .list(&ListParams::default())
            .await
            .ok()?;
        (rs.items.len() == 2).then_some(rs.items)
    })
    .await;
    assert!(rs_after.iter().any(|r| !rs_before.contains(&r.name_any())));
    wait_ready(&c, &ns, "edge", WAIT).await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn deleting_the_gateway_deletes_what_it_owned() -> TestResult {
    let c = client().await;
    let (ns, _) = ready_example(&c, "e2e-delete").await;
    let reader = format!("{ns}-edge-endpointslice-reader");
    Api::<Role>::namespaced(c.clone(), SESSION_NS)
        .get(&reader)
        .await?;

    Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .delete("edge", &DeleteParams::default())
        .await?;

    macro_rules! gone {
        ($kind:ty, $ns:expr, $name:expr) => {{
            let api: Api<$kind> = Api::namespaced(c.clone(), $ns);
            let what = format!("{} {}/{} to be deleted", stringify!($kind), $ns, $name);
            wait_until(&what, WAIT, || async {
                match api.get_opt($name).await {
                    Ok(None) => Some(()),
                    _ => None,
                }
            })
            .await;
        }};
    }
    gone!(MtprotoGateway, &ns, "edge");
    gone!(Deployment, &ns, "edge");
    gone!(Service, &ns, "edge");
    gone!(Service, &ns, "edge-grpc");
    gone!(ConfigMap, &ns, "edge-config");
    gone!(PodDisruptionBudget, &ns, "edge");
    gone!(HorizontalPodAutoscaler, &ns, "edge");
    gone!(NetworkPolicy, &ns, "edge");
    gone!(ServiceAccount, &ns, "edge");
    gone!(Role, SESSION_NS, &reader);
    gone!(RoleBinding, SESSION_NS, &reader);
    gone!(Secret, &ns, "edge-ca");
    gone!(Secret, &ns, "edge-gateway-tls");
    gone!(Secret, SESSION_NS, &format!("{ns}-edge-session-tls"));
    Ok(())
}

/// Value of `key` in Secret `ns/name`, once it exists.
async fn secret_value(c: &Client, ns: &str, name: &str, key: &str) -> Vec<u8> {
    let api: Api<Secret> = Api::namespaced(c.clone(), ns);
    wait_until(&format!("Secret {ns}/{name} key {key}"), WAIT, || async {
        let s = api.get_opt(name).await.ok()??;
        s.data?.get(key).map(|v| v.0.clone())
    })
    .await
}

/// Waits until condition `type_` of `ns/name` has `status` and `reason`.
async fn wait_condition(
    c: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Condition {
    let api: Api<MtprotoGateway> = Api::namespaced(c.clone(), ns);
    wait_until(
        &format!("{ns}/{name} {type_}={status} ({reason})"),
        WAIT,
        || async {
            let gw = api.get(name).await.ok()?;
            condition(&gw, type_)
                .filter(|c| c.status == status && c.reason == reason)
                .cloned()
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn session_grpc_certificates_network_policy_and_plaintext() -> TestResult {
    use mtproto_operator::certs::{validity, CA_KEY, CERT_KEY, KEY_KEY};
    let c = client().await;
    let ns = namespace_with_secrets(&c, "e2e-tls").await;
    // The session Service the gateway points at; its selector becomes the policy's peer.
    let session_svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "session"},
        "spec": {"selector": {"app": "e2e-session"}, "ports": [{"name": "grpc", "port": 20120}]}
    }))?;
    match Api::<Service>::namespaced(c.clone(), SESSION_NS)
        .create(&PostParams::default(), &session_svc)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // The example without networkPolicy and session.tls: both by default.
    let mut spec = serde_json::to_value(example(&ns))?;
    if let Some(s) = spec["spec"].as_object_mut() {
        s.remove("networkPolicy");
    }
    let gw: MtprotoGateway = serde_json::from_value(spec.clone())?;
    let applied = Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .patch(
            "edge",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&spec),
        )
        .await?;
    assert!(gw.spec.network_policy.enabled);
    let gw = wait_ready(&c, &ns, "edge", WAIT).await;
    assert_eq!(applied.metadata.uid, gw.metadata.uid);
    wait_condition(&c, &ns, "edge", "CertificatesReady", "True", "Issued").await;
    wait_condition(&c, &ns, "edge", "PlaintextSessionRPC", "False", "MutualTLS").await;

    // The CA and both certificates, one trust bundle.
    let session_secret = format!("{ns}-edge-session-tls");
    let ca = secret_value(&c, &ns, "edge-ca", CA_KEY).await;
    let gw_cert = secret_value(&c, &ns, "edge-gateway-tls", CERT_KEY).await;
    let session_cert = secret_value(&c, SESSION_NS, &session_secret, CERT_KEY).await;
    assert!(validity(&gw_cert).is_some() && validity(&session_cert).is_some());
    assert_eq!(secret_value(&c, &ns, "edge-gateway-tls", CA_KEY).await, ca);
    assert_eq!(
        secret_value(&c, SESSION_NS, &session_secret, CA_KEY).await,
        ca
    );
    for name in ["edge-ca", "edge-gateway-tls"] {
        let s = Api::<Secret>::namespaced(c.clone(), &ns).get(name).await?;
        assert_owned(&s.metadata, &gw);
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    }
    report(&format!(
        "certificates: CA, gateway and session Secrets issued for {ns}/edge"
    ));

    // Mounted into the pods, outside the config hash; rendered in the config.
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let d = deployments.get("edge").await?;
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("edge-gateway-tls")
        })
        .expect("the gateway certificate is a volume");
    assert!(pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == volume.name && m.mount_path == "/var/run/mtproto-gateway/session-tls"));
    assert!(pod.containers[0]
        .args
        .iter()
        .flatten()
        .any(|a| a == "--grpc-listen=$(POD_IP):20110"));
    let config = Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .get("edge-config")
        .await?;
    let toml = config
        .data
        .as_ref()
        .and_then(|d| d.get("gateway.toml"))
        .cloned()
        .unwrap_or_default();
    assert!(toml.contains("[session.tls]"), "{toml}");

    // The NetworkPolicy, on by default: gRPC only from the session Service's pods.
    let np = Api::<NetworkPolicy>::namespaced(c.clone(), &ns)
        .get("edge")
        .await?;
    assert_owned(&np.metadata, &gw);
    let grpc_rule = np
        .spec
        .as_ref()
        .and_then(|s| s.ingress.as_ref())
        .and_then(|r| r.get(1))
        .and_then(|r| r.from.as_ref())
        .and_then(|f| f.first())
        .cloned()
        .expect("the reverse-path rule");
    assert_eq!(
        grpc_rule
            .pod_selector
            .and_then(|s| s.match_labels)
            .map(|l| l["app"].clone())
            .as_deref(),
        Some("e2e-session")
    );

    // A broken certificate is rewritten in place; the pods do not roll.
    let template_before = template_hash(&d);
    let generation_before = d.metadata.generation;
    let broken = serde_json::json!({"data": {KEY_KEY: "bm90IGEga2V5"}});
    Api::<Secret>::namespaced(c.clone(), &ns)
        .patch(
            "edge-gateway-tls",
            &PatchParams::default(),
            &Patch::Merge(&broken),
        )
        .await?;
    let reissued = wait_until("the gateway certificate reissued", WAIT, || async {
        let cert = Api::<Secret>::namespaced(c.clone(), &ns)
            .get("edge-gateway-tls")
            .await
            .ok()?
            .data?
            .get(CERT_KEY)?
            .0
            .clone();
        (cert != gw_cert).then_some(cert)
    })
    .await;
    assert!(validity(&reissued).is_some());
    let d = deployments.get("edge").await?;
    assert_eq!(template_hash(&d), template_before);
    assert_eq!(d.metadata.generation, generation_before, "no rollout");

    // cert-manager named but not installed: a condition with the fix.
    let mut with_issuer = spec.clone();
    with_issuer["spec"]["session"]["tls"] =
        serde_json::json!({"mode": "mutual", "issuerRef": {"name": "fleet-ca"}});
    Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .patch(
            "edge",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&with_issuer),
        )
        .await?;
    let missing = wait_condition(
        &c,
        &ns,
        "edge",
        "CertificatesReady",
        "False",
        "CertManagerMissing",
    )
    .await;
    assert!(
        missing.message.contains("install cert-manager"),
        "{}",
        missing.message
    );

    // Plaintext: a warning condition, plaintext rendered, nothing mounted.
    let mut plaintext = spec.clone();
    plaintext["spec"]["session"]["tls"] = serde_json::json!({"mode": "plaintext"});
    Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .patch(
            "edge",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&plaintext),
        )
        .await?;
    let warning = wait_condition(
        &c,
        &ns,
        "edge",
        "PlaintextSessionRPC",
        "True",
        "PlaintextByChoice",
    )
    .await;
    assert!(warning.message.contains("auth keys"));
    let toml = Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .get("edge-config")
        .await?
        .data
        .and_then(|d| d.get("gateway.toml").cloned())
        .unwrap_or_default();
    assert!(toml.contains("plaintext = true") && !toml.contains("[session.tls]"));
    let d = deployments.get("edge").await?;
    assert!(d
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.volumes)
        .unwrap_or_default()
        .iter()
        .all(|v| v.secret.is_none()));
    report(&format!(
        "plaintext: {ns}/edge PlaintextSessionRPC=True ({})",
        warning.reason
    ));
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn invalid_gateways_are_refused_naming_the_field() -> TestResult {
    let c = client().await;
    let ns = namespace_with_secrets(&c, "e2e-invalid").await;
    let api: Api<MtprotoGateway> = Api::namespaced(c.clone(), &ns);

    type Mutation = fn(&mut MtprotoGateway);
    let cases: [(&str, Mutation, &[&str]); 13] = [
        (
            "negative replicas",
            |g| g.spec.replicas = -1,
            &["spec.replicas"],
        ),
        (
            "duplicate listener ports",
            |g| g.spec.listeners[1].port = 10443,
            &["spec.listeners", "listener ports must be unique"],
        ),
        (
            "listener on the admin port",
            |g| g.spec.listeners[0].port = 9090,
            &["spec.listeners", "admin port 9090"],
        ),
        (
            "autoscaling bounds reversed",
            |g| {
                if let Some(a) = g.spec.autoscaling.as_mut() {
                    a.min_replicas = 20;
                }
            },
            &[
                "spec.autoscaling.minReplicas",
                "minReplicas must not exceed maxReplicas",
            ],
        ),
        (
            "externalTrafficPolicy on ClusterIP",
            |g| g.spec.service.type_ = mtproto_operator::crd::ServiceType::ClusterIP,
            &["spec.service.externalTrafficPolicy"],
        ),
        (
            "no RSA keys",
            |g| g.spec.rsa_keys.clear(),
            &["spec.rsaKeys"],
        ),
        (
            "duplicate listener names (a list map)",
            |g| g.spec.listeners[1].name = "tcp".to_owned(),
            &["spec.listeners[1]", "Duplicate value"],
        ),
        (
            "listener named grpc",
            |g| g.spec.listeners[1].name = "grpc".to_owned(),
            &["spec.listeners[1].name", "reserved"],
        ),
        (
            "TLS on a TCP listener",
            |g| {
                let key = g.spec.rsa_keys[0].clone();
                g.spec.listeners[0].tls = Some(mtproto_operator::crd::ListenerTls {
                    certificate: key.clone(),
                    private_key: key,
                });
            },
            &["spec.listeners[0].tls", "tls applies only"],
        ),
        (
            "WebSocket path on a TCP listener",
            |g| g.spec.listeners[0].path = Some("/apiws".to_owned()),
            &[
                "spec.listeners[0].path",
                "apply only to transport websocket",
            ],
        ),
        (
            "a name too long for the -grpc Service",
            |g| g.metadata.name = Some("g".repeat(59)),
            &["metadata.name", "<name>-grpc"],
        ),
        (
            "lame duck longer than the grace period",
            |g| g.spec.drain_delay_seconds = g.spec.termination_grace_period_seconds + 1,
            &["spec.drainDelaySeconds"],
        ),
        (
            "store writer without a store",
            |g| {
                g.spec.auth_keys.redis_url = None;
                g.spec.auth_keys.mysql_url = None;
                g.spec.auth_keys.writer = Some(mtproto_operator::crd::KeyLookup::Store);
            },
            &["spec.authKeys.lookup", "needs redisUrl or mysqlUrl"],
        ),
    ];
    for (what, mutate, needles) in cases {
        let mut gw = example(&ns);
        gw.metadata.name = Some("bad".to_owned());
        mutate(&mut gw);
        let err = api
            .create(&PostParams::default(), &gw)
            .await
            .expect_err(&format!("{what}: the API server must refuse it"));
        let msg = match err {
            kube::Error::Api(s) => {
                assert_eq!(s.code, 422, "{what}: {s:?}");
                s.message
            }
            other => panic!("{what}: unexpected error {other}"),
        };
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg:?} should mention {n:?}");
        }
        report(&format!("refused ({what}): {msg}"));
    }

    // An unknown enum value, through kubectl as a user would meet it.
    let bad = std::env::temp_dir().join(format!("{ns}-bad.yaml"));
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/operator/gateway.yaml"
    ))?
    .replace("transport: websocket", "transport: quic");
    std::fs::write(&bad, text)?;
    let out = kubectl(&["apply", "-n", &ns, "-f", bad.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&bad);
    assert!(
        !out.status.success(),
        "kubectl apply of transport: quic must fail"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.listeners[1].transport"), "{stderr}");
    assert!(api.get_opt("edge").await?.is_none());

    // GitOps: replicas outside the autoscaler's bounds are the HPA's to clamp.
    let mut gw = example(&ns);
    gw.spec.replicas = 50;
    api.create(
        &PostParams {
            dry_run: true,
            ..PostParams::default()
        },
        &gw,
    )
    .await
    .expect("replicas outside minReplicas..maxReplicas are accepted");
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn session_namespace_outside_the_allow_list_is_refused() -> TestResult {
    // run.sh starts the operators with --session-namespaces e2e-operator-sessions.
    let c = client().await;
    let ns = namespace_with_secrets(&c, "e2e-allow").await;
    let forbidden = "e2e-operator-forbidden";
    ensure_namespace(&c, forbidden).await;
    let mut gw = example(&ns);
    gw.spec.session.service.namespace = Some(forbidden.to_owned());
    apply_gateway(&c, &gw).await;
    let api: Api<MtprotoGateway> = Api::namespaced(c.clone(), &ns);
    let degraded = wait_until("Degraded for the session namespace", WAIT, || async {
        let gw = api.get("edge").await.ok()?;
        condition(&gw, "Degraded")
            .filter(|d| d.status == "True" && d.reason == "InvalidSpec")
            .cloned()
    })
    .await;
    assert!(
        degraded.message.contains("spec.session.service.namespace"),
        "{degraded:?}"
    );
    let roles: Api<Role> = Api::namespaced(c.clone(), forbidden);
    assert!(roles.list(&ListParams::default()).await?.items.is_empty());
    // Back to an allowed namespace: it recovers.
    apply_gateway(&c, &example(&ns)).await;
    wait_ready(&c, &ns, "edge", WAIT).await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn missing_secret_degrades_then_recovers() -> TestResult {
    let c = client().await;
    let ns = namespace_with_secrets(&c, "e2e-missing").await;
    let mut gw = example(&ns);
    gw.spec.rsa_keys[1].secret_name = "rotated-rsa".to_owned();
    gw.spec.rsa_keys[1].key = "next.pem".to_owned();
    apply_gateway(&c, &gw).await;

    let api: Api<MtprotoGateway> = Api::namespaced(c.clone(), &ns);
    let degraded = wait_until("Degraded=True SecretNotFound", WAIT, || async {
        let g = api.get("edge").await.ok()?;
        let d = condition(&g, "Degraded")?;
        (d.status == "True" && d.reason == "SecretNotFound").then(|| d.message.clone())
    })
    .await;
    assert!(degraded.contains("spec.rsaKeys[1]"), "{degraded}");
    let g = api.get("edge").await?;
    assert_eq!(
        condition(&g, "Ready").map(|r| r.status.as_str()),
        Some("False")
    );
    let events = Api::<Event>::namespaced(c.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    assert!(events
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("SecretNotFound")
            && e.type_.as_deref() == Some("Warning")));

    let s = Secret {
        metadata: ObjectMeta {
            name: Some("rotated-rsa".to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "next.pem".to_owned(),
            ByteString(rsa_pem()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &s)
        .await?;
    let ready = wait_ready(&c, &ns, "edge", WAIT).await;
    assert_eq!(
        condition(&ready, "Degraded").map(|d| d.status.as_str()),
        Some("False")
    );
    Ok(())
}

struct Operator {
    identity: String,
    pid: String,
    port: String,
}

fn operators() -> Vec<Operator> {
    std::env::var("E2E_OPERATORS")
        .expect("E2E_OPERATORS set by run.sh")
        .split(',')
        .filter_map(|o| {
            let mut p = o.split(':');
            Some(Operator {
                identity: p.next()?.to_owned(),
                pid: p.next()?.to_owned(),
                port: p.next()?.to_owned(),
            })
        })
        .collect()
}

fn leader_gauge(port: &str) -> Option<String> {
    let out = Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix("mtproto_operator_leader ")
            .map(str::to_owned)
    })
}

async fn lease_holder(c: &Client) -> Option<String> {
    let ns = std::env::var("E2E_LEASE_NAMESPACE").ok()?;
    let name = std::env::var("E2E_LEASE_NAME").ok()?;
    Api::<Lease>::namespaced(c.clone(), &ns)
        .get(&name)
        .await
        .ok()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[tokio::test]
#[ignore = "kills the leading operator; run.sh runs it alone, after the other tests"]
async fn leader_failover() -> TestResult {
    let c = client().await;
    let ops = operators();
    assert_eq!(ops.len(), 2, "two operator replicas expected");

    let leader = wait_until("a lease holder", WAIT, || lease_holder(&c)).await;
    let (lead, standby): (Vec<_>, Vec<_>) = ops.iter().partition(|o| o.identity == leader);
    let (lead, standby) = (lead.first().expect("leader is one of ours"), standby[0]);
    assert_eq!(leader_gauge(&lead.port).as_deref(), Some("1"));
    assert_eq!(leader_gauge(&standby.port).as_deref(), Some("0"));

    // A hard kill: no graceful release, the standby must wait out the lease.
    let killed = Instant::now();
    let status = Command::new("kill").args(["-KILL", &lead.pid]).status()?;
    assert!(status.success(), "kill the leader");
    let new_leader = wait_until(
        "the standby to take the lease",
        Duration::from_secs(60),
        || async { lease_holder(&c).await.filter(|h| h == &standby.identity) },
    )
    .await;
    report(&format!(
        "leader failover after SIGKILL: {} ms ({} -> {new_leader})",
        killed.elapsed().as_millis(),
        lead.identity
    ));
    wait_until("the new leader's gauge", WAIT, || async {
        (leader_gauge(&standby.port).as_deref() == Some("1")).then_some(())
    })
    .await;

    // The new leader reconciles.
    let (ns, _) = ready_example(&c, "e2e-failover").await;
    report(&format!(
        "new leader {new_leader} reconciled {ns}/edge to Ready"
    ));
    Ok(())
}

/// A minimal stand-in for the Prometheus operator's CRD, enough for the API to be served.
/// A CRD already in the cluster is left alone; the stand-in carries the e2e label so run.sh
/// removes it afterwards.
async fn ensure_service_monitor_crd(c: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(c.clone());
    let name = "servicemonitors.monitoring.coreos.com";
    if api.get_opt(name).await.expect("read CRDs").is_none() {
        let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}},
            "spec": {
                "group": "monitoring.coreos.com",
                "names": {"kind": "ServiceMonitor", "plural": "servicemonitors",
                          "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
                }]
            }
        }))
        .expect("CRD literal");
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating the ServiceMonitor CRD: {e}"),
        }
    }
    wait_until("ServiceMonitor CRD established", WAIT, || async {
        let crd = api.get(name).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn service_monitor_follows_its_crd_and_the_flag() -> TestResult {
    use kube::api::DynamicObject;
    let c = client().await;
    ensure_service_monitor_crd(&c).await;
    let (ns, gw) = ready_example(&c, "e2e-monitor").await;
    let sms: Api<DynamicObject> = Api::namespaced_with(
        c.clone(),
        &ns,
        &mtproto_operator::build::service_monitor_resource(),
    );
    let sm = wait_until("ServiceMonitor created", WAIT, || async {
        sms.get_opt("edge").await.ok()?
    })
    .await;
    assert_owned(&sm.metadata, &gw);
    assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "15s");

    // Turning the flag off removes it.
    let patch = serde_json::json!({"spec": {"metrics": {"serviceMonitor": {"enabled": false}}}});
    Api::<MtprotoGateway>::namespaced(c.clone(), &ns)
        .patch("edge", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_until("ServiceMonitor removed", WAIT, || async {
        matches!(sms.get_opt("edge").await, Ok(None)).then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test]
#[ignore = "needs the e2e control plane and running operators (e2e/operator/run.sh)"]
async fn deleted_children_are_restored() -> TestResult {
    let c = client().await;
    let (ns, gw) = ready_example(&c, "e2e-heal").await;
    let reader = format!("{ns}-edge-endpointslice-reader");
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), &ns);
    let roles: Api<Role> = Api::namespaced(c.clone(), SESSION_NS);
    let old_cm = cms.get("edge-config").await?.metadata.uid;
    let old_role = roles.get(&reader).await?.metadata.uid;

    cms.delete("edge-config", &DeleteParams::default()).await?;
    roles.delete(&reader, &DeleteParams::default()).await?;

    let cm = wait_until("ConfigMap recreated", WAIT, || async {
        cms.get_opt("edge-config")
            .await
            .ok()?
            .filter(|c| c.metadata.uid != old_cm)
    })
    .await;
    assert_owned(&cm.metadata, &gw);
    wait_until("cross-namespace Role recreated", WAIT, || async {
        roles
            .get_opt(&reader)
            .await
            .ok()?
            .filter(|r| r.metadata.uid != old_role)
    })
    .await;
    Ok(())
}
