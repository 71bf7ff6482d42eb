//! Leader election on a `coordination.k8s.io` Lease, so several operator replicas can run
//! and exactly one reconciles. kube has no elector of its own (kube#485); this wraps
//! `kube-leader-election`'s `LeaseLock` with the acquire/hold loop an operator needs.

use std::time::{Duration, Instant};

use kube::Client;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tracing::{info, warn};

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a lease stays valid without renewal; a standby takes over after this.
    pub ttl: Duration,
    /// How often the leader renews and a standby retries.
    pub retry: Duration,
}

impl Timing {
    /// Renew three times per TTL, so one or two failed renewals do not lose the lease.
    pub fn from_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            retry: ttl / 3,
        }
    }
}

/// One candidate for the lease.
pub struct Elector {
    lock: LeaseLock,
    timing: Timing,
    identity: String,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("identity", &self.identity)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl Elector {
    /// A candidate named `identity` for Lease `namespace/name`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        let lock = LeaseLock::new(
            client,
            namespace,
            LeaseLockParams {
                lease_name: name.to_owned(),
                holder_id: identity.to_owned(),
                lease_ttl: timing.ttl,
            },
        );
        Self {
            lock,
            timing,
            identity: identity.to_owned(),
        }
    }

    /// Returns once this candidate holds the lease.
    pub async fn acquire(&self) {
        let mut logged_holder = None;
        loop {
            match self.lock.try_acquire_or_renew().await {
                Ok(LeaseLockResult::Acquired(_)) => {
                    info!(identity = %self.identity, "acquired leadership");
                    return;
                }
                Ok(LeaseLockResult::NotAcquired(lease)) => {
                    let holder = lease.spec.and_then(|s| s.holder_identity);
                    if holder != logged_holder {
                        info!(holder = ?holder, "standing by; lease held elsewhere");
                        logged_holder = holder;
                    }
                }
                Err(e) => warn!(error = %e, "lease acquisition failed"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the lease; returns (with the reason) only when leadership is lost. A leader
    /// that cannot renew gives up before its lease could expire, so two leaders never
    /// overlap by more than clock skew.
    pub async fn hold(&self) -> String {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.lock.try_acquire_or_renew().await {
                Ok(LeaseLockResult::Acquired(_)) => last_renewed = Instant::now(),
                Ok(LeaseLockResult::NotAcquired(lease)) => {
                    let holder = lease
                        .spec
                        .and_then(|s| s.holder_identity)
                        .unwrap_or_default();
                    return format!("lease taken by {holder:?}");
                }
                Err(e) => {
                    warn!(error = %e, "lease renewal failed");
                    if last_renewed.elapsed() + self.timing.retry >= self.timing.ttl {
                        return format!("could not renew the lease within its TTL: {e}");
                    }
                }
            }
        }
    }

    /// Hands the lease back so a standby takes over without waiting for expiry.
    pub async fn release(&self) {
        match self.lock.step_down().await {
            Ok(()) => info!("released leadership"),
            Err(e) => {
                warn!(error = %e, "releasing the lease failed; a standby takes over after its TTL")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_leaves_room_for_failures() {
        let t = Timing::from_ttl(Duration::from_secs(15));
        assert_eq!(t.retry, Duration::from_secs(5));
        assert!(t.retry * 2 < t.ttl);
    }
}
