//! A stream connection's forwards to the session: each the messages of one
//! turn of the core, answered in the order they were started.
//!
//! Not `FuturesOrdered`: that wakes its own task again whenever it has
//! polled every future it holds and all stayed pending (fairness towards
//! other tasks). A connection does that nearly every time it starts a
//! batch, and under tokio's multi-threaded scheduler each such wake is
//! another turn of the connection and a wake-up of an idle worker. A
//! connection has few forwards at once (at most `limits.forward_window`),
//! so polling each unfinished one whenever the connection is polled costs
//! less than per-future wakers would.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::FutureExt;

enum Slot<T> {
    Running(BoxFuture<'static, T>),
    Done(T),
}

/// Futures answered in the order they were pushed. Empty, it holds no
/// memory.
pub(super) struct Forwards<T> {
    started: VecDeque<Slot<T>>,
}

impl<T> Forwards<T> {
    pub(super) fn new() -> Self {
        Self {
            started: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, forward: BoxFuture<'static, T>) {
        self.started.push_back(Slot::Running(forward));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.started.is_empty()
    }

    /// Polls every unfinished future, so each has the task's waker and the
    /// new ones start; ready with the oldest's outcome once it has one.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        for slot in &mut self.started {
            if let Slot::Running(forward) = slot {
                if let Poll::Ready(outcome) = forward.poll_unpin(cx) {
                    *slot = Slot::Done(outcome);
                }
            }
        }
        match self.take_done() {
            Some(outcome) => Poll::Ready(Some(outcome)),
            None if self.started.is_empty() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// The oldest future's outcome, if the last poll found it.
    pub(super) fn take_done(&mut self) -> Option<T> {
        match self.started.front() {
            Some(Slot::Done(_)) => match self.started.pop_front() {
                Some(Slot::Done(outcome)) => Some(outcome),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::{waker, ArcWake};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    /// Counts the wakes of the task polling the set.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(counted: &Arc<Self>) {
            counted.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn answered_by(rx: oneshot::Receiver<u32>) -> BoxFuture<'static, u32> {
        async move { rx.await.unwrap_or(0) }.boxed()
    }

    #[test]
    fn outcomes_come_in_the_order_started_and_starting_one_wakes_nobody() {
        let wakes = Arc::new(Wakes::default());
        let task = waker(wakes.clone());
        let mut cx = Context::from_waker(&task);
        let mut forwards = Forwards::new();
        assert!(
            forwards.poll_next(&mut cx).is_ready(),
            "empty: nothing to wait for"
        );
        let (first, first_rx) = oneshot::channel();
        let (second, second_rx) = oneshot::channel();
        forwards.push(answered_by(first_rx));
        forwards.push(answered_by(second_rx));
        assert!(forwards.poll_next(&mut cx).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "a set of pending futures does not wake its own task"
        );
        second.send(2).expect("receiver");
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "an answer wakes the task"
        );
        assert!(
            forwards.poll_next(&mut cx).is_pending(),
            "the second waits for the first"
        );
        first.send(1).expect("receiver");
        assert_eq!(forwards.poll_next(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(
            forwards.take_done(),
            Some(2),
            "found answered by the same poll"
        );
        assert_eq!(forwards.take_done(), None);
        assert!(forwards.is_empty());
    }
}
