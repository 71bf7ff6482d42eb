//! `mtproto-loadgen`: a bounded load generator for a gateway on loopback (or
//! a test host of your own). Each worker creates an auth key and then sends
//! pings over it, keeping `--in-flight` of them outstanding on one MTProto
//! session (a new one as each `pong` arrives); the run stops after
//! `--duration-secs` and prints rates, per-ping latency percentiles and its
//! own CPU time per ping. `scripts/bench.sh` gives the same-run references
//! (OpenSSL) for ratios; `scripts/pipeline-bench.sh` compares two revisions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::RsaPublicKey;

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
}

/// A worker's pause after a failed connection.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
/// A connection with pings outstanding and nothing received for this long has failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies are recorded in microseconds, up to a minute, to 3 significant digits.
const LATENCY_MAX_US: u64 = 60_000_000;
/// `/proc/self/stat` counts CPU time in USER_HZ ticks, 100 a second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Default)]
struct Counters {
    handshakes: AtomicU64,
    pings: AtomicU64,
    errors: AtomicU64,
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
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut client = Client::connect(cli.target).await?;
    client.set_dh_secret_bits(cli.dh_secret_bits);
    let key = client.create_key(server, None).await?;
    counters.handshakes.fetch_add(1, Ordering::Relaxed);
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
    deadline: Instant,
) -> Histogram<u64> {
    let mut latencies = new_histogram();
    while Instant::now() < deadline {
        let result = connection(&cli, &server, &counters, &mut latencies, deadline).await;
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

/// This process's user + system CPU time so far (all threads).
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / TICKS_PER_SEC,
    ))
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
    let cpu_start = cpu_time();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cli.duration_secs);
    let workers: Vec<_> = (0..cli.connections)
        .map(|_| {
            tokio::spawn(worker(
                cli.clone(),
                server.clone(),
                counters.clone(),
                deadline,
            ))
        })
        .collect();
    let mut latencies = new_histogram();
    for w in workers {
        latencies
            .add(w.await?)
            .context("merging latency histograms")?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_start.zip(cpu_time()).map(|(a, b)| b.saturating_sub(a));
    let handshakes = counters.handshakes.load(Ordering::Relaxed);
    let pings = counters.pings.load(Ordering::Relaxed);
    println!(
        "{handshakes} handshakes ({:.1}/s), {pings} ping round trips ({:.1}/s), {} errors, {} connections, {secs:.1} s",
        handshakes as f64 / secs,
        pings as f64 / secs,
        counters.errors.load(Ordering::Relaxed),
        cli.connections,
    );
    if pings == 0 && handshakes > 0 {
        let cpu_per_handshake = cpu.map_or_else(
            || "unknown".to_owned(),
            |c| format!("{:.1}", c.as_secs_f64() * 1e6 / handshakes as f64),
        );
        println!(
            "handshakes only: client DH secret {} bits, loadgen CPU {cpu_per_handshake} us/handshake",
            cli.dh_secret_bits
        );
    }
    if pings > 0 {
        let us = |q: f64| latencies.value_at_quantile(q);
        let cpu_per_pair = cpu.map_or_else(
            || "unknown".to_owned(),
            |c| format!("{:.1}", c.as_secs_f64() * 1e6 / pings as f64),
        );
        println!(
            "in-flight {}: {:.1} pairs/s, latency p50 {} us, p99 {} us, p999 {} us, max {} us, loadgen CPU {cpu_per_pair} us/pair",
            cli.in_flight,
            pings as f64 / secs,
            us(0.5),
            us(0.99),
            us(0.999),
            latencies.max(),
        );
    }
    Ok(())
}
