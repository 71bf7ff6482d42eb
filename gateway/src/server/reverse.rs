//! The gateway's gRPC server for the reverse path: teamgram's
//! `gateway.RPCGateway` and `gateway.RPCGatewayStream`, through which session
//! services hand server messages to the connections of a session.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use mtproto_edge_proto::gateway::rpc_gateway_server::RpcGateway;
use mtproto_edge_proto::gateway::rpc_gateway_stream_server::RpcGatewayStream;
use mtproto_edge_proto::gateway::{self as gpb};
use mtproto_edge_proto::mtproto as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::registry::Registry;

#[derive(Debug, Clone)]
pub struct ReversePath {
    registry: Arc<Registry>,
}

impl ReversePath {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    fn deliver(&self, req: gpb::TlGatewaySendDataToGateway) -> bool {
        self.registry
            .deliver(req.auth_key_id, req.session_id, req.payload)
    }
}

#[async_trait]
impl RpcGateway for ReversePath {
    /// boolTrue when a live connection of the session took the message into its outbox.
    async fn gateway_send_data_to_gateway(
        &self,
        request: Request<gpb::TlGatewaySendDataToGateway>,
    ) -> Result<Response<pb::Bool>, Status> {
        let ok = self.deliver(request.into_inner());
        Ok(Response::new(pb::Bool::from_bool(ok)))
    }
}

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<gpb::GatewayStreamResponse, Status>> + Send>>;

#[async_trait]
impl RpcGatewayStream for ReversePath {
    type GatewayDataStreamStream = ResponseStream;

    async fn gateway_data_stream(
        &self,
        request: Request<Streaming<gpb::GatewayStreamRequest>>,
    ) -> Result<Response<Self::GatewayDataStreamStream>, Status> {
        let this = self.clone();
        let responses = request.into_inner().map(move |item| {
            let request = item?;
            let success = request.send_data.is_some_and(|send| this.deliver(send));
            Ok(gpb::GatewayStreamResponse {
                request_id: request.request_id,
                success,
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }
}
