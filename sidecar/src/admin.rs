//! The admin listener (127.0.0.1:4191): `/live`, `/ready`, `/metrics`, `/config`,
//! `/endpoints`, and `POST /shutdown`. Also where request metrics are named, so every
//! metric of the data path is listed in one place.
//!
//! Only local programs are answered: a request from a web page (`Origin`), or addressed by
//! a DNS name (`Host`), is refused, and `/shutdown` needs `sinew-admin: 1` (see
//! `local_guard.rs`).

use crate::local_guard::{self, LocalGuard};
use crate::state::Shared;
use crate::transport::{Body, BoxError};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub async fn handle<B>(
    request: Request<B>,
    shared: Arc<Shared>,
    prometheus: PrometheusHandle,
    guard: Arc<LocalGuard>,
) -> Response<Body> {
    if let Err(refused) = guard
        .check_origin(request.headers(), "admin")
        .and_then(|()| local_guard::check_host(&request, "admin"))
    {
        return refused.into_response();
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            let version = shared.snapshot.load().version;
            // Issued, and not expired: an expired one is refused by every peer.
            let identity = shared.identity_ready.load(Ordering::Relaxed);
            let expired = shared
                .certificate
                .borrow()
                .as_ref()
                .is_some_and(|c| c.validity.is_expired(crate::renewal::unix_ms()));
            match (version > 0, identity && !expired, shared.is_shutting_down()) {
                (_, _, true) => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
                (true, true, false) => text(StatusCode::OK, "ready\n"),
                (has_config, _, _) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "not ready: configuration {}, certificate {}\n",
                        if has_config { "applied" } else { "missing" },
                        match (identity, expired) {
                            (_, true) => "expired (renewal is failing)",
                            (true, false) => "issued",
                            (false, _) => "missing",
                        }
                    ),
                ),
            }
        }
        (&Method::GET, "/metrics") => text(StatusCode::OK, &prometheus.render()),
        (&Method::GET, "/config") => {
            let snapshot = shared.snapshot.load();
            let mut json = snapshot.to_json();
            if let Some(map) = json.as_object_mut() {
                map.insert("service".into(), shared.service.clone().into());
                map.insert("node_id".into(), shared.node_id.clone().into());
                map.insert(
                    "control_connected".into(),
                    shared.control_connected.load(Ordering::Relaxed).into(),
                );
            }
            json_response(&json)
        }
        (&Method::GET, "/endpoints") => {
            let snapshot = shared.snapshot.load();
            let map: serde_json::Map<String, serde_json::Value> = snapshot
                .services
                .iter()
                .map(|(name, s)| {
                    let addrs: Vec<String> = s
                        .endpoints
                        .iter()
                        .map(|e| e.target.addr.to_string())
                        .collect();
                    (name.clone(), addrs.into())
                })
                .collect();
            json_response(&serde_json::Value::Object(map))
        }
        (&Method::GET, "/events") => {
            let Some(events) = shared.events.get() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the outbox is not open yet\n",
                );
            };
            let reply = events
                .answer(sinew_proto::v1::EventsRequest {
                    op: sinew_proto::v1::events_request::Op::List as i32,
                    limit: 1000,
                    ..Default::default()
                })
                .await;
            if !reply.error.is_empty() {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("{}\n", reply.error),
                );
            }
            let entries: Vec<serde_json::Value> = reply
                .dead_letters
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "event_id": d.event_id, "topic": d.topic,
                        "subscription": d.subscription, "service": d.service,
                        "attempts": d.attempts, "last_error": d.last_error,
                    })
                })
                .collect();
            let (pending, bytes) = events.depth().await;
            json_response(&serde_json::json!({
                "backend": events.backend_name(),
                "outbox_events": pending,
                "outbox_bytes": bytes,
                "dead_letters": reply.matched,
                "dead_letter_entries": entries,
            }))
        }
        (&Method::POST, "/shutdown") => {
            if let Err(refused) = local_guard::check_admin_header(request.headers()) {
                return refused.into_response();
            }
            shared.begin_shutdown();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config /endpoints /events, POST /shutdown (with sinew-admin: 1)\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(full(Bytes::from(body)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| -> BoxError { match never {} })
        .boxed()
}

/// Every metric the sidecar exports, with its HELP text: registered once at start (before
/// any is recorded), so `/metrics` passes `promtool check metrics`. A metric recorded
/// without a line here is rendered without HELP, which `tests/tests/metrics.rs` (promtool) catches.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    // Requests (outbound: this app calling `peer`; inbound: `peer` calling this app).
    describe_counter!(
        "sinew_requests_total",
        "Requests answered, by direction, peer service and status class."
    );
    describe_histogram!(
        "sinew_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head, by direction and peer service."
    );
    // Resilience decisions on the outbound path.
    describe_counter!("sinew_retries_total", "Retries sent, by peer service.");
    describe_counter!(
        "sinew_retries_budget_exhausted_total",
        "Retries not sent because the retry budget was spent, by peer service."
    );
    describe_counter!(
        "sinew_retries_unreplayable_total",
        "Retries not sent because the request body could not be replayed, by peer service."
    );
    describe_counter!(
        "sinew_hedges_total",
        "Hedged requests sent, by peer service."
    );
    describe_counter!(
        "sinew_hedge_wins_total",
        "Hedged requests that answered first, by peer service."
    );
    describe_counter!(
        "sinew_hedges_budget_exhausted_total",
        "Hedges not sent because the retry budget was spent, by peer service."
    );
    describe_counter!(
        "sinew_outlier_ejections_total",
        "Instances ejected by outlier detection, by peer service."
    );
    describe_counter!(
        "sinew_balancer_panic_total",
        "Picks made from every instance because too few were healthy (panic mode), by peer service."
    );
    describe_counter!(
        "sinew_overloaded_total",
        "Requests refused with 503 overloaded (max_concurrent or max_pending), by peer service."
    );
    describe_counter!(
        "sinew_endpoint_waits_total",
        "Requests that waited for an instance of the peer service."
    );
    describe_counter!(
        "sinew_no_endpoints_total",
        "Requests refused with 503 no-endpoints, by peer service."
    );
    describe_counter!(
        "sinew_endpoints_down_total",
        "Instances skipped after a failed dial until redialed, by peer service."
    );
    // The app behind this sidecar.
    describe_counter!(
        "sinew_health_checks_total",
        "Health checks of the app, by result (pass, fail)."
    );
    describe_counter!(
        "sinew_health_transitions_total",
        "Changes of the app's health, by new state (healthy, unhealthy)."
    );
    describe_gauge!(
        "sinew_app_healthy",
        "1 while the app passes its health checks, else 0."
    );
    describe_counter!(
        "sinew_inbound_unhealthy_total",
        "Inbound requests refused with 503 unhealthy."
    );
    describe_counter!(
        "sinew_inbound_handshake_failures_total",
        "Inbound QUIC connections whose TLS handshake failed."
    );
    describe_counter!(
        "sinew_inbound_forbidden_total",
        "Inbound requests refused by policy, by calling service."
    );
    describe_counter!(
        "sinew_inbound_cancelled_total",
        "Inbound requests the caller gave up on before the app answered."
    );
    describe_counter!(
        "sinew_inbound_head_timeouts_total",
        "Inbound streams reset because their request head did not arrive within --inbound-head-timeout."
    );
    describe_counter!(
        "sinew_inbound_overloaded_total",
        "Inbound requests refused (503 overloaded) past --inbound-max-in-flight requests with the app."
    );
    describe_counter!(
        "sinew_inbound_response_head_too_large_total",
        "App answers whose head was over the mesh's 64 KiB limit, answered 502 response-header-too-large instead."
    );
    describe_counter!(
        "sinew_inbound_app_error_headers_dropped_total",
        "App answers whose own sinew-error header this sidecar dropped (the name is the mesh's)."
    );
    describe_counter!(
        "sinew_request_head_too_large_total",
        "Outbound requests refused before any try (431 header-too-large), by peer service."
    );
    describe_counter!(
        "sinew_quic_connections_opened_total",
        "Outbound QUIC connections opened to other sidecars."
    );
    // The control plane, as this sidecar sees it.
    describe_gauge!(
        "sinew_config_version",
        "Version of the configuration this sidecar applies."
    );
    describe_gauge!(
        "sinew_control_connected",
        "1 while the control stream is open, else 0."
    );
    describe_counter!(
        "sinew_control_updates_total",
        "Configuration updates received, by result (ack, nack)."
    );
    // Events.
    describe_counter!(
        "sinew_events_published_total",
        "Events accepted by the events API, by topic (\"other\" for topics without a subscription)."
    );
    describe_counter!(
        "sinew_events_delivered_total",
        "Event deliveries answered 2xx, by topic and subscribing service."
    );
    describe_counter!(
        "sinew_events_retried_total",
        "Event deliveries that failed and will be tried again, by topic and subscribing service."
    );
    describe_counter!(
        "sinew_events_dead_lettered_total",
        "Events moved to the dead letters, by topic and subscribing service."
    );
    describe_histogram!(
        "sinew_event_delivery_seconds",
        Unit::Seconds,
        "Time from publish to delivery, by topic and subscribing service."
    );
    describe_counter!(
        "sinew_events_duplicates_total",
        "Publishes NATS JetStream recognised as duplicates of a stored event, by topic."
    );
    describe_counter!(
        "sinew_events_refused_total",
        "Publishes refused by the events API, by reason."
    );
    describe_counter!(
        "sinew_events_outbox_full_total",
        "Publishes refused with 503 outbox-full."
    );
    describe_counter!(
        "sinew_events_unsubscribed_total",
        "Pending deliveries dropped because their subscription was deleted."
    );
    describe_gauge!(
        "sinew_outbox_events",
        "Events stored and not yet delivered to every subscriber."
    );
    describe_gauge!(
        "sinew_outbox_bytes",
        Unit::Bytes,
        "Stored bytes of the undelivered events (data and every attribute)."
    );
    describe_gauge!(
        "sinew_outbox_oldest_pending_seconds",
        Unit::Seconds,
        "Age of the oldest undelivered event."
    );
    describe_gauge!("sinew_dead_letters", "Dead letters kept.");
    describe_counter!(
        "sinew_dead_letters_evicted_total",
        "Dead letters dropped, oldest first, to keep the dead letters within their own bound."
    );
    // The local listeners' guards.
    describe_counter!(
        "sinew_local_refused_total",
        "Requests to the admin port or the events API refused as coming from a web page, by listener and reason."
    );
}

/// Buckets of `sinew_request_duration_seconds`: 100 µs to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Which side of the sidecar a request passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From this sidecar's app to the mesh.
    Outbound,
    /// From the mesh to this sidecar's app.
    Inbound,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The request metrics of one (direction, peer): registered once, so a request records with
/// atomic adds instead of building, hashing and looking up a labelled key per metric.
/// Counters per status class are registered when first used, so no zero-valued series
/// appear for classes a peer never answered.
struct RequestMetrics {
    direction: Direction,
    peer: Arc<str>,
    by_class: [std::sync::OnceLock<metrics::Counter>; 5],
    duration: metrics::Histogram,
}

impl RequestMetrics {
    fn new(direction: Direction, peer: &str) -> Self {
        let peer: Arc<str> = peer.into();
        let duration = metrics::histogram!("sinew_request_duration_seconds", "direction" => direction.label(), "peer" => peer.to_string());
        RequestMetrics {
            direction,
            peer,
            by_class: Default::default(),
            duration,
        }
    }

    fn requests(&self, class: usize) -> &metrics::Counter {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        self.by_class[class].get_or_init(|| {
            metrics::counter!("sinew_requests_total", "direction" => self.direction.label(), "peer" => self.peer.to_string(), "status_class" => CLASSES[class])
        })
    }
}

/// Handles by peer, one map per direction. Peers are service names of the mesh (and
/// `unknown`), so the maps stay as small as the mesh.
type RequestMetricsByPeer = std::sync::RwLock<HashMap<Arc<str>, Arc<RequestMetrics>>>;
static REQUEST_METRICS: [std::sync::LazyLock<RequestMetricsByPeer>; 2] = [
    std::sync::LazyLock::new(Default::default),
    std::sync::LazyLock::new(Default::default),
];

fn request_metrics(direction: Direction, peer: &str) -> Arc<RequestMetrics> {
    let by_peer = &REQUEST_METRICS[direction as usize];
    // A poisoned lock only means another thread panicked while holding it; the map is intact.
    if let Some(found) = by_peer.read().unwrap_or_else(|e| e.into_inner()).get(peer) {
        return found.clone();
    }
    let metrics = Arc::new(RequestMetrics::new(direction, peer));
    by_peer
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(metrics.peer.clone())
        .or_insert(metrics)
        .clone()
}

/// `sinew_requests_total{direction, peer, status_class}` and
/// `sinew_request_duration_seconds{direction, peer}` (time to the response head).
/// `peer` is the called service (outbound) or the caller's service (inbound).
pub fn record_request(direction: Direction, peer: &str, status: StatusCode, elapsed: Duration) {
    let class = match status.as_u16() / 100 {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        _ => 4,
    };
    let metrics = request_metrics(direction, peer);
    metrics.requests(class).increment(1);
    metrics.duration.record(elapsed.as_secs_f64());
}
