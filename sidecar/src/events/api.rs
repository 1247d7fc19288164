//! The publish API on the outbound port: `POST /v1/events/<topic>` (one event) and
//! `POST /v1/events/<topic>:batch` (a JSON array of CloudEvents), addressed to the sidecar
//! itself (`127.0.0.1:4140`, `localhost:4140`). Answers 202 once the events are on disk.

use super::outbox::NewEvent;
use super::wire::{self, Invalid, Mode};
use super::{Backend, Events};
use crate::errors::HEADER;
use crate::transport::{Body, BoxError};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sinew_proto::policy::validate_topic;
use sinew_proto::v1::StoredEvent;

const PREFIX: &str = "/v1/events/";
const BATCH_SUFFIX: &str = ":batch";

/// Whether a request on the outbound port is for the events API: its path is under
/// `/v1/events/` and it is addressed to the sidecar itself (an IP address or `localhost`,
/// never a mesh service name).
/// (The same Host test guards the admin port against DNS rebinding: `local_guard.rs`.)
pub fn is_events_request<B>(request: &Request<B>) -> bool {
    request.uri().path().starts_with(PREFIX) && crate::local_guard::host_is_local(request)
}

/// A refusal: status, `sinew-error` reason and message.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
    /// Per-entry results of a batch that was partly stored.
    results: Option<serde_json::Value>,
}

impl Refusal {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            reason,
            message: message.into(),
            results: None,
        }
    }

    fn invalid(e: Invalid) -> Self {
        Refusal::new(e.status, e.reason, e.message)
    }
}

impl Events {
    /// Serves one request of the events API; never fails (errors are answers).
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match self.publish(request).await {
            Ok((status, body)) => json(status, &body),
            Err(refusal) => {
                metrics::counter!("sinew_events_refused_total", "reason" => refusal.reason)
                    .increment(1);
                let mut body =
                    serde_json::json!({"error": refusal.message, "reason": refusal.reason});
                if let Some(results) = refusal.results {
                    body["results"] = results;
                }
                let mut response = json(refusal.status, &body);
                response
                    .headers_mut()
                    .insert(HEADER, HeaderValue::from_static(refusal.reason));
                if refusal.status == StatusCode::METHOD_NOT_ALLOWED {
                    response
                        .headers_mut()
                        .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
                }
                response
            }
        }
    }

    async fn publish<B>(
        &self,
        request: Request<B>,
    ) -> Result<(StatusCode, serde_json::Value), Refusal>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if request.method() != http::Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "publish with POST /v1/events/<topic>",
            ));
        }
        let rest = &request.uri().path()[PREFIX.len()..];
        let (topic, batch) = match rest.strip_suffix(BATCH_SUFFIX) {
            Some(topic) => (topic.to_string(), true),
            None => (rest.to_string(), false),
        };
        validate_topic(&topic)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "bad-request", e))?;
        let snapshot = self.shared.snapshot.load();
        if snapshot.version == 0 {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "no configuration from the control plane yet: the subscribers are unknown",
            ));
        }
        let subscribers = snapshot.subscribers(&topic);
        let subscriptions: Vec<String> = subscribers.iter().map(|s| s.name.clone()).collect();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let events = if batch {
            let (parts, body) = request.into_parts();
            let body = read(&parts.headers, body, self.limits.max_batch_bytes).await?;
            self.parse_batch(&topic, content_type.as_deref(), &body)?
        } else {
            let mode = wire::mode(content_type.as_deref()).map_err(Refusal::invalid)?;
            // Structured mode carries the data inside JSON (base64 grows it by a third).
            let limit = match mode {
                Mode::Binary => self.limits.max_event_bytes,
                Mode::Structured => self.limits.max_event_bytes / 3 * 4 + 64 * 1024,
            };
            let (parts, body) = request.into_parts();
            let body = read(&parts.headers, body, limit).await?;
            let event = match mode {
                Mode::Binary => wire::from_binary(&topic, &parts.headers, body, &self.origin),
                Mode::Structured => serde_json::from_slice(&body)
                    .map_err(|e| Invalid {
                        status: StatusCode::BAD_REQUEST,
                        reason: "bad-request",
                        message: format!("the body is not a CloudEvents JSON object: {e}"),
                    })
                    .and_then(|v| wire::from_json(&topic, &v, &self.origin))
                    .and_then(|event| wire::with_key_header(event, &parts.headers)),
            }
            .map_err(Refusal::invalid)?;
            self.check_size(&event).map_err(Refusal::invalid)?;
            vec![event]
        };
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let n = events.len() as u64;
        if !subscriptions.is_empty() {
            match &self.backend {
                Backend::Embedded(outbox) => {
                    let _room = self.admit(outbox, &events, &subscriptions)?;
                    let new = events
                        .into_iter()
                        .map(|event| NewEvent {
                            event,
                            subscriptions: subscriptions.clone(),
                        })
                        .collect();
                    outbox.publish(new).await.map_err(|e| {
                        Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "outbox-unavailable",
                            format!("the event was not stored: {e}"),
                        )
                    })?;
                }
                #[cfg(feature = "nats")]
                Backend::Nats(nats) => {
                    let results = nats.publish(&topic, &subscribers, events).await;
                    refuse_unstored(&ids, results)?;
                }
            }
        }
        // A topic label only for topics with a subscription (policy bounds them): any name
        // may be published to, and each label value would be a series kept forever.
        let label = if subscriptions.is_empty() {
            "other".to_string()
        } else {
            topic.clone()
        };
        metrics::counter!("sinew_events_published_total", "topic" => label).increment(n);
        let body = if batch {
            let results: Vec<serde_json::Value> = ids
                .iter()
                .map(|id| serde_json::json!({ "id": id }))
                .collect();
            serde_json::json!({ "topic": topic, "subscribers": subscriptions.len(), "results": results })
        } else {
            serde_json::json!({ "id": ids.first(), "topic": topic, "subscribers": subscriptions.len() })
        };
        Ok((StatusCode::ACCEPTED, body))
    }

    fn check_size(&self, event: &StoredEvent) -> Result<(), Invalid> {
        if event.data.len() > self.limits.max_event_bytes {
            return Err(Invalid {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                reason: "too-large",
                message: format!(
                    "the event's data is {} bytes; at most {} are accepted",
                    event.data.len(),
                    self.limits.max_event_bytes
                ),
            });
        }
        Ok(())
    }

    /// A batch: a JSON array of CloudEvents objects. Every entry must be valid, or none is
    /// stored and the answer names each bad entry.
    fn parse_batch(
        &self,
        topic: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Vec<StoredEvent>, Refusal> {
        let essence = content_type.map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
        if !matches!(
            essence.as_deref(),
            None | Some("application/json") | Some("application/cloudevents-batch+json")
        ) {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "a batch is a JSON array of CloudEvents (application/cloudevents-batch+json)",
            ));
        }
        let entries: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("a batch is a JSON array of CloudEvents objects: {e}"),
            )
        })?;
        if entries.is_empty() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "the batch is empty",
            ));
        }
        if entries.len() > self.limits.max_batch_events {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "the batch has {} events; at most {} are accepted",
                    entries.len(),
                    self.limits.max_batch_events
                ),
            ));
        }
        let mut events = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        let mut too_large = false;
        for (i, entry) in entries.iter().enumerate() {
            match wire::from_json(topic, entry, &self.origin)
                .and_then(|e| self.check_size(&e).map(|()| e))
            {
                Ok(event) => events.push(event),
                Err(e) => {
                    too_large |= e.status == StatusCode::PAYLOAD_TOO_LARGE;
                    errors.push(format!("[{i}]: {}", e.message));
                }
            }
        }
        if !errors.is_empty() {
            let (status, reason) = if too_large {
                (StatusCode::PAYLOAD_TOO_LARGE, "too-large")
            } else {
                (StatusCode::BAD_REQUEST, "bad-request")
            };
            return Err(Refusal::new(
                status,
                reason,
                format!(
                    "{} of {} events are invalid, none was stored: {}",
                    errors.len(),
                    entries.len(),
                    errors.join("; ")
                ),
            ));
        }
        Ok(events)
    }

    /// The outbox's bound: past it, 503 `outbox-full` rather than unbounded disk growth. Every
    /// stored byte counts (`outbox::stored_bytes`). The room is held until the events are
    /// stored, so concurrent publishes cannot overshoot.
    fn admit<'a>(
        &self,
        outbox: &'a super::outbox::Outbox,
        events: &[StoredEvent],
        subscriptions: &[String],
    ) -> Result<super::outbox::Reservation<'a>, Refusal> {
        let bytes = events
            .iter()
            .map(|e| super::outbox::stored_bytes(e, subscriptions))
            .sum::<u64>();
        outbox
            .reserve(
                events.len() as u64,
                bytes,
                self.limits.max_outbox_events,
                self.limits.max_outbox_bytes,
            )
            .ok_or_else(|| {
                metrics::counter!("sinew_events_outbox_full_total").increment(1);
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outbox-full",
                    format!(
                        "the outbox holds its limit ({} events or {} stored bytes) of undelivered events; retry later",
                        self.limits.max_outbox_events, self.limits.max_outbox_bytes
                    ),
                )
            })
    }
}

#[cfg(feature = "nats")]
/// NATS stores each event of a batch on its own: if any was refused, the answer says which
/// were stored (a batch resent with the same `ce-id`s within two minutes is stored once).
fn refuse_unstored(
    ids: &[String],
    results: Vec<Result<(), super::nats::PublishFailure>>,
) -> Result<(), Refusal> {
    use super::nats::PublishFailure;
    let Some(failure) = results.iter().find_map(|r| r.as_ref().err()).cloned() else {
        return Ok(());
    };
    let (status, reason) = match failure {
        PublishFailure::Full(_) => (StatusCode::SERVICE_UNAVAILABLE, "outbox-full"),
        PublishFailure::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
        PublishFailure::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "outbox-unavailable"),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE && reason == "outbox-full" {
        metrics::counter!("sinew_events_outbox_full_total").increment(1);
    }
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let entries: Vec<serde_json::Value> = ids
        .iter()
        .zip(&results)
        .map(|(id, result)| match result {
            Ok(()) => serde_json::json!({ "id": id, "stored": true }),
            Err(e) => serde_json::json!({ "id": id, "stored": false, "error": e.to_string() }),
        })
        .collect();
    let message = if ids.len() == 1 {
        format!("the event was not stored: {failure}")
    } else {
        format!(
            "{} of {} events were not stored (the first refusal: {failure})",
            ids.len() - stored,
            ids.len()
        )
    };
    Err(Refusal {
        status,
        reason,
        message,
        results: (ids.len() > 1).then_some(serde_json::Value::Array(entries)),
    })
}

/// A body refused as too large is still read and dropped up to this size: the client is
/// still sending, and closing on it makes many clients report a reset instead of the 413.
const DRAIN_MAX: usize = 64 * 1024 * 1024;

async fn read<B>(headers: &http::HeaderMap, body: B, limit: usize) -> Result<Bytes, Refusal>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    if let Some(length) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && length > limit
    {
        if length <= DRAIN_MAX {
            drain(body.as_mut(), DRAIN_MAX).await;
        }
        return Err(too_large(limit));
    }
    let mut collected = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("reading the body: {}", e.into()),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                drain(body.as_mut(), DRAIN_MAX.saturating_sub(collected.len())).await;
                return Err(too_large(limit));
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(collected.freeze())
}

/// Reads and drops at most `budget` bytes of what is left of `body`.
async fn drain<B>(mut body: std::pin::Pin<&mut B>, mut budget: usize)
where
    B: http_body::Body<Data = Bytes>,
{
    while budget > 0 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    budget = budget.saturating_sub(data.len().max(1));
                }
            }
            _ => return,
        }
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("the body is larger than {limit} bytes"),
    )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{value}\n")))
            .map_err(|never| -> BoxError { match never {} })
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_is_the_sidecar_itself_not_a_service() {
        let at = |uri: &str, host: Option<&str>| {
            let mut b = Request::post(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            is_events_request(&b.body(()).unwrap_or_default())
        };
        assert!(at("/v1/events/a", Some("127.0.0.1:4140")));
        assert!(at("/v1/events/a", Some("localhost:4140")));
        assert!(at("http://[::1]:4140/v1/events/a", None));
        assert!(!at("/v1/events/a", Some("orders")));
        assert!(!at("http://orders/v1/events/a", None));
        assert!(!at("/v1/other", Some("127.0.0.1:4140")));
    }
}
