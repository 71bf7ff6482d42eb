//! The gateway's Prometheus metrics. The IO shell records them; the admin
//! endpoint serves them. Every metric is a cheap handle (an `Arc` inside), so
//! components keep their own clones and nothing is looked up by name at runtime.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use mtproto_session::metrics::latency;

type Latency<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_family<L: Clone + std::hash::Hash + Eq>() -> Latency<L> {
    Family::new_with_constructor(latency)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `tcp` or `websocket`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpenLabels {
    pub listener: &'static str,
    /// The MTProto transport (`abridged`, `obfuscated_intermediate`, …), or
    /// `undetected` before the first bytes tell.
    pub transport: &'static str,
}

/// An event loop by number (`mtproto-loop-N`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoopLabels {
    pub event_loop: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// `in_flight`: a request read whose answer never reached the connection;
/// `queued`: a server message a connection took and did not write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrainLabels {
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The setting under `limits.` that bit, e.g. `max_buffered_bytes`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// `req_pq`, `req_DH_params`, `set_client_DH_params` or `other`.
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepOutcomeLabels {
    pub step: &'static str,
    /// `ok` or the handshake error's reason (`nonce_mismatch`, `rsa`, …).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    /// `embedded`, `unary` or `stream`: alerts about the session ring apply to the remote modes.
    pub session_mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// teamgram's method name, e.g. `session_sendDataToSession`.
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcErrorLabels {
    pub method: &'static str,
    /// `redirect`, `redirect_refused` (to a non-member), `unregistered`, `transient` or `fatal`.
    pub kind: &'static str,
}

/// Calls to session services (the gateway as a gRPC client).
#[derive(Debug, Clone)]
pub struct SessionRpcMetrics {
    /// Whole calls as the caller sees them: redirects and retries included.
    pub duration: Latency<MethodLabels>,
    /// Failed attempts; a call that is retried can count several.
    pub errors: Family<RpcErrorLabels, Counter>,
    /// Calls waiting for a session answer now: the forward path's queue depth.
    pub in_flight: Gauge,
    /// Session instances on the ring.
    pub ring_members: Gauge,
}

impl Default for SessionRpcMetrics {
    fn default() -> Self {
        Self {
            duration: latency_family(),
            errors: Family::default(),
            in_flight: Gauge::default(),
            ring_members: Gauge::default(),
        }
    }
}

/// Everything the gateway records besides the auth-key cache's own counters.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// One series, value 1, naming the version and session mode of this process.
    pub build_info: Family<BuildLabels, Gauge>,
    /// `limits.max_connections`, so dashboards and alerts can relate open connections to it.
    pub connections_limit: Gauge,
    /// The runtime's threads serving connections (`runtime.worker_threads`).
    pub worker_threads: Gauge,
    /// Handshake computations run at once at most (`runtime.handshake_threads`).
    pub handshake_threads: Gauge,
    /// CPU each event loop used, as a share of one core, smoothed (remote session modes).
    pub event_loop_cpu: Family<LoopLabels, Gauge<f64, AtomicU64>>,
    /// Stream connections on each event loop.
    pub event_loop_connections: Family<LoopLabels, Gauge>,
    /// Connections moved between event loops.
    pub connections_moved: Counter,
    pub connections_accepted: Family<ListenerLabels, Counter>,
    pub connections_open: Family<OpenLabels, Gauge>,
    pub connections_closed: Family<ReasonLabels, Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    /// Handshakes that ended, by how.
    pub handshakes: Family<OutcomeLabels, Counter>,
    pub handshake_steps: Family<StepOutcomeLabels, Counter>,
    /// Server time per step (RSA and modpow included).
    pub handshake_step_duration: Latency<StepLabels>,
    /// From `req_pq` to the key being stored: client round trips included.
    pub handshake_duration: Histogram,
    pub rsa_decrypt_duration: Histogram,
    pub quick_acks_sent: Counter,
    /// PROXY headers skipped, not honoured: the socket peer is not a trusted source.
    pub proxy_headers_untrusted: Counter,
    /// Encrypted client messages the session service accepted.
    pub messages_forwarded: Counter,
    /// Server messages encrypted and written to a client.
    pub messages_sent: Counter,
    /// Server messages waiting in connections' outboxes: the reverse path's queue depth.
    pub outbox_queued: Gauge,
    /// Server messages no connection wrote, by why.
    pub server_messages_dropped: Family<ReasonLabels, Counter>,
    /// Session connections and calls the reverse-path server refused, by why.
    pub reverse_path_refused: Family<ReasonLabels, Counter>,
    /// Server messages sessions sent on this gateway's own session streams
    /// (stream mode with a session that knows the extension), not through
    /// the reverse path.
    pub session_stream_replies: Counter,
    /// MTProto sessions with a live connection here (the registry's size).
    pub sessions: Gauge,
    /// Handshakes from `req_pq` until stored or failed (capped by
    /// `limits.max_handshakes_in_progress`).
    pub handshakes_in_progress: Gauge,
    /// Client bytes held in partial frames (capped by `limits.max_buffered_bytes`).
    pub buffered_bytes: Gauge,
    /// Gateway limits that refused or closed something, by setting.
    pub limit_exceeded: Family<LimitLabels, Counter>,
    pub session_rpc: SessionRpcMetrics,
    pub store: mtproto_session::metrics::StoreMetrics,
    /// What connections closed during the drain had not delivered.
    pub drain_undelivered: Family<DrainLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            build_info: Family::default(),
            connections_limit: Gauge::default(),
            worker_threads: Gauge::default(),
            handshake_threads: Gauge::default(),
            event_loop_cpu: Family::default(),
            event_loop_connections: Family::default(),
            connections_moved: Counter::default(),
            connections_accepted: Family::default(),
            connections_open: Family::default(),
            connections_closed: Family::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            handshakes: Family::default(),
            handshake_steps: Family::default(),
            handshake_step_duration: latency_family(),
            handshake_duration: latency(),
            rsa_decrypt_duration: latency(),
            quick_acks_sent: Counter::default(),
            proxy_headers_untrusted: Counter::default(),
            messages_forwarded: Counter::default(),
            messages_sent: Counter::default(),
            outbox_queued: Gauge::default(),
            server_messages_dropped: Family::default(),
            reverse_path_refused: Family::default(),
            session_stream_replies: Counter::default(),
            sessions: Gauge::default(),
            handshakes_in_progress: Gauge::default(),
            buffered_bytes: Gauge::default(),
            limit_exceeded: Family::default(),
            session_rpc: SessionRpcMetrics::default(),
            store: Default::default(),
            drain_undelivered: Family::default(),
        }
    }
}

impl Metrics {
    /// Adds every metric to `registry` (counters get `_total` when encoded).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "mtproto_build_info",
            "Version and session mode of this gateway (value 1)",
            self.build_info.clone(),
        );
        r.register(
            "mtproto_connections_limit",
            "Client connections this gateway accepts at most (limits.max_connections)",
            self.connections_limit.clone(),
        );
        r.register(
            "mtproto_runtime_worker_threads",
            "Threads serving client connections (runtime.worker_threads)",
            self.worker_threads.clone(),
        );
        r.register(
            "mtproto_runtime_handshake_threads",
            "Handshake computations (RSA, DH) run at once at most (runtime.handshake_threads)",
            self.handshake_threads.clone(),
        );
        r.register(
            "mtproto_event_loop_cpu_ratio",
            "CPU each event loop used, as a share of one core, smoothed over about half a second (remote session modes)",
            self.event_loop_cpu.clone(),
        );
        r.register(
            "mtproto_event_loop_connections",
            "TCP and WebSocket connections on each event loop (remote session modes)",
            self.event_loop_connections.clone(),
        );
        r.register(
            "mtproto_connections_moved",
            "Connections moved from a busy event loop to another, or merged onto one from a nearly idle one",
            self.connections_moved.clone(),
        );
        r.register(
            "mtproto_connections_accepted",
            "Client connections accepted, by listener kind",
            self.connections_accepted.clone(),
        );
        r.register(
            "mtproto_connections_open",
            "Client connections open now, by listener and MTProto transport",
            self.connections_open.clone(),
        );
        r.register(
            "mtproto_connections_closed",
            "Client connections closed, by reason",
            self.connections_closed.clone(),
        );
        r.register(
            "mtproto_received_bytes",
            "Bytes read from clients (transport framing included)",
            self.bytes_received.clone(),
        );
        r.register(
            "mtproto_sent_bytes",
            "Bytes written to clients (transport framing included)",
            self.bytes_sent.clone(),
        );
        r.register(
            "mtproto_handshakes",
            "Auth-key handshakes that ended, by outcome",
            self.handshakes.clone(),
        );
        r.register(
            "mtproto_handshake_steps",
            "Handshake messages handled, by step and outcome",
            self.handshake_steps.clone(),
        );
        r.register(
            "mtproto_handshake_step_duration_seconds",
            "Server time spent on one handshake step",
            self.handshake_step_duration.clone(),
        );
        r.register(
            "mtproto_handshake_duration_seconds",
            "From req_pq to the new key being stored, client round trips included",
            self.handshake_duration.clone(),
        );
        r.register(
            "mtproto_rsa_decrypt_duration_seconds",
            "RSA private-key operation of req_DH_params",
            self.rsa_decrypt_duration.clone(),
        );
        r.register(
            "mtproto_quick_acks_sent",
            "QuickAck tokens sent",
            self.quick_acks_sent.clone(),
        );
        r.register(
            "mtproto_proxy_headers_untrusted",
            "PROXY headers ignored (optional mode) because the socket peer is not in proxy_trusted_sources",
            self.proxy_headers_untrusted.clone(),
        );
        r.register(
            "mtproto_messages_forwarded",
            "Encrypted client messages accepted by the session service",
            self.messages_forwarded.clone(),
        );
        r.register(
            "mtproto_messages_sent",
            "Server messages encrypted and written to clients",
            self.messages_sent.clone(),
        );
        r.register(
            "mtproto_outbox_queued_messages",
            "Server messages waiting in connection outboxes",
            self.outbox_queued.clone(),
        );
        r.register(
            "mtproto_server_messages_dropped",
            "Server messages no connection took or wrote (no connection, outboxes full, connection closed first)",
            self.server_messages_dropped.clone(),
        );
        r.register(
            "mtproto_reverse_path_refused",
            "Session connections and calls the reverse-path gRPC server refused (its bounds, malformed calls)",
            self.reverse_path_refused.clone(),
        );
        r.register(
            "mtproto_session_stream_replies",
            "Server messages sessions sent on this gateway's own session streams rather than through the reverse path",
            self.session_stream_replies.clone(),
        );
        r.register(
            "mtproto_sessions",
            "MTProto sessions with a live connection on this gateway",
            self.sessions.clone(),
        );
        r.register(
            "mtproto_handshakes_in_progress",
            "Handshakes from req_pq until the key is stored or a step fails (limits.max_handshakes_in_progress)",
            self.handshakes_in_progress.clone(),
        );
        r.register(
            "mtproto_buffered_bytes",
            "Client bytes held in partial frames across all connections (limits.max_buffered_bytes)",
            self.buffered_bytes.clone(),
        );
        r.register(
            "mtproto_limit_exceeded",
            "Connections closed or requests refused by a gateway limit, by the limits.* setting",
            self.limit_exceeded.clone(),
        );
        r.register(
            "mtproto_session_rpc_duration_seconds",
            "Calls to session services, redirects and retries included",
            self.session_rpc.duration.clone(),
        );
        r.register(
            "mtproto_session_rpc_errors",
            "Failed attempts of calls to session services, by method and kind",
            self.session_rpc.errors.clone(),
        );
        r.register(
            "mtproto_session_rpc_in_flight",
            "Calls to session services waiting for an answer",
            self.session_rpc.in_flight.clone(),
        );
        r.register(
            "mtproto_session_ring_members",
            "Session instances on the ring (remote session modes)",
            self.session_rpc.ring_members.clone(),
        );
        self.store.register(r);
        r.register(
            "mtproto_drain_undelivered",
            "Replies a shutdown drain did not deliver: requests read whose answer had not come (in_flight), server messages taken and not written (queued), on connections closed during the drain before everything was delivered (at the grace end, or by the client or an error)",
            self.drain_undelivered.clone(),
        );
    }
}

/// Keeps a gauge raised while alive.
#[derive(Debug)]
pub struct GaugeGuard(Gauge, i64);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> Self {
        Self::raise(gauge, 1)
    }

    /// Raises the gauge by `by` at once.
    pub fn raise(gauge: &Gauge, by: usize) -> Self {
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        gauge.inc_by(by);
        Self(gauge.clone(), by)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec_by(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_encoded_with_prometheus_names() {
        let metrics = Metrics::default();
        metrics
            .connections_accepted
            .get_or_create(&ListenerLabels { listener: "tcp" })
            .inc();
        metrics.handshake_duration.observe(0.25);
        metrics
            .store
            .lookup_duration
            .get_or_create(&mtproto_session::metrics::TierLabels { tier: "redis" })
            .observe(0.001);
        {
            let _guard = GaugeGuard::new(&metrics.session_rpc.in_flight);
            assert_eq!(metrics.session_rpc.in_flight.get(), 1);
        }
        assert_eq!(metrics.session_rpc.in_flight.get(), 0);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("mtproto_connections_accepted_total{listener=\"tcp\"} 1"));
        assert!(text.contains("mtproto_handshake_duration_seconds_count 1"));
        assert!(text.contains("# TYPE mtproto_session_rpc_in_flight gauge"));
        assert!(
            text.contains("mtproto_auth_key_store_lookup_duration_seconds_count{tier=\"redis\"} 1")
        );
    }
}
