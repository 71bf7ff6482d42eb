//! The reconciler: dereference → validate → build → apply → conditions → status, plus the
//! watch wiring that decides when it runs.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{reflector, ObjectRef, Store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::build::tls::{
    certificate_resource, gateway_certificate, owned_secret, session_certificate, session_secret,
    session_tls_name,
};
use crate::build::{self, service_monitor_resource, Built, MANAGER, OWNER_NAMESPACE_LABEL};
use crate::certs::{self, SecretValues};
use crate::conditions::{self, Decision, Observed, AVAILABLE, CERTIFICATES_READY};
use crate::crd::{MtprotoGateway, MtprotoGatewayStatus, RsaKeyStatus, SessionTlsMode};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::validate::{referenced_keys, validate, Dereferenced, ValidatedGateway};

/// Finalizer that removes objects garbage collection cannot reach (the EndpointSlice reader
/// Role in another namespace).
pub const FINALIZER: &str = "mtproto-edge.io/cleanup";
/// Steady-state resync; owned-object watches trigger everything else.
const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after a failure; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Upper bound of the retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long a reconcile waits for the reader Role caches after a start.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(10);

/// What the operator watches and where it may grant access.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Namespaces whose gateways are reconciled; `None`: all of them (needs a
    /// ClusterRole; with a list, namespaced Roles in those namespaces do).
    pub watch_namespaces: Option<Vec<String>>,
    /// Namespaces other than its own a gateway may name for its session
    /// Service (the operator creates a Role there); `None`: any.
    pub session_namespaces: Option<BTreeSet<String>>,
}

/// Shared state of the reconciles of one controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<MtprotoGateway>, u32>>,
    allowed_session_namespaces: Option<BTreeSet<String>>,
    /// Watch caches of the EndpointSlice reader Roles and RoleBindings this
    /// controller may have made, so pruning reads memory, not the API server.
    reader_roles: Vec<Store<Role>>,
    reader_bindings: Vec<Store<RoleBinding>>,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    fn backoff(&self, gw: &MtprotoGateway) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(ObjectRef::from_obj(gw)).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    fn succeeded(&self, gw: &MtprotoGateway) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ObjectRef::from_obj(gw));
    }

    async fn publish(
        &self,
        gw: &MtprotoGateway,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &gw.object_ref(&())).await {
            warn!(error = %e, "publishing event failed");
        }
    }
}

/// Delay after `failures` consecutive failures: 1 s, 2 s, 4 s, … capped at 5 min.
pub fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

/// Retries of the controller's failed watches: 200 ms doubling to at most 2 s
/// (kube-runtime's default goes to 30 s), so gateways changed or deleted
/// while the API server was away are handled soon after it is back.
fn watch_backoff() -> impl Backoff {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(
        watcher::ExponentialBackoff::from(exponential),
        Duration::from_secs(120),
    )
}

/// Runs the controllers (one for the cluster, or one per watched namespace)
/// until `shutdown` turns true. Events name `instance` as the reporting replica.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    instance: &str,
    scope: Scope,
    shutdown: watch::Receiver<bool>,
) {
    let namespaces: Vec<Option<String>> = match &scope.watch_namespaces {
        None => vec![None],
        Some(list) => list.iter().cloned().map(Some).collect(),
    };
    let controllers = namespaces.into_iter().map(|ns| {
        run_one(
            client.clone(),
            metrics.clone(),
            instance,
            &scope,
            ns,
            shutdown.clone(),
        )
    });
    futures::future::join_all(controllers).await;
}

/// `Api::all` or `Api::namespaced`.
fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A watch cache of `K` and the stream that keeps it (the controller polls it).
fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = kube::runtime::reflector::store();
    let stream = reflector(writer, watcher(api, config).backoff(watch_backoff())).touched_objects();
    (store, stream)
}

async fn run_one(
    client: Client,
    metrics: Arc<Metrics>,
    instance: &str,
    scope: &Scope,
    ns: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ns = ns.as_deref();
    let managed = format!("app.kubernetes.io/managed-by={MANAGER}");
    let owned = watcher::Config::default().labels(&managed);
    // Where this controller's EndpointSlice readers can be: anywhere, or its
    // namespace plus the allowed session namespaces (there labelled with it).
    let reader_sources: Vec<(Option<&str>, watcher::Config)> = match ns {
        None => vec![(None, owned.clone())],
        Some(ns) => std::iter::once((Some(ns), owned.clone()))
            .chain(
                scope
                    .session_namespaces
                    .iter()
                    .flatten()
                    .filter(|s| s.as_str() != ns)
                    .map(|s| {
                        (
                            Some(s.as_str()),
                            watcher::Config::default()
                                .labels(&format!("{managed},{OWNER_NAMESPACE_LABEL}={ns}")),
                        )
                    }),
            )
            .collect(),
    };
    let controller = Controller::new(
        api::<MtprotoGateway>(&client, ns),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    let mut controller = controller
        .trigger_backoff(watch_backoff())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone())
        .owns(api::<NetworkPolicy>(&client, ns), owned)
        // A Secret edit must roll the pods, so a change to any referenced Secret
        // requeues the gateways that reference it. Metadata only: the values of
        // every Secret in scope never stream through the operator (a reconcile
        // reads the few it references).
        .watches(
            api::<PartialObjectMeta<Secret>>(&client, ns),
            watcher::Config::default(),
            move |secret: PartialObjectMeta<Secret>| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|gw| {
                        let names = build::Names::new(&gw.name_any());
                        gw.namespace() == ns
                            && (referenced_keys(gw).iter().any(|k| k.secret_name == name)
                                || [names.ca_secret, names.gateway_tls, names.session_tls]
                                    .contains(&name))
                    })
                    .map(|gw| ObjectRef::from_obj(&*gw))
                    .collect::<Vec<_>>()
            },
        );
    let mut reader_roles = Vec::new();
    let mut reader_bindings = Vec::new();
    // A reader Role may sit in another namespace without an owner reference, so
    // it maps back by label.
    for (source_ns, config) in reader_sources {
        let (roles, role_events) = reflect(api::<Role>(&client, source_ns), config.clone());
        let (bindings, binding_events) = reflect(api::<RoleBinding>(&client, source_ns), config);
        controller = controller
            .watches_stream(role_events, |r: Role| reader_owner(&r.metadata))
            .watches_stream(binding_events, |r: RoleBinding| reader_owner(&r.metadata));
        reader_roles.push(roles);
        reader_bindings.push(bindings);
    }
    let reporter = Reporter {
        controller: MANAGER.to_owned(),
        instance: Some(instance.to_owned()),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics,
        failures: Mutex::new(HashMap::new()),
        allowed_session_namespaces: scope.session_namespaces.clone(),
        reader_roles,
        reader_bindings,
    });
    info!(
        namespace = ns.unwrap_or("(all)"),
        "reconciling MtprotoGateways"
    );
    controller
        .graceful_shutdown_on(async move {
            // An error means the sender is gone, which also means stop.
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(object = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile did not complete"),
            }
        })
        .await;
}

/// The gateway an EndpointSlice reader Role/RoleBinding belongs to: by controller owner
/// reference in the gateway's namespace, or by labels when it lives in another namespace.
pub fn reader_owner(meta: &ObjectMeta) -> Option<ObjectRef<MtprotoGateway>> {
    if let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "MtprotoGateway")
    {
        return Some(ObjectRef::new(&owner.name).within(meta.namespace.as_deref()?));
    }
    let labels = meta.labels.as_ref()?;
    let ns = labels.get(OWNER_NAMESPACE_LABEL)?;
    let name = labels.get("app.kubernetes.io/instance")?;
    Some(ObjectRef::new(name).within(ns))
}

/// One reconcile of one gateway.
pub async fn reconcile(gw: Arc<MtprotoGateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.measure();
    let ns = gw
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<MtprotoGateway> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, gw, |event| async {
        match event {
            Finalizer::Apply(gw) => apply(&gw, &ctx).await,
            Finalizer::Cleanup(gw) => cleanup(&gw, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Retry with per-object exponential backoff and count the failure.
pub fn error_policy(gw: Arc<MtprotoGateway>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(err.metric_label());
    let delay = ctx.backoff(&gw);
    warn!(gateway = %gw.name_any(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn apply(gw: &MtprotoGateway, ctx: &Context) -> Result<Action, Error> {
    let mut deref = dereference(gw, &ctx.client).await?;
    deref.allowed_session_namespaces = ctx.allowed_session_namespaces.clone();
    let outcome = match validate(gw, &deref).and_then(|v| build::build(gw, &v).map(|b| (v, b))) {
        Ok((v, built)) => match ensure_certificates(gw, &v, ctx).await {
            Ok(security) => apply_all(gw, &built, &v.session_namespace, ctx)
                .await
                .map(|applied| (v, applied, security)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let plaintext = gw.spec.session.tls.mode == SessionTlsMode::Plaintext;
    match outcome {
        Ok((v, applied, security)) => {
            let first_for_generation =
                gw.status.as_ref().and_then(|s| s.observed_generation) != gw.metadata.generation;
            let service_monitor = v.service_monitor;
            let status = status_for(
                gw,
                Some(&applied.deployment),
                Published {
                    endpoint: build::endpoint(gw, &v),
                    load_balancer: load_balancer_addresses(&applied.client_service),
                    rsa_keys: v.rsa_status,
                },
                None,
                &conditions::session_security(plaintext, security.condition.clone()),
            );
            patch_status(gw, &status, ctx).await?;
            if first_for_generation {
                ctx.publish(
                    gw,
                    EventType::Normal,
                    "Applied",
                    "Apply",
                    format!(
                        "applied generation {} ({} replicas){}",
                        gw.metadata.generation.unwrap_or(0),
                        gw.spec.replicas,
                        if gw.spec.metrics.service_monitor.enabled && !service_monitor {
                            "; ServiceMonitor skipped: monitoring.coreos.com/v1 is not served"
                        } else {
                            ""
                        }
                    ),
                )
                .await;
            }
            announce_transitions(gw, &status, ctx).await;
            if let Some((_, false, reason, message)) = &security.condition {
                ctx.publish(
                    gw,
                    EventType::Warning,
                    reason,
                    "Certificates",
                    message.clone(),
                )
                .await;
            }
            ctx.succeeded(gw);
            Ok(Action::requeue(
                security.renew_in.map_or(RESYNC, |d| d.min(RESYNC)),
            ))
        }
        Err(err) => {
            let deployment = current_deployment(gw, &ctx.client).await;
            let previous = gw.status.clone().unwrap_or_default();
            let status = status_for(
                gw,
                deployment.as_ref(),
                Published {
                    endpoint: previous.endpoint,
                    load_balancer: previous.load_balancer,
                    rsa_keys: previous.rsa_keys,
                },
                Some((err.metric_label(), &err.to_string())),
                &conditions::session_security(plaintext, None),
            );
            if let Err(e) = patch_status(gw, &status, ctx).await {
                warn!(error = %e, "could not record the failure in status");
            }
            let reason = status
                .conditions
                .iter()
                .find(|c| c.type_ == conditions::DEGRADED)
                .map(|c| c.reason.clone())
                .unwrap_or_else(|| "ReconcileFailed".to_owned());
            ctx.publish(
                gw,
                EventType::Warning,
                &reason,
                "Reconcile",
                err.to_string(),
            )
            .await;
            Err(err)
        }
    }
}

async fn cleanup(gw: &MtprotoGateway, ctx: &Context) -> Result<Action, Error> {
    prune_foreign_readers(gw, None, ctx).await?;
    delete_foreign_session_secret(gw, &ctx.client).await?;
    ctx.succeeded(gw);
    info!(gateway = %gw.name_any(), "cleaned up; owned objects follow by garbage collection");
    Ok(Action::await_change())
}

/// Reads the Secrets the gateway references and whether ServiceMonitors are served.
async fn dereference(gw: &MtprotoGateway, client: &Client) -> Result<Dereferenced, Error> {
    let ns = gw
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let keys = referenced_keys(gw);
    let names: BTreeSet<&str> = keys.iter().map(|k| k.secret_name.as_str()).collect();
    let mut out = Dereferenced::default();
    for name in names {
        let found = secrets.get_opt(name).await.map_err(|source| Error::Read {
            what: format!("Secret {ns}/{name}"),
            source: Box::new(source),
        })?;
        if let Some(secret) = found {
            let data = secret.data.unwrap_or_default();
            let wanted = keys
                .iter()
                .filter(|k| k.secret_name == name)
                .filter_map(|k| data.get(&k.key).map(|v| (k.key.clone(), v.0.clone())))
                .collect();
            out.secrets.insert(name.to_owned(), wanted);
        }
    }
    if gw.spec.metrics.service_monitor.enabled {
        out.service_monitor_api = service_monitor_served(client).await?;
    }
    let session = &gw.spec.session.service;
    let session_ns = session.namespace.as_deref().unwrap_or(&ns);
    // Unreadable or absent: the NetworkPolicy falls back to the session namespace as a whole.
    match Api::<Service>::namespaced(client.clone(), session_ns)
        .get_opt(&session.name)
        .await
    {
        Ok(svc) => out.session_selector = svc.and_then(|s| s.spec).and_then(|s| s.selector),
        Err(e) => warn!(
            service = %format!("{session_ns}/{}", session.name),
            error = %e,
            "cannot read the session Service; the NetworkPolicy admits its whole namespace"
        ),
    }
    Ok(out)
}

/// What the certificate step decided for status and requeueing.
#[derive(Debug, Default)]
struct Security {
    /// The `CertificatesReady` condition; `None` in plaintext mode.
    condition: Option<Decision>,
    /// Time until the next renewal is due (operator-issued certificates only).
    renew_in: Option<Duration>,
}

/// Makes sure the gateway's gRPC certificate Secret exists and is fresh: from cert-manager
/// when the spec names an issuer, else from the operator's own CA for this gateway.
async fn ensure_certificates(
    gw: &MtprotoGateway,
    v: &ValidatedGateway,
    ctx: &Context,
) -> Result<Security, Error> {
    let tls = &gw.spec.session.tls;
    if tls.mode == SessionTlsMode::Plaintext {
        return Ok(Security::default());
    }
    let client = &ctx.client;
    let names = build::Names::new(&v.name);
    let owner = build::owner_ref(gw)?;
    if let Some(issuer) = &tls.issuer_ref {
        if !cert_manager_served(client).await? {
            return Ok(Security {
                condition: Some((
                    CERTIFICATES_READY,
                    false,
                    "CertManagerMissing",
                    format!(
                        "spec.session.tls.issuerRef names {} {} but cert-manager's Certificate \
                         API (cert-manager.io/v1) is not served, so Secret {} is not issued and \
                         the pods wait for it: install cert-manager, or remove issuerRef to let \
                         the operator issue the certificates",
                        issuer.kind, issuer.name, names.gateway_tls
                    ),
                )),
                renew_in: None,
            });
        }
        let certificates: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &v.namespace, &certificate_resource());
        let session_cert = session_certificate(v, &names, &owner, issuer);
        for cert in std::iter::once(gateway_certificate(v, &names, &owner, issuer))
            .chain(session_cert.clone())
        {
            let name = cert.metadata.name.clone().unwrap_or_default();
            certificates
                .patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&cert),
                )
                .await
                .map_err(|source| Error::Apply {
                    kind: "Certificate",
                    name: name.clone(),
                    source: Box::new(source),
                })?;
        }
        let sessions = if session_cert.is_some() {
            format!(
                "Certificate {} writes the sessions' Secret {}",
                names.session_tls, names.session_tls
            )
        } else {
            format!(
                "the sessions (namespace {}) need a certificate for {} from the same CA, from a \
                 Certificate of their own",
                v.session_namespace,
                certs::SESSION_NAME
            )
        };
        return Ok(Security {
            condition: Some((
                CERTIFICATES_READY,
                true,
                "CertManager",
                format!(
                    "Certificate {} from {} {} writes Secret {}; {sessions}",
                    names.gateway_tls, issuer.kind, issuer.name, names.gateway_tls,
                ),
            )),
            renew_in: None,
        });
    }

    let ca = read_secret(client, &v.namespace, &names.ca_secret).await?;
    let gateway = read_secret(client, &v.namespace, &names.gateway_tls).await?;
    let session_tls = session_tls_name(&names, &v.namespace, &v.session_namespace);
    let session = read_secret(client, &v.session_namespace, &session_tls).await?;
    let now = time::OffsetDateTime::now_utc();
    let plan = certs::plan(
        certs::Found {
            ca: ca.as_ref(),
            gateway: gateway.as_ref(),
            session: session.as_ref(),
        },
        certs::Identities {
            ca: &format!("{}.{} mtproto gRPC CA", v.name, v.namespace),
            gateway: certs::GATEWAY_NAME,
            session: certs::SESSION_NAME,
        },
        now,
    )?;
    if let Some(values) = &plan.ca {
        ssa(client, &owned_secret(v, &names.ca_secret, &owner, values)).await?;
        info!(gateway = %v.name, secret = %names.ca_secret, "issued the fleet CA");
    }
    if let Some(values) = &plan.gateway {
        ssa(client, &owned_secret(v, &names.gateway_tls, &owner, values)).await?;
        info!(gateway = %v.name, secret = %names.gateway_tls, "issued the gateway certificate");
    }
    if let Some(values) = &plan.session {
        ssa(client, &session_secret(v, &names, &owner, values)).await?;
        info!(gateway = %v.name, namespace = %v.session_namespace, secret = %session_tls, "issued the session certificate");
    }
    let renew_in = plan
        .next_renewal
        .saturating_sub(now.unix_timestamp())
        .max(1);
    Ok(Security {
        condition: Some((
            CERTIFICATES_READY,
            true,
            "Issued",
            format!(
                "the operator's CA ({}) issued Secret {} (mounted) and Secret {} in namespace {} \
                 for the sessions to mount; next renewal at {}",
                names.ca_secret,
                names.gateway_tls,
                session_tls,
                v.session_namespace,
                Timestamp::from_second(plan.next_renewal)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ),
        )),
        renew_in: Some(Duration::from_secs(renew_in.unsigned_abs())),
    })
}

/// The values of Secret `ns/name`, or `None` if it does not exist.
async fn read_secret(client: &Client, ns: &str, name: &str) -> Result<Option<SecretValues>, Error> {
    let found = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {ns}/{name}"),
            source: Box::new(source),
        })?;
    Ok(found.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }))
}

/// Deletes the sessions' certificate Secret a gateway left in another namespace (garbage
/// collection cannot follow it there), if the labels say it is this gateway's.
async fn delete_foreign_session_secret(gw: &MtprotoGateway, client: &Client) -> Result<(), Error> {
    let ns = gw.namespace().unwrap_or_default();
    let Some(session_ns) = gw.spec.session.service.namespace.as_deref() else {
        return Ok(());
    };
    if session_ns == ns {
        return Ok(());
    }
    let name = session_tls_name(&build::Names::new(&gw.name_any()), &ns, session_ns);
    let api = Api::<Secret>::namespaced(client.clone(), session_ns);
    let err = |source| Error::Delete {
        kind: "Secret",
        name: name.clone(),
        source: Box::new(source),
    };
    let existing = api.get_metadata_opt(&name).await.map_err(err)?;
    let mine = existing.is_some_and(|m| {
        m.metadata.labels.as_ref().is_some_and(|l| {
            l.get(OWNER_NAMESPACE_LABEL) == Some(&ns)
                && l.get("app.kubernetes.io/instance") == Some(&gw.name_any())
        })
    });
    if !mine {
        return Ok(());
    }
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(err(source)),
    }
}

/// Whether cert-manager's `cert-manager.io/v1` Certificates are served.
async fn cert_manager_served(client: &Client) -> Result<bool, Error> {
    let read_err = |source| Error::Read {
        what: "API discovery of cert-manager.io".to_owned(),
        source: Box::new(source),
    };
    let groups = client.list_api_groups().await.map_err(read_err)?;
    if !groups
        .groups
        .iter()
        .any(|g| g.name == "cert-manager.io" && g.versions.iter().any(|v| v.version == "v1"))
    {
        return Ok(false);
    }
    let resources = client
        .list_api_group_resources("cert-manager.io/v1")
        .await
        .map_err(read_err)?;
    Ok(resources.resources.iter().any(|r| r.name == "certificates"))
}

/// Whether `monitoring.coreos.com/v1` serves ServiceMonitors. Asks the group list first, so
/// clusters without the Prometheus operator see no 404s.
async fn service_monitor_served(client: &Client) -> Result<bool, Error> {
    let read_err = |source| Error::Read {
        what: "API discovery of monitoring.coreos.com".to_owned(),
        source: Box::new(source),
    };
    let groups = client.list_api_groups().await.map_err(read_err)?;
    let served = groups
        .groups
        .iter()
        .any(|g| g.name == "monitoring.coreos.com" && g.versions.iter().any(|v| v.version == "v1"));
    if !served {
        return Ok(false);
    }
    let resources = client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
        .map_err(read_err)?;
    Ok(resources
        .resources
        .iter()
        .any(|r| r.name == "servicemonitors"))
}

async fn ssa<K>(client: &Client, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let meta = obj.meta();
    let name = meta
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let ns = meta
        .namespace
        .as_deref()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    Api::<K>::namespaced(client.clone(), ns)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source: Box::new(source),
        })
}

/// Deletes `name` only if this gateway controls it, so a disabled feature never removes a
/// user's own object of the same name.
async fn delete_owned<K>(
    gw: &MtprotoGateway,
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let err = |source| Error::Delete {
        kind: <K as k8s_openapi::Resource>::KIND,
        name: name.to_owned(),
        source: Box::new(source),
    };
    let Some(existing) = api.get_opt(name).await.map_err(err)? else {
        return Ok(());
    };
    if !is_controlled_by(existing.meta(), gw) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(err(source)),
    }
}

fn is_controlled_by(meta: &ObjectMeta, gw: &MtprotoGateway) -> bool {
    let uid = gw.metadata.uid.as_deref();
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// The applied objects status reports on, as the server has them.
struct Applied {
    deployment: Deployment,
    client_service: Service,
}

/// Applies everything in dependency order.
async fn apply_all(
    gw: &MtprotoGateway,
    b: &Built,
    session_ns: &str,
    ctx: &Context,
) -> Result<Applied, Error> {
    let client = &ctx.client;
    let ns = b
        .deployment
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = gw.name_any();
    // Config and identity first, so the Deployment never starts pods against a stale config.
    ssa(client, &b.config_map).await?;
    ssa(client, &b.service_account).await?;
    ssa(client, &b.role).await?;
    ssa(client, &b.role_binding).await?;
    let foreign = (session_ns != ns).then_some(session_ns);
    prune_foreign_readers(gw, foreign, ctx).await?;
    if foreign.is_some() {
        let reader = build::Names::new(&name).endpoint_reader;
        delete_owned::<RoleBinding>(gw, client, &ns, &reader).await?;
        delete_owned::<Role>(gw, client, &ns, &reader).await?;
    }
    let client_service = ssa(client, &b.client_service).await?;
    ssa(client, &b.grpc_service).await?;
    let deployment = ssa(client, &b.deployment).await?;

    match &b.pdb {
        Some(p) => drop(ssa(client, p).await?),
        None => delete_owned::<PodDisruptionBudget>(gw, client, &ns, &name).await?,
    }
    match &b.hpa {
        Some(h) => drop(ssa(client, h).await?),
        None => delete_owned::<HorizontalPodAutoscaler>(gw, client, &ns, &name).await?,
    }
    match &b.network_policy {
        Some(n) => drop(ssa(client, n).await?),
        None => delete_owned::<NetworkPolicy>(gw, client, &ns, &name).await?,
    }
    apply_service_monitor(gw, b.service_monitor.as_ref(), client, &ns, &name).await?;
    Ok(Applied {
        deployment,
        client_service,
    })
}

/// IPs and hostnames the client Service's load balancer got.
fn load_balancer_addresses(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect()
}

async fn apply_service_monitor(
    gw: &MtprotoGateway,
    sm: Option<&DynamicObject>,
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &service_monitor_resource());
    match sm {
        Some(sm) => {
            api.patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(sm),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: "ServiceMonitor",
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        }
        // Without the API there is nothing to delete; a 404 on the resource type says so.
        None if gw.spec.metrics.service_monitor.enabled => {}
        None => match api.get_opt(name).await {
            Ok(Some(existing)) if is_controlled_by(&existing.metadata, gw) => {
                match api.delete(name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => {
                        return Err(Error::Delete {
                            kind: "ServiceMonitor",
                            name: name.to_owned(),
                            source: Box::new(source),
                        })
                    }
                }
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Read {
                    what: format!("ServiceMonitor {ns}/{name}"),
                    source: Box::new(source),
                })
            }
        },
    }
    Ok(())
}

/// Removes EndpointSlice reader Roles/RoleBindings this gateway left in namespaces other than
/// `keep` (all of them when `keep` is `None`), as the watch caches know them.
async fn prune_foreign_readers(
    gw: &MtprotoGateway,
    keep: Option<&str>,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = gw.namespace().unwrap_or_default();
    let name = gw.name_any();
    let mine = |meta: &ObjectMeta| {
        meta.labels.as_ref().is_some_and(|l| {
            l.get("app.kubernetes.io/instance") == Some(&name)
                && l.get(OWNER_NAMESPACE_LABEL) == Some(&ns)
        })
    };
    prune(&ctx.client, &ctx.reader_bindings, &mine, keep).await?;
    prune(&ctx.client, &ctx.reader_roles, &mine, keep).await
}

async fn prune<K>(
    client: &Client,
    stores: &[Store<K>],
    mine: &(dyn Fn(&ObjectMeta) -> bool + Sync),
    keep: Option<&str>,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Debug
        + DeserializeOwned,
{
    let kind = <K as k8s_openapi::Resource>::KIND;
    let mut found = Vec::new();
    for store in stores {
        tokio::time::timeout(CACHE_SYNC_WAIT, store.wait_until_ready())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Error::CacheNotReady(kind))?;
        found.extend(store.state().into_iter().filter(|o| mine(o.meta())));
    }
    for obj in found {
        let obj_ns = obj.namespace().unwrap_or_default();
        if Some(obj_ns.as_str()) == keep {
            continue;
        }
        let name = obj.name_any();
        match Api::<K>::namespaced(client.clone(), &obj_ns)
            .delete(&name, &DeleteParams::background())
            .await
        {
            Ok(_) => {
                info!(namespace = %obj_ns, %name, kind = <K as k8s_openapi::Resource>::KIND, "pruned")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind: <K as k8s_openapi::Resource>::KIND,
                    name,
                    source: Box::new(source),
                })
            }
        }
    }
    Ok(())
}

async fn current_deployment(gw: &MtprotoGateway, client: &Client) -> Option<Deployment> {
    let ns = gw.namespace()?;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .get_opt(&gw.name_any())
        .await
        .ok()
        .flatten()
}

/// What status tells clients about reaching the fleet.
struct Published {
    endpoint: Option<String>,
    load_balancer: Vec<String>,
    rsa_keys: Vec<RsaKeyStatus>,
}

fn status_for(
    gw: &MtprotoGateway,
    deployment: Option<&Deployment>,
    published: Published,
    failure: Option<(&str, &str)>,
    extra: &[Decision],
) -> MtprotoGatewayStatus {
    let previous = gw
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let observed = Observed {
        generation: gw.metadata.generation.unwrap_or(0),
        replicas: gw.spec.replicas,
        deployment,
        failure,
        extra,
    };
    let counts = conditions::replicas(deployment);
    MtprotoGatewayStatus {
        observed_generation: gw.metadata.generation,
        conditions: conditions::compute(&observed, previous, Time(Timestamp::now())),
        replicas: counts.total,
        ready_replicas: counts.ready,
        selector: Some(build::selector_string(&gw.name_any())),
        endpoint: published.endpoint,
        load_balancer: published.load_balancer,
        rsa_keys: published.rsa_keys,
    }
}

async fn patch_status(
    gw: &MtprotoGateway,
    status: &MtprotoGatewayStatus,
    ctx: &Context,
) -> Result<(), Error> {
    if gw.status.as_ref() == Some(status) {
        return Ok(());
    }
    let ns = gw
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<MtprotoGateway> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": MtprotoGateway::api_version(&()),
        "kind": MtprotoGateway::kind(&()),
        "status": status,
    });
    api.patch_status(
        &gw.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| Error::Status(Box::new(e)))?;
    Ok(())
}

/// Events when availability flips, so `kubectl describe` tells the fleet's
/// story; `Ready` flips with every scale and rollout, so it makes none.
async fn announce_transitions(gw: &MtprotoGateway, status: &MtprotoGatewayStatus, ctx: &Context) {
    let was = gw
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == AVAILABLE))
        .map(|c| c.status.as_str());
    let Some(now) = status.conditions.iter().find(|c| c.type_ == AVAILABLE) else {
        return;
    };
    if was == Some(now.status.as_str()) {
        return;
    }
    let (type_, reason) = if now.status == "True" {
        (EventType::Normal, "Available")
    } else {
        (EventType::Warning, "Unavailable")
    };
    ctx.publish(gw, type_, reason, "Observe", now.message.clone())
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1), Duration::from_secs(1));
        assert_eq!(backoff_delay(2), Duration::from_secs(2));
        assert_eq!(backoff_delay(5), Duration::from_secs(16));
        assert_eq!(backoff_delay(40), BACKOFF_MAX);
    }

    #[test]
    fn reader_roles_map_back_to_their_gateway() {
        let gw = crate::fixtures::gateway();
        let v = crate::validate::validate(&gw, &crate::fixtures::dereferenced()).expect("valid");
        let b = build::build(&gw, &v).expect("build");
        // Cross-namespace (fixture): by label.
        let r = reader_owner(&b.role.metadata).expect("mapped");
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("edge", Some("edge"))
        );

        let mut same = gw.clone();
        same.spec.session.service.namespace = None;
        let v = crate::validate::validate(&same, &crate::fixtures::dereferenced()).expect("valid");
        let b = build::build(&same, &v).expect("build");
        let r = reader_owner(&b.role_binding.metadata).expect("mapped");
        assert_eq!(
            (r.name.as_str(), r.namespace.as_deref()),
            ("edge", Some("edge"))
        );

        assert!(reader_owner(&ObjectMeta::default()).is_none());
    }

    #[test]
    fn load_balancer_addresses_take_ips_or_hostnames() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        assert!(load_balancer_addresses(&Service::default()).is_empty());
        let svc = Service {
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![
                        LoadBalancerIngress {
                            ip: Some("203.0.113.7".into()),
                            ..LoadBalancerIngress::default()
                        },
                        LoadBalancerIngress {
                            hostname: Some("edge.elb.example".into()),
                            ..LoadBalancerIngress::default()
                        },
                    ]),
                }),
                ..ServiceStatus::default()
            }),
            ..Service::default()
        };
        assert_eq!(
            load_balancer_addresses(&svc),
            ["203.0.113.7", "edge.elb.example"]
        );
    }

    #[test]
    fn ownership_check_matches_controller_uid() {
        let gw = crate::fixtures::gateway();
        let mut meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta::default();
        assert!(!is_controlled_by(&meta, &gw));
        let owner = build::owner_ref(&gw).expect("owner");
        meta.owner_references = Some(vec![owner.clone()]);
        assert!(is_controlled_by(&meta, &gw));
        let mut other = owner;
        other.uid = "someone-else".into();
        meta.owner_references = Some(vec![other]);
        assert!(!is_controlled_by(&meta, &gw));
    }
}
