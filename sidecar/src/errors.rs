//! Errors the sidecar answers itself. Each has a status, a `sinew-error: <reason>` header and
//! a one-line body naming the cause, so an app (or its operator) can tell a mesh failure
//! from an answer of the service it called. The README lists every reason.

use crate::transport::{Body, BoxError};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use std::time::Duration;

pub const HEADER: &str = "sinew-error";

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("unknown service `{0}`: not in this sidecar's configuration")]
    UnknownService(String),
    #[error("no endpoints: service `{0}` has no ready instance")]
    NoEndpoints(String),
    #[error("upstream connect failure: {0}")]
    ConnectFailure(String),
    #[error("peer refused: {0}")]
    PeerRefused(String),
    #[error("timeout: `{service}` did not answer within {after:?}")]
    Timeout { service: String, after: Duration },
    #[error("upstream reset: {0}")]
    UpstreamReset(String),
    #[error("forbidden: `{caller}` may not call `{service}`")]
    Forbidden { caller: String, service: String },
    #[error("misdirected: this sidecar serves `{served}`, not `{asked}`")]
    Misdirected { served: String, asked: String },
    #[error("app unreachable: {0}")]
    AppUnreachable(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("not ready: this sidecar has no configuration yet")]
    NotReady,
    #[error("overloaded: {max} requests to `{service}` are already in flight (max_concurrent)")]
    Overloaded { service: String, max: usize },
    #[error(
        "overloaded: {max} requests to `{service}` are already waiting for an instance (max_pending)"
    )]
    PendingFull { service: String, max: usize },
    #[error("unhealthy: this instance of `{0}` fails its health checks")]
    Unhealthy(String),
    #[error(
        "request header too large: the request head is {len} bytes encoded, the mesh carries at most {max}"
    )]
    HeaderTooLarge { len: usize, max: usize },
    #[error(
        "response header too large: the app's response head is {len} bytes encoded, the mesh carries at most {max}"
    )]
    ResponseHeaderTooLarge { len: usize, max: usize },
    #[error("overloaded: {max} requests from the mesh are already in flight to this app")]
    InboundOverloaded { max: usize },
}

impl MeshError {
    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::BadRequest(_) => StatusCode::BAD_REQUEST,
            MeshError::UnknownService(_) => StatusCode::NOT_FOUND,
            MeshError::NoEndpoints(_)
            | MeshError::NotReady
            | MeshError::Overloaded { .. }
            | MeshError::PendingFull { .. }
            | MeshError::Unhealthy(_)
            | MeshError::InboundOverloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::ConnectFailure(_)
            | MeshError::PeerRefused(_)
            | MeshError::UpstreamReset(_)
            | MeshError::AppUnreachable(_)
            | MeshError::ResponseHeaderTooLarge { .. } => StatusCode::BAD_GATEWAY,
            MeshError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            MeshError::Forbidden { .. } => StatusCode::FORBIDDEN,
            MeshError::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            MeshError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            MeshError::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The `sinew-error` header value.
    pub fn reason(&self) -> &'static str {
        match self {
            MeshError::BadRequest(_) => "bad-request",
            MeshError::UnknownService(_) => "unknown-service",
            MeshError::NoEndpoints(_) => "no-endpoints",
            MeshError::ConnectFailure(_) => "connect-failure",
            MeshError::PeerRefused(_) => "peer-refused",
            MeshError::Timeout { .. } => "timeout",
            MeshError::UpstreamReset(_) => "upstream-reset",
            MeshError::Forbidden { .. } => "forbidden",
            MeshError::Misdirected { .. } => "misdirected",
            MeshError::AppUnreachable(_) => "app-unreachable",
            MeshError::Unsupported(_) => "unsupported",
            MeshError::NotReady => "not-ready",
            MeshError::Overloaded { .. }
            | MeshError::PendingFull { .. }
            | MeshError::InboundOverloaded { .. } => "overloaded",
            MeshError::Unhealthy(_) => "unhealthy",
            MeshError::HeaderTooLarge { .. } => "header-too-large",
            MeshError::ResponseHeaderTooLarge { .. } => "response-header-too-large",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{self}\n")))
                .map_err(|never| -> BoxError { match never {} })
                .boxed(),
        );
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(HEADER, HeaderValue::from_static(self.reason()));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    /// This sidecar's answer to a request from the mesh, marked so the transport carries it
    /// in the response head's framing: `refused` when the app saw nothing of the request.
    pub fn into_mesh_answer(self, refused: bool) -> Response<Body> {
        let reason = self.reason();
        let mut response = self.into_response();
        response
            .extensions_mut()
            .insert(crate::transport::SidecarAnswer {
                reason: reason.into(),
                refused,
            });
        response
    }
}
