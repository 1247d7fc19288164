//! App -> mesh. Accepts HTTP/1.1 (origin form routed by `Host`, absolute form as an HTTP
//! proxy) and h2c (routed by `:authority`) on 127.0.0.1:4140, and follows each request
//! top to bottom:
//!
//! 1. name the service (`orders`, `orders:8080`, `http://orders/...` all mean `orders`);
//! 2. look it up in the snapshot (one lock-free load);
//! 3. strip what the app may not claim (a caller identity) and hop-by-hop headers;
//! 4. admission: past `max_concurrent`, 503 `overloaded` at once; with no endpoint, wait a
//!    bounded time for one (`endpoint_wait`);
//! 5. for each try, under the service's overall timeout: pick an endpoint (P2C over peak-EWMA
//!    cost, ejected and unreachable endpoints left out, one probe when an ejection ends),
//!    send it over the transport under the per-try timeout, feed the outcome to the
//!    endpoint's latency, outlier and reachability state, retry on another endpoint when
//!    that is safe and the budget allows, and hedge a slow one when the policy says so;
//! 6. map a failure to a `sinew-error` response, and record metrics.

use crate::errors::MeshError;
use crate::resilience::{Permit, Replay};
use crate::snapshot::{Endpoint, Service};
use crate::state::Shared;
use crate::transport::{Body, BoxError, SidecarAnswer, Transport, TransportError};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sinew_proto::policy::{HedgeDelay, HedgePolicy, RetryOn, ServiceSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The header the inbound sets to the caller's verified SPIFFE id. Never taken from an app.
pub const CALLER_HEADER: &str = "sinew-caller";

/// Request bodies up to this size are kept so the request can be sent again (a retry, a
/// hedge); a body that grows past it streams on once.
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
        crate::admin::record_request(
            crate::admin::Direction::Outbound,
            &peer,
            response.status(),
            started.elapsed(),
        );
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
        // A head no peer would accept is refused before any try: the caller's error, which
        // must never count against an endpoint.
        let (parts, body) = request.into_parts();
        if let Err((len, max)) = self.transport.check_head(&parts) {
            metrics::counter!("sinew_request_head_too_large_total", "peer" => service.name.clone())
                .increment(1);
            return Err(failed(MeshError::HeaderTooLarge { len, max }));
        }
        let request = Request::from_parts(parts, body);
        // Admission: fail fast past the limit; the permit lives as long as the response body.
        let permit = service.state.limit.try_acquire().map_err(|_| {
            metrics::counter!("sinew_overloaded_total", "peer" => service.name.clone())
                .increment(1);
            failed(MeshError::Overloaded {
                service: name.to_string(),
                max: service.state.limit.max(),
            })
        })?;
        let response = self.tries(service.clone(), request).await.map_err(failed)?;
        let response = response.map(|body| {
            HoldingBody {
                body,
                _permit: permit,
            }
            .boxed()
        });
        Ok((response, service.name.clone()))
    }

    /// Sends the request, retrying and hedging under the budget, until one try answers well
    /// or no try is left.
    ///
    /// - With no endpoint at all, it waits up to `endpoint_wait` for one to appear.
    /// - A try is retried on another endpoint when nothing of it reached the app (connect
    ///   failure, refused, or the peer's sidecar answered `unhealthy`, `not-ready` or
    ///   `misdirected`), when its per-try timeout fired and the method is idempotent (any
    ///   method with `retries.on: [timeout]`), or when `retries.on` lists its answer (a
    ///   status, gRPC UNAVAILABLE) or, for idempotent methods, `reset`.
    /// - With `hedge` set, an idempotent request whose body is wholly kept gets another try on
    ///   another endpoint after `hedge.delay` without an answer; the first good answer wins
    ///   and the others are dropped (their streams reset).
    /// - A request is sent again only while its body is kept ([`RequestBody`]). Every retry
    ///   and hedge spends the retry budget. When no try is left, the last answer is returned
    ///   as it came.
    async fn tries(
        &self,
        service: Arc<Service>,
        request: Request<Body>,
    ) -> Result<Response<Body>, MeshError> {
        let started = Instant::now();
        // The policy the request was admitted under, for all its tries (an Arc, not a copy).
        let admitted = service.clone();
        let policy = &admitted.policy;
        let deadline = started + policy.timeout;
        service.state.deposit(started);
        let service = self.with_endpoints(service, deadline).await?;
        let peer = service.name.clone();
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
        let mut body = RequestBody::new(body, &parts.headers, policy, &peer);
        let request_for = |body: Body| {
            let mut request = Request::new(body);
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = parts.uri.clone();
            *request.version_mut() = parts.version;
            *request.headers_mut() = parts.headers.clone();
            request
        };
        let plan = TryPlan {
            deadline,
            idempotent,
        };
        let hedge = policy.hedge.clone().filter(|_| idempotent);
        let mut hedges_left = hedge.as_ref().map_or(0, |h| h.max_extra);
        let mut next_hedge = hedge
            .as_ref()
            .map(|h| started + hedge_delay(&service, h, started));
        let mut retries_left = policy.retries.attempts.saturating_sub(1);
        let mut tried = Vec::new();
        let mut running = FuturesUnordered::new();
        // What to answer if no try answers well: the last retryable answer or error.
        let mut last: Option<Result<Response<Body>, MeshError>> = None;

        let first = service
            .pick(Instant::now(), &tried)
            .ok_or_else(|| MeshError::NoEndpoints(peer.clone()))?;
        tried.push(first);
        let Some(first_body) = body.for_try() else {
            return Err(MeshError::NoEndpoints(peer));
        };
        running.push(self.one_try(&service, first, request_for(first_body), &plan, Kind::First));

        loop {
            let hedge_at = next_hedge.filter(|_| hedges_left > 0);
            let outcome = tokio::select! {
                outcome = running.next(), if !running.is_empty() => outcome,
                _ = sleep_until_opt(hedge_at) => {
                    let now = Instant::now();
                    next_hedge = hedge.as_ref().map(|h| now + hedge_delay(&service, h, now));
                    hedges_left -= 1;
                    // Hedge only with a whole body, to an endpoint not tried yet.
                    if now < deadline && body.complete()
                        && let Some(index) = service.pick(now, &tried).filter(|i| !tried.contains(i))
                        && spend(&service, now, Spend::Hedge)
                        && let Some(try_body) = body.for_try()
                    {
                        tried.push(index);
                        running.push(self.one_try(&service, index, request_for(try_body), &plan, Kind::Hedge));
                    }
                    continue;
                }
                else => None,
            };
            let Some((kind, verdict)) = outcome else {
                // Nothing running and nothing left to try.
                return last.unwrap_or_else(|| Err(MeshError::NoEndpoints(peer.clone())));
            };
            let others = !running.is_empty();
            let retry = match verdict {
                Verdict::Done(response) if !(others && response.status().is_server_error()) => {
                    if kind == Kind::Hedge {
                        metrics::counter!("sinew_hedge_wins_total", "peer" => peer.clone())
                            .increment(1);
                    }
                    // Returning drops the other tries: their streams are reset.
                    return Ok(response);
                }
                Verdict::Done(response) => {
                    last = Some(Ok(response));
                    false
                }
                Verdict::Retry(answer) => {
                    last = Some(answer);
                    true
                }
                Verdict::Failed(error) => {
                    last = Some(Err(error));
                    false
                }
            };
            if others {
                // Another try is still out: its answer may yet be good.
                continue;
            }
            // Retry when the outcome allows it, a try is left, time is left, the body can be
            // sent again, there is an endpoint, and the budget grants it (in that order: the
            // budget is spent only on a retry that will go out).
            let now = Instant::now();
            let next = (retry && retries_left > 0 && now < deadline && body.can_resend())
                .then(|| service.pick(now, &tried))
                .flatten()
                .filter(|_| spend(&service, now, Spend::Retry))
                .and_then(|index| Some((index, body.for_try()?)));
            let Some((index, try_body)) = next else {
                return last.unwrap_or_else(|| Err(MeshError::NoEndpoints(peer.clone())));
            };
            if let Some(Err(error)) = &last {
                tracing::debug!(%peer, "retrying after: {error}");
            } else if let Some(Ok(answer)) = &last {
                tracing::debug!(%peer, "retrying after status {}", answer.status());
            }
            // Dropping a retried answer stops its stream.
            last = None;
            retries_left -= 1;
            tried.push(index);
            running.push(self.one_try(
                &service,
                index,
                request_for(try_body),
                &plan,
                Kind::Retry(tried.len() as u32 - 1),
            ));
        }
    }

    /// The service as soon as it has an endpoint: at once, or after waiting up to its
    /// `endpoint_wait` (and no later than `deadline`) for an update that brings one.
    async fn with_endpoints(
        &self,
        service: Arc<Service>,
        deadline: Instant,
    ) -> Result<Arc<Service>, MeshError> {
        if !service.endpoints.is_empty() {
            return Ok(service);
        }
        // At most `max_pending` requests wait; past it, refuse at once rather than queue.
        let _waiting = Waiting::enter(service.state.clone());
        if _waiting.count > service.policy.max_pending as usize {
            metrics::counter!("sinew_overloaded_total", "peer" => service.name.clone())
                .increment(1);
            return Err(MeshError::PendingFull {
                service: service.name.clone(),
                max: service.policy.max_pending as usize,
            });
        }
        let until = (Instant::now() + service.policy.endpoint_wait).min(deadline);
        let mut updates = self.shared.updated.subscribe();
        let mut waited = false;
        loop {
            if let Some(current) = self.shared.snapshot.load().services.get(&service.name)
                && !current.endpoints.is_empty()
            {
                return Ok(current.clone());
            }
            if !waited && Instant::now() < until {
                waited = true;
                metrics::counter!("sinew_endpoint_waits_total", "peer" => service.name.clone())
                    .increment(1);
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(until.into()) => break,
            }
        }
        metrics::counter!("sinew_no_endpoints_total", "peer" => service.name.clone()).increment(1);
        Err(MeshError::NoEndpoints(service.name.clone()))
    }

    /// One try on one endpoint: a short jittered pause first for a retry (so retries of
    /// many requests do not arrive in lockstep), then the exchange under the per-try timeout.
    /// The outcome feeds the endpoint's latency, outlier and reachability records.
    async fn one_try(
        &self,
        service: &Service,
        index: usize,
        request: Request<Body>,
        plan: &TryPlan,
        kind: Kind,
    ) -> (Kind, Verdict) {
        let policy = &service.policy;
        let peer = &service.name;
        if let Kind::Retry(n) = kind {
            let pause = Duration::from_millis(fastrand::u64(0..=(10u64 << (n - 1).min(4))));
            tokio::time::sleep(pause.min(plan.deadline.saturating_duration_since(Instant::now())))
                .await;
        }
        let endpoint = &service.endpoints[index];
        let now = Instant::now();
        let remaining = plan.deadline.saturating_duration_since(now);
        let timeout_error = |after| MeshError::Timeout {
            service: peer.clone(),
            after,
        };
        if remaining.is_zero() {
            return (kind, Verdict::Failed(timeout_error(policy.timeout)));
        }
        let try_timeout = policy
            .retries
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        let in_flight = endpoint.state.begin();
        let mut abandoned = Abandoned {
            endpoint,
            started: now,
            armed: true,
        };
        let result =
            tokio::time::timeout(try_timeout, self.transport.send(&endpoint.target, request)).await;
        abandoned.armed = false;
        drop(in_flight);
        let done = Instant::now();
        // A try that ran out of time counts its time in the latency estimate, so the
        // balancer moves away from an instance that stopped answering even before the
        // outlier detector ejects it.
        let rtt = done - now;
        let verdict = match result {
            Ok(Ok(response)) => {
                endpoint.state.connected();
                service.state.latencies.record(rtt, done);
                let ok = !endpoint_failed(&response);
                if endpoint.state.record(ok, Some(rtt), done, &policy.outlier) {
                    ejected(peer, endpoint);
                }
                if refused_before_the_app(&response)
                    || retry_on_answer(&policy.retries.on, &response)
                {
                    Verdict::Retry(Ok(response))
                } else {
                    Verdict::Done(response)
                }
            }
            // Neither is the endpoint's failure: a head the framing cannot carry is the
            // caller's (request) or the answering app's (response) doing.
            Ok(Err(TransportError::RequestHeadTooLarge { len, max })) => {
                endpoint.state.connected();
                Verdict::Failed(MeshError::HeaderTooLarge { len, max })
            }
            Ok(Err(TransportError::ResponseHeadTooLarge { len, max, .. })) => {
                endpoint.state.connected();
                Verdict::Failed(MeshError::ResponseHeaderTooLarge { len, max })
            }
            Ok(Err(e)) => {
                if e.is_connect_failure() {
                    if endpoint.state.connect_failed(done) {
                        metrics::counter!("sinew_endpoints_down_total", "peer" => peer.clone())
                            .increment(1);
                    }
                } else {
                    endpoint.state.connected();
                }
                let retryable = e.is_connect_failure()
                    || (plan.idempotent
                        && matches!(e, TransportError::Reset { .. })
                        && policy.retries.on.contains(&RetryOn::Reset));
                let error = match e {
                    TransportError::Connect { .. } => MeshError::ConnectFailure(e.to_string()),
                    TransportError::Refused { .. } => MeshError::PeerRefused(e.to_string()),
                    _ => MeshError::UpstreamReset(e.to_string()),
                };
                if endpoint.state.record(false, None, done, &policy.outlier) {
                    ejected(peer, endpoint);
                }
                if retryable {
                    Verdict::Retry(Err(error))
                } else {
                    Verdict::Failed(error)
                }
            }
            Err(_) => {
                if endpoint
                    .state
                    .record(false, Some(rtt), done, &policy.outlier)
                {
                    ejected(peer, endpoint);
                }
                if done >= plan.deadline {
                    Verdict::Failed(timeout_error(policy.timeout))
                } else if plan.idempotent || policy.retries.on.contains(&RetryOn::Timeout) {
                    Verdict::Retry(Err(timeout_error(try_timeout)))
                } else {
                    Verdict::Failed(timeout_error(try_timeout))
                }
            }
        };
        (kind, verdict)
    }
}

/// Dropped with a try that never ended (it lost a hedge race, its client went away): the
/// time it had taken goes into the endpoint's latency estimate, so an instance whose tries
/// keep losing races still looks slow to the balancer. Disarmed when the try ends.
struct Abandoned<'a> {
    endpoint: &'a Endpoint,
    started: Instant,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            let now = Instant::now();
            self.endpoint.state.observe(now - self.started, now);
        }
    }
}

/// What every try of one request shares.
struct TryPlan {
    deadline: Instant,
    idempotent: bool,
}

/// Why a try was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    First,
    /// The n-th retry (1 for the first).
    Retry(u32),
    Hedge,
}

/// How a try ended.
enum Verdict {
    /// An answer to hand back as it is.
    Done(Response<Body>),
    /// An answer the policy retries, or an error that may be retried; returned as it is if
    /// no retry can be made.
    Retry(Result<Response<Body>, MeshError>),
    /// An error no retry may follow.
    Failed(MeshError),
}

/// The request body across tries: none (every try sends none), kept while it streams (sent
/// again while it stays within [`REPLAY_BUFFER`]: [`Replay`]), or one that streams once (a
/// declared length past the buffer, or retries off).
enum RequestBody {
    Empty,
    Kept(Replay),
    Once(Option<Body>),
}

impl RequestBody {
    fn new(body: Body, headers: &http::HeaderMap, policy: &ServiceSpec, peer: &str) -> Self {
        let resendable = policy.retries.attempts > 1 || policy.hedge.is_some();
        let declared = crate::transport::quic::content_length(headers);
        if body.is_end_stream() || declared == Some(0) {
            RequestBody::Empty
        } else if resendable && declared.is_none_or(|n| n <= REPLAY_BUFFER as u64) {
            RequestBody::Kept(Replay::new(body, REPLAY_BUFFER, peer))
        } else {
            if resendable {
                metrics::counter!("sinew_retries_unreplayable_total", "peer" => peer.to_string())
                    .increment(1);
            }
            RequestBody::Once(Some(body))
        }
    }

    /// The body for the next try; `None` when it cannot be sent again.
    fn for_try(&mut self) -> Option<Body> {
        match self {
            RequestBody::Empty => Some(Body::default()),
            RequestBody::Kept(replay) => replay.replayable().then(|| replay.body()),
            RequestBody::Once(body) => body.take(),
        }
    }

    fn can_resend(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Kept(replay) => replay.replayable(),
            RequestBody::Once(body) => body.is_some(),
        }
    }

    /// Whether every byte is in hand, so tries may run side by side.
    fn complete(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Kept(replay) => replay.complete(),
            RequestBody::Once(_) => false,
        }
    }
}

/// The hedge delay now: as configured, or the service's recent percentile (the fallback
/// until it has answered often enough to tell).
fn hedge_delay(service: &Service, hedge: &HedgePolicy, now: Instant) -> Duration {
    match hedge.delay {
        HedgeDelay::Fixed(delay) => delay,
        HedgeDelay::Percentile(per_mille) => service
            .state
            .latencies
            .percentile(per_mille, HedgeDelay::MIN_SAMPLES, now)
            .unwrap_or(HedgeDelay::FALLBACK),
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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

/// Whether the peer's sidecar refused the request before its app saw it, for a reason another
/// instance may not share (its app fails health checks, it has no configuration yet, it
/// serves another service, its app is at its in-flight limit): like a connect failure, safe to
/// retry elsewhere for any method. Told by the framing alone ([`Refused`], from the response
/// head): an app's headers can never make the caller send a request twice.
fn refused_before_the_app<B>(response: &Response<B>) -> bool {
    response
        .extensions()
        .get::<SidecarAnswer>()
        .is_some_and(|answer| {
            answer.refused
                && ["unhealthy", "not-ready", "misdirected", "overloaded"]
                    .contains(&answer.reason.as_str())
        })
}

/// Whether an answer counts as the endpoint failing, for outlier detection: a 5xx, unless
/// the peer's sidecar says the instance is fine and its app answered something the mesh
/// cannot carry (a head over the framing's limit: the app's bug, the same on every instance).
fn endpoint_failed<B>(response: &Response<B>) -> bool {
    response.status().is_server_error()
        && response
            .extensions()
            .get::<SidecarAnswer>()
            .is_none_or(|answer| answer.reason != "response-header-too-large")
}

/// Whether an answer is one the policy retries: a listed status code, or gRPC UNAVAILABLE
/// (status 14 in the head: a trailers-only answer) when `unavailable` is listed.
fn retry_on_answer<B>(on: &[RetryOn], response: &Response<B>) -> bool {
    on.iter().any(|condition| match condition {
        RetryOn::Status(code) => response.status().as_u16() == *code,
        RetryOn::Unavailable => response
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"14"),
        RetryOn::Reset | RetryOn::Timeout => false,
    })
}

/// What a try beyond the first is for.
#[derive(Debug, Clone, Copy)]
enum Spend {
    Retry,
    Hedge,
}

/// Spends one try from the service's retry budget; counts it, or the refusal.
fn spend(service: &Service, now: Instant, what: Spend) -> bool {
    let peer = service.name.clone();
    let granted = service.state.try_retry(now);
    match (what, granted) {
        (Spend::Retry, true) => metrics::counter!("sinew_retries_total", "peer" => peer),
        (Spend::Retry, false) => {
            metrics::counter!("sinew_retries_budget_exhausted_total", "peer" => peer)
        }
        (Spend::Hedge, true) => metrics::counter!("sinew_hedges_total", "peer" => peer),
        (Spend::Hedge, false) => {
            metrics::counter!("sinew_hedges_budget_exhausted_total", "peer" => peer)
        }
    }
    .increment(1);
    granted
}

fn ejected(peer: &str, endpoint: &Endpoint) {
    metrics::counter!("sinew_outlier_ejections_total", "peer" => peer.to_string()).increment(1);
    tracing::info!(%peer, endpoint = %endpoint.target.addr, node = %endpoint.node_id, "ejected");
}

/// One request counted as waiting for an instance until dropped.
struct Waiting {
    state: Arc<crate::endpoint::ServiceState>,
    /// How many wait, this one included.
    count: usize,
}

impl Waiting {
    fn enter(state: Arc<crate::endpoint::ServiceState>) -> Self {
        let count = state
            .pending
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Waiting { state, count }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.state
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
    let trace = crate::trace::next_hop(&mut parts.headers);
    tracing::debug!(%trace, %service, path = %parts.uri.path(), "outbound");
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
        let on = [RetryOn::Status(503), RetryOn::Unavailable];
        assert!(retry_on_answer(&on, &answer(503, None)));
        assert!(!retry_on_answer(&on, &answer(500, None)));
        assert!(!retry_on_answer(&on, &answer(200, None)));
        assert!(retry_on_answer(&on, &answer(200, Some("14"))));
        assert!(!retry_on_answer(&on, &answer(200, Some("13"))));
        assert!(!retry_on_answer(&[], &answer(503, None)));
    }

    #[test]
    fn refusals_of_the_peer_sidecar_are_told_from_answers_of_its_app() {
        // A refusal is what the framing says, whatever the headers say.
        let answer = |refused: Option<&str>, header: Option<&str>| {
            let mut response = Response::builder().status(503);
            if let Some(reason) = header {
                response = response.header(crate::errors::HEADER, reason);
            }
            let mut response = response.body(()).unwrap();
            if let Some(reason) = refused {
                response.extensions_mut().insert(SidecarAnswer {
                    reason: reason.into(),
                    refused: true,
                });
            }
            response
        };
        for reason in ["unhealthy", "not-ready", "misdirected", "overloaded"] {
            assert!(refused_before_the_app(&answer(Some(reason), Some(reason))));
            assert!(refused_before_the_app(&answer(Some(reason), None)));
            // An app's own header is not a refusal: the app may have done the work.
            assert!(
                !refused_before_the_app(&answer(None, Some(reason))),
                "{reason}"
            );
        }
        // Refused, but another instance would refuse it too.
        assert!(!refused_before_the_app(&answer(Some("forbidden"), None)));
        assert!(!refused_before_the_app(&answer(None, None)));
        // The sidecar answered, but after its app saw the request.
        let mut reached = answer(None, None);
        reached.extensions_mut().insert(SidecarAnswer {
            reason: "unhealthy".into(),
            refused: false,
        });
        assert!(!refused_before_the_app(&reached));
    }

    #[test]
    fn a_head_the_mesh_cannot_carry_is_not_the_endpoint_failing() {
        let answer = |status: u16, reason: Option<&str>| {
            let mut response = Response::builder().status(status).body(()).unwrap();
            if let Some(reason) = reason {
                response.extensions_mut().insert(SidecarAnswer {
                    reason: reason.into(),
                    refused: false,
                });
            }
            response
        };
        assert!(endpoint_failed(&answer(502, None)));
        assert!(endpoint_failed(&answer(502, Some("app-unreachable"))));
        assert!(!endpoint_failed(&answer(
            502,
            Some("response-header-too-large")
        )));
        assert!(!endpoint_failed(&answer(200, None)));
    }
}
