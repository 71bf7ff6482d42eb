//! The `MtprotoGateway` custom resource: the desired shape of one gateway fleet.
//!
//! Validation lives in the schema where the API server can enforce it (ranges, enums, CEL
//! rules for cross-field checks), so an invalid object is refused at `kubectl apply` time with
//! a message naming the field, instead of failing later inside the reconciler.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the operator's resources.
pub const GROUP: &str = "mtproto-edge.io";

/// Port of the gateway's admin server (metrics and probes); fixed so probes and policies agree.
pub const ADMIN_PORT: i32 = 9090;

/// Desired state of a gateway fleet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mtproto-edge.io",
    version = "v1alpha1",
    kind = "MtprotoGateway",
    namespaced,
    status = "MtprotoGatewayStatus",
    shortname = "mtgw",
    category = "mtproto",
    doc = "A fleet of MTProto gateways: Deployment, Services, config, RBAC, PDB, HPA and policies managed by mtproto-operator",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Whether the fleet serves clients"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether all desired gateway pods are ready"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired gateway pods"
    ),
    printcolumn(
        name = "Ready-Pods",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready gateway pods"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "Client-facing address",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.drainDelaySeconds <= self.spec.terminationGracePeriodSeconds")
        .message("spec.drainDelaySeconds must not exceed spec.terminationGracePeriodSeconds (the kubelet kills the pod at the end of the grace period)")
        .field_path(".spec.drainDelaySeconds"),
    validation = Rule::new("size(self.metadata.name) <= 58")
        .message("metadata.name must be at most 58 characters: the gateway's `<name>-grpc` Service name must fit 63"),
    validation = Rule::new("self.spec.listeners.all(l, l.port != 9090 && l.port != self.spec.session.grpcPort)")
        .message("listener ports must differ from the admin port 9090 and spec.session.grpcPort")
        .field_path(".spec.listeners"),
    cel
)]
#[serde(rename_all = "camelCase")]
pub struct MtprotoGatewaySpec {
    /// Desired number of gateway pods (also the target of `kubectl scale` and the HPA).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Container image that runs `mtproto-gateway`; unset means the gateway
    /// release matching this operator, so upgrading the operator upgrades
    /// gateways that do not pin an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Image pull policy of the gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Names of Secrets used to pull the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,

    /// CPU and memory of the gateway container; unset means requests of
    /// 100m CPU and 128Mi memory (the HPA's CPU target needs a request).
    /// The gateway's threads follow the CPU, rounded up: the CPU limit sets
    /// both its workers and its handshake threads; with a request alone, the
    /// request sets the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Gateway log level.
    #[serde(default)]
    pub log_level: LogLevel,

    /// Gateway log format: `json` (one object per line, for log collectors) or `text`.
    #[serde(default)]
    pub log_format: LogFormat,

    /// Seconds a pod gets after SIGTERM: the lame-duck delay, then the drain of
    /// open connections (for what is left less 5 s), then the close of the rest.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i64,

    /// Seconds a pod keeps accepting connections after SIGTERM while reporting
    /// not ready, so load balancers and endpoints stop sending it clients before
    /// it stops listening.
    #[serde(default = "default_drain_delay")]
    #[schemars(range(min = 0, max = 600))]
    pub drain_delay_seconds: i64,

    /// How the Deployment replaces pods.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Metadata and scheduling of the gateway pods.
    #[serde(default)]
    pub pod: PodSettings,

    /// The gateway's ServiceAccount.
    #[serde(default)]
    pub service_account: ServiceAccountSpec,

    /// Client-facing listeners; each becomes a port on the client Service.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(
        validation = Rule::new("self.all(l, self.exists_one(m, m.port == l.port))").message("listener ports must be unique"),
        validation = Rule::new("self.all(l, self.exists_one(m, m.name == l.name))").message("listener names must be unique")
    )]
    pub listeners: Vec<Listener>,

    /// RSA private keys used by the handshake. The first is primary; the others are still
    /// served so clients pinned to an older key keep working during rotation.
    #[schemars(length(min = 1, max = 8))]
    pub rsa_keys: Vec<SecretKeyRef>,

    /// Where the gateway finds session services.
    pub session: SessionSpec,

    /// Auth-key store and cache.
    #[serde(default)]
    pub auth_keys: AuthKeysSpec,

    /// Connection limits and timeouts.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// How clients reach the fleet.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Horizontal pod autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// PodDisruptionBudget for voluntary evictions.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,

    /// Pod placement.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// Prometheus scraping.
    #[serde(default)]
    pub metrics: MetricsSpec,

    /// NetworkPolicy around the gateway pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

fn default_replicas() -> i32 {
    2
}

fn default_grace() -> i64 {
    60
}

fn default_drain_delay() -> i64 {
    5
}

/// The gateway image of this operator's release.
pub fn default_image() -> String {
    format!(
        "ghcr.io/mtproto-edge/mtproto-gateway:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Rolling-update knobs of the Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Pods created above the desired count during a rollout (a number or a percentage).
    #[serde(default = "default_max_surge")]
    pub max_surge: IntOrString,
    /// Pods that may be unavailable during a rollout (a number or a percentage);
    /// 0 keeps capacity while old pods drain.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
    /// Seconds a new pod must be ready before it counts as available.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,
}

fn default_max_surge() -> IntOrString {
    IntOrString::String("25%".to_owned())
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(0)
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: default_max_surge(),
            max_unavailable: default_max_unavailable(),
            min_ready_seconds: 0,
        }
    }
}

/// Pod metadata and scheduling priority, passed through to the pod template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Extra pod annotations; the operator's own config-hash annotation wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels; the selector labels win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// ServiceAccount settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSpec {
    /// Annotations (e.g. cloud workload identity bindings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in a container spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Gateway log level.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The value the gateway config expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Gateway log format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl LogFormat {
    /// The value the gateway's `MTPROTO_LOG_FORMAT` expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Text => "text",
        }
    }
}

/// One client-facing listener.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.name != 'grpc' && self.name != 'admin'")
        .message("listener names grpc and admin are reserved for the gateway's own ports")
        .field_path(".name"),
    validation = Rule::new("!has(self.tls) || self.transport != 'tcp'")
        .message("tls applies only to transport websocket or http (MTProto over TCP has its own obfuscation)")
        .field_path(".tls"),
    validation = Rule::new("self.transport == 'websocket' || (!has(self.path) && !has(self.allowedOrigins))")
        .message("path and allowedOrigins apply only to transport websocket")
        .field_path(".path")
)]
pub struct Listener {
    /// Port name on the Services (a DNS label; `grpc` and `admin` are taken).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Container and Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// MTProto transport carried on this port.
    #[serde(default)]
    pub transport: Transport,
    /// Whether a PROXY protocol header precedes client bytes.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// WebSocket request path (web clients use `/apiws`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[!-~]*$"))]
    pub path: Option<String>,
    /// WebSocket `Origin` values allowed; empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_origins: Vec<String>,
    /// The load balancers (CIDRs) whose PROXY headers are honoured; from other
    /// peers a header closes the connection (`required`) or is ignored
    /// (`optional`). Empty: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxy_trusted_sources: Vec<String>,
    /// TLS on a `websocket` (`wss://`) or `http` (`https://`) listener, for
    /// deployments without a load balancer that terminates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// A listener's certificate and key, e.g. `tls.crt` and `tls.key` of a
/// `kubernetes.io/tls` Secret. Editing them rolls the pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerTls {
    /// The certificate chain (PEM).
    pub certificate: SecretKeyRef,
    /// Its private key (PEM).
    pub private_key: SecretKeyRef,
}

/// MTProto transport kinds a listener accepts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Websocket,
    Http,
}

/// PROXY protocol handling on a listener.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    Optional,
    Required,
}

/// A key inside a Secret in the gateway's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Session discovery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// How requests reach sessions: one unary call per frame or a long-lived stream.
    #[serde(default)]
    pub mode: SessionMode,
    /// How auth keys map to session pods.
    #[serde(default)]
    pub ring: RingMode,
    /// The session Service whose EndpointSlices the gateway watches.
    pub service: SessionServiceRef,
    /// Port of the reverse-path gRPC server sessions call back on.
    #[serde(default = "default_grpc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub grpc_port: i32,
    /// Address the reverse-path listener binds: `podIP` (the pod's own IP from
    /// the downward API, so nothing else on the node's network namespace
    /// reaches it) or `any` (0.0.0.0, e.g. for IPv6-only clusters).
    #[serde(default)]
    pub grpc_bind: GrpcBind,
    /// Security of the gRPC between gateways and sessions.
    #[serde(default)]
    pub tls: SessionTlsSpec,
}

/// Where the reverse-path gRPC listener binds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GrpcBind {
    #[default]
    #[serde(rename = "podIP")]
    PodIp,
    #[serde(rename = "any")]
    Any,
}

/// Mutual TLS between gateways and sessions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.issuerRef) || self.mode == 'mutual'")
        .message("issuerRef applies only to mode mutual (plaintext uses no certificates)")
        .field_path(".issuerRef")
)]
pub struct SessionTlsSpec {
    /// `mutual`: both gRPC directions use TLS with certificates from the
    /// fleet's CA. `plaintext`: no TLS, for teamgram Go sessions; anyone on the
    /// pod network can then read auth keys and push messages to clients, so
    /// status carries a `PlaintextSessionRPC` warning condition.
    #[serde(default)]
    pub mode: SessionTlsMode,
    /// A cert-manager issuer for the gateway certificate; unset: the operator
    /// runs its own CA per gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// How the session gRPC is secured.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionTlsMode {
    #[default]
    Mutual,
    Plaintext,
}

/// A cert-manager `Issuer` or `ClusterIssuer`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (in the gateway's namespace) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// API group of the issuer.
    #[serde(default = "default_issuer_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".to_owned()
}

fn default_issuer_group() -> String {
    "cert-manager.io".to_owned()
}

fn default_grpc_port() -> i32 {
    20110
}

/// Session transport mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SessionMode {
    #[default]
    Unary,
    Stream,
}

/// Consistent-hash ring flavour. Only go-zero's exists: it is the one that
/// agrees with Go teamgram sessions, and a second would only split fleets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RingMode {
    /// go-zero compatible ring, so Go teamgram sessions agree on key ownership.
    #[default]
    Gozero,
}

/// The session Service to discover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionServiceRef {
    /// Service name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Service namespace; defaults to the gateway's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
    /// Name of the gRPC port on that Service.
    #[serde(default = "default_port_name")]
    #[schemars(length(min = 1, max = 15))]
    pub port_name: String,
}

fn default_port_name() -> String {
    "grpc".to_owned()
}

/// Auth-key storage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!((has(self.lookup) && self.lookup == 'store') || (has(self.writer) && self.writer == 'store')) || has(self.redisUrl) || has(self.mysqlUrl)")
        .message("authKeys lookup or writer store needs redisUrl or mysqlUrl")
        .field_path(".lookup")
)]
pub struct AuthKeysSpec {
    /// Secret key holding the Redis URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<SecretKeyRef>,
    /// Secret key holding the MySQL URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_url: Option<SecretKeyRef>,
    /// Where the gateway looks keys up: `store` reads Redis/MySQL above directly,
    /// `session` asks the session service (teamgram's `session_queryAuthKey`).
    /// Unset: `store` when a store URL is given, else `session`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<KeyLookup>,
    /// Where keys made by handshakes are written: `store` or `session`
    /// (teamgram's `session_setAuthKey`). Unset: as `lookup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<KeyLookup>,
    /// In-memory auth-key cache size per pod.
    #[serde(default = "default_cache_bytes")]
    #[schemars(range(min = 0, max = 68_719_476_736i64))]
    pub cache_capacity_bytes: i64,
    /// How long a cached key stays fresh.
    #[serde(default = "default_cache_ttl")]
    #[schemars(range(min = 1, max = 604_800))]
    pub cache_ttl_seconds: i64,
}

/// Where auth keys are read or written.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyLookup {
    Session,
    Store,
}

impl AuthKeysSpec {
    /// `lookup` with its default applied.
    pub fn effective_lookup(&self) -> KeyLookup {
        self.lookup
            .unwrap_or(if self.redis_url.is_some() || self.mysql_url.is_some() {
                KeyLookup::Store
            } else {
                KeyLookup::Session
            })
    }

    /// `writer` with its default applied.
    pub fn effective_writer(&self) -> KeyLookup {
        self.writer.unwrap_or_else(|| self.effective_lookup())
    }
}

fn default_cache_bytes() -> i64 {
    64 * 1024 * 1024
}

fn default_cache_ttl() -> i64 {
    3600
}

impl Default for AuthKeysSpec {
    fn default() -> Self {
        Self {
            redis_url: None,
            mysql_url: None,
            lookup: None,
            writer: None,
            cache_capacity_bytes: default_cache_bytes(),
            cache_ttl_seconds: default_cache_ttl(),
        }
    }
}

/// Connection limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Open connections per pod.
    #[serde(default = "default_max_conns")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections: i64,
    /// Open connections per client IP per pod.
    #[serde(default = "default_max_conns_per_ip")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections_per_ip: i64,
    /// Time allowed for the auth-key exchange.
    #[serde(default = "default_handshake_timeout")]
    #[schemars(range(min = 1, max = 600))]
    pub handshake_timeout_seconds: i64,
    /// Idle connections are closed after this long.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 1, max = 86_400))]
    pub idle_timeout_seconds: i64,
    /// New handshakes per client IP per minute per pod; beyond it clients get -429.
    #[serde(default = "default_handshakes_per_ip")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub handshakes_per_ip_per_minute: i64,
    /// A client that takes no bytes for this long is disconnected.
    #[serde(default = "default_write_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub write_timeout_seconds: i64,
    /// Largest MTProto frame accepted from a client.
    #[serde(default = "default_max_frame_bytes")]
    #[schemars(range(min = 1024, max = 16_777_216))]
    pub max_frame_bytes: i64,
}

fn default_max_conns() -> i64 {
    100_000
}
fn default_max_conns_per_ip() -> i64 {
    256
}
fn default_handshake_timeout() -> i64 {
    30
}
fn default_idle_timeout() -> i64 {
    300
}
fn default_handshakes_per_ip() -> i64 {
    120
}
fn default_write_timeout() -> i64 {
    30
}
fn default_max_frame_bytes() -> i64 {
    1 << 20
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections: default_max_conns(),
            max_connections_per_ip: default_max_conns_per_ip(),
            handshake_timeout_seconds: default_handshake_timeout(),
            idle_timeout_seconds: default_idle_timeout(),
            handshakes_per_ip_per_minute: default_handshakes_per_ip(),
            write_timeout_seconds: default_write_timeout(),
            max_frame_bytes: default_max_frame_bytes(),
        }
    }
}

/// Client-facing Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.externalTrafficPolicy) || self.type != 'ClusterIP'")
        .message("externalTrafficPolicy needs type NodePort or LoadBalancer")
        .field_path(".externalTrafficPolicy"),
    validation = Rule::new("self.type == 'LoadBalancer' || (!has(self.loadBalancerClass) && !has(self.loadBalancerSourceRanges))")
        .message("loadBalancerClass and loadBalancerSourceRanges need type LoadBalancer")
        .field_path(".loadBalancerClass")
)]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations for the Service (load-balancer settings and the like).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Keep client source IPs by routing only to local pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// Pin each client IP to one pod. Unset: `ClientIP` when an `http` listener
    /// exists (an HTTP-transport client's requests must reach the pod holding
    /// its handshake), else `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// Load-balancer implementation to use (type LoadBalancer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer_class: Option<String>,
    /// Client CIDRs the cloud load balancer admits (type LoadBalancer only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub load_balancer_source_ranges: Vec<String>,
}

/// Service session affinity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SessionAffinity {
    ClientIP,
    None,
}

impl SessionAffinity {
    /// The value Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientIP => "ClientIP",
            Self::None => "None",
        }
    }
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    /// The value Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Service external traffic policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ExternalTrafficPolicy {
    Cluster,
    Local,
}

impl ExternalTrafficPolicy {
    /// The value Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "Cluster",
            Self::Local => "Local",
        }
    }
}

/// Horizontal pod autoscaling. The HPA scales the MtprotoGateway itself through its scale
/// subresource, so `spec.replicas` stays the one source of truth for the Deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas")
        .message("minReplicas must not exceed maxReplicas")
        .field_path(".minReplicas"),
    validation = Rule::new("!self.enabled || has(self.targetCpuUtilizationPercentage) || has(self.targetConnectionsPerPod)")
        .message("autoscaling needs targetCpuUtilizationPercentage or targetConnectionsPerPod")
        .field_path(".targetCpuUtilizationPercentage")
)]
pub struct AutoscalingSpec {
    /// Whether the HPA exists.
    #[serde(default)]
    pub enabled: bool,
    /// Lower bound of replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Upper bound of replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation target, percent of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
    /// Average open connections per pod (needs a custom-metrics adapter serving
    /// `mtproto_connections_open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub target_connections_per_pod: Option<i64>,
    /// Seconds the HPA looks back before removing pods, so a dip in load does
    /// not drop (and reconnect) clients only to scale up again.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_scale_down_window() -> i32 {
    300
}

/// PodDisruptionBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudgetSpec {
    /// Whether the PDB exists.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Pods that may be down at once during voluntary disruptions.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_unavailable: i32,
}

fn default_true() -> bool {
    true
}
fn default_one() -> i32 {
    1
}

impl Default for DisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

/// Pod placement.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Node labels the pods require.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How pods spread over zones and nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
}

/// Prometheus integration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// ServiceMonitor for the Prometheus operator (created only when its CRD exists).
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,
}

/// ServiceMonitor settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Whether to create the ServiceMonitor.
    #[serde(default)]
    pub enabled: bool,
    /// Scrape interval.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub interval: String,
    /// Labels on the ServiceMonitor, e.g. the one a Prometheus selects on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_interval() -> String {
    "30s".to_owned()
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: default_interval(),
            labels: BTreeMap::new(),
        }
    }
}

/// NetworkPolicy settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Whether to create the NetworkPolicy (clients on the listeners, the
    /// session Service's pods on the reverse-path port, monitoring on the admin port).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Client CIDRs allowed on the listeners; empty means anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_cidrs: Vec<String>,
    /// Namespaces (by `kubernetes.io/metadata.name`) allowed to scrape the admin port;
    /// an explicit empty list means any namespace.
    #[serde(default = "default_metrics_namespaces")]
    pub metrics_namespaces: Vec<String>,
    /// Pods in those namespaces allowed to scrape the admin port; unset: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_pod_selector: Option<LabelSelector>,
}

fn default_metrics_namespaces() -> Vec<String> {
    vec!["monitoring".to_owned()]
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            client_cidrs: Vec::new(),
            metrics_namespaces: default_metrics_namespaces(),
            metrics_pod_selector: None,
        }
    }
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtprotoGatewayStatus {
    /// `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods of the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Ready pods of the Deployment.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods, for the scale subresource and the HPA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Where clients connect (`host:port` of the first listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Addresses (IP or hostname) the load balancer of the client Service got.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer: Vec<String>,
    /// The RSA keys served, in `spec.rsaKeys` order, with the fingerprints clients pin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rsa_keys: Vec<RsaKeyStatus>,
}

/// One served RSA key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RsaKeyStatus {
    /// Secret holding the private key.
    pub secret_name: String,
    /// Key inside the Secret.
    pub key: String,
    /// MTProto fingerprint (lower 64 bits of SHA-1 over the TL-serialised public
    /// key), as 16 hex digits, as the gateway logs it.
    pub fingerprint: String,
    /// The public key clients embed (PKCS#1 PEM).
    pub public_key: String,
}

/// Header of the generated CRD file.
const CRD_HEADER: &str =
    "# Generated by `cargo run -p mtproto-operator --bin crdgen`; do not edit.\n";

/// Paths of the generated CRD, relative to the repository root: the canonical copy and the
/// one the Helm chart installs.
pub const CRD_FILES: [&str; 2] = [
    "crds/mtprotogateways.mtproto-edge.io.yaml",
    "charts/mtproto-operator/files/mtprotogateways.mtproto-edge.io.yaml",
];

/// The CRD as YAML, exactly as `crdgen` writes it to `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    Ok(format!(
        "{CRD_HEADER}{}",
        serde_saphyr::to_string(&MtprotoGateway::crd())?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::gateway;
    use kube::CustomResourceExt;
    use serde_json::json;

    #[test]
    fn committed_crds_match_the_types() {
        let generated = crd_yaml().expect("serialise CRD");
        let committed = [
            include_str!("../../crds/mtprotogateways.mtproto-edge.io.yaml"),
            include_str!(
                "../../charts/mtproto-operator/files/mtprotogateways.mtproto-edge.io.yaml"
            ),
        ];
        for (file, text) in CRD_FILES.iter().zip(committed) {
            assert!(
                text == generated,
                "{file} drifted from the Rust types: run `cargo run -p mtproto-operator --bin crdgen`"
            );
        }
    }

    #[test]
    fn crd_has_status_scale_and_printer_columns() {
        let crd = MtprotoGateway::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["mtgw".to_owned()][..])
        );
        let v = &crd.spec.versions[0];
        let sub = v.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some());
        let scale = sub.scale.as_ref().expect("scale");
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(scale.status_replicas_path, ".status.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .expect("columns")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            [
                "Available",
                "Ready",
                "Replicas",
                "Ready-Pods",
                "Endpoint",
                "Age"
            ]
        );
    }

    #[test]
    fn fixture_passes_cel_rules() {
        gateway().validate_cel().expect("fixture is valid");
    }

    fn cel_error(gw: &MtprotoGateway) -> String {
        gw.validate_cel().expect_err("must be refused").to_string()
    }

    #[test]
    fn cel_refuses_cross_field_mistakes() {
        let mut gw = gateway();
        gw.spec.listeners[1].port = gw.spec.listeners[0].port;
        assert!(cel_error(&gw).contains("listener ports must be unique"));

        let mut gw = gateway();
        gw.spec.listeners[1].name = gw.spec.listeners[0].name.clone();
        assert!(cel_error(&gw).contains("listener names must be unique"));

        let mut gw = gateway();
        gw.spec.listeners[0].port = ADMIN_PORT;
        assert!(cel_error(&gw).contains("admin port"));

        let mut gw = gateway();
        if let Some(a) = gw.spec.autoscaling.as_mut() {
            a.min_replicas = 11;
        }
        assert!(cel_error(&gw).contains("minReplicas must not exceed maxReplicas"));

        let mut gw = gateway();
        gw.spec.service.type_ = ServiceType::ClusterIP;
        assert!(cel_error(&gw).contains("externalTrafficPolicy"));
    }

    #[test]
    fn cel_keeps_issuer_ref_to_mutual_tls() {
        let mut gw = gateway();
        gw.spec.session.tls.issuer_ref = Some(IssuerRef {
            name: "fleet-ca".into(),
            kind: default_issuer_kind(),
            group: default_issuer_group(),
        });
        gw.validate_cel().expect("cert-manager for mutual TLS");
        gw.spec.session.tls.mode = SessionTlsMode::Plaintext;
        assert!(cel_error(&gw).contains("issuerRef applies only to mode mutual"));
    }

    #[test]
    fn session_security_and_policy_defaults_are_the_safe_ones() {
        let spec: MtprotoGatewaySpec = serde_json::from_value(json!({
            "listeners": [{"name": "tcp", "port": 10443}],
            "rsaKeys": [{"secretName": "rsa", "key": "k"}],
            "session": {"service": {"name": "session"}}
        }))
        .expect("minimal spec");
        assert_eq!(spec.session.tls.mode, SessionTlsMode::Mutual);
        assert!(spec.session.tls.issuer_ref.is_none());
        assert_eq!(spec.session.grpc_bind, GrpcBind::PodIp);
        assert!(spec.network_policy.enabled);
        assert_eq!(spec.network_policy.metrics_namespaces, ["monitoring"]);
        assert_eq!(spec.log_format, LogFormat::Json);
    }

    #[test]
    fn replicas_outside_the_autoscaler_bounds_are_accepted() {
        // GitOps tools apply spec.replicas as written; the HPA clamps it.
        let mut gw = gateway();
        gw.spec.replicas = 50;
        gw.validate_cel()
            .expect("the HPA clamps, the API server does not refuse");
    }

    #[test]
    fn cel_refuses_listener_mistakes() {
        for reserved in ["grpc", "admin"] {
            let mut gw = gateway();
            gw.spec.listeners[0].name = reserved.into();
            assert!(cel_error(&gw).contains("reserved"), "{reserved}");
        }

        let mut gw = gateway();
        gw.spec.listeners[0].tls = Some(ListenerTls {
            certificate: gw.spec.rsa_keys[0].clone(),
            private_key: gw.spec.rsa_keys[0].clone(),
        });
        assert!(cel_error(&gw).contains("tls applies only"));
        gw.spec.listeners[0].transport = Transport::Http;
        gw.validate_cel().expect("TLS on an http listener");

        let mut gw = gateway();
        gw.spec.listeners[0].path = Some("/ws".into());
        assert!(cel_error(&gw).contains("path and allowedOrigins"));
        let mut gw = gateway();
        gw.spec.listeners[0].allowed_origins = vec!["https://web.example".into()];
        assert!(cel_error(&gw).contains("path and allowedOrigins"));
        gw.spec.listeners[0].transport = Transport::Websocket;
        gw.validate_cel().expect("origins on a websocket listener");
    }

    #[test]
    fn cel_bounds_the_name_by_the_grpc_service() {
        let mut gw = gateway();
        gw.metadata.name = Some("g".repeat(58));
        gw.validate_cel().expect("58 characters fit");
        gw.metadata.name = Some("g".repeat(59));
        assert!(cel_error(&gw).contains("-grpc"));
    }

    #[test]
    fn cel_ties_store_modes_and_load_balancer_fields() {
        let mut gw = gateway();
        gw.spec.auth_keys.redis_url = None;
        gw.spec.auth_keys.mysql_url = None;
        gw.validate_cel()
            .expect("no store: lookup defaults to session");
        gw.spec.auth_keys.writer = Some(KeyLookup::Store);
        assert!(cel_error(&gw).contains("needs redisUrl or mysqlUrl"));

        let mut gw = gateway();
        gw.spec.service.load_balancer_source_ranges = vec!["10.0.0.0/8".into()];
        gw.validate_cel().expect("the fixture is a LoadBalancer");
        gw.spec.service.type_ = ServiceType::NodePort;
        assert!(cel_error(&gw).contains("need type LoadBalancer"));
    }

    #[test]
    fn listeners_and_conditions_are_list_maps() {
        let crd = serde_json::to_value(MtprotoGateway::crd()).expect("json");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let listeners = &schema["spec"]["properties"]["listeners"];
        assert_eq!(listeners["x-kubernetes-list-type"], "map");
        assert_eq!(listeners["x-kubernetes-list-map-keys"], json!(["name"]));
        let conditions = &schema["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    }

    #[test]
    fn key_lookup_follows_the_configured_stores() {
        let gw = gateway();
        assert_eq!(gw.spec.auth_keys.effective_lookup(), KeyLookup::Store);
        assert_eq!(gw.spec.auth_keys.effective_writer(), KeyLookup::Store);
        let mut keys = AuthKeysSpec::default();
        assert_eq!(keys.effective_lookup(), KeyLookup::Session);
        assert_eq!(keys.effective_writer(), KeyLookup::Session);
        keys.lookup = Some(KeyLookup::Store);
        keys.writer = Some(KeyLookup::Session);
        assert_eq!(keys.effective_writer(), KeyLookup::Session);
    }
}
