//! Mutual TLS between gateways and sessions, both gRPC directions.
//!
//! Each side holds a certificate from the fleet's CA and names the identity
//! its peers must prove: a session accepts callers only with a certificate
//! valid for the gateway name, a gateway accepts only the session name, and
//! each checks the same name on the server it dials (peers are dialled by pod
//! IP, so the name, not the address, is what a certificate vouches for).
//! The CA, certificate and key files are re-read when they change (checked
//! at each new TLS connection), so rotated certificates are used without a
//! restart while established connections carry on. The gateway's `wss://`
//! and `https://` listeners reload their certificates the same way
//! ([`Reloading`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::client::verify_server_name;
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::Uri;
use tracing::{debug, error, info, warn};

/// The SAN (DNS name) gateways' certificates carry unless configured.
pub const DEFAULT_GATEWAY_NAME: &str = "mtproto-gateway";
/// The SAN (DNS name) sessions' certificates carry unless configured.
pub const DEFAULT_SESSION_NAME: &str = "mtproto-session";

/// A TLS handshake that takes longer is dropped (an idle or slow peer must
/// not hold an accept slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted and handshaken, waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 64;
/// TLS handshakes in progress at once; connections beyond are closed at
/// accept (peers are a few gateways or sessions, each with few connections).
const MAX_PENDING_HANDSHAKES: usize = 256;
/// TCP keepalive of gRPC connections, served and dialled: a peer that vanished without
/// closing (its node lost, a network partition) is found after about
/// `time + interval × retries` of silence (90 s) and its connection closed,
/// instead of holding a connection slot and its buffers forever.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Where one side's TLS material is and whom it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM bundle of the CA(s) peers' certificates must chain to.
    pub ca_file: PathBuf,
    /// PEM certificate chain this side presents.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The DNS SAN every peer's certificate must be valid for.
    pub peer_name: String,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("peer name {0:?} is not a DNS name")]
    PeerName(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("CA bundle: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What changes when a file is rewritten or a Secret's symlink is swapped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

type Build<T, E> = Box<dyn Fn() -> Result<T, E> + Send + Sync>;

/// A value built from files (TLS material), rebuilt when one of them
/// changes. The check is a `stat` of each file when the value is asked for,
/// which callers do once per new TLS connection, so renewed certificates are
/// used without a restart or a timer while established connections carry on.
pub struct Reloading<T, E> {
    /// Names the files in the log lines.
    what: String,
    paths: Vec<PathBuf>,
    build: Build<T, E>,
    loaded: Mutex<Loaded<T>>,
}

/// The current value and the file stamps it was built from.
#[derive(Debug)]
struct Loaded<T> {
    stamp: Vec<Option<FileStamp>>,
    value: T,
    /// Stamps of files that failed to load: not retried (nor logged again)
    /// until they change once more.
    rejected: Option<Vec<Option<FileStamp>>>,
}

impl<T: std::fmt::Debug, E> std::fmt::Debug for Reloading<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T: Clone, E: std::fmt::Display> Reloading<T, E> {
    /// Builds the value once; the error is `build`'s, for the caller to report.
    pub fn load(
        what: impl Into<String>,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<Self, E> {
        let stamp = stamps(&paths);
        let value = build()?;
        Ok(Self {
            what: what.into(),
            paths,
            build: Box::new(build),
            loaded: Mutex::new(Loaded {
                stamp,
                value,
                rejected: None,
            }),
        })
    }

    /// The current value, rebuilt first if a file changed. A rewrite caught
    /// half-way (or a bad new file) is logged as an error and keeps the
    /// previous value until the files change again.
    pub fn current(&self) -> T {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = stamps(&self.paths);
        if stamp != loaded.stamp && loaded.rejected.as_ref() != Some(&stamp) {
            match (self.build)() {
                Ok(value) => {
                    info!("{} changed: reloaded", self.what);
                    *loaded = Loaded {
                        stamp,
                        value,
                        rejected: None,
                    };
                }
                Err(e) => {
                    error!(
                        "{} changed but cannot be loaded, keeping the previous ones: {e}",
                        self.what
                    );
                    loaded.rejected = Some(stamp);
                }
            }
        }
        loaded.value.clone()
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<FileStamp>> {
    paths.iter().map(|p| stamp(p)).collect()
}

/// The server and client configurations of one side.
type Configs = (Arc<ServerConfig>, Arc<ClientConfig>);

/// One side's TLS material, reloaded when its files change.
#[derive(Debug)]
pub struct TlsFiles {
    settings: TlsSettings,
    peer: ServerName<'static>,
    configs: Reloading<Configs, TlsError>,
}

impl TlsFiles {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let peer = ServerName::try_from(settings.peer_name.clone())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| TlsError::PeerName(settings.peer_name.clone()))?;
        let paths = vec![
            settings.ca_file.clone(),
            settings.cert_file.clone(),
            settings.key_file.clone(),
        ];
        let (s, p) = (settings.clone(), peer.clone());
        let configs = Reloading::load("gRPC TLS files", paths, move || build(&s, &p))?;
        Ok(Arc::new(Self {
            settings,
            peer,
            configs,
        }))
    }

    fn server_config(&self) -> Arc<ServerConfig> {
        self.configs.current().0
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        self.configs.current().1
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn build(s: &TlsSettings, peer: &ServerName<'static>) -> Result<Configs, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates("ca_file", &s.ca_file)? {
        roots
            .add(ca)
            .map_err(|e| pem_error("ca_file", &s.ca_file, e))?;
    }
    let roots = Arc::new(roots);
    let chain = certificates("cert_file", &s.cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(&read("key_file", &s.key_file)?)
        .map_err(|e| pem_error("key_file", &s.key_file, e))?;
    let provider = provider();
    let verifier = Arc::new(PeerNameVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()?,
        peer: peer.clone(),
    });
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    // The standard server verification: the chain against `roots`, the
    // name against the `ServerName` dialled (always the peer name).
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// The CA's client verification plus the peer-name check on the client's
/// certificate, so a certificate of the wrong role fails the handshake.
#[derive(Debug)]
struct PeerNameVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    peer: ServerName<'static>,
}

impl ClientCertVerifier for PeerNameVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, &self.peer)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who is on the other end of a served gRPC connection; in every request's
/// extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The client's verified leaf certificate (TLS only). Shared: tonic
    /// copies the connection's `Peer` into every call, and a stream's
    /// handler into every message.
    pub certificate: Option<Arc<CertificateDer<'static>>>,
}

impl Peer {
    /// Whether this peer may name `host` as its own address: with TLS, the
    /// host is the address the connection comes from or a name (DNS or IP)
    /// its certificate is valid for; without TLS anyone may name anything.
    pub fn may_claim_host(&self, host: &str) -> bool {
        let Some(cert) = &self.certificate else {
            return true;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let (Some(addr), Ok(ip)) = (self.addr, host.parse::<std::net::IpAddr>()) {
            if addr.ip() == ip {
                return true;
            }
        }
        let Ok(name) = ServerName::try_from(host) else {
            return false;
        };
        ParsedCertificate::try_from(cert.as_ref())
            .and_then(|parsed| verify_server_name(&parsed, &name))
            .is_ok()
    }

    /// Whether messages addressed to the gateway at `host` may go back on
    /// this connection. With TLS as [`Peer::may_claim_host`]; without, the
    /// host must be the address the connection comes from, or any caller
    /// could take another gateway's messages by naming it.
    pub fn may_receive_for(&self, host: &str) -> bool {
        if self.certificate.is_some() {
            return self.may_claim_host(host);
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        matches!(
            (self.addr, host.parse::<std::net::IpAddr>()),
            (Some(addr), Ok(ip)) if addr.ip().to_canonical() == ip.to_canonical()
        )
    }
}

trait Io: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

/// A served connection, TLS or not, with its [`Peer`].
pub struct ServedIo {
    io: Pin<Box<dyn Io>>,
    peer: Peer,
}

impl std::fmt::Debug for ServedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedIo")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Connected for ServedIo {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for ServedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

/// Turns on TCP keepalive probes for a gRPC connection.
pub fn keep_alive(tcp: &TcpStream) -> io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_TIME)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&probes)
}

/// The connections of a gRPC listener, for `serve_with_incoming*`: with TLS,
/// only those whose handshake proved the peer identity. Accepting stops when
/// the server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsFiles>>,
) -> ReceiverStream<io::Result<ServedIo>> {
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: the next accept may work.
                    warn!("gRPC accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = keep_alive(&tcp) {
                debug!(peer = %addr, "gRPC connection without TCP keepalive: {e}");
            }
            let Some(tls) = &tls else {
                let io = ServedIo {
                    io: Box::pin(tcp),
                    peer: Peer {
                        addr: Some(addr),
                        certificate: None,
                    },
                };
                if tx.send(Ok(io)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(peer = %addr, "gRPC TLS handshakes at their limit: connection closed");
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| Arc::new(c.clone().into_owned()));
                        let io = ServedIo {
                            io: Box::pin(stream),
                            peer: Peer {
                                addr: Some(addr),
                                certificate,
                            },
                        };
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => debug!(peer = %addr, "gRPC TLS handshake refused: {e}"),
                    Err(_) => debug!(peer = %addr, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Dials `host:port` and proves both identities, for
/// `Endpoint::connect_with_connector_lazy`.
#[derive(Debug, Clone)]
pub struct Connector(pub Arc<TlsFiles>);

type Connecting = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let files = self.0.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host:port"))?
                .as_str()
                .to_string();
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            keep_alive(&tcp)?;
            Ok(TokioIo::new(connect_tls(&files, tcp).await?))
        })
    }
}

/// The client side of mutual TLS over `tcp`, with the current certificate,
/// verifying the peer against the configured peer name.
pub async fn connect_tls(
    files: &TlsFiles,
    tcp: TcpStream,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    TlsConnector::from(files.client_config())
        .connect(files.peer.clone(), tcp)
        .await
}

/// How one side's gRPC is secured, as configured.
#[derive(Debug, Clone)]
pub enum GrpcSecurity {
    Tls(Arc<TlsFiles>),
    /// Explicitly chosen (teamgram's Go services speak plaintext gRPC).
    Plaintext,
    /// Nothing configured: plaintext, for now, with a warning.
    Unconfigured,
}

impl GrpcSecurity {
    pub fn tls(&self) -> Option<Arc<TlsFiles>> {
        match self {
            GrpcSecurity::Tls(files) => Some(files.clone()),
            _ => None,
        }
    }

    /// Says at start what the gRPC links are protected by, loudly when nothing.
    pub fn log(&self, side: &str, how_to_configure: &str) {
        match self {
            GrpcSecurity::Tls(files) => info!(
                peer_name = %files.settings.peer_name,
                cert = %files.settings.cert_file.display(),
                "{side} gRPC: mutual TLS"
            ),
            GrpcSecurity::Plaintext => warn!(
                "{side} gRPC is PLAINTEXT by choice: anyone who reaches these ports can read \
                 auth keys and messages and push messages to clients; use only for teamgram Go \
                 services on a trusted network"
            ),
            GrpcSecurity::Unconfigured => warn!(
                "{side} gRPC is PLAINTEXT and unauthenticated because no TLS is configured: anyone \
                 who reaches these ports can read auth keys and messages and push messages to \
                 clients; configure {how_to_configure}, or choose plaintext explicitly"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn served_connections_probe_a_silent_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (served, _) = accepted.expect("accept");
        let socket = socket2::SockRef::from(&served);
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"));
        keep_alive(&served).expect("keepalive");
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(socket.tcp_keepalive_time().expect("idle"), KEEPALIVE_TIME);
        assert_eq!(
            socket.tcp_keepalive_interval().expect("interval"),
            KEEPALIVE_INTERVAL
        );
        assert_eq!(
            socket.tcp_keepalive_retries().expect("retries"),
            KEEPALIVE_RETRIES
        );
        drop(client);
    }

    #[test]
    fn without_tls_only_the_connections_own_address_receives() {
        let peer = |addr: &str| Peer {
            addr: Some(addr.parse().expect("socket address")),
            certificate: None,
        };
        let local = peer("10.0.0.7:51000");
        assert!(local.may_receive_for("10.0.0.7"));
        assert!(!local.may_receive_for("10.0.0.8"));
        assert!(
            !local.may_receive_for("gateway-0.gateway"),
            "names need TLS"
        );
        assert!(local.may_claim_host("10.0.0.8"), "claiming stays open");
        let mapped = peer("[::ffff:10.0.0.7]:51000");
        assert!(mapped.may_receive_for("10.0.0.7"));
        assert!(peer("[fd00::7]:51000").may_receive_for("[fd00::7]"));
        let unknown = Peer {
            addr: None,
            certificate: None,
        };
        assert!(!unknown.may_receive_for("10.0.0.7"));
    }
}
