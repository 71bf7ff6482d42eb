//! A remote session client's links by session address. Each link is opened
//! by one attempt however many callers need it at that moment: when a
//! session restarts, the messages waiting for it share one connection
//! attempt instead of each opening a connection of its own.
//!
//! Links are kept per event loop: a link's HTTP/2 connection runs as a task
//! on the runtime that opened it, so a connection forwarding on its own
//! loop's link never wakes another thread (see `crate::loops`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};

use super::remote::Failure;

type Opening<L> = Shared<BoxFuture<'static, Result<Arc<L>, Failure>>>;

/// The event loop a link runs on (`None`: the main runtime).
type Loop = Option<u64>;

pub(super) struct Links<L> {
    live: Mutex<HashMap<Loop, HashMap<String, Arc<L>>>>,
    /// Links being opened, each awaited by every caller that needs it.
    opening: Mutex<HashMap<(Loop, String), Opening<L>>>,
    is_closed: fn(&L) -> bool,
}

impl<L> std::fmt::Debug for Links<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field(
                "live",
                &lock(&self.live)
                    .iter()
                    .map(|(on, links)| (on, links.keys().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl<L: Send + Sync + 'static> Links<L> {
    pub(super) fn new(is_closed: fn(&L) -> bool) -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            is_closed,
        }
    }

    /// This event loop's live link to `addr`, else the one being opened,
    /// else a new one from `open`. Nothing is locked while a link opens, so
    /// one unreachable member does not hold up calls to the others.
    pub(super) async fn get<F>(
        &self,
        addr: &str,
        open: impl FnOnce() -> F,
    ) -> Result<Arc<L>, Failure>
    where
        F: Future<Output = Result<L, Failure>> + Send + 'static,
    {
        let on = crate::loops::current();
        if let Some(link) = self.live(on, addr) {
            return Ok(link);
        }
        let key = (on, addr.to_string());
        let opening = {
            // Locked in this order (opening, then live) everywhere.
            let mut opening = lock(&self.opening);
            if let Some(link) = self.live(on, addr) {
                return Ok(link);
            }
            opening
                .entry(key.clone())
                .or_insert_with(|| open().map(|opened| opened.map(Arc::new)).boxed().shared())
                .clone()
        };
        let opened = opening.clone().await;
        let mut pending = lock(&self.opening);
        if pending.get(&key).is_some_and(|o| o.ptr_eq(&opening)) {
            pending.remove(&key);
            if let Ok(link) = &opened {
                let mut live = lock(&self.live);
                // Session instances come and go with their addresses (a
                // rollout gives each pod a new one): closed links are
                // dropped here, or the map would grow for the gateway's life.
                for links in live.values_mut() {
                    links.retain(|_, link| !(self.is_closed)(link));
                }
                live.retain(|_, links| !links.is_empty());
                live.entry(on).or_default().insert(key.1, link.clone());
            }
        }
        opened
    }

    fn live(&self, on: Loop, addr: &str) -> Option<Arc<L>> {
        lock(&self.live)
            .get(&on)?
            .get(addr)
            .filter(|link| !(self.is_closed)(link))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    struct Link(AtomicBool);

    fn closed(link: &Link) -> bool {
        link.0.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn callers_at_once_share_one_opening_and_a_closed_link_is_replaced() {
        let links = Arc::new(Links::new(closed));
        let opened = Arc::new(AtomicUsize::new(0));
        let open = |opened: Arc<AtomicUsize>| {
            move || async move {
                opened.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Link(AtomicBool::new(false)))
            }
        };
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (links, opened) = (links.clone(), opened.clone());
                tokio::spawn(async move { links.get("a:1", open(opened)).await })
            })
            .collect();
        let mut got = Vec::new();
        for caller in callers {
            got.push(caller.await.unwrap().unwrap_or_else(|_| panic!("opened")));
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert!(got.iter().all(|link| Arc::ptr_eq(link, &got[0])));

        got[0].0.store(true, Ordering::SeqCst);
        let fresh = links
            .get("a:1", open(opened.clone()))
            .await
            .unwrap_or_else(|_| panic!());
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        assert!(!Arc::ptr_eq(&fresh, &got[0]));
    }

    #[tokio::test]
    async fn a_failed_opening_fails_its_waiters_once_and_the_next_caller_tries_again() {
        let links = Arc::new(Links::<Link>::new(closed));
        let attempts = Arc::new(AtomicUsize::new(0));
        let failing = |attempts: Arc<AtomicUsize>| {
            move || async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(Failure::Transient("refused".into()))
            }
        };
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (links, attempts) = (links.clone(), attempts.clone());
                tokio::spawn(async move { links.get("a:1", failing(attempts)).await.is_err() })
            })
            .collect();
        for caller in callers {
            assert!(caller.await.unwrap());
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert!(links.get("a:1", failing(attempts.clone())).await.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn closed_links_are_dropped_when_another_opens() {
        let links = Links::new(closed);
        let open = || async { Ok(Link(AtomicBool::new(false))) };
        let first = links.get("a:1", open).await.unwrap_or_else(|_| panic!());
        links.get("b:1", open).await.unwrap_or_else(|_| panic!());
        first.0.store(true, Ordering::SeqCst);
        links.get("c:1", open).await.unwrap_or_else(|_| panic!());
        let mut kept: Vec<_> = lock(&links.live)
            .values()
            .flat_map(|links| links.keys().cloned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["b:1", "c:1"]);
    }

    #[tokio::test]
    async fn each_event_loop_opens_its_own_link() {
        let links = Arc::new(Links::new(closed));
        let open = || async { Ok(Link(AtomicBool::new(false))) };
        let here = links.get("a:1", open).await.unwrap_or_else(|_| panic!());
        let (loops, _running) = crate::loops::Loops::start(2, Default::default()).expect("loops");
        let mut on_loops = Vec::new();
        for index in 0..2 {
            let (links, (got, get)) = (links.clone(), tokio::sync::oneshot::channel());
            loops.spawn(index, move |_seat| async move {
                let first = links.get("a:1", open).await.unwrap_or_else(|_| panic!());
                let again = links.get("a:1", open).await.unwrap_or_else(|_| panic!());
                let _ = got.send(Arc::ptr_eq(&first, &again).then_some(first));
            });
            on_loops.push(get.await.expect("ran").expect("the loop reuses its link"));
        }
        assert!(!Arc::ptr_eq(&on_loops[0], &on_loops[1]));
        assert!(on_loops.iter().all(|link| !Arc::ptr_eq(link, &here)));
    }
}
