//! Which live connections carry which (auth_key_id, session_id): the
//! gateway's half of the reverse path (`gateway_sendDataToGateway`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::outbox::{Outbox, Refused};
use bytes::Bytes;

use crate::metrics::{GaugeGuard, Metrics, ReasonLabels};
use mtproto_core::connection::Attached;
use mtproto_session::GatewayDelivery;

pub type ConnectionId = u64;

/// A server message for a connection.
#[derive(Debug)]
pub struct Outgoing {
    /// Plaintext from the salt on; the connection encrypts it with its key.
    pub payload: Bytes,
    /// Counts the message as queued until the connection takes it (or drops it).
    pub queued: GaugeGuard,
}

/// (auth_key_id, session_id) → the connections carrying it, oldest first;
/// and how many sessions each key has.
#[derive(Debug, Default)]
struct SessionMap {
    sessions: HashMap<(i64, i64), Vec<(ConnectionId, Outbox)>>,
    per_key: HashMap<i64, usize>,
}

#[derive(Debug)]
pub struct Registry {
    map: Mutex<SessionMap>,
    /// Distinct sessions one auth key may have across all connections (the
    /// client picks session ids freely, and each costs registry and session memory).
    max_sessions_per_key: usize,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, max_sessions_per_key: usize) -> Self {
        Self {
            map: Mutex::default(),
            max_sessions_per_key,
            metrics,
        }
    }

    /// Counts a server message no connection took.
    pub fn dropped(&self, reason: &'static str) -> bool {
        self.metrics
            .server_messages_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `conn` carries this session: [`Attached::New`] when the
    /// session was not on this gateway before (teamgram's `conn_type = 1`),
    /// [`Attached::KeyFull`] (and nothing recorded) when it is new and its
    /// key has `max_sessions_per_key` already.
    pub fn attach(
        &self,
        auth_key_id: i64,
        session_id: i64,
        conn: ConnectionId,
        outbox: &Outbox,
    ) -> Attached {
        let mut guard = self.lock();
        let map = &mut *guard;
        let of_key = map.per_key.get(&auth_key_id).copied().unwrap_or(0);
        let entry = match map.sessions.get_mut(&(auth_key_id, session_id)) {
            Some(entry) => entry,
            None if of_key >= self.max_sessions_per_key => return Attached::KeyFull(of_key),
            None => {
                map.per_key.insert(auth_key_id, of_key + 1);
                map.sessions.entry((auth_key_id, session_id)).or_default()
            }
        };
        let attached = if entry.is_empty() {
            Attached::New
        } else {
            Attached::Known
        };
        if !entry.iter().any(|(id, _)| *id == conn) {
            entry.push((conn, outbox.clone()));
        }
        self.metrics.sessions.set(map.sessions.len() as i64);
        attached
    }

    /// Removes `conn` from a session; true when it was the session's last connection here.
    pub fn detach(&self, auth_key_id: i64, session_id: i64, conn: ConnectionId) -> bool {
        let mut guard = self.lock();
        let map = &mut *guard;
        let Some(entry) = map.sessions.get_mut(&(auth_key_id, session_id)) else {
            return false;
        };
        entry.retain(|(id, _)| *id != conn);
        if !entry.is_empty() {
            return false;
        }
        map.sessions.remove(&(auth_key_id, session_id));
        if let Some(n) = map.per_key.get_mut(&auth_key_id) {
            *n -= 1;
            if *n == 0 {
                map.per_key.remove(&auth_key_id);
            }
        }
        self.metrics.sessions.set(map.sessions.len() as i64);
        true
    }
}

impl Registry {
    /// Queues the message for the newest live connection of the session that
    /// has room (never two), without waiting for any client: true means a
    /// connection took it; a full outbox (a client that does not read) is
    /// "not delivered" at once.
    pub fn deliver(&self, auth_key_id: i64, session_id: i64, payload: Bytes) -> bool {
        let map = self.lock();
        let Some(conns) = map.sessions.get(&(auth_key_id, session_id)) else {
            drop(map);
            return self.dropped("no_connection");
        };
        let (mut payload, mut full) = (payload, false);
        for (_, tx) in conns.iter().rev() {
            let outgoing = Outgoing {
                payload,
                queued: GaugeGuard::new(&self.metrics.outbox_queued),
            };
            // A refused message comes back, and goes on to the next connection.
            payload = match tx.try_send(outgoing) {
                Ok(()) => return true,
                Err(Refused::Full(back)) => {
                    full = true;
                    back.payload
                }
                // A connection that is closing (a drained one, before it leaves the registry).
                Err(Refused::Closed(back)) => back.payload,
            };
        }
        drop(map);
        self.dropped(if full { "outbox_full" } else { "no_connection" })
    }
}

/// The embedded session's reply path.
impl GatewayDelivery for Registry {
    fn send_data_to_gateway(
        &self,
        _server_id: &str,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool {
        self.deliver(auth_key_id, session_id, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::outbox;

    #[tokio::test]
    async fn queues_once_for_the_newest_connection_without_waiting() {
        let registry = Registry::new(Arc::default(), 8);
        let (old_tx, mut old_rx) = outbox::channel(1);
        let (new_tx, mut new_rx) = outbox::channel(1);
        assert_eq!(registry.attach(1, 2, 10, &old_tx), Attached::New);
        assert_eq!(registry.attach(1, 2, 11, &new_tx), Attached::Known);
        // Nobody reads the outboxes: delivery still returns at once.
        assert!(registry.send_data_to_gateway("", 1, 2, Bytes::from_static(b"a")));
        assert_eq!(new_rx.try_recv().unwrap().payload, Bytes::from_static(b"a"));
        assert!(old_rx.try_recv().is_none());
        assert!(!registry.send_data_to_gateway("", 1, 3, Bytes::from_static(b"d")));
        assert!(!registry.detach(1, 2, 11));
        assert!(registry.detach(1, 2, 10));
        assert_eq!(registry.metrics.sessions.get(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_is_not_delivered_and_counted() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(metrics.clone(), 8);
        // A client that stopped reading: its outbox holds one message and is full.
        let (tx, _rx) = outbox::channel(1);
        registry.attach(5, 6, 20, &tx);
        assert!(registry.send_data_to_gateway("", 5, 6, Bytes::from_static(b"x")));
        assert!(!registry.send_data_to_gateway("", 5, 6, Bytes::from_static(b"y")));
        assert!(!registry.send_data_to_gateway("", 7, 8, Bytes::from_static(b"z")));
        assert_eq!(metrics.outbox_queued.get(), 1);
        for reason in ["outbox_full", "no_connection"] {
            let dropped = metrics
                .server_messages_dropped
                .get_or_create(&ReasonLabels { reason })
                .get();
            assert_eq!(dropped, 1, "{reason}");
        }
    }

    #[tokio::test]
    async fn a_refused_message_goes_on_to_the_older_connection() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(metrics.clone(), 8);
        let (old_tx, mut old_rx) = outbox::channel(1);
        let (new_tx, mut new_rx) = outbox::channel(1);
        registry.attach(5, 6, 20, &old_tx);
        registry.attach(5, 6, 21, &new_tx);
        assert!(registry.send_data_to_gateway("", 5, 6, Bytes::from_static(b"first")));
        // The newest connection's outbox is full now: the next message is
        // refused there and taken, whole, by the older one.
        assert!(registry.send_data_to_gateway("", 5, 6, Bytes::from_static(b"second")));
        assert_eq!(
            new_rx.try_recv().unwrap().payload,
            Bytes::from_static(b"first")
        );
        assert_eq!(
            old_rx.try_recv().unwrap().payload,
            Bytes::from_static(b"second")
        );
        assert_eq!(metrics.outbox_queued.get(), 0);
    }

    #[tokio::test]
    async fn a_closing_connection_takes_nothing_and_is_not_full() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(metrics.clone(), 8);
        let (tx, mut rx) = outbox::channel(4);
        registry.attach(5, 6, 20, &tx);
        // A drained connection closes its outbox before it leaves the registry.
        rx.close();
        assert!(!registry.send_data_to_gateway("", 5, 6, Bytes::from_static(b"x")));
        let dropped = |reason| {
            metrics
                .server_messages_dropped
                .get_or_create(&ReasonLabels { reason })
                .get()
        };
        assert_eq!((dropped("no_connection"), dropped("outbox_full")), (1, 0));
        assert_eq!(metrics.outbox_queued.get(), 0);
    }

    #[test]
    fn sessions_per_key_are_capped_across_connections() {
        let registry = Registry::new(Arc::default(), 2);
        let (tx, _rx) = outbox::channel(1);
        assert_eq!(registry.attach(1, 10, 100, &tx), Attached::New);
        assert_eq!(registry.attach(1, 11, 101, &tx), Attached::New);
        // A third session of key 1, on any connection, is refused; known
        // sessions and other keys are not.
        assert_eq!(registry.attach(1, 12, 102, &tx), Attached::KeyFull(2));
        assert_eq!(registry.attach(1, 10, 102, &tx), Attached::Known);
        assert_eq!(registry.attach(2, 12, 102, &tx), Attached::New);
        assert!(!registry.detach(1, 10, 100));
        assert!(registry.detach(1, 10, 102));
        assert_eq!(registry.attach(1, 12, 102, &tx), Attached::New);
        assert_eq!(registry.metrics.sessions.get(), 3);
    }
}
