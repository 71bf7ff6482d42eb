//! Event loops for stream connections when sessions are remote: one
//! single-threaded tokio runtime per thread, connections packed onto as few
//! loops as keep up, and moved between loops when one is overloaded or two
//! are nearly idle.
//!
//! Why not the work-stealing runtime: with two workers, the one that goes
//! idle first sleeps in `epoll_wait` and the other on a condition variable,
//! so nearly every socket event wakes a sleeping thread, and a sleep and
//! wake-up costs more CPU than forwarding a message (docs/performance.md,
//! Scheduling). A connection, the session link it forwards on and the
//! replies coming back all run on one loop; a second loop takes work only
//! when the first cannot keep up.
//!
//! A loop's load is the CPU time its thread used (Linux's per-thread
//! `schedstat`), not the time it was awake: on a machine shared with other
//! busy processes, a loop waiting for a core looks awake, and a second loop
//! would not get that core either. Without `/proc` (not Linux) loads read
//! as zero and every connection stays on the first loop.

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tracing::debug;

use crate::metrics::{LoopLabels, Metrics};

/// How often the loops' CPU time is turned into loads and moves decided.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// New connections go to the lowest-numbered loop less busy than this.
const PLACE_BELOW: f64 = 0.6;
/// A loop busier than this sheds connections to one below [`PLACE_BELOW`].
const SHED_ABOVE: f64 = 0.9;
/// Two loops together less busy than this are merged into the lower one:
/// below [`SHED_ABOVE`] by a margin, so that a merge never calls for a shed
/// (nor a shed, which leaves the two loops above this together, a merge).
const MERGE_BELOW: f64 = 0.8;
/// The weight of the newest sample in a loop's smoothed load: a move
/// follows load that lasts about half a second, not one burst.
const SMOOTHING: f64 = 0.25;

thread_local! {
    /// The loop this thread runs, if it runs one.
    static CURRENT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// A process-unique id of the event loop the calling thread runs, `None`
/// off the loops. Things bound to the runtime that opened them (an HTTP/2
/// connection's task) are kept per loop by this id.
pub fn current() -> Option<u64> {
    CURRENT.with(Cell::get)
}

/// The loops of one server. Connections on them hold it; they stop when
/// its [`Running`] is dropped.
#[derive(Debug)]
pub struct Loops {
    loops: Vec<Loop>,
    metrics: Arc<Metrics>,
    /// Each loop's CPU time at the last sample, and its smoothed load.
    sampled: Mutex<Sampled>,
}

#[derive(Debug)]
struct Loop {
    handle: Handle,
    /// The thread's `/proc/…/schedstat`, if it has one.
    cpu: Option<PathBuf>,
    /// The last smoothed load, in thousandths of the loop's time.
    load: AtomicUsize,
    connections: AtomicUsize,
    /// Connections asked to move away, taken one each by the next
    /// connections to run; and where they go.
    shed: AtomicUsize,
    shed_to: AtomicUsize,
}

/// The loops' threads: dropping this stops them (what is left on them is
/// dropped) and waits until they have ended.
#[derive(Debug)]
pub struct Running {
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stops.clear();
        // A loop cannot wait for itself.
        if current().is_some() {
            return;
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct Sampled {
    at: Instant,
    cpu_ns: Vec<u64>,
    loads: Vec<f64>,
}

/// The CPU time, in nanoseconds, a thread's `schedstat` reports.
fn cpu_ns(schedstat: &Path) -> Option<u64> {
    std::fs::read_to_string(schedstat)
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The calling thread's `schedstat`.
fn own_schedstat() -> Option<PathBuf> {
    let task = std::fs::read_link("/proc/thread-self").ok()?;
    let path = Path::new("/proc").join(task).join("schedstat");
    cpu_ns(&path).map(|_| path)
}

impl Loops {
    /// Starts `count` loops, and the sampler on the calling runtime (it
    /// ends when the loops are dropped).
    pub fn start(count: usize, metrics: Arc<Metrics>) -> std::io::Result<(Arc<Self>, Running)> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let mut loops = Vec::with_capacity(count);
        let mut running = Running {
            stops: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for index in 0..count {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let (cpu_tx, cpu_rx) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("mtproto-loop-{index}"))
                .spawn(move || {
                    CURRENT.with(|current| current.set(Some(id)));
                    let _ = cpu_tx.send(own_schedstat());
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // What is left is dropped; nothing blocking is waited for.
                    runtime.shutdown_background();
                })?;
            running.stops.push(stop);
            running.threads.push(thread);
            loops.push(Loop {
                handle,
                cpu: cpu_rx.recv().ok().flatten(),
                load: AtomicUsize::new(0),
                connections: AtomicUsize::new(0),
                shed: AtomicUsize::new(0),
                shed_to: AtomicUsize::new(0),
            });
        }
        let sampled = Sampled {
            at: Instant::now(),
            cpu_ns: loops
                .iter()
                .map(|l| l.cpu.as_deref().and_then(cpu_ns).unwrap_or(0))
                .collect(),
            loads: vec![0.0; count],
        };
        let loops = Arc::new(Self {
            loops,
            metrics,
            sampled: Mutex::new(sampled),
        });
        tokio::spawn(sample(Arc::downgrade(&loops)));
        Ok((loops, running))
    }

    pub fn len(&self) -> usize {
        self.loops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.loops.is_empty()
    }

    /// Connections on each loop now.
    pub fn connections(&self) -> Vec<usize> {
        self.loops
            .iter()
            .map(|l| l.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// Asks `count` connections on loop `from` to move to loop `to`: the
    /// next ones to run (an idle one stays) move once what they forwarded is
    /// answered; plain TCP only, WebSocket connections stay. The sampler
    /// decides this every 100 ms, replacing what is left.
    pub fn shed(&self, from: usize, to: usize, count: usize) {
        let here = &self.loops[from];
        here.shed_to.store(to, Ordering::Relaxed);
        here.shed.store(count, Ordering::Release);
    }

    /// The loop a new connection goes to.
    pub fn place(&self) -> usize {
        let loads: Vec<f64> = self.loops.iter().map(|l| l.load()).collect();
        placement(&loads)
    }

    /// Runs `work` on loop `index` for a connection, which holds a seat
    /// there while it runs. A stopped loop drops it.
    pub fn spawn<F, Fut>(self: &Arc<Self>, index: usize, work: F)
    where
        F: FnOnce(Seat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let seat = Seat::new(self.clone(), index);
        self.loops[index]
            .handle
            .spawn(async move { work(seat).await });
    }

    /// Turns CPU time into loads and decides a move.
    fn sample(&self) {
        let mut sampled = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let window = now.duration_since(sampled.at).as_nanos().max(1) as f64;
        sampled.at = now;
        let connections = self.connections();
        for (i, l) in self.loops.iter().enumerate() {
            let total = l.cpu.as_deref().and_then(cpu_ns).unwrap_or(0);
            let spent = total.saturating_sub(sampled.cpu_ns[i]) as f64;
            sampled.cpu_ns[i] = total;
            let load =
                sampled.loads[i] + ((spent / window).min(1.0) - sampled.loads[i]) * SMOOTHING;
            sampled.loads[i] = load;
            l.load.store((load * 1000.0) as usize, Ordering::Relaxed);
            let labels = LoopLabels { event_loop: i };
            self.metrics.event_loop_cpu.get_or_create(&labels).set(load);
            self.metrics
                .event_loop_connections
                .get_or_create(&labels)
                .set(connections[i] as i64);
        }
        let plan = shed_plan(&sampled.loads, &connections);
        // A budget left over from the last sample is replaced.
        for (i, l) in self.loops.iter().enumerate() {
            match plan.filter(|p| p.from == i) {
                Some(plan) => {
                    debug!(from = plan.from, to = plan.to, count = plan.count, loads = ?sampled.loads, "moving connections between event loops");
                    self.shed(plan.from, plan.to, plan.count);
                }
                None => l.shed.store(0, Ordering::Relaxed),
            }
        }
    }
}

impl Loop {
    fn load(&self) -> f64 {
        self.load.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

async fn sample(loops: Weak<Loops>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(loops) = loops.upgrade() else { return };
        loops.sample();
    }
}

/// A connection's place on a loop, counted while it lasts.
#[derive(Debug)]
pub struct Seat {
    loops: Arc<Loops>,
    index: usize,
}

impl Seat {
    fn new(loops: Arc<Loops>, index: usize) -> Self {
        loops.loops[index]
            .connections
            .fetch_add(1, Ordering::Relaxed);
        Self { loops, index }
    }

    /// The loop to move to, if this loop is shedding connections; each
    /// answer uses one of its budget, so ask only when ready to move.
    pub fn take_move(&self) -> Option<usize> {
        let here = &self.loops.loops[self.index];
        if here.shed.load(Ordering::Relaxed) == 0 {
            return None;
        }
        here.shed
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1))
            .ok()?;
        Some(here.shed_to.load(Ordering::Relaxed))
    }

    pub fn loops(&self) -> &Arc<Loops> {
        &self.loops
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.loops.loops[self.index]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The lowest-numbered loop below [`PLACE_BELOW`], else the least busy:
/// packed, so that an idle loop stays asleep rather than being woken for a
/// share of the work.
fn placement(loads: &[f64]) -> usize {
    loads
        .iter()
        .position(|&load| load < PLACE_BELOW)
        .unwrap_or_else(|| least_busy(loads))
}

fn least_busy(loads: &[f64]) -> usize {
    loads
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Connections to move from one loop to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shed {
    from: usize,
    to: usize,
    count: usize,
}

/// The move the loads call for, if any: the busiest loop above
/// [`SHED_ABOVE`] gives the least busy one below [`PLACE_BELOW`] its share
/// of half the difference; else the highest-numbered loop with connections
/// that, added to a lower one, stays below [`MERGE_BELOW`] moves them all
/// there.
fn shed_plan(loads: &[f64], connections: &[usize]) -> Option<Shed> {
    let busiest = (0..loads.len())
        .filter(|&i| connections[i] > 0)
        .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))?;
    let idlest = least_busy(loads);
    let (high, low) = (loads[busiest], loads[idlest]);
    if high > SHED_ABOVE && low < PLACE_BELOW {
        let share = (high - low) / (2.0 * high);
        let count = ((connections[busiest] as f64 * share).ceil() as usize).max(1);
        return Some(Shed {
            from: busiest,
            to: idlest,
            count,
        });
    }
    let from = (1..loads.len()).rev().find(|&i| connections[i] > 0)?;
    let to = (0..from).find(|&j| loads[j] + loads[from] < MERGE_BELOW)?;
    Some(Shed {
        from,
        to,
        count: connections[from],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_connections_pack_onto_the_first_loop_that_keeps_up() {
        assert_eq!(placement(&[0.0, 0.0]), 0);
        assert_eq!(placement(&[0.59, 0.0]), 0);
        assert_eq!(placement(&[0.7, 0.1, 0.0]), 1);
        assert_eq!(placement(&[0.9, 0.8, 0.7]), 2, "else the least busy");
    }

    #[test]
    fn an_overloaded_loop_sheds_to_the_least_busy() {
        let plan = shed_plan(&[0.95, 0.05], &[10, 2]);
        assert_eq!(
            plan,
            Some(Shed {
                from: 0,
                to: 1,
                count: 5
            })
        );
        assert_eq!(shed_plan(&[1.0, 0.7], &[10, 2]), None, "no loop has room");
        assert_eq!(
            shed_plan(&[0.85, 0.0], &[10, 0]),
            None,
            "busy but keeping up"
        );
    }

    #[test]
    fn a_single_busy_connection_still_moves() {
        assert_eq!(shed_plan(&[0.99, 0.0], &[1, 0]).map(|p| p.count), Some(1));
    }

    #[test]
    fn nearly_idle_loops_merge_into_the_lowest() {
        assert_eq!(
            shed_plan(&[0.4, 0.25], &[5, 3]),
            Some(Shed {
                from: 1,
                to: 0,
                count: 3
            })
        );
        assert_eq!(shed_plan(&[0.4, 0.4], &[5, 3]), None, "split after a shed");
        assert_eq!(
            shed_plan(&[0.1, 0.0, 0.0], &[5, 0, 0]),
            None,
            "already packed"
        );
        assert_eq!(shed_plan(&[0.0, 0.0], &[0, 0]), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loops_count_cpu_time_and_connections_and_stop_when_dropped() {
        let runtime = Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (loops, running) = Loops::start(2, Arc::new(Metrics::default())).expect("loops");
            assert!(loops.loops.iter().all(|l| l.cpu.is_some()));
            let (ran, on_loop) = oneshot::channel();
            loops.spawn(1, move |seat| async move {
                // 200 ms of CPU, however long a busy machine takes to give it.
                let cpu = own_schedstat().expect("the loop's schedstat");
                let until = cpu_ns(&cpu).expect("CPU time") + 200_000_000;
                while cpu_ns(&cpu).is_some_and(|now| now < until) {
                    std::hint::black_box(0u64);
                }
                let _ = ran.send((current(), seat.index));
            });
            let (id, index) = on_loop.await.expect("ran");
            assert!(id.is_some() && index == 1);
            assert_eq!(current(), None, "the caller is not a loop");
            loops.sample();
            let (busy, idle) = (loops.loops[1].load(), loops.loops[0].load());
            assert!(busy > 0.0 && busy > idle, "{:?}", loops.sampled);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(loops.loops[1].connections.load(Ordering::Relaxed), 0);
            let handle = loops.loops[0].handle.clone();
            drop(running);
            let (sent, dropped) = oneshot::channel::<()>();
            handle.spawn(async move {
                let _keep = sent;
                std::future::pending::<()>().await
            });
            assert!(dropped.await.is_err(), "a stopped loop drops its work");
        });
    }
}
