//! Mesh -> app. Accepts QUIC connections from peers holding a certificate of the mesh CA
//! (rustls refuses everyone else during the handshake), reads the caller's SPIFFE id once
//! per connection, and serves each stream top to bottom:
//!
//! 1. read the request head within `--inbound-head-timeout` (a framing error or a stalled
//!    head resets the stream; a head's memory grows only as its bytes arrive);
//! 2. check it is for this service, that the app is healthy, that the caller is allowed
//!    (`allow` policy), and that fewer than `--inbound-max-in-flight` requests are with the
//!    app: each refusal here is the sidecar's own, and says so in the response head's
//!    framing (`sidecar_error`, `refused`), so the caller may safely try another instance;
//! 3. replace any caller claim with the verified identity (`sinew-caller`);
//! 4. forward to the app over a pooled hyper client;
//! 5. stream the response back, and record metrics labelled with the caller. The app's own
//!    `sinew-error` header is dropped (the name is the mesh's: a caller must be able to
//!    trust it names a failure of its mesh hop), and a response head the framing cannot carry
//!    becomes 502 `response-header-too-large`.
//!
//! A peer connection may hold `--inbound-max-streams` streams at once (QUIC flow control
//! makes it wait past that), so one peer cannot hold the inbound's every slot with stalled
//! heads.

use crate::config::{AppProtocol, InboundLimits};
use crate::errors::MeshError;
use crate::outbound::CALLER_HEADER;
use crate::state::Shared;
use crate::transport::{Body, BoxError, frame, quic, tls};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Inbound {
    shared: Arc<Shared>,
    app_addr: SocketAddr,
    app: Client<HttpConnector, Body>,
    /// Streams being served (read, answered, or streaming their answer).
    in_flight: AtomicUsize,
    /// Requests admitted to the app and not yet answered in full.
    admitted: AtomicUsize,
    limits: InboundLimits,
}

impl Inbound {
    pub fn new(
        shared: Arc<Shared>,
        app_addr: SocketAddr,
        protocol: AppProtocol,
        limits: InboundLimits,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256);
        if protocol == AppProtocol::H2c {
            builder.http2_only(true);
        }
        Inbound {
            shared,
            app_addr,
            app: builder.build(connector),
            in_flight: AtomicUsize::new(0),
            admitted: AtomicUsize::new(0),
            limits,
        }
    }

    /// Requests being served right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let inbound = self.clone();
            tokio::spawn(async move { inbound.connection(incoming).await });
        }
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(conn) => conn,
            Err(e) => {
                metrics::counter!("sinew_inbound_handshake_failures_total").increment(1);
                tracing::info!("refused QUIC connection from {remote}: {e}");
                return;
            }
        };
        let Some(caller) = tls::peer_spiffe_id(&conn) else {
            conn.close(quinn::VarInt::from_u32(1), b"certificate has no spiffe id");
            return;
        };
        tracing::info!(%remote, %caller, "peer connected");
        let caller: Arc<str> = caller.into();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let inbound = self.clone();
            let caller = caller.clone();
            tokio::spawn(async move { inbound.stream(send, recv, caller).await });
        }
    }

    async fn stream(&self, mut send: quinn::SendStream, recv: quinn::RecvStream, caller: Arc<str>) {
        let _in_flight = InFlight::enter(&self.in_flight);
        let started = Instant::now();
        let caller_service = tls::service_of(&caller).unwrap_or("unknown").to_string();
        let read = tokio::time::timeout(self.limits.head_timeout, quic::read_request(recv));
        let (authority, request) = match read.await {
            Ok(Ok(head)) => head,
            Ok(Err(e)) => {
                tracing::debug!("bad request stream from {caller}: {e}");
                let _ = send.reset(frame::PROTOCOL_ERROR);
                return;
            }
            Err(_) => {
                // Dropping the read stops the receiving side as well.
                metrics::counter!("sinew_inbound_head_timeouts_total").increment(1);
                tracing::debug!(
                    "no request head from {caller} within {:?}",
                    self.limits.head_timeout
                );
                let _ = send.reset(frame::TIMED_OUT);
                return;
            }
        };
        let admitted = Admitted::enter(&self.admitted, self.limits.max_in_flight);
        // The caller stopping the response (it timed out, its client went away) cancels the
        // app request, even while the app is silent: dropping the futures below drops it.
        let stopped = send.stopped();
        tokio::pin!(stopped);
        let response = tokio::select! {
            response = self.to_app(&caller, &authority, request, admitted.is_some()) => response,
            _ = &mut stopped => {
                cancelled(&caller, "before the app answered");
                return;
            }
        };
        let response = quic::OutgoingResponse::new(response).or_else(|len| {
            metrics::counter!("sinew_inbound_response_head_too_large_total").increment(1);
            let error = MeshError::ResponseHeaderTooLarge {
                len,
                max: frame::MAX_HEAD_LEN as usize,
            };
            tracing::info!("answer of the app to {caller}: {error}");
            quic::OutgoingResponse::new(error.into_mesh_answer(false))
        });
        let Ok(response) = response else {
            let _ = send.reset(frame::PROTOCOL_ERROR);
            return;
        };
        crate::admin::record_request(
            crate::admin::Direction::Inbound,
            &caller_service,
            response.status(),
            started.elapsed(),
        );
        tokio::select! {
            result = response.write(&mut send) => match result {
                Ok(()) => {}
                // The caller stopped reading; writing noticed before `stopped` did.
                Err(frame::FrameError::Write(quinn::WriteError::Stopped(_))) => {
                    cancelled(&caller, "while the response streamed");
                }
                Err(e) => tracing::debug!("response to {caller} ended early: {e}"),
            },
            _ = &mut stopped => cancelled(&caller, "while the response streamed"),
        }
        drop(admitted);
    }

    /// The app's answer, or this sidecar's own (marked for the framing,
    /// [`MeshError::into_mesh_answer`]): a refusal before the app saw anything, or a failure
    /// to reach the app.
    async fn to_app(
        &self,
        caller: &str,
        authority: &str,
        request: Request<Body>,
        admitted: bool,
    ) -> Response<Body> {
        if let Err(refusal) = self.admit(caller, authority, admitted) {
            tracing::debug!("inbound from {caller}: {refusal}");
            return refusal.into_mesh_answer(true);
        }
        match self.forward(authority, Some(caller), request).await {
            Ok(mut response) => {
                if response
                    .headers_mut()
                    .remove(crate::errors::HEADER)
                    .is_some()
                {
                    metrics::counter!("sinew_inbound_app_error_headers_dropped_total").increment(1);
                }
                response
            }
            Err(e) => {
                tracing::debug!("inbound from {caller}: {e}");
                e.into_mesh_answer(false)
            }
        }
    }

    /// Whether this sidecar takes the request to its app: it serves that service, its app is
    /// healthy, it has configuration, the caller is allowed, and the app has room.
    fn admit(&self, caller: &str, authority: &str, room: bool) -> Result<(), MeshError> {
        let me = &self.shared.service;
        if authority != me {
            return Err(MeshError::Misdirected {
                served: me.clone(),
                asked: authority.to_string(),
            });
        }
        if !self.shared.is_app_healthy() {
            // Withdrawn (or about to be): callers retry elsewhere.
            metrics::counter!("sinew_inbound_unhealthy_total").increment(1);
            return Err(MeshError::Unhealthy(me.clone()));
        }
        let caller_service = tls::service_of(caller).unwrap_or_default();
        let snapshot = self.shared.snapshot.load();
        if snapshot.version == 0 {
            // Without configuration the allow list is unknown: refuse rather than fail open.
            return Err(MeshError::NotReady);
        }
        if let Some(service) = snapshot.services.get(me) {
            let allow = &service.policy.allow;
            if !allow.is_empty() && !allow.iter().any(|s| s == caller_service) {
                metrics::counter!("sinew_inbound_forbidden_total", "caller" => caller_service.to_string())
                    .increment(1);
                return Err(MeshError::Forbidden {
                    caller: caller.to_string(),
                    service: me.clone(),
                });
            }
        }
        if !room {
            metrics::counter!("sinew_inbound_overloaded_total").increment(1);
            return Err(MeshError::InboundOverloaded {
                max: self.limits.max_in_flight,
            });
        }
        Ok(())
    }

    /// Hands an event pulled from NATS JetStream (`--events-backend nats`) to the app: the
    /// same health and readiness gates as a request from the mesh, without the allow list
    /// (the subscription itself is the app's consent to the topic).
    pub async fn deliver_event(&self, request: Request<Body>) -> Result<Response<Body>, MeshError> {
        if !self.shared.is_app_healthy() {
            return Err(MeshError::Unhealthy(self.shared.service.clone()));
        }
        let me = self.shared.service.clone();
        self.forward(&me, None, request).await
    }

    /// The request, re-addressed to the app.
    async fn forward(
        &self,
        authority: &str,
        caller: Option<&str>,
        request: Request<Body>,
    ) -> Result<Response<Body>, MeshError> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.app_addr.to_string())
            .path_and_query(path)
            .build()
            .map_err(|e| MeshError::BadRequest(e.to_string()))?;
        if let Ok(host) = HeaderValue::from_str(authority) {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.headers.remove(CALLER_HEADER);
        let trace = crate::trace::next_hop(&mut parts.headers);
        tracing::debug!(%trace, caller = caller.unwrap_or("(event)"), path = %parts.uri.path(), "inbound");
        if let Some(value) = caller.and_then(|c| HeaderValue::from_str(c).ok()) {
            parts.headers.insert(CALLER_HEADER, value);
        }
        let response = self
            .app
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| MeshError::AppUnreachable(format!("{}: {}", self.app_addr, chain(&e))))?;
        Ok(response.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed()))
    }
}

/// An error with its causes: hyper's own text ("client error (SendRequest)") names no cause.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The caller gave up on a request (its timeout fired, its client went away).
fn cancelled(caller: &str, when: &str) {
    tracing::debug!("{caller} cancelled a request {when}");
    metrics::counter!("sinew_inbound_cancelled_total").increment(1);
}

/// A request admitted to the app, counted until dropped; `None` when `max` are already in.
struct Admitted<'a>(&'a AtomicUsize);

impl<'a> Admitted<'a> {
    fn enter(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admitted(counter))
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as in flight until dropped, however the request ends.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
