//! Between sidecars: one request, one bidirectional stream.
//!
//! The outbound only sees [`Transport`]: hand it a request for a [`Target`] and get the
//! response back, bodies streaming both ways. Today the only transport is QUIC with mutual TLS
//! and Sinew's own small framing ([`frame`]); DESIGN.md ("Between sidecars") records why not
//! HTTP/3 through `h3` 0.0.x. An HTTP/3 or HTTP/2-over-TLS transport fits behind the same trait.

pub mod frame;
pub mod quic;
pub mod tls;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use std::net::SocketAddr;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on every internal edge: streaming, trailers allowed.
pub type Body = BoxBody<Bytes, BoxError>;

/// A response extension: the answering sidecar produced this answer itself, not its app, for
/// this `sinew-error` reason; `refused` when its app saw nothing of the request. Set by the
/// inbound on its own answers; carried in the response head's framing
/// (`ResponseHead.sidecar_error`, `refused`), so the caller can tell it from an app's answer
/// whatever headers the app sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarAnswer {
    pub reason: String,
    pub refused: bool,
}

/// One instance of a service, as the transport reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddr,
    /// The SPIFFE id the peer's certificate must carry.
    pub identity: String,
    /// How long a new connection's handshake may take.
    pub connect_timeout: std::time::Duration,
}

/// Why a request did not get a response from the peer sidecar.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made (timeout, unreachable, handshake failed).
    #[error("connect to {addr} failed: {detail}")]
    Connect { addr: SocketAddr, detail: String },
    /// The peer refused us (our certificate), or is not who the control plane said.
    #[error("peer {addr} refused: {detail}")]
    Refused { addr: SocketAddr, detail: String },
    /// The stream or connection broke after the request was sent.
    #[error("stream to {addr} failed: {detail}")]
    Reset { addr: SocketAddr, detail: String },
    /// The request head is larger than the framing carries: nothing was sent. The caller's
    /// error, not the peer's.
    #[error("request head of {len} bytes exceeds the mesh's limit of {max}")]
    RequestHeadTooLarge { len: usize, max: usize },
    /// The peer's answer had a head larger than the framing carries. The answering app's
    /// doing (its sidecar should have refused it), not a failure of the peer's instance.
    #[error("response head of {len} bytes from {addr} exceeds the mesh's limit of {max}")]
    ResponseHeadTooLarge {
        addr: SocketAddr,
        len: usize,
        max: usize,
    },
}

impl TransportError {
    /// True when nothing reached the peer's app, so the request can safely go elsewhere.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Refused { .. }
        )
    }
}

/// Sends one request to one peer sidecar.
pub trait Transport: Send + Sync + 'static {
    fn send(
        &self,
        target: &Target,
        request: http::Request<Body>,
    ) -> impl std::future::Future<Output = Result<http::Response<Body>, TransportError>> + Send;

    /// Whether a request's head fits the transport's framing: `Err((encoded length, limit))`
    /// when it does not. The outbound asks before any try, so a head no peer would accept is
    /// the caller's error (431), never a failure of an endpoint.
    fn check_head(&self, _parts: &http::request::Parts) -> Result<(), (usize, usize)> {
        Ok(())
    }
}
