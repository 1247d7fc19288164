//! The admin listener (127.0.0.1:4191): `/live`, `/ready`, `/metrics`, `/config`,
//! `/endpoints`, and `POST /shutdown`. Also where request metrics are named, so every
//! metric of the data path is listed in one place.

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
) -> Response<Body> {
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
            shared.begin_shutdown();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (_, "/shutdown") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config /endpoints /events, POST /shutdown\n",
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
