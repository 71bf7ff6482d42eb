//! The stream shell (TCP and WebSocket): moves bytes between the socket and
//! the connection core, runs the core's actions and hands it server
//! messages. It decides nothing: every branch of the loop below only feeds
//! the core, and the loop never awaits one thing while another is due: a
//! session call in flight, a key lookup or a handshake computation leaves
//! writing, QuickAcks, server messages, timers and drain running.

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::future::{BoxFuture, Fuse, OptionFuture};
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::forwards;
use super::limiter::{Refusal, Slot};
use super::outbox::Inbox;
use super::registry::{ConnectionId, Outgoing};
use super::shell::{self, GatewayHost, Held, LazyOutbox, OpenGauge};
use super::websocket::{self, Prefixed};
use super::{Endpoint, Shared};
use crate::loops::{Loops, Seat};
use mtproto_core::connection::{Action, Close, Connection, Forwarded, HandshakeJob, KeyLookup};
use mtproto_core::handshake::StoreOutcome;
use mtproto_session::SessionClientEvent;

/// Packets handed to one vectored write. Their `IoSlice`s live in every
/// connection's task, idle ones too: 12 (192 bytes) covers the replies of
/// 8 requests in flight and keeps an idle TCP connection under 4 KiB.
const WRITE_BATCH: usize = 12;
/// Server messages taken from the outbox per turn of the loop.
const SERVER_MESSAGES_PER_TURN: usize = 32;
/// After a shutdown close, how long the client's unread bytes are read and
/// discarded while it takes the last replies and closes its side: closing
/// with unread input would send a reset, which can destroy replies still in
/// the socket's send queue.
const LINGER: Duration = Duration::from_secs(2);
/// A connection closed at the end of the drain grace gets this long (or the
/// write timeout, if shorter) for its last write, FIN and linger together,
/// so it is gone, its undelivered replies counted, well within the
/// gateway's [`CLOSE_AFTER_GRACE`](super::CLOSE_AFTER_GRACE).
const FORCED_CLOSE: Duration = Duration::from_secs(2);

/// A connection's forwards to the session, the messages of one turn of the
/// core together, answered in order.
type Forwards = forwards::Forwards<Vec<Forwarded>>;

/// How far a shutdown has got, as stream connections see it. One watch for
/// both steps: a connection keeps one wait registered on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Serving,
    /// Accepting stopped: read no more, deliver what was read, close when done.
    Draining,
    /// The grace ended: close now, counting what is undelivered.
    Forced,
}

/// The result of the one action a connection may be waiting on.
enum Answer {
    Key(KeyLookup),
    Computed(Result<Box<HandshakeJob>, Close>),
    Stored(StoreOutcome),
}

/// Serves one accepted connection; with a `seat` on an event loop, a
/// plain TCP connection may stop to move to another loop, and is returned
/// to be moved. `slot` holds its place under the listener's
/// cap; the per-client cap is applied once the client address is known
/// (after the PROXY header, if any).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the task"
)]
pub fn run<'a>(
    stream: TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    endpoint: &'a Endpoint,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<Stage>,
    seat: Option<&'a Seat>,
) -> impl Future<Output = Option<Box<Moving>>> + Send + 'a {
    async move {
        let mut open = OpenGauge::new(shared.metrics.clone(), endpoint.kind(), "undetected");
        let admitted = shell::admit(&shared, stream, peer, &mut slot, endpoint).await?;
        let (stream, buf) = (admitted.stream, admitted.buf);
        let handshake_deadline = admitted.accepted + shared.limits.connection.handshake_timeout;
        let cx = Cx {
            id: admitted.id,
            peer: admitted.peer,
            shared,
            accepted: admitted.accepted,
        };
        let Some(ws) = &endpoint.websocket else {
            let state = cx.start(buf);
            return cx
                .serve_tcp(stream, state, open, slot, shutdown, seat)
                .await;
        };
        // TLS and the upgrade count against the handshake deadline too. Their
        // state is boxed, all of it (a TLS stream held in this function's frame
        // across an await added 1.3 KB to every connection's task), so
        // the tasks of plain TCP connections, most of the idle ones, stay small.
        let stream = Prefixed::new(buf, stream);
        let Some(tls) = &endpoint.tls else {
            Box::pin(cx.upgrade(stream, ws, handshake_deadline, &mut open, shutdown)).await;
            return None;
        };
        Box::pin(cx.tls_upgrade(stream, tls, ws, handshake_deadline, &mut open, shutdown)).await;
        None
    }
}

/// Where to start serving a connection on an event loop.
pub(super) enum Start {
    /// Just accepted (by the main runtime, so the socket is handed over
    /// unregistered).
    Accepted {
        stream: std::net::TcpStream,
        peer: SocketAddr,
        slot: Slot,
        endpoint: Arc<Endpoint>,
        shared: Arc<Shared>,
        shutdown: watch::Receiver<Stage>,
    },
    Moved(Box<Moving>),
}

/// Serves a connection on event loop `to`, and again on the next loop
/// each time it moves; `done` is dropped when it closes.
pub(super) fn place(loops: &Arc<Loops>, to: usize, start: Start, done: mpsc::Sender<()>) {
    loops.spawn(to, move |seat| async move {
        let moving = match start {
            Start::Accepted {
                stream,
                peer,
                slot,
                endpoint,
                shared,
                shutdown,
            } => match TcpStream::from_std(stream) {
                Ok(stream) => {
                    run(stream, peer, slot, &endpoint, shared, shutdown, Some(&seat)).await
                }
                Err(e) => {
                    warn!(%peer, "cannot serve an accepted connection on an event loop: {e}");
                    None
                }
            },
            Start::Moved(moving) => moving.resume(&seat).await,
        };
        let Some(moving) = moving else {
            drop(done);
            return;
        };
        let (loops, to) = (seat.loops().clone(), moving.to);
        // Counted on the next loop from here.
        drop(seat);
        place(&loops, to, Start::Moved(moving), done);
    });
}

/// A plain TCP connection on its way to another event loop: its socket,
/// unregistered, and everything its serving loop keeps across turns.
pub(super) struct Moving {
    cx: Cx,
    stream: std::net::TcpStream,
    state: Box<State>,
    open: OpenGauge,
    slot: Slot,
    shutdown: watch::Receiver<Stage>,
    to: usize,
}

impl Moving {
    async fn resume(self, seat: &Seat) -> Option<Box<Moving>> {
        let Self {
            cx,
            stream,
            state,
            open,
            slot,
            shutdown,
            to: _,
        } = self;
        match TcpStream::from_std(stream) {
            Ok(stream) => {
                cx.serve_tcp(stream, state, open, slot, shutdown, Some(seat))
                    .await
            }
            Err(e) => {
                warn!(conn = cx.id, peer = %cx.peer, "cannot resume a moved connection: {e}");
                None
            }
        }
    }
}

/// What a connection keeps across turns of its loop, and across a move
/// (which waits until nothing else is started: no forwards, no lookup);
/// the socket and the timer are registered anew.
struct State {
    conn: Connection,
    outbox: LazyOutbox,
    held: Held,
}

/// How a connection's serving ended.
enum Served {
    Closed,
    /// To the event loop numbered.
    Moving(Box<State>, usize),
}

/// One connection's identity, shared by its loop and its close.
struct Cx {
    id: ConnectionId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    accepted: Instant,
}

impl Cx {
    /// The stream a handshake stage (TLS, WebSocket upgrade) produced within
    /// the handshake deadline; a failure is counted, logged and `None`. The
    /// callers bind it before the next stage: a match arm that awaited would
    /// keep the whole stage result alive in the task.
    fn passed<S, E: std::fmt::Display>(
        &self,
        outcome: Result<Result<S, E>, tokio::time::error::Elapsed>,
        refusal: Refusal,
        (reason, what): (&'static str, &str),
    ) -> Option<S> {
        match outcome {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                let total = self.shared.admission.refused.count(refusal);
                shell::count_closed(&self.shared, reason);
                info!(conn = self.id, peer = %self.peer, refused_total = total, "closed: {what}: {e}");
                None
            }
            Err(_) => {
                shell::count_close(&self.shared, self.id, self.peer, &Close::HandshakeTimeout);
                None
            }
        }
    }

    /// The TLS handshake on `stream`, then [`Cx::upgrade`].
    async fn tls_upgrade(
        self,
        stream: Prefixed<TcpStream>,
        tls: &super::tls::Tls,
        ws: &websocket::WsOptions,
        deadline: Instant,
        open: &mut OpenGauge,
        shutdown: watch::Receiver<Stage>,
    ) {
        let accepted = tokio::time::timeout_at(deadline, tls.0.accept(stream)).await;
        let Some(stream) = self.passed(
            accepted,
            Refusal::TlsHandshake,
            ("tls_handshake_failed", "TLS handshake failed"),
        ) else {
            return;
        };
        self.upgrade(stream, ws, deadline, open, shutdown).await
    }

    /// Runs the WebSocket upgrade on `stream`, then serves the connection inside it.
    async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        stream: S,
        ws: &websocket::WsOptions,
        deadline: Instant,
        open: &mut OpenGauge,
        shutdown: watch::Receiver<Stage>,
    ) {
        let upgraded = tokio::time::timeout_at(deadline, websocket::accept(stream, ws)).await;
        let Some(ws) = self.passed(
            upgraded,
            Refusal::WebsocketUpgrade,
            ("websocket_upgrade_refused", "WebSocket upgrade refused"),
        ) else {
            return;
        };
        let state = self.start(BytesMut::new());
        self.serve(tokio::io::split(ws), state, open, shutdown, None)
            .await;
    }

    /// A new connection's state, `initial` (bytes read with the PROXY
    /// header) taken in. Boxed: an async function's arguments are kept
    /// apart from its locals, so the state passed down by value would be
    /// stored once per level in every connection's task.
    fn start(&self, initial: BytesMut) -> Box<State> {
        let shared = &self.shared;
        let mut state = Box::new(State {
            conn: Connection::new(
                shared.limits.connection.clone(),
                shared.handshake.clone(),
                initial,
                self.accepted.into_std(),
            ),
            outbox: LazyOutbox::new(shared.limits.outbox_capacity),
            held: Held::new(shared.budgets.clone()),
        });
        state.conn.handle_input(
            0,
            shell::now(),
            &mut self.host(&mut state.outbox, &mut state.held),
            &mut rand::thread_rng(),
        );
        state
    }

    /// Serves a plain TCP connection; returns it to be moved if it stopped
    /// for that. Not an `async fn`: that would store each argument twice in
    /// every connection's task (as an argument and as the local it is
    /// moved into), some 200 bytes here; an `async move` block keeps each
    /// once.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice in the task"
    )]
    fn serve_tcp<'a>(
        self,
        mut stream: TcpStream,
        state: Box<State>,
        mut open: OpenGauge,
        slot: Slot,
        shutdown: watch::Receiver<Stage>,
        seat: Option<&'a Seat>,
    ) -> impl Future<Output = Option<Box<Moving>>> + Send + 'a {
        async move {
            // A TCP stream splits into borrowed halves, without the shared
            // allocation a generic split costs every connection.
            let served = self
                .serve(stream.split(), state, &mut open, shutdown.clone(), seat)
                .await;
            let Served::Moving(state, to) = served else {
                return None;
            };
            match stream.into_std() {
                Ok(stream) => Some(Box::new(Moving {
                    cx: self,
                    stream,
                    state,
                    open,
                    slot,
                    shutdown,
                    to,
                })),
                Err(e) => {
                    warn!(conn = self.id, peer = %self.peer, "cannot move a connection between event loops: {e}");
                    None
                }
            }
        }
    }

    fn host<'a>(&'a self, outbox: &'a mut LazyOutbox, held: &'a mut Held) -> GatewayHost<'a> {
        GatewayHost {
            shared: &self.shared,
            id: self.id,
            peer: self.peer,
            outbox: Some(outbox),
            held,
        }
    }

    /// Serves the connection whose two directions are `reader` and `writer`
    /// from `state`; with a `seat`, stops to move when its loop sheds
    /// connections.
    async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        (mut reader, mut writer): (R, W),
        state: Box<State>,
        open: &mut OpenGauge,
        shutdown: watch::Receiver<Stage>,
        seat: Option<&Seat>,
    ) -> Served {
        let mut drain_started = false;
        let mut forced = false;
        let mut closed_when_done = false;
        let shared = self.shared.clone();
        // Out of the box at once: a box moved out of is freed only when it
        // goes out of scope, here the end of the connection.
        let State {
            mut conn,
            mut outbox,
            mut held,
        } = {
            let state = state;
            *state
        };
        let mut forwards = Forwards::new();
        let mut waiting: Option<BoxFuture<'static, Answer>> = None;
        // The loop this connection was asked to move to.
        let mut moving = None;
        let mut needs_flush = false;
        // One timer for the connection, moved only when the core's deadline
        // comes sooner than the timer (a new timer per loop turn costs a
        // timer-wheel insert each). The idle deadline moves later on every
        // message; the timer is left where it is then, and when it fires
        // early the core finds nothing due and it is set again.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_at: Option<Instant> = None;
        // The shutdown's stage is read here, then through `poll_stage`.
        let mut stage_seen = shutdown.clone();
        let mut drain_due = *stage_seen.borrow_and_update() != Stage::Serving;
        let forced_wait = stage_forced(shutdown).fuse();
        tokio::pin!(forced_wait);
        let mut stage_armed = false;
        loop {
            self.run_actions(&mut conn, &mut forwards, &mut waiting)
                .await;
            while let Some(event) = conn.poll_event() {
                shell::record(&shared.metrics, Some(open), event);
            }
            if !drain_started && drain_due {
                drain_started = true;
                conn.drain();
            }
            if drain_started && conn.closing().is_none() && conn.drained() && !needs_flush {
                // Nothing is owed: take no more server messages, write any
                // that came meanwhile, then close.
                let now = shell::now();
                let Some(out) = outbox.inbox().and_then(|inbox| {
                    inbox.close();
                    inbox.try_recv()
                }) else {
                    closed_when_done = true;
                    conn.close(Close::Shutdown, now, &mut rand::thread_rng());
                    break;
                };
                conn.send_server_message(&out.payload, now, &mut rand::thread_rng());
                continue;
            }
            if conn.closing().is_some() {
                break;
            }
            // Asked to move, the connection reads nothing more until what
            // it forwarded is answered (so its messages reach the session
            // in order, though the next ones go on the next loop's link);
            // then all it is, is `State`.
            if moving.is_none() && !drain_due {
                moving = seat.and_then(Seat::take_move);
            }
            if let Some(to) = moving {
                if !drain_due && !needs_flush && forwards.is_empty() && waiting.is_none() {
                    shared.metrics.connections_moved.inc();
                    let state = State { conn, outbox, held };
                    return Served::Moving(Box::new(state), to);
                }
            }
            let want_read = conn.wants_read() && moving.is_none();
            let accepts = conn.accepts_server_messages();
            let deadline = conn.poll_timeout().map(Instant::from_std);
            if let Some(at) = deadline.filter(|&at| timer_at.is_none_or(|armed| at < armed)) {
                timer.as_mut().reset(at);
                timer_at = Some(at);
            }
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
            let (input, n) = conn.io_buffers(&mut slices);
            let step = tokio::select! {
                read = shell::read_input(&mut reader, input), if want_read => Step::Read(read),
                // One write (or, with nothing left, one flush) at a time: each is cancel-safe.
                wrote = async {
                    if n > 0 {
                        writer.write_vectored(&slices[..n]).await.map(Some)
                    } else {
                        writer.flush().await.map(|()| None)
                    }
                }, if n > 0 || needs_flush => Step::Wrote(wrote),
                Some(out) = async { outbox.inbox()?.recv().await }, if accepts => Step::Server(out),
                Some(outcome) = poll_fn(|cx| forwards.poll_next(cx)), if !forwards.is_empty() => Step::Forwarded(outcome),
                Some(answer) = OptionFuture::from(waiting.as_mut()), if waiting.is_some() => Step::Answer(answer),
                () = &mut timer, if deadline.is_some() => Step::Timeout,
                step = poll_fn(|cx| poll_stage(cx, forced_wait.as_mut(), &mut stage_seen, &mut stage_armed)) => step,
            };
            let now = shell::now();
            let mut host = self.host(&mut outbox, &mut held);
            match step {
                Step::Read(Ok(0)) => conn.close(Close::ClientClosed, now, &mut rand::thread_rng()),
                Step::Read(Ok(n)) => {
                    shared.metrics.bytes_received.inc_by(n as u64);
                    conn.handle_input(n, now, &mut host, &mut rand::thread_rng());
                }
                Step::Read(Err(e)) => conn.close(Close::Read(e), now, &mut rand::thread_rng()),
                Step::Wrote(Ok(Some(n))) if n > 0 => {
                    shared.metrics.bytes_sent.inc_by(n as u64);
                    let delivered = conn.handle_written(n, now.instant);
                    if drain_started {
                        shared.drain.delivered(delivered as u64);
                    }
                    // Most streams flush at once (TCP always): try now rather
                    // than in another turn of the loop; a stream that cannot
                    // (a WebSocket's buffered frame) is flushed by the loop.
                    needs_flush = !conn.has_transmit()
                        && writer.flush().now_or_never().is_none_or(|r| r.is_err());
                }
                Step::Wrote(Ok(None)) => needs_flush = false,
                Step::Wrote(_) => conn.close(Close::Write, now, &mut rand::thread_rng()),
                Step::Server(out) => {
                    // Whatever else is queued goes into the same write.
                    let mut rng = rand::thread_rng();
                    conn.send_server_message(&out.payload, now, &mut rng);
                    for _ in 1..SERVER_MESSAGES_PER_TURN {
                        if !conn.accepts_server_messages() {
                            break;
                        }
                        let Some(out) = outbox.inbox().and_then(Inbox::try_recv) else {
                            break;
                        };
                        conn.send_server_message(&out.payload, now, &mut rng);
                    }
                }
                Step::Forwarded(outcomes) => {
                    // Answers to several turns' messages often come
                    // together: all that are ready are taken in this turn.
                    let mut rng = rand::thread_rng();
                    let mut ready = Some(outcomes);
                    while let Some(outcomes) = ready {
                        for outcome in outcomes {
                            conn.handle_forwarded(outcome, now, &mut host, &mut rng);
                        }
                        ready = forwards.take_done();
                    }
                }
                Step::Answer(answer) => {
                    waiting = None;
                    match answer {
                        Answer::Key(lookup) => {
                            conn.handle_key(lookup, now, &mut host, &mut rand::thread_rng())
                        }
                        Answer::Computed(Ok(job)) => {
                            conn.handle_computed(job, now, &mut host, &mut rand::thread_rng())
                        }
                        Answer::Computed(Err(close)) => {
                            conn.close(close, now, &mut rand::thread_rng())
                        }
                        Answer::Stored(outcome) => {
                            conn.handle_stored(outcome, now, &mut host, &mut rand::thread_rng())
                        }
                    }
                }
                Step::Timeout => {
                    timer_at = None;
                    conn.handle_timeout(now, &mut rand::thread_rng());
                }
                Step::Drain => drain_due = true,
                Step::Shutdown => {
                    // The grace is over: what the outbox holds goes out with
                    // the last write, as far as the transmit budget takes it.
                    forced = true;
                    let mut rng = rand::thread_rng();
                    if let Some(inbox) = outbox.inbox() {
                        inbox.close();
                        while conn.accepts_server_messages() {
                            let Some(out) = inbox.try_recv() else { break };
                            conn.send_server_message(&out.payload, now, &mut rng);
                        }
                    }
                    conn.close(Close::Shutdown, now, &mut rng)
                }
            }
        }
        // The budgets are free before the last writes.
        drop(held);
        let close = conn.take_close().unwrap_or(Close::Shutdown);
        shell::count_close(&shared, self.id, self.peer, &close);
        // Past the grace the gateway cannot wait a whole write timeout.
        let last_write_by = Instant::now()
            + if forced {
                shared.limits.connection.write_timeout.min(FORCED_CLOSE)
            } else {
                shared.limits.connection.write_timeout
            };
        if !matches!(close, Close::Write | Close::Read(_)) {
            let delivered = self.flush(&mut conn, &mut writer, last_write_by).await;
            if drain_started {
                shared.drain.delivered(delivered);
            }
        }
        // Messages queued for this connection and never taken are lost with it.
        let mut dropped = 0;
        if let Some(inbox) = outbox.inbox() {
            inbox.close();
            while let Some(out) = inbox.try_recv() {
                conn.undeliverable(&out.payload);
                dropped += 1;
            }
        }
        if closed_when_done {
            shared.drain.closed_done();
        } else if drain_started {
            // Closed at the grace end, or by the client or an error first.
            let in_flight = conn.awaited_replies() as u64;
            let queued = dropped + conn.unwritten_server_messages() as u64;
            shared
                .drain
                .undelivered(&shared.metrics, forced, in_flight, queued);
            if in_flight + queued > 0 {
                info!(conn = self.id, peer = %self.peer, reason = close.reason(), in_flight, queued, "closed during the drain with replies undelivered");
            }
        }
        if dropped > 0 {
            shared
                .metrics
                .server_messages_dropped
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: "connection_closed",
                })
                .inc_by(dropped);
        }
        let _ = tokio::time::timeout_at(last_write_by, writer.shutdown()).await;
        if matches!(close, Close::Shutdown) {
            let linger_until = if forced {
                last_write_by
            } else {
                Instant::now() + LINGER
            };
            let mut sink = tokio::io::sink();
            let discard = tokio::io::copy(&mut reader, &mut sink);
            let _ = tokio::time::timeout_at(linger_until, discard).await;
        }
        self.detach_sessions(&conn).await;
        Served::Closed
    }

    /// Starts what the core asked for.
    async fn run_actions(
        &self,
        conn: &mut Connection,
        forwards: &mut Forwards,
        waiting: &mut Option<BoxFuture<'static, Answer>>,
    ) {
        while let Some(auth_key_id) = self.start_actions(conn, forwards, waiting) {
            // Boxed: moka's invalidation future is large, and inline it
            // would be part of every connection's task; forgetting is rare.
            Box::pin(self.shared.keys.cache.remove(auth_key_id)).await
        }
    }

    /// Starts the core's actions up to a key to forget, which it returns:
    /// the actions after it wait until it is forgotten. Nothing here is
    /// kept across that wait, so idle connections' tasks stay small.
    fn start_actions(
        &self,
        conn: &mut Connection,
        forwards: &mut Forwards,
        waiting: &mut Option<BoxFuture<'static, Answer>>,
    ) -> Option<i64> {
        let mut batch = Vec::new();
        // Formatted once for the batch.
        let mut client_ip = None;
        let mut forget = None;
        while let Some(action) = conn.poll_action() {
            let shared = &self.shared;
            match action {
                Action::Forward(forward) => {
                    let client_ip: &Arc<str> =
                        client_ip.get_or_insert_with(|| self.peer.ip().to_string().into());
                    batch.push(shell::client_data(shared, client_ip.clone(), forward));
                }
                Action::LookupKey(auth_key_id) => {
                    let shared = shared.clone();
                    *waiting = Some(
                        async move { Answer::Key(shell::lookup_key(&shared, auth_key_id).await) }
                            .boxed(),
                    );
                }
                Action::Compute(job) => {
                    let shared = shared.clone();
                    *waiting = Some(
                        async move { Answer::Computed(shell::compute(&shared, job).await) }.boxed(),
                    );
                }
                Action::StoreKey(key) => {
                    let (shared, id) = (shared.clone(), self.id);
                    *waiting = Some(
                        async move { Answer::Stored(shell::store_key(&shared, id, key).await) }
                            .boxed(),
                    );
                }
                Action::ForgetKey(auth_key_id) => {
                    forget = Some(auth_key_id);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let shared = self.shared.clone();
            forwards.push(shell::forward_all(shared, batch).boxed());
        }
        forget
    }

    /// Writes what the core left queued (the error code of a close, replies),
    /// within `within`; returns how many server messages that completed.
    async fn flush<W: AsyncWrite + Unpin>(
        &self,
        conn: &mut Connection,
        writer: &mut W,
        limit: Instant,
    ) -> u64 {
        let mut delivered = 0;
        while conn.has_transmit() {
            let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
            let (_, n) = conn.io_buffers(&mut slices);
            match tokio::time::timeout_at(limit, writer.write_vectored(&slices[..n])).await {
                Ok(Ok(written)) if written > 0 => {
                    self.shared.metrics.bytes_sent.inc_by(written as u64);
                    delivered += conn.handle_written(written, Instant::now().into_std()) as u64;
                }
                _ => return delivered,
            }
        }
        let _ = tokio::time::timeout_at(limit, writer.flush()).await;
        delivered
    }

    /// Leaves the registry; tells the session about sessions whose last
    /// connection this was (awaited, so a draining gateway reports them all).
    async fn detach_sessions(&self, conn: &Connection) {
        let Some(info) = conn.key() else { return };
        for &session_id in conn.sessions() {
            if !self.shared.registry.detach(info.id(), session_id, self.id) {
                continue;
            }
            let event = SessionClientEvent {
                server_id: self.shared.server_id.to_string(),
                auth_key_id: info.id(),
                key_type: info.key_type as i32,
                perm_auth_key_id: info.perm_auth_key_id,
                session_id,
                client_ip: self.peer.ip().to_string(),
            };
            super::report_closed_session(&self.shared, event).await;
        }
    }
}

/// Resolves once the stage is forced, or its sender is dropped (which means
/// stop too).
async fn stage_forced(mut stage: watch::Receiver<Stage>) {
    let _ = stage.wait_for(|stage| *stage == Stage::Forced).await;
}

/// Polls the wait for the forced stage (`stage_forced`) the first time, which
/// registers it, and again only once the stage has changed (an atomic load
/// of `seen`): the registration stays, and wakes the task at every change.
/// Ready with the step it changed to. Polling the watch anew every turn
/// took its locks, which every connection shares: about 2% of the
/// gateway's CPU per message.
fn poll_stage<F: Future<Output = ()>>(
    cx: &mut Context<'_>,
    forced: Pin<&mut Fuse<F>>,
    seen: &mut watch::Receiver<Stage>,
    armed: &mut bool,
) -> Poll<Step> {
    if *armed && !seen.has_changed().unwrap_or(true) {
        return Poll::Pending;
    }
    *armed = true;
    if forced.poll(cx).is_ready() {
        return Poll::Ready(Step::Shutdown);
    }
    match *seen.borrow_and_update() {
        Stage::Serving => Poll::Pending,
        Stage::Draining | Stage::Forced => Poll::Ready(Step::Drain),
    }
}

/// What woke the connection's loop.
enum Step {
    Read(std::io::Result<usize>),
    /// Bytes written, or `None` for a completed flush.
    Wrote(std::io::Result<Option<usize>>),
    Server(Outgoing),
    Forwarded(Vec<Forwarded>),
    Answer(Answer),
    Timeout,
    /// The gateway stopped accepting.
    Drain,
    /// The drain grace ended.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn the_stage_wait_reports_each_step_once() {
        let (stage, seen) = watch::channel(Stage::Serving);
        let mut seen_here = seen.clone();
        let mut wait = std::pin::pin!(stage_forced(seen).fuse());
        let mut armed = false;
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut poll = |armed: &mut bool| poll_stage(&mut cx, wait.as_mut(), &mut seen_here, armed);
        assert!(poll(&mut armed).is_pending());
        assert!(armed, "the first poll registers the wait");
        assert!(poll(&mut armed).is_pending());
        stage.send(Stage::Draining).expect("a receiver");
        assert!(matches!(poll(&mut armed), Poll::Ready(Step::Drain)));
        assert!(poll(&mut armed).is_pending(), "the drain is reported once");
        stage.send(Stage::Forced).expect("a receiver");
        assert!(matches!(poll(&mut armed), Poll::Ready(Step::Shutdown)));
    }

    #[test]
    fn the_wait_is_polled_first_and_then_only_after_a_change() {
        let (stage, mut seen) = watch::channel(Stage::Serving);
        let polls = std::cell::Cell::new(0);
        let counted = poll_fn(|_| {
            polls.set(polls.get() + 1);
            Poll::<()>::Pending
        });
        let mut wait = std::pin::pin!(counted.fuse());
        let mut armed = false;
        let mut cx = Context::from_waker(noop_waker_ref());
        for _ in 0..3 {
            assert!(poll_stage(&mut cx, wait.as_mut(), &mut seen, &mut armed).is_pending());
        }
        assert_eq!(polls.get(), 1);
        stage.send(Stage::Draining).expect("a receiver");
        assert!(poll_stage(&mut cx, wait.as_mut(), &mut seen, &mut armed).is_ready());
        assert_eq!(polls.get(), 2);
    }

    #[test]
    fn a_dropped_stage_sender_means_stop() {
        let (stage, seen) = watch::channel(Stage::Serving);
        let mut seen_here = seen.clone();
        let mut wait = std::pin::pin!(stage_forced(seen).fuse());
        let mut armed = false;
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(poll_stage(&mut cx, wait.as_mut(), &mut seen_here, &mut armed).is_pending());
        drop(stage);
        assert!(matches!(
            poll_stage(&mut cx, wait.as_mut(), &mut seen_here, &mut armed),
            Poll::Ready(Step::Shutdown)
        ));
    }
}
