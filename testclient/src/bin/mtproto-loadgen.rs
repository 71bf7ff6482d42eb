//! `mtproto-loadgen`: a bounded load generator for a gateway on loopback (or
//! a test host of your own). Each worker creates an auth key and then sends
//! pings over it, keeping `--in-flight` of them outstanding on one MTProto
//! session (a new one as each `pong` arrives). With pings, the measured
//! window opens once every connection has its key, so the figures per pair
//! carry no handshakes; it lasts `--duration-secs`. The run prints rates,
//! per-ping latency percentiles and CPU time per ping (or per handshake) of
//! its own and of each `--measure-pid` process over the same window.
//! `scripts/perf.sh` gives the same-run references (OpenSSL) for ratios;
//! `scripts/pipeline-bench.sh` compares two revisions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::RsaPublicKey;
use tokio::sync::{watch, Notify};

use mtproto_core::authkey::AuthKey;
use mtproto_core::tl::{id, TlReader, TlWrite};
use mtproto_testclient::Client;

#[derive(Debug, Parser)]
#[command(name = "mtproto-loadgen", about = "Bounded MTProto load generator")]
struct Cli {
    /// Gateway address (loopback or a test host you run).
    #[arg(long, default_value = "127.0.0.1:10443")]
    target: SocketAddr,
    /// The gateway's public RSA key (PKCS#1 PEM).
    #[arg(long)]
    public_key: PathBuf,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Pings per connection after its handshake (0 = handshakes only).
    #[arg(long, default_value_t = 100)]
    pings: u64,
    /// Pings kept outstanding per connection, pipelined on one MTProto
    /// session: a new one is sent as each pong arrives.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    in_flight: u32,
    /// Length of the client's DH secret: 2048 as the spec asks, or shorter
    /// (down to 224) so that the load generator's own CPU goes less into
    /// handshakes than the gateway's does.
    #[arg(long, default_value_t = mtproto_core::dh::SPEC_SECRET_BITS,
          value_parser = clap::value_parser!(u32).range(224..=2048))]
    dh_secret_bits: u32,
    /// Also report the CPU time and the context switches of this process
    /// (the gateway, its session) over the measured window, per pair or per
    /// handshake. Repeatable.
    #[arg(long)]
    measure_pid: Vec<u32>,
}

/// A worker's pause after a failed connection.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// A connection with pings outstanding and nothing received for this long has failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies are recorded in microseconds, up to a minute, to 3 significant digits.
const LATENCY_MAX_US: u64 = 60_000_000;
/// How long the connections may take to make their keys before the window.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// `/proc/*/stat` counts CPU time in USER_HZ ticks, 100 a second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// Handshakes and pings within the measured window, the handshakes before
/// it apart, and errors throughout the run.
#[derive(Debug, Default)]
struct Counters {
    handshakes: AtomicU64,
    warm_up_handshakes: AtomicU64,
    pings: AtomicU64,
    errors: AtomicU64,
}

/// The measured window: workers wait (after their first handshake) until
/// `deadline` is set, which opens it.
struct Window {
    deadline: watch::Receiver<Option<Instant>>,
    keyed: AtomicUsize,
    all_keyed: Notify,
    connections: usize,
}

impl Window {
    /// Called after a handshake before the window opened (`first`: the
    /// worker's first key): waits for the window and gives its deadline.
    async fn keyed(&self, first: bool) -> anyhow::Result<Instant> {
        if first && self.keyed.fetch_add(1, Ordering::AcqRel) + 1 == self.connections {
            self.all_keyed.notify_one();
        }
        let mut deadline = self.deadline.clone();
        let open = deadline
            .wait_for(Option::is_some)
            .await
            .context("the run ended before the window opened")?;
        Ok(open.expect("waited for Some"))
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// One connection's pipelined pings on one MTProto session.
struct Pinger<'a> {
    client: Client,
    key: &'a AuthKey,
    salt: i64,
    session_id: i64,
    next_ping_id: i64,
    /// ping_id → (msg_id it was last sent with, first send time).
    outstanding: HashMap<i64, (i64, Instant)>,
}

impl Pinger<'_> {
    async fn send(&mut self, ping_id: i64) -> anyhow::Result<i64> {
        let mut ping = Vec::with_capacity(12);
        ping.put_u32(id::PING);
        ping.put_i64(ping_id);
        let msg_id = self.client.next_msg_id();
        self.client
            .send(self.key, self.salt, self.session_id, msg_id, &ping)
            .await?;
        Ok(msg_id)
    }

    async fn send_new(&mut self) -> anyhow::Result<()> {
        let ping_id = self.next_ping_id;
        self.next_ping_id += 1;
        let sent = Instant::now();
        let msg_id = self.send(ping_id).await?;
        self.outstanding.insert(ping_id, (msg_id, sent));
        Ok(())
    }

    /// The pongs in one server message (several when the session answered
    /// them in one container), after acting on any `bad_server_salt`.
    async fn pongs(&mut self, body: &[u8], out: &mut Vec<i64>) -> anyhow::Result<()> {
        let mut r = TlReader::new(body);
        let constructor = r.u32().context("reply shorter than a constructor")?;
        match constructor {
            id::MSG_CONTAINER => {
                let count = r.u32().context("short container")?;
                for _ in 0..count {
                    let (_msg_id, _seq_no, len) = (r.i64(), r.i32(), r.u32());
                    let inner = r.take(len.context("short container")? as usize);
                    let inner = inner.context("short container")?;
                    if u32::from_le_bytes(inner.get(..4).context("empty message")?.try_into()?)
                        == id::MSG_CONTAINER
                    {
                        bail!("container inside a container");
                    }
                    Box::pin(self.pongs(inner, out)).await?;
                }
            }
            id::PONG => {
                let _msg_id = r.i64().context("short pong")?;
                out.push(r.i64().context("short pong")?);
            }
            id::BAD_SERVER_SALT => {
                let bad_msg_id = r.i64().context("short bad_server_salt")?;
                let (_seq_no, _code) = (r.i32(), r.i32());
                self.salt = r.i64().context("short bad_server_salt")?;
                let refused = self
                    .outstanding
                    .iter()
                    .find(|(_, (msg_id, _))| *msg_id == bad_msg_id)
                    .map(|(ping_id, _)| *ping_id);
                if let Some(ping_id) = refused {
                    let msg_id = self.send(ping_id).await?;
                    if let Some(entry) = self.outstanding.get_mut(&ping_id) {
                        entry.0 = msg_id;
                    }
                }
            }
            id::BAD_MSG_NOTIFICATION => {
                let (_msg_id, _seq_no) = (r.i64(), r.i32());
                bail!("bad_msg_notification code {}", r.i32().unwrap_or(0));
            }
            // new_session_created, msgs_ack and anything else need no answer here.
            _ => {}
        }
        Ok(())
    }
}

/// One connection: a handshake, then up to `--pings` pings with
/// `--in-flight` outstanding, until they are answered or the deadline.
async fn connection(
    cli: &Cli,
    server: &RsaPublicKey,
    counters: &Counters,
    latencies: &mut Histogram<u64>,
    window: &Window,
    waits_for_window: &mut bool,
) -> anyhow::Result<()> {
    let mut client = Client::connect(cli.target).await?;
    client.set_dh_secret_bits(cli.dh_secret_bits);
    let key = client.create_key(server, None).await?;
    let open = *window.deadline.borrow();
    let deadline = match open {
        Some(deadline) => {
            counters.handshakes.fetch_add(1, Ordering::Relaxed);
            deadline
        }
        None => {
            counters.warm_up_handshakes.fetch_add(1, Ordering::Relaxed);
            window.keyed(std::mem::take(waits_for_window)).await?
        }
    };
    let mut p = Pinger {
        client,
        key: &key.key,
        salt: key.salt,
        session_id: rand::random(),
        next_ping_id: 0,
        outstanding: HashMap::new(),
    };
    let may_send = |p: &Pinger| (p.next_ping_id as u64) < cli.pings && Instant::now() < deadline;
    while p.outstanding.len() < cli.in_flight as usize && may_send(&p) {
        p.send_new().await?;
    }
    let mut pongs = Vec::new();
    while !p.outstanding.is_empty() {
        let (_, body) = tokio::time::timeout(REPLY_TIMEOUT, p.client.recv(p.key))
            .await
            .context("no reply within 10 s")??;
        pongs.clear();
        p.pongs(&body, &mut pongs).await?;
        let now = Instant::now();
        for ping_id in &pongs {
            let Some((_, sent)) = p.outstanding.remove(ping_id) else {
                bail!("pong for ping {ping_id}, not outstanding");
            };
            latencies.saturating_record(now.duration_since(sent).as_micros() as u64);
            counters.pings.fetch_add(1, Ordering::Relaxed);
        }
        while p.outstanding.len() < cli.in_flight as usize && may_send(&p) {
            p.send_new().await?;
        }
    }
    Ok(())
}

async fn worker(
    cli: Arc<Cli>,
    server: Arc<RsaPublicKey>,
    counters: Arc<Counters>,
    window: Arc<Window>,
) -> Histogram<u64> {
    let mut latencies = new_histogram();
    let mut waits_for_window = true;
    while window
        .deadline
        .borrow()
        .is_none_or(|deadline| Instant::now() < deadline)
    {
        let result = connection(
            &cli,
            &server,
            &counters,
            &mut latencies,
            &window,
            &mut waits_for_window,
        )
        .await;
        if let Err(e) = result {
            // The first error says why (a −429 from the gateway's handshake
            // limit, say); a pause keeps a refusing gateway from being hammered.
            if counters.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("mtproto-loadgen: {e:#}");
            }
            tokio::time::sleep(ERROR_PAUSE).await;
        }
    }
    latencies
}

/// `name` under a process's `/proc` directory; `None` for this one.
fn proc_path(pid: Option<u32>, name: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{name}"),
        None => format!("/proc/self/{name}"),
    }
}

/// A process's user + system CPU time so far (all threads); `None` for
/// this one.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SEC,
    ))
}

/// Context switches of a process's threads so far, voluntary and not
/// (a thread that ended is no longer counted); `None` for this one.
fn switches(pid: Option<u32>) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(proc_path(pid, "task")).ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.ends_with("voluntary_ctxt_switches")
                    .then(|| value.trim().parse::<u64>().ok())?
            })
            .sum::<u64>();
    }
    Some(total)
}

/// CPU ticks the whole machine's processes used so far (user, nice,
/// system), from `/proc/stat`.
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|t| t.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SEC))
}

/// One process's CPU time and context switches.
#[derive(Clone, Copy)]
struct Usage {
    cpu: Option<Duration>,
    switches: Option<u64>,
}

impl Usage {
    fn take(pid: Option<u32>) -> Self {
        Self {
            cpu: cpu_time(pid),
            switches: switches(pid),
        }
    }
}

/// CPU times at the window's opening, to subtract at its end.
struct CpuSample {
    own: Usage,
    pids: Vec<(u32, Usage)>,
    machine: Option<Duration>,
}

impl CpuSample {
    fn take(pids: &[u32]) -> Self {
        Self {
            own: Usage::take(None),
            pids: pids.iter().map(|&p| (p, Usage::take(Some(p)))).collect(),
            machine: machine_busy(),
        }
    }

    /// The lines reporting CPU and switches per `count` `unit`s since `start`.
    fn report(start: &Self, end: &Self, count: u64, unit: &str) -> Vec<String> {
        let per = |a: Usage, b: Usage| {
            let cpu = a.cpu.zip(b.cpu).map_or_else(
                || "unknown".to_owned(),
                |(a, b)| {
                    format!(
                        "{:.1}",
                        b.saturating_sub(a).as_secs_f64() * 1e6 / count as f64
                    )
                },
            );
            let switches = a.switches.zip(b.switches).map_or_else(
                || "unknown".to_owned(),
                |(a, b)| format!("{:.3}", b.saturating_sub(a) as f64 / count as f64),
            );
            format!("CPU {cpu} us/{unit}, {switches} switches/{unit}")
        };
        let mut lines = vec![format!("loadgen {}", per(start.own, end.own))];
        for ((pid, a), (_, b)) in start.pids.iter().zip(&end.pids) {
            lines.push(format!("pid {pid} {}", per(*a, *b)));
        }
        if let Some((a, b)) = start.machine.zip(end.machine) {
            lines.push(format!(
                "machine busy {:.2} CPU s",
                b.saturating_sub(a).as_secs_f64()
            ));
        }
        lines
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Arc::new(Cli::parse());
    let pem = std::fs::read_to_string(&cli.public_key)
        .with_context(|| format!("--public-key: cannot read {}", cli.public_key.display()))?;
    let server = Arc::new(
        RsaPublicKey::from_pkcs1_pem(&pem).context("--public-key: not a PKCS#1 RSA public key")?,
    );
    let counters = Arc::new(Counters::default());
    let duration = Duration::from_secs(cli.duration_secs);
    let (open, deadline) = watch::channel(None);
    let window = Arc::new(Window {
        deadline,
        keyed: AtomicUsize::new(0),
        all_keyed: Notify::new(),
        connections: cli.connections,
    });
    // Handshakes are what a run without pings measures: its window opens at once.
    let mut start = None;
    if cli.pings == 0 {
        start = Some((CpuSample::take(&cli.measure_pid), Instant::now()));
        open.send_replace(Some(Instant::now() + duration));
    }
    let workers: Vec<_> = (0..cli.connections)
        .map(|_| {
            tokio::spawn(worker(
                cli.clone(),
                server.clone(),
                counters.clone(),
                window.clone(),
            ))
        })
        .collect();
    let (cpu_start, started) = match start {
        Some(start) => start,
        None => {
            let all_keyed = async {
                while window.keyed.load(Ordering::Acquire) < cli.connections {
                    window.all_keyed.notified().await;
                }
            };
            if tokio::time::timeout(WARM_UP_TIMEOUT, all_keyed)
                .await
                .is_err()
            {
                bail!(
                    "only {} of {} connections made a key within {} s",
                    window.keyed.load(Ordering::Acquire),
                    cli.connections,
                    WARM_UP_TIMEOUT.as_secs()
                );
            }
            let start = (CpuSample::take(&cli.measure_pid), Instant::now());
            open.send_replace(Some(Instant::now() + duration));
            start
        }
    };
    let mut latencies = new_histogram();
    for w in workers {
        latencies
            .add(w.await?)
            .context("merging latency histograms")?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_end = CpuSample::take(&cli.measure_pid);
    let handshakes = counters.handshakes.load(Ordering::Relaxed);
    let pings = counters.pings.load(Ordering::Relaxed);
    println!(
        "{handshakes} handshakes ({:.1}/s), {pings} ping round trips ({:.1}/s), {} errors, {} connections, {secs:.1} s",
        handshakes as f64 / secs,
        pings as f64 / secs,
        counters.errors.load(Ordering::Relaxed),
        cli.connections,
    );
    let warm_up = counters.warm_up_handshakes.load(Ordering::Relaxed);
    if warm_up > 0 {
        println!("{warm_up} handshakes before the window (not counted above)");
    }
    if pings == 0 && handshakes > 0 {
        println!(
            "handshakes only: client DH secret {} bits",
            cli.dh_secret_bits
        );
        for line in CpuSample::report(&cpu_start, &cpu_end, handshakes, "handshake") {
            println!("{line}");
        }
    }
    if pings > 0 {
        let us = |q: f64| latencies.value_at_quantile(q);
        println!(
            "in-flight {}: {:.1} pairs/s, latency p50 {} us, p99 {} us, p999 {} us, max {} us",
            cli.in_flight,
            pings as f64 / secs,
            us(0.5),
            us(0.99),
            us(0.999),
            latencies.max(),
        );
        for line in CpuSample::report(&cpu_start, &cpu_end, pings, "pair") {
            println!("{line}");
        }
    }
    Ok(())
}
