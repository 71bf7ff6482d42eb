//! Admission limits: open connections per listener and per client address,
//! new handshakes and HTTP requests per client address, and the gateway-wide
//! budgets (handshakes in progress, bytes buffered in partial frames). The
//! bookkeeping is plain data with time passed in, so the rules are tested
//! without sockets or clocks.
//!
//! IPv6 clients are grouped by their /64: one subscriber usually owns a whole
//! /64, so counting single addresses would let one host bypass the caps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::metrics::ReasonLabels;

/// The key one client address is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => ClientKey((u128::from(v6) & !((1u128 << 64) - 1)) | (1 << 32)),
        }
    }
}

/// Open connections per client key, capped.
#[derive(Debug)]
pub struct PerClientCount {
    max: usize,
    open: HashMap<ClientKey, usize>,
}

impl PerClientCount {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: HashMap::new(),
        }
    }

    /// Counts one more connection unless the client is at the cap.
    pub fn try_add(&mut self, key: ClientKey) -> bool {
        let n = self.open.entry(key).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn remove(&mut self, key: ClientKey) {
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }

    pub fn open(&self, key: ClientKey) -> usize {
        self.open.get(&key).copied().unwrap_or(0)
    }
}

/// Events (new handshakes, HTTP requests) per client key: a burst of
/// `per_minute`, refilled evenly over a minute (the generic cell rate
/// algorithm: one instant per client).
#[derive(Debug)]
pub struct Rate {
    interval: Duration,
    burst: Duration,
    /// When each client's allowance is next fully restored.
    full_at: HashMap<ClientKey, Instant>,
}

/// Clients tracked before fully restored entries are swept.
const SWEEP_AT: usize = 4096;

impl Rate {
    pub fn new(per_minute: u32) -> Self {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        Self {
            interval,
            burst: Duration::from_secs(60) - interval,
            full_at: HashMap::new(),
        }
    }

    /// Takes one event from the client's allowance; false when it is spent.
    pub fn allow(&mut self, key: ClientKey, now: Instant) -> bool {
        if self.full_at.len() >= SWEEP_AT {
            self.full_at.retain(|_, at| *at > now);
        }
        let at = self.full_at.get(&key).copied().filter(|at| *at > now);
        let base = at.unwrap_or(now);
        if base.saturating_duration_since(now) > self.burst {
            return false;
        }
        self.full_at.insert(key, base + self.interval);
        true
    }

    pub fn tracked(&self) -> usize {
        self.full_at.len()
    }
}

/// Why a connection or request was refused at the edge: the `reason` label
/// of `mtproto_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// At accept: the listener is at `limits.max_connections`.
    ListenerFull,
    /// The client address is at `limits.max_connections_per_ip`.
    ClientFull,
    /// −429: `limits.handshakes_per_ip_per_minute`.
    HandshakeFlood,
    /// A missing or malformed PROXY header.
    ProxyHeader,
    /// A WebSocket upgrade refused (path, Origin, bad request) or not finished.
    WebsocketUpgrade,
    /// A TLS handshake on a `wss://`/`https://` listener failed (one that runs
    /// out of time closes as `handshake_timeout`, like other slow starts).
    TlsHandshake,
    /// HTTP 405: not POST.
    HttpMethod,
    /// HTTP 404: not an MTProto path.
    HttpPath,
    /// HTTP 413: body over `limits.max_frame_bytes`.
    HttpTooLarge,
    /// HTTP 400: incomplete body, bad MTProto message, failed handshake step.
    HttpBadBody,
}

impl Refusal {
    /// Every reason, in declaration order (the index of each one's counter).
    pub const ALL: [Refusal; 10] = [
        Refusal::ListenerFull,
        Refusal::ClientFull,
        Refusal::HandshakeFlood,
        Refusal::ProxyHeader,
        Refusal::WebsocketUpgrade,
        Refusal::TlsHandshake,
        Refusal::HttpMethod,
        Refusal::HttpPath,
        Refusal::HttpTooLarge,
        Refusal::HttpBadBody,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::ClientFull => "client_full",
            Refusal::HandshakeFlood => "handshake_flood",
            Refusal::ProxyHeader => "proxy_header",
            Refusal::WebsocketUpgrade => "websocket_upgrade",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::HttpMethod => "http_method",
            Refusal::HttpPath => "http_path",
            Refusal::HttpTooLarge => "http_too_large",
            Refusal::HttpBadBody => "http_bad_body",
        }
    }
}

/// `mtproto_refused_total{reason}`, for metrics and logs. Every reason's
/// series exists from the start (at 0), so rates and alerts see them before
/// the first refusal; counting goes straight to the series' own handle.
#[derive(Debug)]
pub struct Refused {
    family: Family<ReasonLabels, Counter>,
    counters: [Counter; Refusal::ALL.len()],
}

impl Default for Refused {
    fn default() -> Self {
        let family = Family::<ReasonLabels, Counter>::default();
        let counters = Refusal::ALL.map(|r| {
            family
                .get_or_create(&ReasonLabels { reason: r.label() })
                .clone()
        });
        Self { family, counters }
    }
}

impl Refused {
    /// The series of `reason`.
    pub fn counter(&self, reason: Refusal) -> &Counter {
        &self.counters[reason as usize]
    }

    /// Adds one refusal and returns that reason's new total (for the log line).
    pub fn count(&self, reason: Refusal) -> u64 {
        self.counter(reason).inc() + 1
    }

    /// Refusals of `reason` so far.
    pub fn total(&self, reason: Refusal) -> u64 {
        self.counter(reason).get()
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mtproto_refused",
            "Connections and requests refused at the edge, by reason (a limits.* setting, \
             a bad PROXY header, WebSocket upgrade or TLS handshake, or an HTTP request \
             answered 405, 404, 413 or 400)",
            self.family.clone(),
        );
    }
}

/// The limits every listener shares.
#[derive(Debug)]
pub struct Admission {
    max_per_listener: usize,
    clients: Mutex<PerClientCount>,
    handshakes: Mutex<Rate>,
    http_requests: Mutex<Rate>,
    pub refused: Refused,
}

/// Open connections on one listener.
#[derive(Debug, Default)]
pub struct ListenerSlots(AtomicUsize);

/// Held by an admitted connection; gives its slots back when dropped.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    listener: Arc<ListenerSlots>,
    client: Option<ClientKey>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data stays consistent even if a holder panicked mid-way (counts only).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    pub fn new(
        max_per_listener: usize,
        max_per_client: usize,
        handshakes_per_minute: u32,
        http_requests_per_minute: u32,
    ) -> Self {
        Self {
            max_per_listener,
            clients: Mutex::new(PerClientCount::new(max_per_client)),
            handshakes: Mutex::new(Rate::new(handshakes_per_minute)),
            http_requests: Mutex::new(Rate::new(http_requests_per_minute)),
            refused: Refused::default(),
        }
    }

    /// Takes a listener slot, at accept time.
    pub fn enter_listener(
        self: &Arc<Self>,
        listener: &Arc<ListenerSlots>,
    ) -> Result<Slot, Refusal> {
        let taken = listener
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_per_listener).then_some(n + 1)
            });
        if taken.is_err() {
            self.refused.count(Refusal::ListenerFull);
            return Err(Refusal::ListenerFull);
        }
        Ok(Slot {
            admission: self.clone(),
            listener: listener.clone(),
            client: None,
        })
    }

    /// Counts the connection against its client address (known only after a
    /// PROXY header, so this is a second step).
    pub fn enter_client(&self, slot: &mut Slot, ip: IpAddr) -> Result<(), Refusal> {
        let key = ClientKey::from(ip);
        if slot.client.is_some() {
            return Ok(());
        }
        if !lock(&self.clients).try_add(key) {
            self.refused.count(Refusal::ClientFull);
            return Err(Refusal::ClientFull);
        }
        slot.client = Some(key);
        Ok(())
    }

    /// Whether the client may start another handshake now.
    pub fn allow_handshake(&self, ip: IpAddr, now: Instant) -> bool {
        lock(&self.handshakes).allow(ClientKey::from(ip), now)
    }

    /// Whether the client may send another HTTP-transport request now.
    pub fn allow_http_request(&self, ip: IpAddr, now: Instant) -> bool {
        lock(&self.http_requests).allow(ClientKey::from(ip), now)
    }
}

/// Gateway-wide budgets, each a gauge that never passes its cap: what is
/// taken is given back by the guard that took it.
#[derive(Debug)]
pub struct Budgets {
    max_handshakes: i64,
    handshakes: Gauge,
    max_buffered: i64,
    buffered: Gauge,
}

/// Adds `n` to `gauge` unless that would pass `max`.
fn take(gauge: &Gauge, n: i64, max: i64) -> bool {
    gauge
        .inner()
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v + n <= max).then_some(v + n)
        })
        .is_ok()
}

impl Budgets {
    /// Caps on the two gauges (the metrics' own handles).
    pub fn new(
        max_handshakes: usize,
        handshakes: Gauge,
        max_buffered: usize,
        buffered: Gauge,
    ) -> Self {
        Self {
            max_handshakes: i64::try_from(max_handshakes).unwrap_or(i64::MAX),
            handshakes,
            max_buffered: i64::try_from(max_buffered).unwrap_or(i64::MAX),
            buffered,
        }
    }

    /// One of the handshake slots, or `None` when all are taken.
    pub fn begin_handshake(self: &Arc<Self>) -> Option<HandshakeSlot> {
        take(&self.handshakes, 1, self.max_handshakes).then(|| HandshakeSlot(self.clone()))
    }

    /// Counts `bytes` more buffered input, unless that passes the budget.
    pub fn buffer(&self, bytes: usize) -> bool {
        i64::try_from(bytes).is_ok_and(|n| take(&self.buffered, n, self.max_buffered))
    }

    pub fn unbuffer(&self, bytes: usize) {
        self.buffered
            .dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// A handshake in progress; its slot is free again when this drops.
#[derive(Debug)]
pub struct HandshakeSlot(Arc<Budgets>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshakes.dec();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.listener.0.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = self.client {
            lock(&self.admission.clients).remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_grouped_by_slash_64_and_mapped_v4_is_v4() {
        assert_eq!(
            ClientKey::from(ip("2001:db8:1:2::1")),
            ClientKey::from(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::from(ip("2001:db8:1:2::1")),
            ClientKey::from(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::from(ip("::ffff:10.0.0.1")),
            ClientKey::from(ip("10.0.0.1"))
        );
        assert_ne!(ClientKey::from(ip("0.0.0.1")), ClientKey::from(ip("::")));
    }

    #[test]
    fn per_client_cap_and_release() {
        let mut c = PerClientCount::new(2);
        let a = ClientKey::from(ip("10.0.0.1"));
        let b = ClientKey::from(ip("10.0.0.2"));
        assert!(c.try_add(a) && c.try_add(a));
        assert!(!c.try_add(a));
        assert!(c.try_add(b));
        c.remove(a);
        assert!(c.try_add(a));
        c.remove(a);
        c.remove(a);
        c.remove(b);
        c.remove(b);
        assert_eq!(c.open(a), 0);
        assert!(c.open.is_empty());
    }

    #[test]
    fn handshake_burst_then_steady_rate() {
        let mut r = Rate::new(6);
        let a = ClientKey::from(ip("10.0.0.1"));
        let t0 = Instant::now();
        for _ in 0..6 {
            assert!(r.allow(a, t0));
        }
        assert!(!r.allow(a, t0));
        assert!(r.allow(ClientKey::from(ip("10.0.0.2")), t0));
        // One handshake back every 10 s.
        assert!(!r.allow(a, t0 + Duration::from_secs(9)));
        assert!(r.allow(a, t0 + Duration::from_secs(10)));
        assert!(!r.allow(a, t0 + Duration::from_secs(10)));
        // A quiet minute restores the whole burst.
        let later = t0 + Duration::from_secs(200);
        for _ in 0..6 {
            assert!(r.allow(a, later));
        }
        assert!(!r.allow(a, later));
    }

    #[test]
    fn handshake_table_is_swept() {
        let mut r = Rate::new(60);
        let t0 = Instant::now();
        for i in 0..SWEEP_AT as u32 {
            assert!(r.allow(ClientKey::from(IpAddr::from(i.to_be_bytes())), t0));
        }
        assert_eq!(r.tracked(), SWEEP_AT);
        assert!(r.allow(ClientKey::from(ip("10.0.0.1")), t0 + Duration::from_secs(2)));
        assert_eq!(r.tracked(), 1);
    }

    #[test]
    fn slots_are_returned_on_drop() {
        let admission = Arc::new(Admission::new(2, 1, 60, 60));
        let listener = Arc::new(ListenerSlots::default());
        let mut s1 = admission.enter_listener(&listener).unwrap();
        admission.enter_client(&mut s1, ip("10.0.0.1")).unwrap();
        let mut s2 = admission.enter_listener(&listener).unwrap();
        assert_eq!(
            admission.enter_client(&mut s2, ip("10.0.0.1")),
            Err(Refusal::ClientFull)
        );
        assert_eq!(
            admission.enter_listener(&listener).unwrap_err(),
            Refusal::ListenerFull
        );
        drop(s1);
        admission.enter_client(&mut s2, ip("10.0.0.1")).unwrap();
        let _s3 = admission.enter_listener(&listener).unwrap();
        assert_eq!(admission.refused.total(Refusal::ClientFull), 1);
        assert_eq!(admission.refused.total(Refusal::ListenerFull), 1);
    }

    #[test]
    fn one_refusal_family_with_every_reason_from_the_start() {
        for (i, reason) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "ALL is in declaration order");
        }
        let refused = Refused::default();
        assert_eq!(refused.count(Refusal::HttpTooLarge), 1);
        assert_eq!(refused.count(Refusal::HttpTooLarge), 2);
        assert_eq!(refused.count(Refusal::ProxyHeader), 1);
        let mut registry = Registry::default();
        refused.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("mtproto_refused_total{"))
            .collect();
        assert_eq!(samples.len(), Refusal::ALL.len(), "{text}");
        for reason in Refusal::ALL {
            let value = match reason {
                Refusal::HttpTooLarge => 2,
                Refusal::ProxyHeader => 1,
                _ => 0,
            };
            let line = format!(
                "mtproto_refused_total{{reason=\"{}\"}} {value}",
                reason.label()
            );
            assert!(samples.contains(&line.as_str()), "{line} in {text}");
        }
    }

    #[test]
    fn budgets_stop_at_their_caps_and_guards_give_back() {
        let budgets = Arc::new(Budgets::new(2, Gauge::default(), 100, Gauge::default()));
        let a = budgets.begin_handshake().unwrap();
        let _b = budgets.begin_handshake().unwrap();
        assert!(budgets.begin_handshake().is_none());
        assert_eq!(budgets.handshakes.get(), 2);
        drop(a);
        assert_eq!(budgets.handshakes.get(), 1);
        assert!(budgets.begin_handshake().is_some());
        assert!(budgets.buffer(60));
        assert!(!budgets.buffer(41), "over the cap: nothing counted");
        assert!(budgets.buffer(40));
        budgets.unbuffer(100);
        assert_eq!(budgets.buffered.get(), 0);
    }

    #[test]
    fn http_requests_have_their_own_rate() {
        let admission = Admission::new(10, 10, 60, 2);
        let t0 = Instant::now();
        assert!(admission.allow_http_request(ip("10.0.0.1"), t0));
        assert!(admission.allow_http_request(ip("10.0.0.1"), t0));
        assert!(!admission.allow_http_request(ip("10.0.0.1"), t0));
        assert!(admission.allow_http_request(ip("10.0.0.2"), t0));
        assert!(admission.allow_handshake(ip("10.0.0.1"), t0));
    }
}
