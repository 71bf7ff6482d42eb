//! The reverse path over real gRPC: a gateway in remote-session mode answers
//! `gateway_sendDataToGateway` (unary and stream) with false when no live
//! connection carries the session — nothing is reported delivered that was not.

use std::net::TcpListener as StdListener;
use std::time::Duration;

use mtproto_edge_proto::gateway::rpc_gateway_client::RpcGatewayClient;
use mtproto_edge_proto::gateway::rpc_gateway_stream_client::RpcGatewayStreamClient;
use mtproto_edge_proto::gateway::{
    GatewayStreamRequest, TlGatewaySendDataToGateway, SEND_DATA_TO_GATEWAY,
};
use mtproto_gateway::app::Gateway;
use mtproto_gateway::config::{Cli, Config, ConfigExt};

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn unknown_sessions_are_not_delivered() {
    use clap::Parser;
    let dir = tempfile::tempdir().expect("tempdir");
    let grpc_port = free_port();
    let cli = Cli::parse_from([
        "mtproto-gateway",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--session",
        &format!("grpc://127.0.0.1:{}", free_port()),
        "--grpc-listen",
        &format!("127.0.0.1:{grpc_port}"),
    ]);
    let config = Config::load(&cli).expect("config");
    let gateway = Gateway::build(&config).await.expect("gateway");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(gateway.serve(stopped));

    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let request = TlGatewaySendDataToGateway {
        constructor: SEND_DATA_TO_GATEWAY,
        auth_key_id: 1,
        session_id: 2,
        payload: vec![0; 40].into(),
    };
    let mut unary = RpcGatewayClient::connect(endpoint.clone())
        .await
        .expect("connect");
    let reply = unary
        .gateway_send_data_to_gateway(request.clone())
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(reply.predicate_name, "boolFalse");
    assert!(!reply.value());

    let mut stream = RpcGatewayStreamClient::connect(endpoint)
        .await
        .expect("connect");
    let requests = tokio_stream::iter(vec![GatewayStreamRequest {
        request_id: "r1".into(),
        send_data: Some(request),
    }]);
    let mut responses = stream
        .gateway_data_stream(requests)
        .await
        .expect("stream")
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("in time")
        .expect("stream ok")
        .expect("a response");
    assert_eq!(response.request_id, "r1");
    assert!(!response.success);

    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(40), serving)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean exit");
}
