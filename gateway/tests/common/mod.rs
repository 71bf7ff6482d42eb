//! What several integration tests share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mtproto_session::embedded::EmbeddedSession;
use mtproto_session::grpc_server::{self, RemoteGateways, SessionGrpc};
use mtproto_session::ring::Ring;
use mtproto_session::store::MemoryStore;
use tokio::net::TcpListener;

/// The reference session as `mtproto-session` serves it, on loopback, with
/// `others` on its ring after itself.
pub async fn reference_session(others: &[&str]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let me = addr.to_string();
    let members = std::iter::once(me.clone())
        .chain(others.iter().map(|s| s.to_string()))
        .collect::<Vec<_>>();
    let session = Arc::new(EmbeddedSession::new(
        Arc::new(MemoryStore::default()),
        Arc::new(RemoteGateways::new(Duration::from_secs(1))),
    ));
    let service = Arc::new(SessionGrpc::new(session, Ring::new(members), me));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(grpc_server::routes(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}
