//! teamgram's gRPC status codes on the wire. teamgram's sessions answer an
//! unknown auth key with `grpc-status: 401` and a key another instance owns
//! with `grpc-status: 700` (grpc-go carries any number); teamgram's gateway
//! recognises them only with those numbers. tonic's `Code` stops at 16, so:
//!
//! - the session side builds the status with [`teamgram_status`], which rides
//!   as `Code::Unknown` plus a private header through tonic, and serves its
//!   unary service wrapped in [`TeamgramStatus`], which moves that header into
//!   the `grpc-status` of the (trailers-only) error response;
//! - the gateway reads `grpc-status` itself (its session clients drive
//!   HTTP/2 directly), so the numbers reach it as sent.
//!
//! The session's tonic client of the gateway's reverse path is wrapped in
//! [`DropStatusDetails`]: tonic panics on a `grpc-status-details-bin` that is
//! not base64 (`Status::from_header_map`), which would let a gateway end the
//! session's delivery task, and nothing here reads status details.

use std::task::{Context, Poll};

use futures::future::{MapOk, TryFutureExt};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::{Code, Status};

/// teamgram's code for `AUTH_KEY_UNREGISTERED` (`mtproto.ErrAuthKeyUnregistered`).
pub const UNREGISTERED_CODE: u16 = 401;
/// teamgram's code for `REDIRECT_TO_<addr>`.
pub const REDIRECT_CODE: u16 = 700;

/// The header a session-side status carries its teamgram code in until
/// [`TeamgramStatus`] turns it into `grpc-status`.
const STATUS_MARKER: &str = "x-teamgram-grpc-status";
const GRPC_STATUS: &str = "grpc-status";
const GRPC_STATUS_DETAILS: &str = "grpc-status-details-bin";

/// A status sent as `grpc-status: <code>` by a service wrapped in [`TeamgramStatus`]
/// (as `Unknown` with the same message otherwise).
pub fn teamgram_status(code: u16, message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(STATUS_MARKER, MetadataValue::from(code));
    Status::with_metadata(Code::Unknown, message, metadata)
}

/// Session side: a tonic service whose error responses carry the codes of
/// [`teamgram_status`]. Errors before any message are trailers-only responses
/// (the status is in the headers), which is how unary calls fail; a status
/// ending a stream that already sent messages keeps tonic's code.
#[derive(Debug, Clone)]
pub struct TeamgramStatus<S>(pub S);

impl<S: NamedService> NamedService for TeamgramStatus<S> {
    const NAME: &'static str = S::NAME;
}

type MapResponse<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for TeamgramStatus<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = MapOk<S::Future, MapResponse<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        self.0
            .call(request)
            .map_ok(raise_status::<ResBody> as MapResponse<ResBody>)
    }
}

fn raise_status<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if let Some(code) = headers.remove(STATUS_MARKER) {
        if headers.contains_key(GRPC_STATUS) {
            headers.insert(GRPC_STATUS, code);
        }
    }
    response
}

/// Client side: a channel whose responses reach tonic without
/// `grpc-status-details-bin`, in trailers-only responses (how grpc-go fails
/// a unary call) and in trailers after a body alike.
#[derive(Debug, Clone)]
pub struct DropStatusDetails<S>(pub S);

impl<S> Service<http::Request<Body>> for DropStatusDetails<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = MapOk<S::Future, MapResponse<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.0
            .call(request)
            .map_ok(drop_status_details as MapResponse<Body>)
    }
}

fn drop_status_details(response: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    if parts.headers.contains_key(GRPC_STATUS) {
        // Trailers-only: the status is here and the body is empty.
        parts.headers.remove(GRPC_STATUS_DETAILS);
        return http::Response::from_parts(parts, body);
    }
    let body = body.map_frame(|mut frame| {
        if let Some(trailers) = frame.trailers_mut() {
            trailers.remove(GRPC_STATUS_DETAILS);
        }
        frame
    });
    http::Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::codegen::http::{HeaderMap, HeaderValue};

    #[test]
    fn the_marker_becomes_the_grpc_status_of_an_error_response() {
        let response: http::Response<Body> =
            teamgram_status(UNREGISTERED_CODE, "AUTH_KEY_UNREGISTERED").into_http();
        assert_eq!(response.headers()[GRPC_STATUS], "2");
        let response = raise_status(response);
        assert_eq!(response.headers()[GRPC_STATUS], "401");
        assert_eq!(response.headers()["grpc-message"], "AUTH_KEY_UNREGISTERED");
        assert!(!response.headers().contains_key(STATUS_MARKER));
    }

    /// A status block whose details are not base64, as a hostile or broken
    /// session could send.
    fn bad_details() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_STATUS, HeaderValue::from_static("13"));
        headers.insert(
            GRPC_STATUS_DETAILS,
            HeaderValue::from_static("*not base64*"),
        );
        headers
    }

    #[test]
    fn undecodable_details_never_reach_tonic() {
        let tonic_panics = std::panic::catch_unwind(|| Status::from_header_map(&bad_details()));
        assert!(tonic_panics.is_err(), "tonic's parser panics on these");

        let mut trailers_only = http::Response::new(Body::empty());
        *trailers_only.headers_mut() = bad_details();
        let exposed = drop_status_details(trailers_only);
        let status = Status::from_header_map(exposed.headers()).expect("a status");
        assert_eq!(status.code(), Code::Internal);
        assert!(status.details().is_empty());
    }

    #[tokio::test]
    async fn undecodable_details_in_trailers_never_reach_tonic() {
        let frames = futures::stream::iter([
            Ok::<_, Status>(http_body::Frame::data(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            ))),
            Ok(http_body::Frame::trailers(bad_details())),
        ]);
        let response = http::Response::new(Body::new(http_body_util::StreamBody::new(frames)));
        let body = drop_status_details(response).into_body();
        let trailers = body
            .collect()
            .await
            .expect("the body")
            .trailers()
            .cloned()
            .expect("trailers");
        assert!(!trailers.contains_key(GRPC_STATUS_DETAILS));
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), Code::Internal);
    }
}
