//! `mtproto-loadgen`: a bounded load generator for a gateway on loopback (or
//! a test host of your own). Each worker creates an auth key and then sends
//! pings over it; the run stops after `--duration-secs` and prints rates.
//! `scripts/bench.sh` gives the same-run references (OpenSSL) for ratios.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::RsaPublicKey;

use mtproto_core::tl::{id, TlWrite};
use mtproto_gateway::client::Client;

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
}

/// A worker's pause after a failed connection.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Counters {
    handshakes: AtomicU64,
    pings: AtomicU64,
    errors: AtomicU64,
}

async fn worker(
    cli: Arc<Cli>,
    server: Arc<RsaPublicKey>,
    counters: Arc<Counters>,
    deadline: Instant,
) {
    while Instant::now() < deadline {
        let result: anyhow::Result<()> = async {
            let mut client = Client::connect(cli.target).await?;
            let key = client.create_key(&server, None).await?;
            counters.handshakes.fetch_add(1, Ordering::Relaxed);
            let session_id = rand::random();
            let mut salt = key.salt;
            for n in 0..cli.pings {
                if Instant::now() >= deadline {
                    break;
                }
                let mut ping = Vec::with_capacity(12);
                ping.put_u32(id::PING);
                ping.put_i64(n as i64);
                let msg_id = client.next_msg_id();
                client
                    .send(&key.key, salt, session_id, msg_id, &ping)
                    .await?;
                // Read until the pong (new_session_created or bad_server_salt may come first).
                loop {
                    let (_, body) = client.recv(&key.key).await?;
                    let constructor = u32::from_le_bytes(
                        body.get(..4)
                            .context("reply shorter than a constructor")?
                            .try_into()?,
                    );
                    if constructor == id::BAD_SERVER_SALT {
                        let new_salt = body.get(20..28).context("short bad_server_salt")?;
                        salt = i64::from_le_bytes(new_salt.try_into()?);
                        let msg_id = client.next_msg_id();
                        client
                            .send(&key.key, salt, session_id, msg_id, &ping)
                            .await?;
                    } else if constructor == id::PONG || constructor == id::MSG_CONTAINER {
                        break;
                    }
                }
                counters.pings.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
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
    for w in workers {
        w.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let handshakes = counters.handshakes.load(Ordering::Relaxed);
    let pings = counters.pings.load(Ordering::Relaxed);
    println!(
        "{handshakes} handshakes ({:.1}/s), {pings} ping round trips ({:.1}/s), {} errors, {} connections, {secs:.1} s",
        handshakes as f64 / secs,
        pings as f64 / secs,
        counters.errors.load(Ordering::Relaxed),
        cli.connections,
    );
    Ok(())
}
