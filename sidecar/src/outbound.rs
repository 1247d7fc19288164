//! App -> mesh. Accepts HTTP/1.1 (origin form routed by `Host`, absolute form as an HTTP
//! proxy) and h2c (routed by `:authority`) on 127.0.0.1:4140, and follows each request
//! top to bottom:
//!
//! 1. name the service (`orders`, `orders:8080`, `http://orders/...` all mean `orders`);
//! 2. look it up in the snapshot (one lock-free load);
//! 3. strip what the app may not claim (a caller identity) and hop-by-hop headers;
//! 4. for each try, under the service's overall timeout: pick an endpoint (P2C over peak-EWMA
//!    cost, ejected endpoints left out, one probe when an ejection ends), send it over the
//!    transport under the per-try timeout, feed the outcome to the endpoint's latency and
//!    outlier state, and retry on another endpoint when that is safe and the budget allows;
//! 5. map a failure to a `sinew-error` response, and record metrics.

use crate::errors::MeshError;
use crate::resilience::Permit;
use crate::snapshot::{Endpoint, Service};
use crate::state::Shared;
use crate::transport::{Body, BoxError, Transport, TransportError};
use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sinew_proto::policy::RetryOn;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The header the inbound sets to the caller's verified SPIFFE id. Never taken from an app.
pub const CALLER_HEADER: &str = "sinew-caller";

/// Request bodies up to this size (declared by `content-length`) are kept so the request can
/// be retried; larger ones stream once.
pub const REPLAY_BUFFER: usize = 64 * 1024;

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
        let request = rewrite(request, &name).map_err(|e| (e, name.clone()))?;
        self.call(&name, request).await
    }

    /// Sends a request (URI already `http://<service><path>`, no caller claims) to the mesh
    /// service `name`: admission, then the tries. The sidecar's own clients (event
    /// delivery) come in here, so they get the same balancing, retries and breakers.
    pub async fn call(
        &self,
        name: &str,
        request: Request<Body>,
    ) -> Result<(Response<Body>, String), (MeshError, String)> {
        let service = self
            .shared
            .snapshot
            .load()
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| {
                (
                    MeshError::UnknownService(name.to_string()),
                    "unknown".to_string(),
                )
            })?;
        let failed = |e| (e, service.name.clone());
        // Admission: fail fast past the limit; the permit lives as long as the response body.
        let permit = service.state.limit.try_acquire().map_err(|_| {
            metrics::counter!("sinew_overloaded_total", "peer" => service.name.clone())
                .increment(1);
            failed(MeshError::Overloaded {
                service: name.to_string(),
                max: service.state.limit.max(),
            })
        })?;
        let response = self.tries(&service, request).await.map_err(failed)?;
        let response = response.map(|body| {
            HoldingBody {
                body,
                _permit: permit,
            }
            .boxed()
        });
        Ok((response, service.name.clone()))
    }

    /// Sends the request, retrying under the budget, until one try answers or no try is
    /// left. A try is retried on another endpoint when nothing of it reached the app
    /// (connect failure, refused), when its per-try timeout fired and the method is
    /// idempotent, or when `retries.on` lists its answer (a status, gRPC UNAVAILABLE) or,
    /// for idempotent methods, `reset`. A request is sent again only when its body was kept
    /// (none, or a declared length within [`REPLAY_BUFFER`]). When no retry is left, the
    /// last answer is returned as it came.
    async fn tries(
        &self,
        service: &Service,
        request: Request<Body>,
    ) -> Result<Response<Body>, MeshError> {
        let policy = &service.policy;
        let started = Instant::now();
        let deadline = started + policy.timeout;
        service.state.deposit(started);
        let idempotent = matches!(
            *request.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let (parts, body) = request.into_parts();
        // A request can be sent again only if its body is kept: none, or a declared length
        // within the replay buffer (read whole before the first try). Larger or unsized
        // bodies stream once, with no retry; that is counted.
        let mut streamed = None;
        let replay = if body.is_end_stream() {
            Some(Bytes::new())
        } else if policy.retries.attempts > 1
            && crate::transport::quic::content_length(&parts.headers)
                .is_some_and(|n| n <= REPLAY_BUFFER as u64)
        {
            // hyper holds both HTTP/1.1 and h2 bodies to their declared length, so reading
            // it whole stays within the buffer.
            let collected = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                body.collect(),
            )
            .await
            .map_err(|_| MeshError::Timeout {
                service: service.name.clone(),
                after: policy.timeout,
            })?
            .map_err(|e| MeshError::BadRequest(format!("reading the request body: {e}")))?;
            Some(collected.to_bytes())
        } else {
            if policy.retries.attempts > 1 {
                metrics::counter!("sinew_retries_unreplayable_total", "peer" => service.name.clone())
                    .increment(1);
            }
            streamed = Some(body);
            None
        };
        let attempts = if replay.is_some() {
            policy.retries.attempts.max(1)
        } else {
            1
        };
        let mut tried = Vec::with_capacity(attempts as usize);
        let peer = service.name.clone();
        for attempt in 1..=attempts {
            let now = Instant::now();
            let remaining = deadline.saturating_duration_since(now);
            let timeout_error = |after| MeshError::Timeout {
                service: peer.clone(),
                after,
            };
            if remaining.is_zero() {
                return Err(timeout_error(policy.timeout));
            }
            let index = service
                .pick(now, &tried)
                .ok_or_else(|| MeshError::NoEndpoints(peer.clone()))?;
            tried.push(index);
            let endpoint = &service.endpoints[index];
            let try_body = match &replay {
                Some(bytes) if bytes.is_empty() => Body::default(),
                Some(bytes) => Full::new(bytes.clone())
                    .map_err(|never| -> BoxError { match never {} })
                    .boxed(),
                None => streamed.take().unwrap_or_default(),
            };
            let mut request = Request::new(try_body);
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = parts.version;
            *request.headers_mut() = parts.headers.clone();
            let try_timeout = policy
                .retries
                .per_try_timeout
                .map_or(remaining, |t| t.min(remaining));

            let in_flight = endpoint.state.begin();
            let result =
                tokio::time::timeout(try_timeout, self.transport.send(&endpoint.target, request))
                    .await;
            drop(in_flight);
            let done = Instant::now();
            // A try that ran out of time counts its time in the latency estimate, so the
            // balancer moves away from an instance that stopped answering even before the
            // outlier detector ejects it.
            let rtt = done - now;
            let last = attempt == attempts;
            let reason = match result {
                Ok(Ok(response)) => {
                    let ok = !response.status().is_server_error();
                    if endpoint.state.record(ok, Some(rtt), done, &policy.outlier) {
                        ejected(&peer, endpoint);
                    }
                    let retry = !last && retry_on_answer(&policy.retries.on, &response);
                    if !retry || !spend_retry(service, done) {
                        return Ok(response);
                    }
                    // Dropping the answer stops its stream.
                    format!("status {}", response.status())
                }
                failed => {
                    let (error, retryable, rtt) = match failed {
                        Ok(Err(e)) => {
                            let retryable = e.is_connect_failure()
                                || (idempotent
                                    && matches!(e, TransportError::Reset { .. })
                                    && policy
                                        .retries
                                        .on
                                        .contains(&RetryOn::Condition("reset".into())));
                            let error = match e {
                                TransportError::Connect { .. } => {
                                    MeshError::ConnectFailure(e.to_string())
                                }
                                TransportError::Refused { .. } => {
                                    MeshError::PeerRefused(e.to_string())
                                }
                                TransportError::Reset { .. } => {
                                    MeshError::UpstreamReset(e.to_string())
                                }
                            };
                            (error, retryable, None)
                        }
                        _ if done >= deadline => (timeout_error(policy.timeout), false, Some(rtt)),
                        _ => (timeout_error(try_timeout), idempotent, Some(rtt)),
                    };
                    if endpoint.state.record(false, rtt, done, &policy.outlier) {
                        ejected(&peer, endpoint);
                    }
                    if !retryable || last || !spend_retry(service, done) {
                        return Err(error);
                    }
                    error.to_string()
                }
            };
            tracing::debug!(%peer, attempt, "retrying after: {reason}");
            // A short jittered pause, so retries of many requests do not arrive in lockstep.
            let pause = Duration::from_millis(fastrand::u64(0..=(10u64 << (attempt - 1).min(4))));
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
        Err(MeshError::NoEndpoints(peer))
    }
}

/// A response body that holds its request's concurrency permit until it ends or is dropped.
struct HoldingBody {
    body: Body,
    _permit: Permit,
}

impl http_body::Body for HoldingBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether an answer is one the policy retries: a listed status code, or gRPC UNAVAILABLE
/// (status 14 in the head: a trailers-only answer) when `unavailable` is listed.
fn retry_on_answer<B>(on: &[RetryOn], response: &Response<B>) -> bool {
    on.iter().any(|condition| match condition {
        RetryOn::Status(code) => response.status().as_u16() == *code,
        RetryOn::Condition(name) => {
            name == "unavailable"
                && response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|v| v.as_bytes() == b"14")
        }
    })
}

/// Spends one retry from the service's budget; counts the retry, or the refusal.
fn spend_retry(service: &Service, now: Instant) -> bool {
    if service.state.try_retry(now) {
        metrics::counter!("sinew_retries_total", "peer" => service.name.clone()).increment(1);
        true
    } else {
        metrics::counter!("sinew_retries_budget_exhausted_total", "peer" => service.name.clone())
            .increment(1);
        false
    }
}

fn ejected(peer: &str, endpoint: &Endpoint) {
    metrics::counter!("sinew_outlier_ejections_total", "peer" => peer.to_string()).increment(1);
    tracing::info!(%peer, endpoint = %endpoint.target.addr, node = %endpoint.node_id, "ejected");
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

    #[test]
    fn answers_the_policy_retries() {
        let answer = |status: u16, grpc: Option<&str>| {
            let mut response = Response::builder().status(status);
            if let Some(code) = grpc {
                response = response.header("grpc-status", code);
            }
            response.body(()).unwrap()
        };
        let on = [
            RetryOn::Status(503),
            RetryOn::Condition("unavailable".into()),
        ];
        assert!(retry_on_answer(&on, &answer(503, None)));
        assert!(!retry_on_answer(&on, &answer(500, None)));
        assert!(!retry_on_answer(&on, &answer(200, None)));
        assert!(retry_on_answer(&on, &answer(200, Some("14"))));
        assert!(!retry_on_answer(&on, &answer(200, Some("13"))));
        assert!(!retry_on_answer(&[], &answer(503, None)));
    }
}
