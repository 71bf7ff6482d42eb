//! Mutual TLS between gateways and sessions over real sockets, with real
//! certificates (OpenSSL-generated CA and leaves): a session and a gateway
//! answer only callers with a certificate of the other role from the fleet's
//! CA; a client with no certificate, another CA's certificate or the wrong
//! role's certificate cannot call `session_queryAuthKey`,
//! `session_setAuthKey` or `gateway_sendDataToGateway`; a session takes a
//! message's `server_id` only when it is the calling gateway's own; a gateway
//! refuses a redirect to a session off its ring; a gateway's session stream
//! carries the server messages of the name its certificate proves; rotated
//! certificate files are served without a restart while established
//! connections carry on.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509};
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use mtproto_edge_proto::gateway::rpc_gateway_client::RpcGatewayClient;
use mtproto_edge_proto::gateway::{TlGatewaySendDataToGateway, SEND_DATA_TO_GATEWAY};
use mtproto_edge_proto::mtproto as pb;
use mtproto_edge_proto::session::rpc_session_client::RpcSessionClient;
use mtproto_edge_proto::session::{self as spb};
use mtproto_gateway::app::Gateway;
use mtproto_gateway::config::{Cli, Config, ConfigExt};
use mtproto_gateway::metrics::{RpcErrorLabels, SessionRpcMetrics};
use mtproto_gateway::server::outbox;
use mtproto_gateway::server::registry::Registry;
use mtproto_gateway::session::remote::{Mode, RemoteSession, RemoteSettings};
use mtproto_session::embedded::EmbeddedSession;
use mtproto_session::grpc_server::{self, RemoteGateways, SessionGrpc};
use mtproto_session::ring::Ring;
use mtproto_session::store::MemoryStore;
use mtproto_session::tls::{self, TlsFiles, TlsSettings};
use mtproto_session::{
    GatewayDelivery, SessionClientData, SessionClientEvent, SessionError, SessionService,
};

const GATEWAY: &str = "mtproto-gateway";
const SESSION: &str = "mtproto-session";

struct Ca {
    cert: X509,
    key: PKey<Private>,
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("pkey")
}

fn serial() -> Asn1Integer {
    let mut n = BigNum::new().expect("bignum");
    n.rand(63, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .expect("random serial");
    n.to_asn1_integer().expect("serial")
}

fn name(cn: &str) -> X509Name {
    let mut name = X509Name::builder().expect("name");
    name.append_entry_by_text("CN", cn).expect("CN");
    name.build()
}

fn ca(cn: &str) -> Ca {
    let key = ec_key();
    let mut x = X509::builder().expect("x509");
    x.set_version(2).expect("v3");
    x.set_serial_number(&serial()).expect("serial");
    x.set_subject_name(&name(cn)).expect("subject");
    x.set_issuer_name(&name(cn)).expect("issuer");
    x.set_pubkey(&key).expect("pubkey");
    x.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("not before");
    x.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
        .expect("not after");
    x.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
        .expect("bc");
    x.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .expect("ku"),
    )
    .expect("ku");
    x.sign(&key, MessageDigest::sha256()).expect("sign");
    Ca {
        cert: x.build(),
        key,
    }
}

/// A leaf of `ca` valid for `dns` (client and server use), as PEM (cert, key).
fn leaf(ca: &Ca, dns: &str) -> (Vec<u8>, Vec<u8>) {
    let key = ec_key();
    let mut x = X509::builder().expect("x509");
    x.set_version(2).expect("v3");
    x.set_serial_number(&serial()).expect("serial");
    x.set_subject_name(&name(dns)).expect("subject");
    x.set_issuer_name(ca.cert.subject_name()).expect("issuer");
    x.set_pubkey(&key).expect("pubkey");
    x.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("not before");
    x.set_not_after(&Asn1Time::days_from_now(30).expect("time"))
        .expect("not after");
    x.append_extension(BasicConstraints::new().build().expect("bc"))
        .expect("bc");
    x.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .build()
            .expect("ku"),
    )
    .expect("ku");
    x.append_extension(
        ExtendedKeyUsage::new()
            .server_auth()
            .client_auth()
            .build()
            .expect("eku"),
    )
    .expect("eku");
    let san = SubjectAlternativeName::new()
        .dns(dns)
        .build(&x.x509v3_context(Some(&ca.cert), None))
        .expect("san");
    x.append_extension(san).expect("san");
    x.sign(&ca.key, MessageDigest::sha256()).expect("sign");
    (
        x.build().to_pem().expect("pem"),
        key.private_key_to_pem_pkcs8().expect("key pem"),
    )
}

/// Writes through a rename, as a Secret update swaps files.
fn write(dir: &Path, file: &str, pem: &[u8]) -> PathBuf {
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, pem).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    path
}

/// The files of one identity: the fleet CA, its certificate and key.
fn identity(dir: &Path, prefix: &str, ca: &Ca, dns: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = leaf(ca, dns);
    (
        write(
            dir,
            &format!("{prefix}-ca.pem"),
            &ca.cert.to_pem().expect("pem"),
        ),
        write(dir, &format!("{prefix}.pem"), &cert),
        write(dir, &format!("{prefix}-key.pem"), &key),
    )
}

/// A client's TLS: it trusts `trust`, presents `cert` (PEM cert, key) if any.
fn client_config(trust: &Ca, cert: Option<(Vec<u8>, Vec<u8>)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&trust.cert.to_pem().expect("pem")).expect("ca der"))
        .expect("root");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
    let mut config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .expect("chain"),
                PrivateKeyDer::from_pem_slice(&key).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Dials with `config`, checking the server against `server_name`.
#[derive(Clone)]
struct TestConnector {
    config: Arc<ClientConfig>,
    server_name: &'static str,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for TestConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let authority = uri.authority().expect("authority").to_string();
            let tcp = TcpStream::connect(authority).await?;
            let name = ServerName::try_from(this.server_name).expect("server name");
            let tls = TlsConnector::from(this.config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn channel(addr: SocketAddr, config: Arc<ClientConfig>, server_name: &'static str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(TestConnector {
            config,
            server_name,
        })
}

/// The reference session as `mtproto-session` serves it with `--tls-*`.
async fn tls_session(files: Arc<TlsFiles>) -> SocketAddr {
    tls_session_on_ring(files, &[]).await
}

/// The same with `others` on its ring besides itself.
async fn tls_session_on_ring(files: Arc<TlsFiles>, others: &[&str]) -> SocketAddr {
    let gateways =
        Arc::new(RemoteGateways::new(Duration::from_secs(1)).with_tls(Some(files.clone())));
    tls_session_delivering_through(files, gateways, others).await
}

/// The same, delivering server messages through `gateways` (gateways'
/// session streams that ask for them included, as `mtproto-session` does).
async fn tls_session_delivering_through(
    files: Arc<TlsFiles>,
    gateways: Arc<RemoteGateways>,
    others: &[&str],
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let members = std::iter::once(addr.to_string())
        .chain(others.iter().map(|o| o.to_string()))
        .collect::<Vec<_>>();
    let session = Arc::new(EmbeddedSession::new(
        Arc::new(MemoryStore::default()),
        gateways.clone(),
    ));
    let service = Arc::new(
        SessionGrpc::new(session, Ring::new(members), addr.to_string())
            .with_stream_replies(gateways),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(grpc_server::routes(service))
            .serve_with_incoming(tls::incoming(listener, Some(files))),
    );
    addr
}

/// `role`'s certificate from `fleet`, trusting the other role's.
fn role_files(dir: &Path, fleet: &Ca, role: &str) -> Arc<TlsFiles> {
    let (prefix, peer) = if role == SESSION {
        ("session", GATEWAY)
    } else {
        ("gateway", SESSION)
    };
    TlsFiles::load(settings(identity(dir, prefix, fleet, role), peer))
        .unwrap_or_else(|e| panic!("{role} TLS: {e}"))
}

fn settings(files: (PathBuf, PathBuf, PathBuf), peer_name: &str) -> TlsSettings {
    TlsSettings {
        ca_file: files.0,
        cert_file: files.1,
        key_file: files.2,
        peer_name: peer_name.into(),
    }
}

fn query() -> spb::TlSessionQueryAuthKey {
    spb::TlSessionQueryAuthKey {
        constructor: spb::QUERY_AUTH_KEY,
        auth_key_id: 42,
    }
}

fn set_auth_key() -> spb::TlSessionSetAuthKey {
    spb::TlSessionSetAuthKey {
        constructor: spb::SET_AUTH_KEY,
        auth_key: None,
        future_salt: None,
        expires_in: 0,
    }
}

fn send_to_gateway() -> TlGatewaySendDataToGateway {
    TlGatewaySendDataToGateway {
        constructor: SEND_DATA_TO_GATEWAY,
        auth_key_id: 1,
        session_id: 2,
        payload: vec![0; 40].into(),
    }
}

fn close_event(server_id: &str) -> spb::TlSessionCloseSession {
    spb::TlSessionCloseSession {
        constructor: spb::CLOSE_SESSION,
        client: Some(spb::SessionClientEvent {
            predicate_name: "sessionClientEvent".into(),
            constructor: spb::SESSION_CLIENT_EVENT,
            server_id: server_id.into(),
            conn_type: 0,
            auth_key_id: 7,
            key_type: 0,
            perm_auth_key_id: 7,
            session_id: 8,
            client_ip: "127.0.0.1".into(),
        }),
    }
}

/// The call failed in TLS, before any service saw it.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) {
    match result {
        Err(status) => assert!(
            matches!(status.code(), Code::Unavailable | Code::Unknown)
                && !status.message().contains("AUTH_KEY_UNREGISTERED")
                && !status.message().contains("setAuthKey"),
            "{what}: not a connection failure: {status:?}"
        ),
        Ok(reply) => panic!("{what}: answered {reply:?}"),
    }
}

#[tokio::test]
async fn only_the_other_role_from_the_fleet_ca_may_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = ca("fleet CA");
    let other = ca("another CA");
    let session_files = role_files(dir.path(), &fleet, SESSION);
    let session = tls_session(session_files).await;

    // The gateway, in-process as the binary runs it, with session.tls.
    let (ca_file, cert_file, key_file) = identity(dir.path(), "gateway", &fleet, GATEWAY);
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let grpc_addr = grpc.local_addr().expect("addr");
    drop(grpc);
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[session]\nmode = \"unary\"\n\
             endpoints = [\"{session}\"]\ngrpc_listen = \"{grpc_addr}\"\n[session.tls]\n\
             ca_file = {ca_file:?}\ncert_file = {cert_file:?}\nkey_file = {key_file:?}\n"
        ),
    )
    .expect("config");
    use clap::Parser;
    let cli = Cli::parse_from([
        "mtproto-gateway",
        "--config",
        config_path.to_str().expect("utf-8"),
        "--data-dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    let config = Config::load(&cli).expect("config");
    let gateway = Gateway::build(&config).await.expect("gateway");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(gateway.serve(stopped));

    let as_gateway = || client_config(&fleet, Some(leaf(&fleet, GATEWAY)));
    let as_session = || client_config(&fleet, Some(leaf(&fleet, SESSION)));
    let strangers = [
        ("no certificate", client_config(&fleet, None)),
        (
            "another CA's certificate",
            client_config(&fleet, Some(leaf(&other, GATEWAY))),
        ),
    ];

    // The session answers gateways (here: the key is unknown)...
    let mut client = RpcSessionClient::new(channel(session, as_gateway(), SESSION));
    let status = client.session_query_auth_key(query()).await.unwrap_err();
    assert!(
        status.message().contains("AUTH_KEY_UNREGISTERED"),
        "{status:?}"
    );
    let status = client
        .session_set_auth_key(set_auth_key())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // ...and no one else: not a session, nor a stranger.
    for (who, config) in strangers
        .iter()
        .cloned()
        .chain([("a session's certificate", as_session())])
    {
        let mut client = RpcSessionClient::new(channel(session, config, SESSION));
        assert_refused(who, client.session_query_auth_key(query()).await);
        assert_refused(who, client.session_set_auth_key(set_auth_key()).await);
    }
    let mut plain = RpcSessionClient::new(
        Endpoint::from_shared(format!("http://{session}"))
            .expect("endpoint")
            .connect_lazy(),
    );
    assert_refused("plaintext", plain.session_query_auth_key(query()).await);

    // The gateway's reverse path answers sessions (no such client: false)...
    let mut client = RpcGatewayClient::new(channel(grpc_addr, as_session(), GATEWAY));
    let reply = client
        .gateway_send_data_to_gateway(send_to_gateway())
        .await
        .expect("a session may call")
        .into_inner();
    assert!(!reply.value());
    // ...and no one else.
    for (who, config) in strangers
        .iter()
        .cloned()
        .chain([("a gateway's certificate", as_gateway())])
    {
        let mut client = RpcGatewayClient::new(channel(grpc_addr, config, GATEWAY));
        assert_refused(
            who,
            client.gateway_send_data_to_gateway(send_to_gateway()).await,
        );
    }

    // A client that does not trust the fleet CA will not talk to either.
    let mut client = RpcSessionClient::new(channel(
        session,
        client_config(&other, Some(leaf(&other, GATEWAY))),
        SESSION,
    ));
    assert_refused(
        "distrusting client",
        client.session_query_auth_key(query()).await,
    );
}

#[tokio::test]
async fn a_session_takes_only_the_calling_gateways_own_server_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = ca("fleet CA");
    let files = role_files(dir.path(), &fleet, SESSION);
    let session = tls_session(files).await;
    let mut client = RpcSessionClient::new(channel(
        session,
        client_config(&fleet, Some(leaf(&fleet, GATEWAY))),
        SESSION,
    ));
    // Its connection's address, or a name its certificate carries.
    for own in ["127.0.0.1:20110", "mtproto-gateway:20110"] {
        let reply = client
            .session_close_session(close_event(own))
            .await
            .unwrap_or_else(|s| panic!("{own}: {s:?}"))
            .into_inner();
        assert_eq!(reply, pb::Bool::from_bool(true), "{own}");
    }
    for foreign in ["10.9.9.9:20110", "evil.example:20110"] {
        let status = client
            .session_close_session(close_event(foreign))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{foreign}: {status:?}"
        );
    }
}

#[tokio::test]
async fn with_tls_a_gateway_stream_carries_the_server_messages_of_its_certificates_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = ca("fleet CA");
    let session_files = role_files(dir.path(), &fleet, SESSION);
    let gateways =
        Arc::new(RemoteGateways::new(Duration::from_secs(1)).with_tls(Some(session_files.clone())));
    let session = tls_session_delivering_through(session_files, gateways.clone(), &[]).await;
    let gateway_files = role_files(dir.path(), &fleet, GATEWAY);
    let registry = Arc::new(Registry::new(Arc::default(), 8));
    let (outbox, mut inbox) = outbox::channel(16);
    registry.attach(1, 9, 1, &outbox);
    let on_stream = Counter::default();
    let client = RemoteSession::new(
        vec![session.to_string()],
        RemoteSettings {
            mode: Mode::Stream,
            call_timeout: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::from_millis(1),
        },
        SessionRpcMetrics::default(),
    )
    .with_tls(Some(gateway_files))
    .with_stream_replies(registry, on_stream.clone());
    // A name the gateway's certificate carries, not its connection's
    // address: nothing could dial it, so only the stream can deliver.
    let own = "mtproto-gateway:20110";
    client
        .send_data(SessionClientData {
            server_id: own.into(),
            conn_type: 1,
            auth_key_id: 1,
            key_type: 0,
            perm_auth_key_id: 1,
            session_id: 7,
            client_ip: "192.0.2.1".into(),
            quick_ack: 0,
            salt: 0,
            payload: vec![0; 64].into(),
        })
        .await
        .expect("forwarded");

    assert!(gateways.send_data_to_gateway(own, 1, 9, vec![1; 8].into()));
    let delivered = tokio::time::timeout(Duration::from_secs(30), inbox.recv())
        .await
        .expect("delivered on the stream in time")
        .expect("a message");
    assert_eq!(&delivered.payload[..], &[1; 8]);
    assert!(on_stream.get() >= 1);
}

/// The leaf certificate a server presents to a fresh connection.
async fn served_certificate(addr: SocketAddr, config: Arc<ClientConfig>) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from(SESSION).expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
}

#[tokio::test]
async fn rotated_certificates_are_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = ca("fleet CA");
    let files = identity(dir.path(), "session", &fleet, SESSION);
    let first = std::fs::read(&files.1).expect("cert");
    let session = tls_session(TlsFiles::load(settings(files, GATEWAY)).expect("TLS")).await;
    let as_gateway = client_config(&fleet, Some(leaf(&fleet, GATEWAY)));
    let mut kept = RpcSessionClient::new(channel(session, as_gateway.clone(), SESSION));
    let status = kept.session_query_auth_key(query()).await.unwrap_err();
    assert!(
        status.message().contains("AUTH_KEY_UNREGISTERED"),
        "{status:?}"
    );
    let der = |pem: &[u8]| CertificateDer::from_pem_slice(pem).expect("der").to_vec();
    assert_eq!(
        served_certificate(session, as_gateway.clone()).await,
        der(&first)
    );

    let (cert, key) = leaf(&fleet, SESSION);
    write(dir.path(), "session-key.pem", &key);
    write(dir.path(), "session.pem", &cert);
    assert_eq!(
        served_certificate(session, as_gateway.clone()).await,
        der(&cert)
    );
    // The connection opened before the rotation still carries calls.
    let status = kept.session_query_auth_key(query()).await.unwrap_err();
    assert!(
        status.message().contains("AUTH_KEY_UNREGISTERED"),
        "{status:?}"
    );

    // A broken rewrite keeps the last good files in use, until fixed.
    write(dir.path(), "session.pem", b"not a certificate");
    assert_eq!(
        served_certificate(session, as_gateway.clone()).await,
        der(&cert)
    );
    assert_eq!(
        served_certificate(session, as_gateway.clone()).await,
        der(&cert)
    );
    let (cert, key) = leaf(&fleet, SESSION);
    write(dir.path(), "session-key.pem", &key);
    write(dir.path(), "session.pem", &cert);
    assert_eq!(served_certificate(session, as_gateway).await, der(&cert));
}

#[tokio::test]
async fn with_tls_a_redirect_off_the_ring_is_refused_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = ca("fleet CA");
    let session_files = role_files(dir.path(), &fleet, SESSION);
    // The session's ring has a member this gateway's ring does not.
    const STRANGER: &str = "127.0.0.1:9";
    let session = tls_session_on_ring(session_files, &[STRANGER]).await;
    let gateway_files = role_files(dir.path(), &fleet, GATEWAY);
    let metrics = SessionRpcMetrics::default();
    let retries = 2;
    let client = RemoteSession::new(
        vec![session.to_string()],
        RemoteSettings {
            mode: Mode::Unary,
            call_timeout: Duration::from_secs(5),
            retries,
            backoff: Duration::from_millis(1),
        },
        metrics.clone(),
    )
    .with_tls(Some(gateway_files));
    let theirs = {
        let ring = Ring::new([session.to_string(), STRANGER.to_string()]);
        (1..100_000)
            .find(|id| ring.owner_of_id(*id) == Some(STRANGER))
            .expect("the stranger owns some key")
    };
    let event = SessionClientEvent {
        server_id: "127.0.0.1:20110".into(),
        auth_key_id: theirs,
        key_type: 0,
        perm_auth_key_id: theirs,
        session_id: 1,
        client_ip: "192.0.2.1".into(),
    };
    match client.close_session(event).await {
        Err(SessionError::Unavailable(e)) => assert!(e.contains("not a ring member"), "{e}"),
        r => panic!("expected a refused redirect, got {r:?}"),
    }
    let refused = metrics
        .errors
        .get_or_create(&RpcErrorLabels {
            method: "session_closeSession",
            kind: "redirect_refused",
        })
        .get();
    assert_eq!(refused, retries as u64 + 1);
}
