//! `grammers-probe`: connects to an MTProto server with grammers (a third-party
//! Rust client), runs the auth-key handshake with grammers' own code, then calls
//! `ping` and `invokeWithLayer(initConnection(help.getConfig))` and prints one
//! JSON line per step on stdout.
//!
//! A call counts as answered when the server sent its result or an `rpc_error`
//! (the gateway's reference session answers API methods with
//! `rpc_error` 400 `API_METHOD_NOT_SERVED_BY_REFERENCE_SESSION`). The exit
//! status is 0 only when the handshake finished and every call was answered,
//! 1 otherwise, 2 for bad arguments or an unreadable key.
//!
//! grammers only trusts Telegram's RSA keys; `prepare.sh` patches
//! `grammers_mtproto::authentication::add_server_key` in so the key given with
//! `--rsa-public-key` is accepted too.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::{Parser, ValueEnum};
use grammers_mtproto::transport::{Abridged, Full, Intermediate, Obfuscated, Transport};
use grammers_mtproto::{authentication, mtp};
use grammers_mtsender::{InvocationError, Sender, ServerAddr};
use grammers_tl_types::{self as tl, Serializable as _};
use num_bigint::BigUint;
use serde_json::{Value, json};
use sha1::{Digest as _, Sha1};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Handshake, ping and help.getConfig against an MTProto server with grammers"
)]
struct Args {
    /// Server address, HOST:PORT.
    #[arg(long)]
    addr: String,

    /// MTProto TCP transport (grammers' own default is full). `obfuscated` is
    /// obfuscated2 around intermediate (grammers can obfuscate abridged and
    /// intermediate, not full).
    #[arg(long, value_enum, default_value_t = TransportKind::Full)]
    transport: TransportKind,

    /// The server's RSA public key, PEM (PKCS#1 `RSA PUBLIC KEY` or
    /// SubjectPublicKeyInfo `PUBLIC KEY`).
    #[arg(long)]
    rsa_public_key: PathBuf,

    /// How long the connect + handshake, and then each call, may take.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,

    /// Calls to make, in order, on the one connection.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Call::Ping, Call::HelpGetConfig])]
    calls: Vec<Call>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    Full,
    Abridged,
    Intermediate,
    #[value(name = "obfuscated", alias = "obfuscated-intermediate")]
    ObfuscatedIntermediate,
    ObfuscatedAbridged,
}

impl TransportKind {
    fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Abridged => "abridged",
            Self::Intermediate => "intermediate",
            Self::ObfuscatedIntermediate => "obfuscated",
            Self::ObfuscatedAbridged => "obfuscated-abridged",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Call {
    /// `ping#7abe77ec`
    Ping,
    /// `invokeWithLayer(initConnection(help.getConfig))`
    #[value(name = "help.getConfig")]
    HelpGetConfig,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::HelpGetConfig => "help.getConfig",
        }
    }
}

/// An RSA public key as grammers wants it: modulus and exponent in decimal,
/// and the MTProto fingerprint the server advertises in `resPQ`.
struct ServerKey {
    fingerprint: i64,
    n: BigUint,
    e: BigUint,
}

impl ServerKey {
    fn from_pem(pem: &str) -> Result<Self, String> {
        let der = pem_body(pem)?;
        let (n, e) = rsa_public_key_from_der(&der)?;
        Ok(Self {
            fingerprint: fingerprint(n, e),
            n: BigUint::from_bytes_be(n),
            e: BigUint::from_bytes_be(e),
        })
    }
}

/// The base64 between the first `-----BEGIN` line and its `-----END` line.
fn pem_body(pem: &str) -> Result<Vec<u8>, String> {
    let mut lines = pem.lines().map(str::trim);
    lines
        .by_ref()
        .find(|l| l.starts_with("-----BEGIN"))
        .ok_or("no PEM BEGIN line")?;
    let b64: String = lines.take_while(|l| !l.starts_with("-----END")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("bad PEM base64: {e}"))
}

/// Splits one DER element off `buf`: (tag, contents, rest).
fn der_element(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let short = || "truncated DER".to_string();
    let (&tag, buf) = buf.split_first().ok_or_else(short)?;
    let (&first, mut buf) = buf.split_first().ok_or_else(short)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || buf.len() < count {
            return Err("unsupported DER length".into());
        }
        let (bytes, rest) = buf.split_at(count);
        buf = rest;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if buf.len() < len {
        return Err(short());
    }
    let (contents, rest) = buf.split_at(len);
    Ok((tag, contents, rest))
}

const DER_INTEGER: u8 = 0x02;
const DER_BIT_STRING: u8 = 0x03;
const DER_SEQUENCE: u8 = 0x30;

/// (n, e) as unsigned big-endian bytes from PKCS#1 `RSAPublicKey` or from a
/// SubjectPublicKeyInfo wrapping one.
fn rsa_public_key_from_der(der: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let (tag, seq, _) = der_element(der)?;
    if tag != DER_SEQUENCE {
        return Err("key is not a DER SEQUENCE".into());
    }
    let (tag, first, rest) = der_element(seq)?;
    match tag {
        DER_INTEGER => {
            let (tag, e, _) = der_element(rest)?;
            if tag != DER_INTEGER {
                return Err("RSAPublicKey exponent is not an INTEGER".into());
            }
            Ok((unsigned(first), unsigned(e)))
        }
        DER_SEQUENCE => {
            // SubjectPublicKeyInfo: algorithm, then BIT STRING (unused-bits byte, RSAPublicKey).
            let (tag, bits, _) = der_element(rest)?;
            match bits.split_first() {
                Some((0, inner)) if tag == DER_BIT_STRING => rsa_public_key_from_der(inner),
                _ => Err("SubjectPublicKeyInfo without a key BIT STRING".into()),
            }
        }
        _ => Err("not an RSA public key".into()),
    }
}

/// A DER INTEGER's contents without the sign byte.
fn unsigned(mut int: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = int {
        int = rest;
    }
    int
}

/// MTProto's key fingerprint: the low 64 bits of
/// SHA1(`rsa_public_key n:bytes e:bytes`), as the server lists it in `resPQ`.
fn fingerprint(n: &[u8], e: &[u8]) -> i64 {
    let mut hasher = Sha1::new();
    hasher.update(n.to_bytes());
    hasher.update(e.to_bytes());
    let digest = hasher.finalize();
    i64::from_le_bytes(digest[12..20].try_into().expect("SHA1 is 20 bytes"))
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

fn emit(line: Value) {
    println!("{line}");
}

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One JSON line for a call; returns whether the server answered it.
fn report<R>(
    call: Call,
    transport: TransportKind,
    start: Instant,
    outcome: Result<Result<R, InvocationError>, tokio::time::error::Elapsed>,
    timeout: Duration,
    describe: impl FnOnce(R) -> (&'static str, Value),
) -> bool {
    let mut line = json!({
        "call": call.name(),
        "transport": transport.name(),
        "ms": elapsed_ms(start),
    });
    let replied = match outcome {
        Ok(Ok(result)) => {
            let (key, value) = describe(result);
            line["ok"] = json!(true);
            line[key] = value;
            true
        }
        Ok(Err(InvocationError::Rpc(err))) => {
            line["ok"] = json!(false);
            line["rpc_error"] = json!({
                "code": err.code,
                "message": err.name,
                "value": err.value,
            });
            true
        }
        Ok(Err(err)) => {
            line["ok"] = json!(false);
            line["error"] = json!(err.to_string());
            false
        }
        Err(_) => {
            line["ok"] = json!(false);
            line["error"] = json!(format!("no reply within {}s", timeout.as_secs()));
            false
        }
    };
    line["replied"] = json!(replied);
    emit(line);
    replied
}

fn init_connection_get_config()
-> tl::functions::InvokeWithLayer<tl::functions::InitConnection<tl::functions::help::GetConfig>> {
    tl::functions::InvokeWithLayer {
        layer: tl::LAYER,
        query: tl::functions::InitConnection {
            api_id: 1,
            device_model: "grammers-probe".into(),
            system_version: std::env::consts::OS.into(),
            app_version: env!("CARGO_PKG_VERSION").into(),
            system_lang_code: "en".into(),
            lang_pack: String::new(),
            lang_code: "en".into(),
            proxy: None,
            params: None,
            query: tl::functions::help::GetConfig {},
        },
    }
}

async fn call<T: Transport>(
    sender: &mut Sender<T, mtp::Encrypted>,
    call: Call,
    kind: TransportKind,
    timeout: Duration,
) -> bool {
    let start = Instant::now();
    match call {
        Call::Ping => {
            let ping_id = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
                    & 0x3fff_ffff_ffff_ffff,
            )
            .unwrap_or(1);
            let outcome =
                tokio::time::timeout(timeout, sender.invoke(&tl::functions::Ping { ping_id }))
                    .await;
            report(call, kind, start, outcome, timeout, |pong| {
                let tl::enums::Pong::Pong(pong) = pong;
                let matches = pong.ping_id == ping_id;
                (
                    "pong",
                    json!({"msg_id": pong.msg_id, "ping_id": pong.ping_id, "ping_id_matches": matches}),
                )
            })
        }
        Call::HelpGetConfig => {
            let outcome =
                tokio::time::timeout(timeout, sender.invoke(&init_connection_get_config())).await;
            report(call, kind, start, outcome, timeout, |config| {
                let tl::enums::Config::Config(config) = config;
                (
                    "config",
                    json!({"this_dc": config.this_dc, "dc_options": config.dc_options.len()}),
                )
            })
        }
    }
}

/// Handshake, then every call on the same connection; true when all answered.
async fn probe<T: Transport>(transport: T, args: &Args, addr: SocketAddr) -> bool {
    let timeout = Duration::from_secs(args.timeout_secs);
    let kind = args.transport;
    let start = Instant::now();
    let connected = tokio::time::timeout(
        timeout,
        grammers_mtsender::connect(transport, ServerAddr::Tcp { address: addr }),
    )
    .await;
    let mut line = json!({"call": "handshake", "transport": kind.name(), "ms": elapsed_ms(start)});
    let outcome = match connected {
        Ok(Ok(sender)) => Ok(sender),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no handshake within {}s", timeout.as_secs())),
    };
    line["ok"] = json!(outcome.is_ok());
    line["replied"] = json!(outcome.is_ok());
    let mut sender = match outcome {
        Ok(sender) => {
            emit(line);
            sender
        }
        Err(err) => {
            line["error"] = json!(err);
            emit(line);
            return false;
        }
    };

    let mut all = true;
    for &c in &args.calls {
        all &= call(&mut sender, c, kind, timeout).await;
    }
    let _ = sender.disconnect().await;
    all
}

fn main() -> ExitCode {
    let args = Args::parse();
    // grammers logs through `tracing`; RUST_LOG=grammers_mtsender=trace shows every message.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let key = match std::fs::read_to_string(&args.rsa_public_key)
        .map_err(|e| format!("cannot read {}: {e}", args.rsa_public_key.display()))
        .and_then(|pem| ServerKey::from_pem(&pem))
    {
        Ok(key) => key,
        Err(err) => {
            eprintln!("grammers-probe: {err}");
            return ExitCode::from(2);
        }
    };
    let addr = match resolve(&args.addr) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("grammers-probe: {err}");
            return ExitCode::from(2);
        }
    };
    authentication::add_server_key(key.fingerprint, &key.n.to_string(), &key.e.to_string());
    eprintln!(
        "grammers-probe: {} via {}, server key fingerprint {}",
        addr,
        args.transport.name(),
        key.fingerprint
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ok = runtime.block_on(async {
        match args.transport {
            TransportKind::Full => probe(Full::new(), &args, addr).await,
            TransportKind::Abridged => probe(Abridged::new(), &args, addr).await,
            TransportKind::Intermediate => probe(Intermediate::new(), &args, addr).await,
            TransportKind::ObfuscatedIntermediate => {
                probe(Obfuscated::new(Intermediate::new()), &args, addr).await
            }
            TransportKind::ObfuscatedAbridged => {
                probe(Obfuscated::new(Abridged::new()), &args, addr).await
            }
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x02, 0x01, 0x05, 0xff]).unwrap(),
            (0x02, &[5u8][..], &[0xffu8][..])
        );
        let long = [&[0x04, 0x81, 0x80][..], &[7u8; 0x80]].concat();
        let (_, contents, rest) = der_element(&long).unwrap();
        assert_eq!((contents.len(), rest.len()), (0x80, 0));
        assert!(der_element(&[0x02, 0x05, 0x00]).is_err());
    }

    #[test]
    fn unsigned_strips_sign_byte() {
        assert_eq!(unsigned(&[0, 0x80, 1]), &[0x80, 1]);
        assert_eq!(unsigned(&[1, 0]), &[1, 0]);
    }

    /// Telegram's production key and the fingerprint it is known by.
    #[test]
    fn fingerprint_of_telegrams_key() {
        const N: &str = "29379598170669337022986177149456128565388431120058863768162556424047512191330847455146576344487764408661701890505066208632169112269581063774293102577308490531282748465986139880977280302242772832972539403531316010870401287642763009136156734339538042419388722777357134487746169093539093850251243897188928735903389451772730245253062963384108812842079887538976360465290946139638691491496062099570836476454855996319192747663615955633778034897140982517446405334423701359108810182097749467210509584293428076654573384828809574217079944388301239431309115013843331317877374435868468779972014486325557807783825502498215169806323";
        let n = BigUint::parse_bytes(N.as_bytes(), 10)
            .unwrap()
            .to_bytes_be();
        assert_eq!(fingerprint(&n, &[1, 0, 1]), -3414540481677951611);
    }
}
