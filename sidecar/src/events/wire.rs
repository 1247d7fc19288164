//! Events on the wire: what an app publishes (CloudEvents 1.0 binary or structured mode, or
//! a JSON batch) and what a subscriber receives (binary mode).

use super::outbox::unix_ms;
use crate::transport::{Body, BoxError};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use sinew_proto::v1::StoredEvent;
use std::collections::HashMap;

/// The header an app sets to order its events: same key, same order, per subscriber.
pub const KEY_HEADER: &str = "sinew-key";
/// Keys are at most this long.
pub const MAX_KEY: usize = 256;

/// The size caps of an event's attributes, in bytes (the data has `--event-max-bytes`).
/// Every byte of an event is stored and counted against the outbox's bound; the caps keep
/// one event's attributes small beside its data, whatever the body limit lets through.
pub const MAX_ID: usize = 256;
pub const MAX_TYPE: usize = 256;
pub const MAX_SOURCE: usize = 1024;
pub const MAX_SUBJECT: usize = 1024;
pub const MAX_CONTENT_TYPE: usize = 256;
/// The value of one extension attribute (`ce-<name>`, `time` included).
pub const MAX_EXTENSION: usize = 1024;
/// Extension attributes per event.
pub const MAX_EXTENSIONS: usize = 32;

/// Why a published event is refused: a 4xx status, the `sinew-error` reason and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub status: http::StatusCode,
    pub reason: &'static str,
    pub message: String,
}

fn bad(message: impl Into<String>) -> Invalid {
    Invalid {
        status: http::StatusCode::BAD_REQUEST,
        reason: "bad-request",
        message: message.into(),
    }
}

/// 400 `attribute-too-large` when `value` is over `max` bytes; names the attribute.
fn cap(attribute: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.len() <= max {
        return Ok(());
    }
    Err(Invalid {
        status: http::StatusCode::BAD_REQUEST,
        reason: "attribute-too-large",
        message: format!(
            "attribute `{attribute}` is {} bytes; at most {max} are accepted",
            value.len()
        ),
    })
}

/// What the sidecar knows about the publisher.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The default `source`: `/svc/<service>`.
    pub source: String,
    /// This sidecar's service: recorded in every event as its publisher.
    pub publisher: String,
}

/// How the body of a single publish is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Body = data; attributes in `ce-*` headers.
    Binary,
    /// Body = one CloudEvents JSON object (`application/cloudevents+json`).
    Structured,
}

/// The publish mode a `content-type` asks for, or 415 for one that cannot be a single event.
pub fn mode(content_type: Option<&str>) -> Result<Mode, Invalid> {
    let Some(ct) = content_type else {
        return Ok(Mode::Binary);
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/cloudevents+json" {
        Ok(Mode::Structured)
    } else if essence == "application/cloudevents-batch+json" {
        Err(Invalid {
            status: http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reason: "unsupported-media-type",
            message: "a batch goes to POST /v1/events/<topic>:batch".into(),
        })
    } else if essence.starts_with("application/cloudevents") {
        Err(Invalid {
            status: http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            reason: "unsupported-media-type",
            message: format!(
                "`{ct}`: only the JSON event format (application/cloudevents+json) is supported"
            ),
        })
    } else {
        Ok(Mode::Binary)
    }
}

/// A binary-mode event: the body is the data, attributes come from `ce-*` headers.
pub fn from_binary(
    topic: &str,
    headers: &HeaderMap,
    data: Bytes,
    origin: &Origin,
) -> Result<StoredEvent, Invalid> {
    let mut attrs: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let value = value
            .to_str()
            .map_err(|_| bad(format!("header {name} is not printable ASCII")))?;
        attrs.insert(attr.to_string(), value.to_string());
    }
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| bad("content-type is not printable ASCII"))
        })
        .transpose()?
        .unwrap_or_else(|| "application/octet-stream".into());
    // The publisher's trace context travels with the event (CloudEvents' distributed
    // tracing extension): delivered as `ce-traceparent`, and as the delivery's `traceparent`.
    if !attrs.contains_key(crate::trace::TRACEPARENT)
        && let Some(parent) = headers
            .get(crate::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::trace::TraceParent::parse(v).is_some())
    {
        attrs.insert(crate::trace::TRACEPARENT.to_string(), parent.to_string());
    }
    let from_attrs = attrs.remove("partitionkey");
    let key = key_header(headers)?.or(from_attrs);
    build(topic, attrs, key, content_type, data.to_vec(), origin)
}

/// The `sinew-key` header, if any.
fn key_header(headers: &HeaderMap) -> Result<Option<String>, Invalid> {
    headers
        .get(KEY_HEADER)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| bad(format!("{KEY_HEADER} is not printable ASCII")))
        })
        .transpose()
}

/// A structured event published with a `sinew-key` header: the header is its key.
pub fn with_key_header(
    mut event: StoredEvent,
    headers: &HeaderMap,
) -> Result<StoredEvent, Invalid> {
    if let Some(key) = key_header(headers)? {
        cap("partitionkey", &key, MAX_KEY)?;
        if HeaderValue::from_str(&key).is_err() {
            return Err(bad("the key is not printable text"));
        }
        event.key = key;
    }
    Ok(event)
}

/// A structured-mode event (one CloudEvents JSON object).
pub fn from_json(
    topic: &str,
    value: &serde_json::Value,
    origin: &Origin,
) -> Result<StoredEvent, Invalid> {
    let serde_json::Value::Object(object) = value else {
        return Err(bad("an event must be a JSON object"));
    };
    let mut attrs = HashMap::new();
    let mut data: Option<Vec<u8>> = None;
    let mut content_type = None;
    for (name, value) in object {
        match name.as_str() {
            "data" => {
                data = Some(match value {
                    // A JSON string is the data itself when the data is not JSON.
                    serde_json::Value::String(s)
                        if content_type_of(object).is_some_and(|ct| !is_json(ct)) =>
                    {
                        s.as_bytes().to_vec()
                    }
                    other => serde_json::to_vec(other).unwrap_or_default(),
                });
            }
            "data_base64" => {
                let text = value
                    .as_str()
                    .ok_or_else(|| bad("data_base64 must be a string"))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| bad(format!("data_base64: {e}")))?;
                data = Some(bytes);
            }
            "datacontenttype" => {
                content_type = Some(
                    value
                        .as_str()
                        .ok_or_else(|| bad("datacontenttype must be a string"))?
                        .to_string(),
                );
            }
            _ => {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(bad(format!(
                            "attribute `{name}` must be a string, number or boolean"
                        )));
                    }
                };
                attrs.insert(name.clone(), text);
            }
        }
    }
    if object.contains_key("data") && object.contains_key("data_base64") {
        return Err(bad("an event has `data` or `data_base64`, not both"));
    }
    let content_type = content_type.unwrap_or_else(|| "application/json".into());
    let key = attrs.remove("partitionkey");
    build(
        topic,
        attrs,
        key,
        content_type,
        data.unwrap_or_default(),
        origin,
    )
}

fn content_type_of(object: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    object.get("datacontenttype").and_then(|v| v.as_str())
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json")
}

fn build(
    topic: &str,
    mut attrs: HashMap<String, String>,
    key: Option<String>,
    content_type: String,
    data: Vec<u8>,
    origin: &Origin,
) -> Result<StoredEvent, Invalid> {
    if let Some(v) = attrs.remove("specversion")
        && v != "1.0"
    {
        return Err(bad(format!(
            "specversion `{v}` is not supported (only 1.0)"
        )));
    }
    let key = key.unwrap_or_default();
    cap("partitionkey", &key, MAX_KEY)?;
    let id = attrs.remove("id").unwrap_or_else(new_id);
    if id.is_empty() {
        return Err(bad("id must not be empty"));
    }
    cap("id", &id, MAX_ID)?;
    cap("datacontenttype", &content_type, MAX_CONTENT_TYPE)?;
    for (name, max) in [
        ("type", MAX_TYPE),
        ("source", MAX_SOURCE),
        ("subject", MAX_SUBJECT),
    ] {
        if let Some(value) = attrs.get(name) {
            cap(name, value, max)?;
        }
    }
    for (name, value) in &attrs {
        let valid_name = !name.is_empty()
            && name.len() <= 20
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !valid_name {
            return Err(bad(format!(
                "`{name}` is not a CloudEvents attribute name (1-20 of a-z, 0-9)"
            )));
        }
        if HeaderValue::from_str(value).is_err() {
            return Err(bad(format!("attribute `{name}` is not printable text")));
        }
        if !matches!(name.as_str(), "type" | "source" | "subject") {
            cap(name, value, MAX_EXTENSION)?;
        }
    }
    let extensions = attrs
        .keys()
        .filter(|n| !matches!(n.as_str(), "type" | "source" | "subject"))
        .count();
    if extensions > MAX_EXTENSIONS {
        return Err(Invalid {
            status: http::StatusCode::BAD_REQUEST,
            reason: "attribute-too-large",
            message: format!(
                "the event has {extensions} extension attributes; at most {MAX_EXTENSIONS} are accepted"
            ),
        });
    }
    for (what, value) in [("id", &id), ("key", &key), ("content type", &content_type)] {
        if HeaderValue::from_str(value).is_err() {
            return Err(bad(format!("the {what} is not printable text")));
        }
    }
    let now = unix_ms();
    let take = |attrs: &mut HashMap<String, String>, name: &str| attrs.remove(name);
    let event_type = take(&mut attrs, "type").unwrap_or_else(|| topic.to_string());
    let source = take(&mut attrs, "source").unwrap_or_else(|| origin.source.clone());
    let subject = take(&mut attrs, "subject").unwrap_or_default();
    // A `time` the app set is kept as it was written; otherwise the publish time is sent.
    let extensions = attrs;
    Ok(StoredEvent {
        id,
        topic: topic.to_string(),
        key,
        r#type: event_type,
        source,
        subject,
        time_unix_ms: now,
        content_type,
        data,
        extensions,
        stored_unix_ms: now,
        publisher: origin.publisher.clone(),
    })
}

/// A new event id: 128 random bits as a UUID (version 4) string.
pub fn new_id() -> String {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0x0fff,
        ((lo >> 48) & 0x3fff) | 0x8000,
        lo & 0xffff_ffff_ffff
    )
}

/// The request that delivers `event` to `service` at `path`, CloudEvents binary mode.
pub fn delivery_request(
    service: &str,
    path: &str,
    event: &StoredEvent,
) -> Result<Request<Body>, String> {
    let time = event
        .extensions
        .get("time")
        .cloned()
        .unwrap_or_else(|| rfc3339(event.time_unix_ms));
    let mut builder = Request::post(format!("http://{service}{path}"))
        .header(http::header::CONTENT_TYPE, &event.content_type)
        .header(http::header::CONTENT_LENGTH, event.data.len())
        .header("ce-specversion", "1.0")
        .header("ce-id", &event.id)
        .header("ce-source", &event.source)
        .header("ce-type", &event.r#type)
        .header("ce-time", time);
    if !event.subject.is_empty() {
        builder = builder.header("ce-subject", &event.subject);
    }
    if !event.key.is_empty() {
        builder = builder
            .header(KEY_HEADER, &event.key)
            .header("ce-partitionkey", &event.key);
    }
    for (name, value) in &event.extensions {
        if name != "time" {
            builder = builder.header(format!("ce-{name}"), value);
        }
    }
    if let Some(parent) = event.extensions.get(crate::trace::TRACEPARENT) {
        builder = builder.header(crate::trace::TRACEPARENT, parent);
    }
    let body = Full::new(Bytes::from(event.data.clone()))
        .map_err(|never| -> BoxError { match never {} })
        .boxed();
    builder
        .body(body)
        .map_err(|e| format!("cannot build the delivery request: {e}"))
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T19:32:37.123Z`.
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_publishers_trace_context_travels_with_the_event() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static(parent));
        let event = from_binary("t", &headers, Bytes::from_static(b"x"), &origin()).unwrap();
        assert_eq!(event.extensions["traceparent"], parent);
        let request = delivery_request("billing", "/e", &event).unwrap();
        assert_eq!(request.headers()["ce-traceparent"], parent);
        assert_eq!(request.headers()["traceparent"], parent);
        // A malformed one is not recorded.
        headers.insert("traceparent", HeaderValue::from_static("nonsense"));
        let event = from_binary("t", &headers, Bytes::from_static(b"x"), &origin()).unwrap();
        assert!(!event.extensions.contains_key("traceparent"));
    }

    fn origin() -> Origin {
        Origin {
            source: "/svc/orders".into(),
            publisher: "orders".into(),
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_635_157_000), "2026-11-25T19:32:37.000Z");
    }

    #[test]
    fn ids_are_uuid_shaped_and_differ() {
        let a = new_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_id());
    }

    #[test]
    fn binary_mode_takes_ce_headers_and_the_key() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("ce-id", HeaderValue::from_static("e-1"));
        h.insert("ce-type", HeaderValue::from_static("com.example.created"));
        h.insert("ce-traceparent", HeaderValue::from_static("00-ab-cd-01"));
        h.insert(KEY_HEADER, HeaderValue::from_static("order-7"));
        let e = from_binary("order.created", &h, Bytes::from_static(b"{}"), &origin()).unwrap();
        assert_eq!(e.id, "e-1");
        assert_eq!(e.r#type, "com.example.created");
        assert_eq!(e.source, "/svc/orders");
        assert_eq!(e.key, "order-7");
        assert_eq!(e.extensions.get("traceparent").unwrap(), "00-ab-cd-01");
        let r = delivery_request("billing", "/events", &e).unwrap();
        assert_eq!(r.uri(), "http://billing/events");
        assert_eq!(r.headers()["ce-id"], "e-1");
        assert_eq!(r.headers()["ce-specversion"], "1.0");
        assert_eq!(r.headers()["ce-traceparent"], "00-ab-cd-01");
        assert_eq!(r.headers()[KEY_HEADER], "order-7");
        assert_eq!(r.headers()["content-length"], "2");
    }

    #[test]
    fn structured_mode_and_its_errors() {
        let v = serde_json::json!({"specversion": "1.0", "id": "x", "type": "t",
            "partitionkey": "k", "data": {"n": 1}});
        let e = from_json("a", &v, &origin()).unwrap();
        assert_eq!((e.id.as_str(), e.key.as_str()), ("x", "k"));
        assert_eq!(e.content_type, "application/json");
        assert_eq!(e.data, br#"{"n":1}"#);
        let v = serde_json::json!({"datacontenttype": "text/plain", "data": "hi"});
        assert_eq!(from_json("a", &v, &origin()).unwrap().data, b"hi");
        let v = serde_json::json!({"data_base64": "aGk="});
        assert_eq!(from_json("a", &v, &origin()).unwrap().data, b"hi");
        for (bad_event, reason) in [
            (serde_json::json!([1]), "JSON object"),
            (serde_json::json!({"specversion": "0.3"}), "specversion"),
            (serde_json::json!({"data_base64": "***"}), "data_base64"),
            (serde_json::json!({"Bad-Name": "x"}), "attribute name"),
            (serde_json::json!({"ext": {"a": 1}}), "string, number"),
            (
                serde_json::json!({"data": 1, "data_base64": "aGk="}),
                "not both",
            ),
        ] {
            let err = from_json("a", &bad_event, &origin()).unwrap_err();
            assert!(err.message.contains(reason), "{bad_event}: {err:?}");
        }
    }

    #[test]
    fn every_attribute_has_a_size_cap_named_in_the_refusal() {
        let long = |n: usize| "a".repeat(n);
        let cases = [
            ("id", MAX_ID),
            ("type", MAX_TYPE),
            ("source", MAX_SOURCE),
            ("subject", MAX_SUBJECT),
            ("partitionkey", MAX_KEY),
            ("traceparent", MAX_EXTENSION),
            ("time", MAX_EXTENSION),
        ];
        for (attribute, max) in cases {
            // At the cap: accepted, in both modes.
            let v = serde_json::json!({ attribute: long(max) });
            assert!(
                from_json("a", &v, &origin()).is_ok(),
                "{attribute} at {max}"
            );
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(format!("ce-{attribute}").as_bytes()).unwrap(),
                HeaderValue::from_str(&long(max)).unwrap(),
            );
            assert!(from_binary("a", &h, Bytes::new(), &origin()).is_ok());
            // One byte more: 400 naming it.
            let v = serde_json::json!({ attribute: long(max + 1) });
            let err = from_json("a", &v, &origin()).unwrap_err();
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
            assert_eq!(err.reason, "attribute-too-large");
            assert!(
                err.message.contains(&format!("`{attribute}`")),
                "{attribute}: {}",
                err.message
            );
            h.insert(
                http::HeaderName::from_bytes(format!("ce-{attribute}").as_bytes()).unwrap(),
                HeaderValue::from_str(&long(max + 1)).unwrap(),
            );
            let err = from_binary("a", &h, Bytes::new(), &origin()).unwrap_err();
            assert!(err.message.contains(&format!("`{attribute}`")), "{err:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(&format!("text/{}", long(MAX_CONTENT_TYPE))).unwrap(),
        );
        let err = from_binary("a", &h, Bytes::new(), &origin()).unwrap_err();
        assert!(err.message.contains("`datacontenttype`"), "{err:?}");
        h.clear();
        h.insert(
            KEY_HEADER,
            HeaderValue::from_str(&long(MAX_KEY + 1)).unwrap(),
        );
        let err = from_binary("a", &h, Bytes::new(), &origin()).unwrap_err();
        assert!(err.message.contains("`partitionkey`"), "{err:?}");
        // The number of extensions is capped too.
        let mut object = serde_json::Map::new();
        for i in 0..=MAX_EXTENSIONS {
            object.insert(format!("ext{i}"), "x".into());
        }
        let err = from_json("a", &serde_json::Value::Object(object), &origin()).unwrap_err();
        assert_eq!(err.reason, "attribute-too-large");
        assert!(err.message.contains("extension attributes"), "{err:?}");
    }

    #[test]
    fn modes_by_content_type() {
        assert_eq!(mode(None), Ok(Mode::Binary));
        assert_eq!(mode(Some("text/plain")), Ok(Mode::Binary));
        assert_eq!(
            mode(Some("application/cloudevents+json; charset=utf-8")),
            Ok(Mode::Structured)
        );
        for ct in [
            "application/cloudevents-batch+json",
            "application/cloudevents+avro",
        ] {
            assert_eq!(
                mode(Some(ct)).unwrap_err().status,
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE
            );
        }
    }
}
