//! Which live connections carry which (auth_key_id, session_id): the
//! gateway's half of the reverse path (`gateway_sendDataToGateway`).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::session::GatewayDelivery;

pub type ConnectionId = u64;

/// A connection's inbox for server messages (plaintext from the salt on).
pub type Outbox = mpsc::Sender<Bytes>;

/// (auth_key_id, session_id) → the connections carrying it, oldest first.
type SessionMap = HashMap<(i64, i64), Vec<(ConnectionId, Outbox)>>;

#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<SessionMap>,
}

impl Registry {
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
    /// room; never blocks and never duplicates.
    async fn send_data_to_gateway(
        &self,
        auth_key_id: i64,
        session_id: i64,
        payload: Bytes,
    ) -> bool {
        let candidates: Vec<Outbox> = match self.lock().get(&(auth_key_id, session_id)) {
            Some(conns) => conns.iter().rev().map(|(_, tx)| tx.clone()).collect(),
            None => return false,
        };
        candidates
            .into_iter()
            .any(|tx| tx.try_send(payload.clone()).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_newest_connection_with_room_and_reports_none() {
        let registry = Registry::default();
        let (old_tx, mut old_rx) = mpsc::channel(1);
        let (new_tx, mut new_rx) = mpsc::channel(1);
        assert!(registry.attach(1, 2, 10, &old_tx));
        assert!(!registry.attach(1, 2, 11, &new_tx));
        assert!(
            registry
                .send_data_to_gateway(1, 2, Bytes::from_static(b"a"))
                .await
        );
        assert_eq!(new_rx.recv().await.unwrap(), Bytes::from_static(b"a"));
        // The newest is full: the older one takes it.
        new_tx.try_send(Bytes::new()).unwrap();
        assert!(
            registry
                .send_data_to_gateway(1, 2, Bytes::from_static(b"b"))
                .await
        );
        assert_eq!(old_rx.recv().await.unwrap(), Bytes::from_static(b"b"));
        // Both full: not delivered.
        old_tx.try_send(Bytes::new()).unwrap();
        assert!(
            !registry
                .send_data_to_gateway(1, 2, Bytes::from_static(b"c"))
                .await
        );
        assert!(
            !registry
                .send_data_to_gateway(1, 3, Bytes::from_static(b"d"))
                .await
        );
        assert!(!registry.detach(1, 2, 11));
        assert!(registry.detach(1, 2, 10));
        assert_eq!(registry.session_count(), 0);
    }
}
