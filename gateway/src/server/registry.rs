//! Which live connections carry which (auth_key_id, session_id): the
//! gateway's half of the reverse path (`gateway_sendDataToGateway`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{GaugeGuard, Metrics, ReasonLabels};
use crate::session::GatewayDelivery;

pub type ConnectionId = u64;

/// A server message for a connection, with a way to say it was written.
#[derive(Debug)]
pub struct Outgoing {
    /// Plaintext from the salt on; the connection encrypts it with its key.
    pub payload: Bytes,
    /// Completed once the frame is written to the client's socket.
    pub written: oneshot::Sender<()>,
    /// Counts the message as queued until the connection takes it (or drops it).
    pub queued: GaugeGuard,
}

/// A connection's inbox for server messages.
pub type Outbox = mpsc::Sender<Outgoing>;

/// (auth_key_id, session_id) → the connections carrying it, oldest first.
type SessionMap = HashMap<(i64, i64), Vec<(ConnectionId, Outbox)>>;

#[derive(Debug)]
pub struct Registry {
    sessions: Mutex<SessionMap>,
    /// How long a delivery waits for the connection to write the message.
    write_wait: Duration,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(write_wait: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            sessions: Mutex::default(),
            write_wait,
            metrics,
        }
    }

    /// Counts a server message no connection wrote.
    fn dropped(&self, reason: &'static str) -> bool {
        self.metrics
            .server_messages_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `conn` carries this session. Returns true when the session
    /// was not on this gateway before (teamgram's `conn_type = 1`).
    pub fn attach(
        &self,
        auth_key_id: i64,
        session_id: i64,
        conn: ConnectionId,
        outbox: &Outbox,
    ) -> bool {
        let mut map = self.lock();
        let entry = map.entry((auth_key_id, session_id)).or_default();
        let is_new = entry.is_empty();
        if !entry.iter().any(|(id, _)| *id == conn) {
            entry.push((conn, outbox.clone()));
        }
        is_new
    }

    /// Removes `conn` from a session; true when it was the session's last connection here.
    pub fn detach(&self, auth_key_id: i64, session_id: i64, conn: ConnectionId) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(&(auth_key_id, session_id)) else {
            return false;
        };
        entry.retain(|(id, _)| *id != conn);
        if entry.is_empty() {
            map.remove(&(auth_key_id, session_id));
            true
        } else {
            false
        }
    }

    pub fn session_count(&self) -> usize {
        self.lock().len()
    }
}

#[async_trait]
impl GatewayDelivery for Registry {
    /// Hands the message to the newest live connection of the session that has
    /// room (never to two) and reports whether that connection wrote it.
    async fn send_data_to_gateway(
        &self,
        _server_id: &str,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool {
        let candidates: Vec<Outbox> = match self.lock().get(&(auth_key_id, session_id)) {
            Some(conns) => conns.iter().rev().map(|(_, tx)| tx.clone()).collect(),
            None => return self.dropped("no_connection"),
        };
        for tx in candidates {
            let (written, done) = oneshot::channel();
            let outgoing = Outgoing {
                payload: payload.clone(),
                written,
                queued: GaugeGuard::new(&self.metrics.outbox_queued),
            };
            if tx.try_send(outgoing).is_ok() {
                return match tokio::time::timeout(self.write_wait, done).await {
                    Ok(Ok(())) => true,
                    _ => self.dropped("not_written"),
                };
            }
        }
        self.dropped("outbox_full")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acts as a connection that writes everything it is given.
    fn writer(mut rx: mpsc::Receiver<Outgoing>, seen: mpsc::UnboundedSender<Bytes>) {
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let _ = seen.send(out.payload);
                let _ = out.written.send(());
            }
        });
    }

    #[tokio::test]
    async fn delivers_once_to_the_newest_connection_that_writes() {
        let registry = Registry::new(Duration::from_secs(1), Arc::default());
        let (old_tx, old_rx) = mpsc::channel(1);
        let (new_tx, new_rx) = mpsc::channel(1);
        let (seen_old, mut old_seen) = mpsc::unbounded_channel();
        let (seen_new, mut new_seen) = mpsc::unbounded_channel();
        writer(old_rx, seen_old);
        writer(new_rx, seen_new);
        assert!(registry.attach(1, 2, 10, &old_tx));
        assert!(!registry.attach(1, 2, 11, &new_tx));
        assert!(
            registry
                .send_data_to_gateway("", 1, 2, Bytes::from_static(b"a"))
                .await
        );
        assert_eq!(new_seen.recv().await.unwrap(), Bytes::from_static(b"a"));
        assert!(old_seen.try_recv().is_err());
        assert!(
            !registry
                .send_data_to_gateway("", 1, 3, Bytes::from_static(b"d"))
                .await
        );
        assert!(!registry.detach(1, 2, 11));
        assert!(registry.detach(1, 2, 10));
        assert_eq!(registry.session_count(), 0);
    }

    #[tokio::test]
    async fn not_written_is_not_delivered() {
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new(Duration::from_millis(50), metrics.clone());
        // A connection that takes the message but never writes it (dead socket).
        let (tx, mut rx) = mpsc::channel::<Outgoing>(4);
        registry.attach(1, 2, 10, &tx);
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                drop(out.written);
            }
        });
        assert!(
            !registry
                .send_data_to_gateway("", 1, 2, Bytes::from_static(b"x"))
                .await
        );
        // A full outbox is skipped, not waited on.
        let (full_tx, _full_rx) = mpsc::channel::<Outgoing>(1);
        let (w, _) = oneshot::channel();
        full_tx
            .try_send(Outgoing {
                payload: Bytes::new(),
                written: w,
                queued: GaugeGuard::new(&metrics.outbox_queued),
            })
            .unwrap();
        registry.attach(5, 6, 20, &full_tx);
        assert!(
            !registry
                .send_data_to_gateway("", 5, 6, Bytes::from_static(b"y"))
                .await
        );
        assert!(
            !registry
                .send_data_to_gateway("", 7, 8, Bytes::from_static(b"z"))
                .await
        );
        // The message sitting in the full outbox is the only one queued.
        assert_eq!(metrics.outbox_queued.get(), 1);
        for reason in ["not_written", "outbox_full", "no_connection"] {
            let dropped = metrics
                .server_messages_dropped
                .get_or_create(&ReasonLabels { reason })
                .get();
            assert_eq!(dropped, 1, "{reason}");
        }
    }
}
