//! What the stream and HTTP shells share around the connection core:
//! admission, running the core's actions (key lookups, handshake steps on
//! the blocking pool, key stores, forwards), and counting its events.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use super::limiter::{Budgets, HandshakeSlot, Refusal, Slot};
use super::outbox::{self, Inbox, Outbox};
use super::registry::ConnectionId;
use super::{Endpoint, Shared};
use crate::config::ProxyProtocol;
use crate::metrics::{
    Metrics, OpenLabels, OutcomeLabels, ReasonLabels, StepLabels, StepOutcomeLabels,
};
use mtproto_core::connection::{
    Attached, Close, Event, Forward, Forwarded, HandshakeJob, Host, KeyLookup, Now,
};
use mtproto_core::handshake::{HandshakeError, NewAuthKey, StoreOutcome};
use mtproto_core::proxy::{self, Detected};
use mtproto_core::transport::error_code;
use mtproto_session::store::StoreError;
use mtproto_session::{SessionClientData, SessionError};

/// The shell's clock, as the core takes it.
pub(super) fn now() -> Now {
    Now {
        instant: Instant::now().into_std(),
        unix: crate::unix_time(),
    }
}

/// Bytes taken by one read into a connection that holds no read buffer.
const FIRST_READ: usize = 1024;

/// Reads into `input`. With no room there (the core keeps no read buffer
/// between frames), the read goes to a buffer on the stack that lives only
/// for one poll and what came is copied in, so an idle connection waits for
/// its next bytes holding no memory for them. Cancel-safe.
pub(super) async fn read_input<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
) -> io::Result<usize> {
    if input.capacity() > input.len() {
        return reader.read_buf(input).await;
    }
    poll_fn(|cx| {
        let mut chunk = [MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut *reader).poll_read(cx, &mut buf))?;
        input.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    })
    .await
}

/// Holds the connection's place in `mtproto_connections_open`, under its
/// transport's name once the first bytes tell it.
pub(super) struct OpenGauge {
    metrics: Arc<Metrics>,
    labels: OpenLabels,
}

impl OpenGauge {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        listener: &'static str,
        transport: &'static str,
    ) -> Self {
        let labels = OpenLabels {
            listener,
            transport,
        };
        metrics.connections_open.get_or_create(&labels).inc();
        Self { metrics, labels }
    }

    pub(super) fn set_transport(&mut self, transport: &'static str) {
        if self.labels.transport != transport {
            self.metrics
                .connections_open
                .get_or_create(&self.labels)
                .dec();
            self.labels.transport = transport;
            self.metrics
                .connections_open
                .get_or_create(&self.labels)
                .inc();
        }
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .get_or_create(&self.labels)
            .dec();
    }
}

/// A connection past admission.
pub(super) struct Admitted {
    pub id: ConnectionId,
    /// The client's address: the PROXY header's source, else the socket peer.
    pub peer: SocketAddr,
    pub stream: TcpStream,
    /// Bytes read after the PROXY header.
    pub buf: BytesMut,
    pub accepted: Instant,
}

/// Reads the PROXY header the listener expects, then counts the connection
/// against its client address (`slot`, which the caller keeps for the
/// connection's life). A refused connection is counted, logged and closed.
pub(super) async fn admit(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: &mut Slot,
    endpoint: &Endpoint,
) -> Option<Admitted> {
    let mut admitted = Admitted {
        id: shared.connection_ids.next(),
        peer,
        stream,
        buf: BytesMut::new(),
        accepted: Instant::now(),
    };
    let deadline = admitted.accepted + shared.limits.connection.handshake_timeout;
    match read_proxy_header(shared, &mut admitted, endpoint, deadline).await {
        Ok(()) => match shared.admission.enter_client(slot, admitted.peer.ip()) {
            Ok(()) => return Some(admitted),
            Err(_) => count_close(shared, admitted.id, admitted.peer, &Close::ClientLimit),
        },
        Err(close) => count_close(shared, admitted.id, admitted.peer, &close),
    }
    stream = admitted.stream;
    let _ = tokio::time::timeout(shared.limits.connection.write_timeout, stream.shutdown()).await;
    None
}

/// Reads the PROXY header, if the listener takes one; its source replaces
/// the peer when the socket peer is a trusted source. An untrusted peer is
/// closed where a header is required, and has its header skipped (counted)
/// where it is optional, so no client can choose its own address.
async fn read_proxy_header(
    shared: &Shared,
    conn: &mut Admitted,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<(), Close> {
    let mode = endpoint.proxy_protocol;
    if mode == ProxyProtocol::Off {
        return Ok(());
    }
    let trusted = endpoint.proxy_trusted_sources.is_empty()
        || endpoint
            .proxy_trusted_sources
            .iter()
            .any(|net| net.contains(&conn.peer.ip()));
    if !trusted && mode == ProxyProtocol::Required {
        debug!(conn = conn.id, socket_peer = %conn.peer, "not a trusted PROXY source");
        return Err(proxy_refused(shared, conn.id, Close::ProxyHeaderMissing));
    }
    let (id, buf) = (conn.id, &mut conn.buf);
    let detected = loop {
        match proxy::detect(buf) {
            Ok(Detected::NeedMore) => {}
            Ok(detected) => break detected,
            Err(e) => return Err(proxy_refused(shared, id, Close::ProxyHeader(e))),
        }
        let read = tokio::select! {
            read = conn.stream.read_buf(buf) => read,
            _ = sleep_until(deadline) => return Err(Close::HandshakeTimeout),
        };
        match read {
            Ok(0) => return Err(Close::ClientClosed),
            Ok(_) => {}
            Err(e) => return Err(Close::Read(e)),
        }
    };
    match detected {
        Detected::Header(header) => {
            buf.advance(header.len);
            if !trusted {
                shared.metrics.proxy_headers_untrusted.inc();
                debug!(conn = id, socket_peer = %conn.peer, "PROXY header from an untrusted source ignored");
                return Ok(());
            }
            if let Some(source) = header.source {
                debug!(conn = id, socket_peer = %conn.peer, client = %source, "PROXY header");
                conn.peer = source;
            }
            Ok(())
        }
        _ if mode == ProxyProtocol::Required => {
            Err(proxy_refused(shared, id, Close::ProxyHeaderMissing))
        }
        _ => Ok(()),
    }
}

/// Counts a refused PROXY header; the reason is logged when the connection closes.
fn proxy_refused(shared: &Shared, id: ConnectionId, close: Close) -> Close {
    let total = shared.admission.refused.count(Refusal::ProxyHeader);
    debug!(conn = id, refused_total = total, "PROXY header refused");
    close
}

/// Counts and logs why a connection (or an HTTP request) ended.
pub(super) fn count_close(shared: &Shared, id: ConnectionId, peer: SocketAddr, close: &Close) {
    count_closed(shared, close.reason());
    count_limit_of(shared, close);
    if close.code() == Some(error_code::AUTH_KEY_NOT_FOUND) {
        return count_404(shared, id, peer, close);
    }
    match close {
        Close::ClientClosed | Close::Shutdown => debug!(conn = id, %peer, "closed: {close}"),
        Close::ClientLimit => {
            let total = shared.admission.refused.total(Refusal::ClientFull);
            debug!(conn = id, %peer, refused_total = total, "closed: {close}");
        }
        _ => info!(conn = id, %peer, "closed: {close}"),
    }
}

/// Counts and logs a −404 sent for `close`.
pub(super) fn count_404(shared: &Shared, id: ConnectionId, peer: SocketAddr, close: &Close) {
    shared.keys.cache.stats.not_found_sent.inc();
    info!(conn = id, %peer, "sent -404: {close}");
}

/// Adds one to `mtproto_limit_exceeded_total{limit}` when `close` is one of
/// the gateway's budgets biting.
pub(super) fn count_limit_of(shared: &Shared, close: &Close) {
    let limit = match close {
        Close::HandshakesBusy => "max_handshakes_in_progress",
        Close::BufferBudget => "max_buffered_bytes",
        Close::FrameTimeout => "frame_timeout_secs",
        Close::KeySessionsFull(_) => "max_sessions_per_auth_key",
        _ => return,
    };
    count_limit(shared, limit);
}

/// Adds one to `mtproto_limit_exceeded_total{limit}` (the setting's name).
pub(super) fn count_limit(shared: &Shared, limit: &'static str) {
    shared
        .metrics
        .limit_exceeded
        .get_or_create(&crate::metrics::LimitLabels { limit })
        .inc();
}

/// Adds one to `mtproto_connections_closed_total{reason}`.
pub(super) fn count_closed(shared: &Shared, reason: &'static str) {
    shared
        .metrics
        .connections_closed
        .get_or_create(&ReasonLabels { reason })
        .inc();
}

/// Counts what the core reports.
pub(super) fn record(metrics: &Metrics, open: Option<&mut OpenGauge>, event: Event) {
    match event {
        Event::Transport(name) => {
            if let Some(open) = open {
                open.set_transport(name);
            }
        }
        Event::HandshakeStep {
            step,
            outcome,
            elapsed,
        } => {
            metrics
                .handshake_step_duration
                .get_or_create(&StepLabels { step })
                .observe(elapsed.as_secs_f64());
            metrics
                .handshake_steps
                .get_or_create(&StepOutcomeLabels { step, outcome })
                .inc();
        }
        Event::RsaDecrypt(elapsed) => {
            metrics.rsa_decrypt_duration.observe(elapsed.as_secs_f64());
        }
        Event::Handshake { outcome, elapsed } => {
            metrics
                .handshakes
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
            if let Some(elapsed) = elapsed {
                metrics.handshake_duration.observe(elapsed.as_secs_f64());
            }
        }
        Event::QuickAck => {
            metrics.quick_acks_sent.inc();
        }
        Event::ServerMessage => {
            metrics.messages_sent.inc();
        }
    }
}

/// What one connection (or HTTP handshake) holds of the gateway-wide
/// budgets; all of it is given back when this drops.
#[derive(Debug)]
pub(super) struct Held {
    budgets: Arc<Budgets>,
    handshake: Option<HandshakeSlot>,
    buffered: usize,
}

impl Held {
    pub(super) fn new(budgets: Arc<Budgets>) -> Self {
        Self {
            budgets,
            handshake: None,
            buffered: 0,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budgets.unbuffer(self.buffered);
    }
}

/// A stream connection's queue of server messages, made when its first
/// session attaches: connections without a key (the cheap ones to open in
/// numbers) do not hold a channel.
#[derive(Debug)]
pub(super) struct LazyOutbox {
    capacity: usize,
    channel: Option<(Outbox, Inbox)>,
}

impl LazyOutbox {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            channel: None,
        }
    }

    fn sender(&mut self) -> &Outbox {
        let capacity = self.capacity;
        &self
            .channel
            .get_or_insert_with(|| outbox::channel(capacity))
            .0
    }

    /// The receiving end, once made.
    pub(super) fn inbox(&mut self) -> Option<&mut Inbox> {
        self.channel.as_mut().map(|(_, inbox)| inbox)
    }
}

/// The core's view of the gateway's shared state for one client.
pub(super) struct GatewayHost<'a> {
    pub shared: &'a Shared,
    pub id: ConnectionId,
    pub peer: SocketAddr,
    /// Where the registry sends this connection's server messages (stream connections).
    pub outbox: Option<&'a mut LazyOutbox>,
    pub held: &'a mut Held,
}

impl Host for GatewayHost<'_> {
    fn allow_handshake(&mut self) -> bool {
        let allowed = self
            .shared
            .admission
            .allow_handshake(self.peer.ip(), std::time::Instant::now());
        if !allowed {
            let total = self.shared.admission.refused.count(Refusal::HandshakeFlood);
            debug!(conn = self.id, peer = %self.peer, refused_total = total, "handshake rate exceeded");
        }
        allowed
    }

    fn begin_handshake(&mut self) -> bool {
        self.held.handshake = self.shared.budgets.begin_handshake();
        if self.held.handshake.is_none() {
            debug!(conn = self.id, peer = %self.peer, "handshakes in progress at limits.max_handshakes_in_progress");
        }
        self.held.handshake.is_some()
    }

    fn end_handshake(&mut self) {
        self.held.handshake = None;
    }

    fn attach_session(&mut self, auth_key_id: i64, session_id: i64) -> Attached {
        match self.outbox.as_mut() {
            Some(outbox) => {
                self.shared
                    .registry
                    .attach(auth_key_id, session_id, self.id, outbox.sender())
            }
            None => Attached::Known,
        }
    }

    fn buffer_grew(&mut self, bytes: usize) -> bool {
        if !self.shared.budgets.buffer(bytes) {
            debug!(conn = self.id, peer = %self.peer, "buffered input at limits.max_buffered_bytes");
            return false;
        }
        self.held.buffered += bytes;
        true
    }

    fn buffer_shrank(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held.buffered);
        self.held.buffered -= bytes;
        self.shared.budgets.unbuffer(bytes);
    }
}

/// Finds a key: the cache, then the key source behind it.
pub(super) async fn lookup_key(shared: &Shared, auth_key_id: i64) -> KeyLookup {
    match shared
        .keys
        .cache
        .get(auth_key_id, shared.keys.source.as_ref())
        .await
    {
        Ok(Some(info)) => KeyLookup::Found(info),
        Ok(None) => KeyLookup::NotFound,
        Err(e) => KeyLookup::Failed(e.0),
    }
}

/// Runs a heavy handshake step (RSA, 2048-bit modpow) on a handshake thread.
pub(super) async fn compute(
    shared: &Shared,
    mut job: Box<HandshakeJob>,
) -> Result<Box<HandshakeJob>, Close> {
    on_handshake_thread(&shared.handshake_pool, move || {
        job.run(&mut rand::thread_rng());
        job
    })
    .await
    .ok_or(Close::Handshake(HandshakeError::OutOfOrder(
        "blocking task",
        "aborted",
    )))
}

/// Where handshakes compute: the main runtime's blocking pool, whichever
/// event loop a connection is on (each loop's runtime has a pool of its own).
#[derive(Debug)]
pub struct HandshakePool {
    /// One per computation at once (`runtime.handshake_threads`).
    threads: Arc<Semaphore>,
    runtime: Handle,
}

impl HandshakePool {
    /// A pool of `threads` on the calling runtime.
    pub fn new(threads: usize) -> Self {
        Self {
            threads: Arc::new(Semaphore::new(threads)),
            runtime: Handle::current(),
        }
    }
}

/// Runs `work` on the pool's blocking threads once one of its permits is
/// free, so handshakes compute on at most that many threads at once
/// (tokio's pool alone would start up to 512). The work holds its permit
/// until it ends, even if its connection closes and stops waiting for it.
/// `None` if the work did not finish.
async fn on_handshake_thread<T: Send + 'static>(
    pool: &HandshakePool,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let thread = pool.threads.clone().acquire_owned().await.ok()?;
    pool.runtime
        .spawn_blocking(move || {
            let _thread = thread;
            work()
        })
        .await
        .ok()
}

/// Stores a new key (the configured store, else the session) and caches it.
pub(super) async fn store_key(shared: &Shared, id: ConnectionId, key: NewAuthKey) -> StoreOutcome {
    let stored = match &shared.keys.writer {
        Some(store) => match store.insert(key.info.clone(), key.first_salt).await {
            Ok(()) => Ok(StoreOutcome::Stored),
            Err(StoreError::Collision(_)) => Ok(StoreOutcome::Collision),
            Err(e) => Err(e.to_string()),
        },
        None => shared
            .session
            .set_auth_key(&key)
            .await
            .map_err(|e| e.to_string()),
    };
    let outcome = stored.unwrap_or_else(|e| {
        warn!(
            conn = id,
            auth_key_id = key.info.id(),
            "storing new auth key failed: {e}"
        );
        StoreOutcome::Failed
    });
    if outcome == StoreOutcome::Stored {
        info!(
            conn = id,
            auth_key_id = key.info.id(),
            key_type = ?key.info.key_type,
            "auth key created"
        );
        shared.keys.cache.insert(key.info).await;
    }
    outcome
}

/// teamgram's `SessionClientData` for a forward from the core.
pub(super) fn client_data(
    shared: &Shared,
    client_ip: Arc<str>,
    forward: Forward,
) -> SessionClientData {
    SessionClientData {
        server_id: shared.server_id.clone(),
        conn_type: forward.conn_type,
        auth_key_id: forward.auth_key_id,
        key_type: forward.key_type,
        perm_auth_key_id: forward.perm_auth_key_id,
        session_id: forward.session_id,
        client_ip,
        quick_ack: 0,
        salt: forward.salt,
        payload: forward.payload,
    }
}

/// Hands one message to the session and says how it went.
pub(super) async fn forward(shared: Arc<Shared>, data: SessionClientData) -> Forwarded {
    let sent = shared.session.send_data(data).await;
    forwarded(&shared, sent)
}

/// Hands a connection's messages to the session together and says how each
/// went, in order.
pub(super) async fn forward_all(
    shared: Arc<Shared>,
    data: Vec<SessionClientData>,
) -> Vec<Forwarded> {
    let sent = shared.session.send_data_batch(data).await;
    sent.into_iter()
        .map(|sent| forwarded(&shared, sent))
        .collect()
}

fn forwarded(shared: &Shared, sent: Result<(), SessionError>) -> Forwarded {
    match sent {
        Ok(()) => {
            shared.metrics.messages_forwarded.inc();
            Forwarded::Accepted
        }
        Err(SessionError::AuthKeyUnregistered) => Forwarded::UnknownKey,
        Err(e) => Forwarded::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_work_runs_on_at_most_the_permitted_threads() {
        let threads = Arc::new(HandshakePool::new(2));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..8)
            .map(|i| {
                let (threads, running, most) = (threads.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    on_handshake_thread(&threads, move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, Ordering::SeqCst);
                        i
                    })
                    .await
                })
            })
            .collect();
        for (i, job) in jobs.into_iter().enumerate() {
            assert_eq!(job.await.expect("joined"), Some(i));
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=2).contains(&most), "{most} ran at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_connection_stopped_waiting_keeps_its_thread() {
        let threads = Arc::new(HandshakePool::new(1));
        let running = Arc::new(AtomicUsize::new(0));
        let (started, mut start) = tokio::sync::mpsc::channel(1);
        let first = {
            let (threads, running) = (threads.clone(), running.clone());
            tokio::spawn(async move {
                on_handshake_thread(&threads, move || {
                    running.fetch_add(1, Ordering::SeqCst);
                    let _ = started.blocking_send(());
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            })
        };
        start.recv().await.expect("the first work started");
        first.abort();
        let seen = on_handshake_thread(&threads, {
            let running = running.clone();
            move || running.load(Ordering::SeqCst)
        })
        .await;
        assert_eq!(seen, Some(0), "the second work ran beside the first");
    }

    #[tokio::test]
    async fn closed_handshake_threads_refuse_the_work() {
        let threads = HandshakePool::new(1);
        threads.threads.close();
        assert_eq!(on_handshake_thread(&threads, || 1).await, None);
    }
}
