//! App -> mesh. Accepts HTTP/1.1 (origin form routed by `Host`, absolute form as an HTTP
//! proxy) and h2c (routed by `:authority`) on 127.0.0.1:4140, and follows each request
//! top to bottom:
//!
//! 1. name the service (`orders`, `orders:8080`, `http://orders/...` all mean `orders`);
//! 2. look it up in the snapshot (one lock-free load);
//! 3. pick an endpoint;
//! 4. strip what the app may not claim (a caller identity) and hop-by-hop headers;
//! 5. send it over the transport, under the service's timeout;
//! 6. map a failure to a `sinew-error` response, and record metrics.

use crate::errors::MeshError;
use crate::state::Shared;
use crate::transport::{Body, BoxError, Transport, TransportError};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

/// The header the inbound sets to the caller's verified SPIFFE id. Never taken from an app.
pub const CALLER_HEADER: &str = "sinew-caller";

pub struct Outbound<T> {
    shared: Arc<Shared>,
    transport: Arc<T>,
}

impl<T: Transport> Outbound<T> {
    pub fn new(shared: Arc<Shared>, transport: Arc<T>) -> Self {
        Outbound { shared, transport }
    }

    /// Serves one request; never fails (errors become `sinew-error` responses).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let (response, peer) = match self.forward(request).await {
            Ok((response, service)) => (response, service),
            Err((error, service)) => {
                tracing::debug!("outbound: {error}");
                (error.into_response(), service)
            }
        };
        crate::admin::record_request("outbound", &peer, response.status(), started.elapsed());
        response
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
    ) -> Result<(Response<Body>, String), (MeshError, String)> {
        let unknown = |e| (e, "unknown".to_string());
        if request.method() == http::Method::CONNECT {
            return Err(unknown(MeshError::Unsupported(
                "CONNECT tunnels: send plain HTTP to the sidecar; it encrypts between sidecars"
                    .into(),
            )));
        }
        let name = service_name(&request).map_err(unknown)?;
        let service = self
            .shared
            .snapshot
            .load()
            .services
            .get(&name)
            .cloned()
            .ok_or_else(|| unknown(MeshError::UnknownService(name.clone())))?;
        let failed = |e| (e, service.name.clone());
        let endpoint = service
            .pick()
            .cloned()
            .ok_or_else(|| failed(MeshError::NoEndpoints(name.clone())))?;
        let request = rewrite(request, &name).map_err(failed)?;
        let timeout = service.policy.timeout;
        let response =
            tokio::time::timeout(timeout, self.transport.send(&endpoint.target, request))
                .await
                .map_err(|_| {
                    failed(MeshError::Timeout {
                        service: name.clone(),
                        after: timeout,
                    })
                })?
                .map_err(|e| {
                    failed(match e {
                        TransportError::Connect { .. } => MeshError::ConnectFailure(e.to_string()),
                        TransportError::Refused { .. } => MeshError::PeerRefused(e.to_string()),
                        TransportError::Reset { .. } => MeshError::UpstreamReset(e.to_string()),
                    })
                })?;
        Ok((response, service.name.clone()))
    }
}

/// The mesh service a request is for: the URI's host (absolute form, or h2's `:authority`),
/// else the `Host` header; any port is ignored, case is folded.
pub fn service_name<B>(request: &Request<B>) -> Result<String, MeshError> {
    let host = match request.uri().host() {
        Some(host) => host.to_string(),
        None => {
            let header = request.headers().get(http::header::HOST).ok_or_else(|| {
                MeshError::BadRequest("no Host header and no absolute URI".into())
            })?;
            let text = header
                .to_str()
                .map_err(|_| MeshError::BadRequest("Host header is not text".into()))?;
            let authority: http::uri::Authority = text.parse().map_err(|_| {
                MeshError::BadRequest(format!("Host header `{text}` is not a host"))
            })?;
            authority.host().to_string()
        }
    };
    Ok(host.trim_end_matches('.').to_ascii_lowercase())
}

/// The request as it leaves for the mesh: URI `http://<service><path>`, no caller claims.
fn rewrite(request: Request<Incoming>, service: &str) -> Result<Request<Body>, MeshError> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(service)
        .path_and_query(path)
        .build()
        .map_err(|e| MeshError::BadRequest(format!("cannot rewrite the URI: {e}")))?;
    parts.headers.remove(CALLER_HEADER);
    let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed();
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, host: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn names_the_service_from_uri_or_host() {
        assert_eq!(
            service_name(&request("/items/1", Some("orders"))).unwrap(),
            "orders"
        );
        assert_eq!(
            service_name(&request("/items/1", Some("Orders:8080"))).unwrap(),
            "orders"
        );
        assert_eq!(
            service_name(&request("http://orders:80/items", Some("x"))).unwrap(),
            "orders"
        );
        assert_eq!(
            service_name(&request("http://orders./", None)).unwrap(),
            "orders"
        );
        assert_eq!(
            service_name(&request("/", None)).unwrap_err().reason(),
            "bad-request"
        );
        assert_eq!(
            service_name(&request("/", Some("a b")))
                .unwrap_err()
                .reason(),
            "bad-request"
        );
    }
}
