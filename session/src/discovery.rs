//! Session instances from Kubernetes: the gateway (and `mtproto-session`,
//! for its own ownership checks) watches the EndpointSlices of the session
//! Service and keeps the ring on its ready endpoints
//! (`podIP:port`, the strings teamgram sessions publish). An endpoint that
//! turns NotReady stays on the ring for a grace period so a blip does not
//! reshuffle ownership; one that disappears leaves at once; when the API
//! server is unreachable the last membership stays.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tracing::{info, warn};

/// Which Service to follow.
#[derive(Debug, Clone)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    /// The named port of the Service; `None` takes the slice's only port.
    pub port_name: Option<String>,
    /// How long a NotReady endpoint keeps its place on the ring.
    pub not_ready_grace: Duration,
}

/// The endpoints of a set of slices: address → ready. Terminating endpoints
/// (their pod is being deleted) are left out, so they leave the ring at once
/// instead of after the NotReady grace. A terminating session drops itself
/// too: what still reaches it is redirected to the new owner, which gateways
/// follow.
pub fn endpoints(
    slices: &BTreeMap<String, EndpointSlice>,
    port_name: Option<&str>,
) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for slice in slices.values() {
        let port = slice.ports.iter().flatten().find(|p| match port_name {
            Some(name) => p.name.as_deref() == Some(name),
            None => true,
        });
        let Some(port) = port.and_then(|p| p.port) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.as_ref();
            if conditions.and_then(|c| c.terminating) == Some(true) {
                continue;
            }
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            for address in &endpoint.addresses {
                let member = format!("{address}:{port}");
                let entry = out.entry(member).or_insert(false);
                *entry |= ready;
            }
        }
    }
    out
}

/// Ring membership with a grace period for NotReady endpoints (sans-IO: time is passed in).
#[derive(Debug, Default)]
pub struct Membership {
    members: BTreeSet<String>,
    not_ready_since: BTreeMap<String, Instant>,
}

impl Membership {
    pub fn members(&self) -> Vec<String> {
        self.members.iter().cloned().collect()
    }

    /// Applies what the slices say now; returns the new membership if it changed.
    pub fn update(
        &mut self,
        seen: &BTreeMap<String, bool>,
        grace: Duration,
        now: Instant,
    ) -> Option<Vec<String>> {
        let before = self.members.clone();
        self.not_ready_since
            .retain(|addr, _| seen.get(addr) == Some(&false));
        for (addr, &ready) in seen {
            if ready {
                self.members.insert(addr.clone());
                self.not_ready_since.remove(addr);
            } else if self.members.contains(addr) {
                self.not_ready_since.entry(addr.clone()).or_insert(now);
            }
        }
        self.members.retain(|addr| match seen.get(addr) {
            None => false,
            Some(true) => true,
            Some(false) => self
                .not_ready_since
                .get(addr)
                .is_some_and(|since| now.duration_since(*since) < grace),
        });
        (self.members != before).then(|| self.members())
    }
}

/// Retries of a failed watch: 200 ms doubling to at most 2 s (kube-runtime's
/// default goes to 30 s), so changes made while the API server was away reach
/// the ring soon after it is back. One watch per process keeps this cheap for
/// the API server.
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

/// Follows the Service's EndpointSlices until the process ends, handing each
/// new membership to `apply` (the gateway's routing ring, or a session's
/// ownership ring).
pub async fn run(client: Client, target: Target, apply: impl Fn(Vec<String>)) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &target.namespace);
    let config = watcher::Config::default()
        .labels(&format!("kubernetes.io/service-name={}", target.service));
    let mut events = watcher::watcher(api, config)
        .backoff(watch_backoff())
        .boxed();
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut pending: Option<BTreeMap<String, EndpointSlice>> = None;
    let mut membership = Membership::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let seen = tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Apply(slice) | Event::InitApply(slice))) => {
                    let name = slice.metadata.name.clone().unwrap_or_default();
                    match &mut pending {
                        Some(init) => { init.insert(name, slice); continue; }
                        None => { slices.insert(name, slice); }
                    }
                    endpoints(&slices, target.port_name.as_deref())
                }
                Some(Ok(Event::Delete(slice))) => {
                    slices.remove(&slice.metadata.name.clone().unwrap_or_default());
                    endpoints(&slices, target.port_name.as_deref())
                }
                Some(Ok(Event::Init)) => { pending = Some(BTreeMap::new()); continue; }
                Some(Ok(Event::InitDone)) => {
                    slices = pending.take().unwrap_or_default();
                    endpoints(&slices, target.port_name.as_deref())
                }
                Some(Err(e)) => {
                    warn!("EndpointSlice watch failed (keeping the last session list): {e}");
                    continue;
                }
                None => return,
            },
            _ = tick.tick() => endpoints(&slices, target.port_name.as_deref()),
        };
        if let Some(members) = membership.update(&seen, target.not_ready_grace, Instant::now()) {
            info!(service = %target.service, ?members, "session ring updated from EndpointSlices");
            apply(members);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(name: &str, port: (&str, i32), endpoints: &[(&str, bool)]) -> (String, EndpointSlice) {
        let s = EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port.0.into()),
                port: Some(port.1),
                ..Default::default()
            }]),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(addr, ready)| Endpoint {
                        addresses: vec![(*addr).into()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        };
        (name.into(), s)
    }

    #[test]
    fn members_are_pod_ip_colon_named_port_without_terminating_ones() {
        let mut slices: BTreeMap<_, _> = [
            slice(
                "a",
                ("grpc", 20120),
                &[("10.0.0.1", true), ("10.0.0.2", false)],
            ),
            slice("b", ("grpc", 20120), &[("10.0.0.3", true)]),
            slice("c", ("metrics", 9090), &[("10.0.0.9", true)]),
        ]
        .into_iter()
        .collect();
        // A pod being deleted: still serving, but already off the ring.
        if let Some(endpoints) = slices.get_mut("b").and_then(|s| s.endpoints.as_mut()) {
            endpoints.push(Endpoint {
                addresses: vec!["10.0.0.4".into()],
                conditions: Some(EndpointConditions {
                    ready: Some(false),
                    serving: Some(true),
                    terminating: Some(true),
                }),
                ..Default::default()
            });
        }
        let seen = endpoints(&slices, Some("grpc"));
        assert_eq!(
            seen,
            BTreeMap::from([
                ("10.0.0.1:20120".to_string(), true),
                ("10.0.0.2:20120".to_string(), false),
                ("10.0.0.3:20120".to_string(), true),
            ])
        );
    }

    #[test]
    fn a_brief_not_ready_keeps_the_member_and_removal_is_immediate() {
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut m = Membership::default();
        let both = BTreeMap::from([("a:1".to_string(), true), ("b:1".to_string(), true)]);
        assert_eq!(
            m.update(&both, grace, t0),
            Some(vec!["a:1".into(), "b:1".into()])
        );
        let b_not_ready = BTreeMap::from([("a:1".to_string(), true), ("b:1".to_string(), false)]);
        assert_eq!(
            m.update(&b_not_ready, grace, t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            m.update(&b_not_ready, grace, t0 + Duration::from_secs(4)),
            None
        );
        // Ready again inside the grace: nothing moved.
        assert_eq!(m.update(&both, grace, t0 + Duration::from_secs(5)), None);
        // NotReady for longer than the grace: it leaves.
        m.update(&b_not_ready, grace, t0 + Duration::from_secs(10));
        assert_eq!(
            m.update(&b_not_ready, grace, t0 + Duration::from_secs(16)),
            Some(vec!["a:1".into()])
        );
        // An endpoint that disappears leaves at once; a new one joins at once.
        let c_only = BTreeMap::from([("c:1".to_string(), true)]);
        assert_eq!(
            m.update(&c_only, grace, t0 + Duration::from_secs(17)),
            Some(vec!["c:1".into()])
        );
        // A NotReady endpoint that was never a member does not join.
        let d = BTreeMap::from([("c:1".to_string(), true), ("d:1".to_string(), false)]);
        assert_eq!(m.update(&d, grace, t0 + Duration::from_secs(18)), None);
    }
}
