//! Policy documents: YAML, several per file, `kind` + `name` + `spec`, in the style users know
//! from Kubernetes. Every field has a default (see [`ServiceSpec`]); an invalid document is
//! refused with its field path and the reason ([`PolicyError`]).
//!
//! The control plane validates documents when they are applied; it sends each service's spec
//! to sidecars as canonical JSON ([`ServiceSpec::to_json`]), and the sidecar decodes it again
//! with the same strict rules ([`ServiceSpec::from_json`]), so a sidecar older than the control
//! plane NACKs a field it does not know instead of silently ignoring it.

use crate::duration;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A refused document: which one, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {path}: {reason}")]
pub struct PolicyError {
    /// `document 2 (Service orders)`: the position in the stream, and its kind and name when known.
    pub document: String,
    /// A dotted field path, such as `spec.timeout` or `spec.allow[1]`.
    pub path: String,
    pub reason: String,
}

/// The kinds of document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A mesh service's traffic and authorization policy.
    Service,
    /// A service's subscription to an event topic.
    Subscription,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Service, Kind::Subscription];

    /// A document's `kind`: case-sensitive, as in Kubernetes (`service` is refused with a
    /// hint, so one spelling is stored and shown everywhere).
    pub fn parse(text: &str) -> Result<Kind, String> {
        if let Some(kind) = Kind::ALL.into_iter().find(|k| k.to_string() == text) {
            return Ok(kind);
        }
        let lower = text.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        match Kind::ALL.into_iter().find(|k| {
            let known = k.to_string().to_ascii_lowercase();
            known == lower || known == singular
        }) {
            Some(kind) => Err(format!(
                "unknown kind `{text}`: kinds are case-sensitive and singular; did you mean {kind}?"
            )),
            None => Err(format!(
                "unknown kind `{text}` (known: Service, Subscription)"
            )),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Service => f.write_str("Service"),
            Kind::Subscription => f.write_str("Subscription"),
        }
    }
}

/// One validated document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub kind: Kind,
    pub name: String,
    pub spec: Spec,
}

/// A document's spec, by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Spec {
    Service(ServiceSpec),
    Subscription(SubscriptionSpec),
}

impl Spec {
    /// The canonical JSON the control plane sends to sidecars.
    pub fn to_json(&self) -> String {
        match self {
            Spec::Service(s) => s.to_json(),
            Spec::Subscription(s) => s.to_json(),
        }
    }

    pub fn service(&self) -> Option<&ServiceSpec> {
        match self {
            Spec::Service(s) => Some(s),
            Spec::Subscription(_) => None,
        }
    }

    pub fn subscription(&self) -> Option<&SubscriptionSpec> {
        match self {
            Spec::Subscription(s) => Some(s),
            Spec::Service(_) => None,
        }
    }
}

impl Document {
    /// The document as YAML, the way `sinewctl get` prints it.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_default()
    }
}

/// `kind: Service`: how a service is called and who may call it. Every field is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSpec {
    /// Overall time for one request to this service, from the caller's sidecar receiving it
    /// to the response head arriving. Past it: 504 `sinew-error: timeout`. Default `15s`.
    #[serde(with = "duration::serde_text")]
    pub timeout: Duration,
    /// Time to establish a QUIC connection to one instance's sidecar. Default `1s`; the
    /// overall `timeout` still bounds it when shorter.
    #[serde(with = "duration::serde_text")]
    pub connect_timeout: Duration,
    /// Services allowed to call this one, by name (their certificate's SPIFFE identity is
    /// checked by the inbound sidecar). Empty means every identity of the mesh. Default `[]`.
    pub allow: Vec<String>,
    /// The services this one calls. When set, its sidecars receive only these services
    /// (scoping: a sidecar's memory does not grow with the mesh). Default: unset, every service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<Vec<String>>,
    /// Retrying a failed try on another instance, always under a budget.
    pub retries: RetryPolicy,
    /// Ejecting instances that keep failing, and probing them back.
    pub outlier: OutlierPolicy,
    /// Requests to this service in flight at once from one sidecar (each until its response
    /// body ends); past it, 503 `sinew-error: overloaded` at once instead of queueing.
    /// Default `1024`.
    pub max_concurrent: u32,
    /// How long a request waits for the service to have an instance when it has none (none
    /// registered yet, or all withdrawn); past it, 503 `sinew-error: no-endpoints`. The
    /// overall `timeout` still bounds it; `0ms` fails at once. Default `3s`.
    #[serde(with = "duration::serde_text")]
    pub endpoint_wait: Duration,
    /// Requests to this service waiting at once (for an instance, see `endpoint_wait`) in one
    /// sidecar; past it, 503 `sinew-error: overloaded` at once. Default `1024`.
    pub max_pending: u32,
    /// Hedging: after `delay` without an answer, send the same request to another instance
    /// as well and take the first good answer. Off when unset (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgePolicy>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(1),
            allow: Vec::new(),
            calls: None,
            retries: RetryPolicy::default(),
            outlier: OutlierPolicy::default(),
            max_concurrent: 1024,
            endpoint_wait: Duration::from_secs(3),
            max_pending: 1024,
            hedge: None,
        }
    }
}

/// `spec.hedge`. Only idempotent methods are hedged, and only when the request has no body
/// or its whole body is kept (it ended within 64 KiB). Every hedge spends from the retry
/// budget, so hedging never multiplies the load; the slower try is cancelled (its stream
/// reset) as soon as one answers well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgePolicy {
    /// Time without a response head before another try is sent: a duration, or a percentile
    /// of the service's recent response times (`p95`: hedge the slowest 5%). Default `50ms`.
    pub delay: HedgeDelay,
    /// Hedged tries per request beyond the first (each after another `delay`). Default `1`.
    pub max_extra: u32,
}

impl Default for HedgePolicy {
    fn default() -> Self {
        HedgePolicy {
            delay: HedgeDelay::Fixed(Duration::from_millis(50)),
            max_extra: 1,
        }
    }
}

/// `spec.hedge.delay`: `50ms`, or `pNN` (50 to 99.9: `p95`, `p99`, `p99.9`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HedgeDelay {
    Fixed(Duration),
    /// A percentile of the response times the sidecar saw from the service over the last
    /// 10 to 20 s, in per mille (950 for `p95`).
    Percentile(u16),
}

impl HedgeDelay {
    /// Until the service has answered this many times in the window, a percentile delay
    /// is not trusted and hedging waits for the fallback instead.
    pub const MIN_SAMPLES: u64 = 20;
    /// The delay a percentile stands for until there are enough samples.
    pub const FALLBACK: Duration = Duration::from_millis(50);

    fn parse(text: &str) -> Result<HedgeDelay, String> {
        if let Some(number) = text.strip_prefix('p') {
            let value: f64 = number
                .parse()
                .map_err(|_| format!("`{text}` is not a percentile such as p95 or p99.9"))?;
            let per_mille = (value * 10.0).round();
            if !(500.0..=999.0).contains(&per_mille) || (per_mille - value * 10.0).abs() > 1e-6 {
                return Err(format!(
                    "`{text}`: a percentile between p50 and p99.9, in steps of 0.1"
                ));
            }
            return Ok(HedgeDelay::Percentile(per_mille as u16));
        }
        duration::parse(text).map(HedgeDelay::Fixed)
    }
}

impl fmt::Display for HedgeDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HedgeDelay::Fixed(d) => f.write_str(&duration::format(*d)),
            HedgeDelay::Percentile(pm) if pm % 10 == 0 => write!(f, "p{}", pm / 10),
            HedgeDelay::Percentile(pm) => write!(f, "p{}.{}", pm / 10, pm % 10),
        }
    }
}

impl Serialize for HedgeDelay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HedgeDelay::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `spec.retries`. A try is retried, on another instance when there is one, when it failed
/// before reaching the app (connect failure, refused by the peer), or when its per-try
/// timeout fired and the method is idempotent and the request has no body. Retries spend a
/// budget, so a full outage never multiplies the load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Tries in all, the first included; `1` turns retries off. Default `2`.
    pub attempts: u32,
    /// Time for one try. Unset (the default): only `timeout` bounds the tries.
    #[serde(
        with = "duration::serde_text_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// More reasons to retry: status codes (`503`, `429`, ...), `reset` (the stream broke
    /// before the response head; idempotent methods only), `unavailable` (gRPC status 14
    /// in a trailers-only answer) and `timeout` (a per-try timeout of any method, POST
    /// included: only list it when the service tolerates a request arriving twice). Default
    /// `[]`: only what never reached the app, and per-try timeouts of idempotent methods.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    pub budget: RetryBudgetPolicy,
}

/// One entry of `spec.retries.on`: a status code or a named condition. Written as a number or
/// a word (`503`, `reset`); any other word is refused where it is read, with its field path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RetryOnText", into = "RetryOnText")]
pub enum RetryOn {
    /// An answer with this status (4xx or 5xx).
    Status(u16),
    /// The stream broke before the response head (idempotent methods only).
    Reset,
    /// gRPC status 14 in a trailers-only answer.
    Unavailable,
    /// A per-try timeout, for any method (POST included).
    Timeout,
}

/// How a [`RetryOn`] is written.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RetryOnText {
    Status(u16),
    Word(String),
}

impl TryFrom<RetryOnText> for RetryOn {
    type Error = String;

    fn try_from(text: RetryOnText) -> Result<Self, String> {
        match text {
            RetryOnText::Status(code) => Ok(RetryOn::Status(code)),
            RetryOnText::Word(word) => match word.as_str() {
                "reset" => Ok(RetryOn::Reset),
                "unavailable" => Ok(RetryOn::Unavailable),
                "timeout" => Ok(RetryOn::Timeout),
                _ => Err(format!(
                    "`{word}`: must be a 4xx or 5xx status code, `reset`, `unavailable` or `timeout`"
                )),
            },
        }
    }
}

impl From<RetryOn> for RetryOnText {
    fn from(on: RetryOn) -> Self {
        match on {
            RetryOn::Status(code) => RetryOnText::Status(code),
            RetryOn::Reset => RetryOnText::Word("reset".into()),
            RetryOn::Unavailable => RetryOnText::Word("unavailable".into()),
            RetryOn::Timeout => RetryOnText::Word("timeout".into()),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            on: Vec::new(),
            budget: RetryBudgetPolicy::default(),
        }
    }
}

/// `spec.retries.budget`: retries may add at most `ratio` of the request rate plus
/// `min_per_second` (over a 10 s window). Defaults `0.2` and `10`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetPolicy {
    pub ratio: f64,
    pub min_per_second: u32,
}

impl Default for RetryBudgetPolicy {
    fn default() -> Self {
        RetryBudgetPolicy {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// `spec.outlier`: an instance with `consecutive_failures` failures in a row (connect
/// failures, resets, timeouts, 5xx) is ejected for `base_ejection`, doubling with each
/// ejection up to `max_ejection`; then one probe request decides. At most
/// `max_ejection_percent` of a service's instances are ejected at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierPolicy {
    /// Default `5`.
    pub consecutive_failures: u32,
    /// Default `5s`.
    #[serde(with = "duration::serde_text")]
    pub base_ejection: Duration,
    /// Default `60s`.
    #[serde(with = "duration::serde_text")]
    pub max_ejection: Duration,
    /// Default `50`.
    pub max_ejection_percent: u32,
    /// The second trigger: eject an instance when more than this percentage of its requests
    /// failed over the last 10 s... Default `50`.
    pub failure_percent: u32,
    /// ...counting only instances with at least this many requests in that window.
    /// Default `20`.
    pub min_requests: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
            failure_percent: 50,
            min_requests: 20,
        }
    }
}

impl ServiceSpec {
    /// The canonical JSON the control plane sends to sidecars.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes and validates what [`ServiceSpec::to_json`] wrote; `""` is every default.
    pub fn from_json(json: &str) -> Result<ServiceSpec, PolicyError> {
        if json.is_empty() {
            return Ok(ServiceSpec::default());
        }
        decode_strict("policy", json, ServiceSpec::validate)
    }

    /// Checks what serde cannot: ranges and names. Returns the field path and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let max = Duration::from_secs(3600);
        if self.timeout.is_zero() || self.timeout > max {
            return Err(("spec.timeout".into(), "must be between 1ms and 1h".into()));
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > max {
            return Err((
                "spec.connect_timeout".into(),
                "must be between 1ms and 1h".into(),
            ));
        }
        check_names("spec.allow", &self.allow)?;
        if !(1..=1_000_000).contains(&self.max_concurrent) {
            return Err((
                "spec.max_concurrent".into(),
                "must be between 1 and 1000000".into(),
            ));
        }
        let r = &self.retries;
        if !(1..=10).contains(&r.attempts) {
            return Err((
                "spec.retries.attempts".into(),
                "must be between 1 and 10".into(),
            ));
        }
        if r.per_try_timeout.is_some_and(|t| t.is_zero() || t > max) {
            return Err((
                "spec.retries.per_try_timeout".into(),
                "must be between 1ms and 1h".into(),
            ));
        }
        for (i, on) in r.on.iter().enumerate() {
            let ok = match on {
                RetryOn::Status(code) => (400..=599).contains(code),
                RetryOn::Reset | RetryOn::Unavailable | RetryOn::Timeout => true,
            };
            if !ok {
                return Err((
                    format!("spec.retries.on[{i}]"),
                    "must be a 4xx or 5xx status code, `reset`, `unavailable` or `timeout`".into(),
                ));
            }
        }
        if !(0.0..=1.0).contains(&r.budget.ratio) {
            return Err((
                "spec.retries.budget.ratio".into(),
                "must be between 0 and 1".into(),
            ));
        }
        if r.budget.min_per_second > 10_000 {
            return Err((
                "spec.retries.budget.min_per_second".into(),
                "must be at most 10000".into(),
            ));
        }
        let o = &self.outlier;
        if o.consecutive_failures == 0 {
            return Err((
                "spec.outlier.consecutive_failures".into(),
                "must be at least 1".into(),
            ));
        }
        if o.base_ejection.is_zero() || o.base_ejection > o.max_ejection || o.max_ejection > max {
            return Err((
                "spec.outlier.base_ejection".into(),
                "must be at least 1ms and at most spec.outlier.max_ejection (at most 1h)".into(),
            ));
        }
        if o.failure_percent > 100 {
            return Err((
                "spec.outlier.failure_percent".into(),
                "must be between 0 and 100".into(),
            ));
        }
        if o.max_ejection_percent > 100 {
            return Err((
                "spec.outlier.max_ejection_percent".into(),
                "must be between 0 and 100".into(),
            ));
        }
        if let Some(calls) = &self.calls {
            check_names("spec.calls", calls)?;
        }
        if self.max_pending > 1_000_000 {
            return Err(("spec.max_pending".into(), "must be at most 1000000".into()));
        }
        if self.endpoint_wait > max {
            return Err(("spec.endpoint_wait".into(), "must be at most 1h".into()));
        }
        if let Some(hedge) = &self.hedge {
            if let HedgeDelay::Fixed(delay) = hedge.delay
                && (delay.is_zero() || delay > max)
            {
                return Err((
                    "spec.hedge.delay".into(),
                    "must be between 1ms and 1h".into(),
                ));
            }
            if !(1..=3).contains(&hedge.max_extra) {
                return Err((
                    "spec.hedge.max_extra".into(),
                    "must be between 1 and 3".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `kind: Subscription`: `service` receives every event published to `topic`, as
/// `POST <path>` on one of its instances, with CloudEvents binary-mode headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The topic, e.g. `order.created`. Required.
    pub topic: String,
    /// The subscribing service (one consumer group: each event reaches one of its
    /// instances). Required.
    pub service: String,
    /// The path on the subscriber's app. Default `/events/<topic>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    #[serde(default)]
    pub delivery: DeliveryPolicy,
}

/// `spec.delivery`: how hard and how fast to deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryPolicy {
    /// Attempts in all before the event is dead-lettered. Default `10`.
    pub max_attempts: u32,
    /// Exponential backoff with full jitter between attempts. Defaults `100ms` and `30s`.
    pub backoff: BackoffPolicy,
    /// Time for one attempt (the answer's head must arrive within it). Default `5s`.
    #[serde(with = "duration::serde_text")]
    pub timeout: Duration,
    /// Events without a key in delivery at once, per subscription and sidecar. Default `32`.
    pub max_in_flight: u32,
    /// A topic that dead-lettered events are also published to. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_attempts: 10,
            backoff: BackoffPolicy::default(),
            timeout: Duration::from_secs(5),
            max_in_flight: 32,
            dead_letter_topic: None,
        }
    }
}

/// `spec.delivery.backoff`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffPolicy {
    #[serde(with = "duration::serde_text")]
    pub base: Duration,
    #[serde(with = "duration::serde_text")]
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl SubscriptionSpec {
    /// The path events are posted to: `path`, or `/events/<topic>`.
    pub fn path(&self) -> String {
        if self.path.is_empty() {
            format!("/events/{}", self.topic)
        } else {
            self.path.clone()
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes and validates what [`SubscriptionSpec::to_json`] wrote.
    pub fn from_json(json: &str) -> Result<SubscriptionSpec, PolicyError> {
        decode_strict("subscription", json, SubscriptionSpec::validate)
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_topic(&self.topic).map_err(|r| ("spec.topic".to_string(), r))?;
        validate_name(&self.service).map_err(|r| ("spec.service".to_string(), r))?;
        if !self.path.is_empty()
            && (!self.path.starts_with('/') || self.path.parse::<http::Uri>().is_err())
        {
            return Err((
                "spec.path".into(),
                format!(
                    "`{}` is not an absolute path such as /events/orders",
                    self.path
                ),
            ));
        }
        let d = &self.delivery;
        if !(1..=1000).contains(&d.max_attempts) {
            return Err((
                "spec.delivery.max_attempts".into(),
                "must be between 1 and 1000".into(),
            ));
        }
        let hour = Duration::from_secs(3600);
        if d.backoff.base.is_zero() || d.backoff.base > d.backoff.max || d.backoff.max > hour {
            return Err((
                "spec.delivery.backoff.base".into(),
                "must be at least 1ms and at most spec.delivery.backoff.max (at most 1h)".into(),
            ));
        }
        if d.timeout.is_zero() || d.timeout > hour {
            return Err((
                "spec.delivery.timeout".into(),
                "must be between 1ms and 1h".into(),
            ));
        }
        if !(1..=10_000).contains(&d.max_in_flight) {
            return Err((
                "spec.delivery.max_in_flight".into(),
                "must be between 1 and 10000".into(),
            ));
        }
        if let Some(topic) = &d.dead_letter_topic {
            validate_topic(topic)
                .map_err(|r| ("spec.delivery.dead_letter_topic".to_string(), r))?;
            if *topic == self.topic {
                return Err((
                    "spec.delivery.dead_letter_topic".into(),
                    "must differ from spec.topic".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Topic names: 1-200 characters of `A-Z a-z 0-9 . _ -`, dot-separated words (no empty
/// word): they double as NATS subject tokens.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    let ok = !topic.is_empty()
        && topic.len() <= 200
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && topic.split('.').all(|word| !word.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{topic}` is not a valid topic (1-200 characters of A-Z, a-z, 0-9, '.', '_' and '-', in words separated by single dots)"
        ))
    }
}

/// Decodes a spec from canonical JSON, strictly (unknown fields refused), then validates it;
/// errors name `document` and the field path.
fn decode_strict<T: serde::de::DeserializeOwned>(
    document: &str,
    json: &str,
    validate: impl Fn(&T) -> Result<(), (String, String)>,
) -> Result<T, PolicyError> {
    let de = &mut serde_json::Deserializer::from_str(json);
    let spec: T = serde_path_to_error::deserialize(de).map_err(|e| PolicyError {
        document: document.to_string(),
        path: field_path("spec", &e.path().to_string()),
        reason: e.inner().to_string(),
    })?;
    validate(&spec).map_err(|(path, reason)| PolicyError {
        document: document.to_string(),
        path,
        reason,
    })?;
    Ok(spec)
}

fn check_names(path: &str, names: &[String]) -> Result<(), (String, String)> {
    for (i, name) in names.iter().enumerate() {
        validate_name(name).map_err(|reason| (format!("{path}[{i}]"), reason))?;
        if names[..i].contains(name) {
            return Err((format!("{path}[{i}]"), format!("`{name}` is listed twice")));
        }
    }
    Ok(())
}

/// Service names are DNS labels: 1-63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (1-63 characters of a-z, 0-9 and '-', not starting or ending with '-')"
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    kind: String,
    name: String,
    #[serde(default)]
    spec: serde_yaml_ng::Value,
}

/// Parses and validates a YAML stream of documents. All of them are valid, or the first
/// problem is returned; empty documents (a trailing `---`) are skipped. The same kind and
/// name twice in one stream is refused.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, PolicyError> {
    let mut documents: Vec<Document> = Vec::new();
    for (index, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = format!("document {}", index + 1);
        let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| PolicyError {
            document: position.clone(),
            path: "(yaml)".into(),
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let raw: RawDocument =
            serde_path_to_error::deserialize(value).map_err(|e| PolicyError {
                document: position.clone(),
                path: field_path("", &e.path().to_string()),
                reason: e.inner().to_string(),
            })?;
        let here = |path: &str, reason: String| PolicyError {
            document: format!("{position} ({} {})", raw.kind, raw.name),
            path: path.to_string(),
            reason,
        };
        let kind = Kind::parse(&raw.kind).map_err(|r| here("kind", r))?;
        validate_name(&raw.name).map_err(|r| here("name", r))?;
        let decode_error = |e: serde_path_to_error::Error<serde_yaml_ng::Error>| {
            here(
                &field_path("spec", &e.path().to_string()),
                e.inner().to_string(),
            )
        };
        let spec = match kind {
            Kind::Service => {
                let spec: ServiceSpec = if raw.spec.is_null() {
                    ServiceSpec::default()
                } else {
                    serde_path_to_error::deserialize(raw.spec.clone()).map_err(decode_error)?
                };
                spec.validate()
                    .map_err(|(path, reason)| here(&path, reason))?;
                Spec::Service(spec)
            }
            Kind::Subscription => {
                let spec: SubscriptionSpec =
                    serde_path_to_error::deserialize(raw.spec.clone()).map_err(decode_error)?;
                spec.validate()
                    .map_err(|(path, reason)| here(&path, reason))?;
                Spec::Subscription(spec)
            }
        };
        if documents
            .iter()
            .any(|d| d.kind == kind && d.name == raw.name)
        {
            return Err(here(
                "name",
                format!("{kind} `{}` appears twice in this input", raw.name),
            ));
        }
        documents.push(Document {
            kind,
            name: raw.name,
            spec,
        });
    }
    Ok(documents)
}

/// Joins a prefix and serde_path_to_error's path (`.` when at the root).
fn field_path(prefix: &str, inner: &str) -> String {
    match (prefix.is_empty(), inner == "." || inner.is_empty()) {
        (true, true) => "(document)".into(),
        (true, false) => inner.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{inner}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_spec_is_every_default() {
        let docs = parse_documents("kind: Service\nname: orders\n").unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].spec, Spec::Service(ServiceSpec::default()));
        assert_eq!(
            docs[0].spec.service().unwrap().timeout,
            Duration::from_secs(15)
        );
    }

    #[test]
    fn several_documents_with_fields() {
        let text = "kind: Service\nname: orders\nspec:\n  timeout: 2s\n  allow: [web]\n---\nkind: Service\nname: web\nspec: {calls: [orders]}\n---\n";
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].spec.service().unwrap().timeout,
            Duration::from_secs(2)
        );
        assert_eq!(
            docs[0].spec.service().unwrap().allow,
            vec!["web".to_string()]
        );
        assert_eq!(
            docs[1].spec.service().unwrap().calls,
            Some(vec!["orders".to_string()])
        );
    }

    #[test]
    fn errors_name_the_document_and_field() {
        let err = parse_documents("kind: Service\nname: orders\nspec:\n  timeout: 2 seconds\n")
            .unwrap_err();
        assert_eq!(err.path, "spec.timeout");
        assert!(err.document.contains("Service orders"), "{err}");

        let err = parse_documents(
            "kind: Service\nname: a\n---\nkind: Service\nname: b\nspec: {timout: 1s}\n",
        )
        .unwrap_err();
        assert_eq!(err.document, "document 2 (Service b)");
        assert!(err.reason.contains("unknown field `timout`"), "{err}");

        let err = parse_documents("kind: Service\nname: a\nspec: {allow: [web, Bad_Name]}\n")
            .unwrap_err();
        assert_eq!(err.path, "spec.allow[1]");

        let err =
            parse_documents("kind: Service\nname: a\nspec: {connect_timeout: 0ms}\n").unwrap_err();
        assert_eq!(err.path, "spec.connect_timeout");

        let err = parse_documents("kind: Gateway\nname: a\n").unwrap_err();
        assert_eq!(err.path, "kind");
        assert!(err.reason.contains("unknown kind `Gateway`"), "{err}");

        let err = parse_documents("kind: service\nname: a\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "document 1 (service a): kind: unknown kind `service`: kinds are case-sensitive and singular; did you mean Service?"
        );
        let err = parse_documents("kind: Subscriptions\nname: a\n").unwrap_err();
        assert!(err.reason.ends_with("did you mean Subscription?"), "{err}");

        let err = parse_documents("name: a\n").unwrap_err();
        assert!(err.reason.contains("missing field `kind`"), "{err}");

        let err =
            parse_documents("kind: Service\nname: a\n---\nkind: Service\nname: a\n").unwrap_err();
        assert!(err.reason.contains("twice"), "{err}");

        assert!(parse_documents("kind: [\n").is_err());
    }

    #[test]
    fn json_round_trip_and_strict_decode() {
        let spec = ServiceSpec {
            timeout: Duration::from_millis(1500),
            allow: vec!["web".into()],
            ..ServiceSpec::default()
        };
        assert_eq!(ServiceSpec::from_json(&spec.to_json()), Ok(spec));
        assert_eq!(ServiceSpec::from_json(""), Ok(ServiceSpec::default()));
        let err = ServiceSpec::from_json(r#"{"timeout":"1s","hedging":"on"}"#).unwrap_err();
        assert!(err.reason.contains("unknown field `hedging`"), "{err}");
        let err =
            ServiceSpec::from_json(r#"{"retries":{"on":[503,"reset","sometimes"]}}"#).unwrap_err();
        assert_eq!(err.path, "spec.retries.on[2]");
        let err = ServiceSpec::from_json(r#"{"retries":{"on":[200]}}"#).unwrap_err();
        assert_eq!(err.path, "spec.retries.on[0]");
        let docs =
            parse_documents("kind: Service\nname: a\nspec: {retries: {on: [503, unavailable]}}\n")
                .unwrap();
        assert_eq!(
            docs[0].spec.service().unwrap().retries.on,
            [RetryOn::Status(503), RetryOn::Unavailable]
        );
        let err = ServiceSpec::from_json(r#"{"retries":{"attempts":0}}"#).unwrap_err();
        assert_eq!(err.path, "spec.retries.attempts");
        let err = ServiceSpec::from_json(r#"{"retries":{"budget":{"ratio":2}}}"#).unwrap_err();
        assert_eq!(err.path, "spec.retries.budget.ratio");
        let err = ServiceSpec::from_json(r#"{"outlier":{"base_ejection":"2m"}}"#).unwrap_err();
        assert_eq!(err.path, "spec.outlier.base_ejection");
        let spec =
            ServiceSpec::from_json(r#"{"retries":{"attempts":3,"per_try_timeout":"200ms"}}"#)
                .unwrap();
        assert_eq!(
            spec.retries.per_try_timeout,
            Some(Duration::from_millis(200))
        );
        assert_eq!(spec.retries.budget, RetryBudgetPolicy::default());
        assert_eq!(ServiceSpec::from_json(&spec.to_json()), Ok(spec));
        let err = ServiceSpec::from_json(r#"{"timeout":"0ms"}"#).unwrap_err();
        assert_eq!(err.path, "spec.timeout");
    }

    #[test]
    fn subscriptions_parse_with_defaults_and_round_trip() {
        let docs = parse_documents(
            "kind: Subscription\nname: billing-orders\nspec: {topic: order.created, service: billing}\n",
        )
        .unwrap();
        let sub = docs[0].spec.subscription().unwrap();
        assert_eq!(docs[0].kind, Kind::Subscription);
        assert_eq!(sub.path(), "/events/order.created");
        assert_eq!(sub.delivery, DeliveryPolicy::default());
        assert_eq!(sub.delivery.max_attempts, 10);
        let back = SubscriptionSpec::from_json(&sub.to_json()).unwrap();
        assert_eq!(&back, sub);
        // A sidecar refuses fields it does not know.
        let err = SubscriptionSpec::from_json(
            r#"{"topic":"a","service":"b","delivery":{"max_atempts":3}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "spec.delivery.max_atempts");
    }

    #[test]
    fn subscription_errors_name_the_field() {
        let cases = [
            ("{service: billing}", "spec", "missing field `topic`"),
            (
                "{topic: 'a..b', service: billing}",
                "spec.topic",
                "not a valid topic",
            ),
            (
                "{topic: 'a b', service: billing}",
                "spec.topic",
                "not a valid topic",
            ),
            (
                "{topic: a, service: Billing}",
                "spec.service",
                "not a valid name",
            ),
            (
                "{topic: a, service: b, path: events}",
                "spec.path",
                "absolute path",
            ),
            (
                "{topic: a, service: b, delivery: {max_attempts: 0}}",
                "spec.delivery.max_attempts",
                "between 1 and 1000",
            ),
            (
                "{topic: a, service: b, delivery: {backoff: {base: 2s, max: 1s}}}",
                "spec.delivery.backoff.base",
                "at most",
            ),
            (
                "{topic: a, service: b, delivery: {dead_letter_topic: a}}",
                "spec.delivery.dead_letter_topic",
                "differ",
            ),
            (
                "{topic: a, service: b, delivery: {timeout: soon}}",
                "spec.delivery.timeout",
                "",
            ),
        ];
        for (spec, path, reason) in cases {
            let err = parse_documents(&format!("kind: Subscription\nname: s\nspec: {spec}\n"))
                .unwrap_err();
            assert_eq!(err.path, path, "{spec}: {err}");
            assert!(err.reason.contains(reason), "{spec}: {err}");
            assert!(err.document.contains("Subscription s"), "{err}");
        }
    }

    #[test]
    fn topics() {
        for ok in ["a", "order.created", "A_b-c.d9"] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a*", "a>", "a/b", &"x".repeat(201)] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_wait_hedge_and_timeout_retries() {
        let spec = ServiceSpec::default();
        assert_eq!(spec.endpoint_wait, Duration::from_secs(3));
        assert_eq!(spec.hedge, None);
        let docs = parse_documents(
            "kind: Service\nname: a\nspec: {endpoint_wait: 0ms, hedge: {delay: 20ms}, retries: {on: [timeout]}}\n",
        )
        .unwrap();
        let spec = docs[0].spec.service().unwrap();
        assert_eq!(spec.endpoint_wait, Duration::ZERO);
        assert_eq!(
            spec.hedge,
            Some(HedgePolicy {
                delay: HedgeDelay::Fixed(Duration::from_millis(20)),
                max_extra: 1
            })
        );
        assert!(spec.retries.on.contains(&RetryOn::Timeout));
        assert_eq!(ServiceSpec::from_json(&spec.to_json()).as_ref(), Ok(spec));
        let err = ServiceSpec::from_json(r#"{"hedge":{"delay":"0ms"}}"#).unwrap_err();
        assert_eq!(err.path, "spec.hedge.delay");
        let err = ServiceSpec::from_json(r#"{"hedge":{"max_extra":4}}"#).unwrap_err();
        assert_eq!(err.path, "spec.hedge.max_extra");
        for (text, per_mille) in [("p95", 950), ("p50", 500), ("p99.9", 999)] {
            let json = format!(r#"{{"hedge":{{"delay":"{text}"}}}}"#);
            let spec = ServiceSpec::from_json(&json).unwrap();
            let hedge = spec.hedge.clone().unwrap();
            assert_eq!(hedge.delay, HedgeDelay::Percentile(per_mille));
            assert_eq!(hedge.delay.to_string(), text);
            assert_eq!(ServiceSpec::from_json(&spec.to_json()), Ok(spec));
        }
        for bad in ["p100", "p40", "p95.55", "px", "fast"] {
            let json = format!(r#"{{"hedge":{{"delay":"{bad}"}}}}"#);
            let err = ServiceSpec::from_json(&json).unwrap_err();
            assert_eq!(err.path, "spec.hedge.delay", "{bad}");
        }
        let err = ServiceSpec::from_json(r#"{"endpoint_wait":"2h"}"#).unwrap_err();
        assert_eq!(err.path, "spec.endpoint_wait");
    }
}
