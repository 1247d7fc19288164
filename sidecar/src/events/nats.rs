//! The scale-out events backend (`--events-backend nats`): NATS JetStream keeps the events,
//! the sidecars still decide how they are delivered.
//!
//! Layout on the server (`<p>` is `--nats-prefix`, default `sinew`; `<P>` the same in upper
//! case, so several meshes can share one server):
//!
//! - Stream `<P>_EVENTS` on `<p>.ev.>` and `<p>.rp.>`, interest retention: a message stays
//!   until every consumer that wants it has acknowledged it. Its limits are the outbox's
//!   (`--outbox-max-events`, `--outbox-max-bytes`), with `discard: new`, so a full stream
//!   refuses publishes (503 `outbox-full`) instead of dropping old events.
//! - An event of topic `T` goes to `<p>.ev.T.u` without a key, or `<p>.ev.T.k<N>` with one,
//!   `N` = FNV-1a(key) mod [`PARTITIONS`]. The publish carries `Nats-Msg-Id` = the event id,
//!   so a publish repeated within two minutes is stored once. The payload is the
//!   `StoredEvent` protobuf (the same record the embedded outbox keeps).
//! - Per subscription `S`, [`PARTITIONS`] + 1 durable pull consumers, `S-u` and `S-k0`...:
//!   each filters its topic's subject plus `<p>.rp.S.<part>` (replays meant for `S` alone).
//!   A subscribing service is one consumer group: every instance's sidecar pulls from the
//!   same consumers and delivers to its own app, so each event reaches one instance.
//! - Per-key order: a `k<N>` consumer has `max_ack_pending: 1`, so the server hands out the
//!   next event of the partition only when the previous one is acknowledged, whichever
//!   instance holds it; a failed attempt is `NAK`ed with the backoff as delay and stays
//!   pending, so it is redelivered before anything after it. Keys sharing a partition wait
//!   for each other (head-of-line), the price of having any number of keys. The `u` consumer
//!   allows `max_in_flight` unacknowledged events across the group.
//! - Consumers are created (or updated) by any sidecar that needs them: the subscribing
//!   service's sidecars when the subscription reaches them, and a publisher before its first
//!   publish to the topic, so an event published before any subscriber is up is kept. They
//!   carry the subscription name and snapshot version as metadata; a sidecar whose snapshot
//!   no longer has a subscription deletes consumers created at an older version.
//!
//! Delivery follows the embedded rules (see `dispatch.rs`): 2xx acknowledges; 429, 5xx,
//! timeouts and an unreachable or unhealthy app `NAK` with exponential backoff and full
//! jitter (at least `Retry-After`); the attempt count is JetStream's delivery count, so it
//! survives a sidecar crash. Other answers, or `max_attempts` used up, dead-letter the event:
//! a `DeadLetterRecord` goes to the stream `<P>_DEAD` (subject `<p>.dead.S`, message id
//! `<event id>@S`), and only then is the event acknowledged.
//! `<P>_DEAD` has its own bound (`--dead-letters-max-events`, `--dead-letters-max-bytes`,
//! `discard: old`): full, its oldest dead letters go, so they never hold publishes back.
//!
//! Dead letters are shared by the mesh: every NATS sidecar names the store in its Hello
//! (`nats:<url>#<P>_DEAD`), and the control plane sends `sinewctl events` questions to one
//! sidecar per store (and counts one reply per store). Replay republishes to
//! `<p>.rp.S.<part>` (consumers re-checked first) with a message id derived from the dead
//! letter, then deletes it, 500 at a time, touching only what was dead when asked.

use super::wire;
use super::{Limits, NatsConfig, outbox::Filter};
use crate::inbound::Inbound;
use crate::snapshot::Subscription;
use crate::state::Shared;
use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use sinew_proto::v1::{DeadLetter, DeadLetterRecord, StoredEvent};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

use super::dispatch::{Outcome, backoff, classify};
use super::outbox::{ADMIN_CHUNK, unix_ms};

/// Keyed events are spread over this many partitions per topic. Every sidecar of a mesh must
/// agree on it: changing it moves keys between partitions.
pub const PARTITIONS: u32 = 16;

/// How long a publisher trusts that a subscription's consumers exist before creating (or
/// updating) them again.
const RECHECK: Duration = Duration::from_secs(5);

/// How long JetStream keeps message ids for de-duplication.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Where a partition of a topic lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    /// Events without a key.
    Unkeyed,
    Keyed(u32),
}

impl Part {
    fn of(key: &str) -> Part {
        if key.is_empty() {
            return Part::Unkeyed;
        }
        // FNV-1a, 64 bits: stable across sidecars and releases.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in key.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Part::Keyed((hash % u64::from(PARTITIONS)) as u32)
    }

    fn all() -> impl Iterator<Item = Part> {
        std::iter::once(Part::Unkeyed).chain((0..PARTITIONS).map(Part::Keyed))
    }

    fn token(self) -> String {
        match self {
            Part::Unkeyed => "u".to_string(),
            Part::Keyed(n) => format!("k{n}"),
        }
    }
}

/// Why a publish was not stored.
#[derive(Debug, Clone)]
pub enum PublishFailure {
    /// The stream holds its limit: 503 `outbox-full`.
    Full(String),
    /// Larger than the server's `max_payload`: 413.
    TooLarge(String),
    /// The server is unreachable or failed: 503 `outbox-unavailable`.
    Unavailable(String),
}

impl std::fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishFailure::Full(e)
            | PublishFailure::TooLarge(e)
            | PublishFailure::Unavailable(e) => f.write_str(e),
        }
    }
}

/// This sidecar's side of the NATS backend.
pub struct NatsEvents {
    js: jetstream::Context,
    url: String,
    prefix: String,
    events_stream: String,
    dead_stream: String,
    limits: Limits,
    shared: Arc<Shared>,
    /// Both streams exist (checked once per connection life; re-checked after a failure).
    streams_ready: AtomicBool,
    /// Subscription name → the spec (as JSON) its consumers were last created with, and
    /// when. Entries go stale after [`RECHECK`]: with interest retention a publish that no
    /// consumer wants is acknowledged and dropped, so a consumer deleted behind our back
    /// (by an operator, or a server that lost its state) must be noticed quickly.
    ensured: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// Consumers are created by one task at a time.
    ensuring: tokio::sync::Mutex<()>,
    /// From the last stream info: messages, bytes (for `/events` and the gauges).
    depth: AtomicU64,
    bytes: AtomicU64,
}

impl NatsEvents {
    /// Connects (in the background if the server is not up yet) and starts pulling for this
    /// service's subscriptions.
    pub async fn start(
        shared: Arc<Shared>,
        inbound: Arc<Inbound>,
        config: &NatsConfig,
        limits: Limits,
    ) -> anyhow::Result<Arc<NatsEvents>> {
        let options = async_nats::ConnectOptions::new()
            .name(format!("sinew-sidecar {}", shared.node_id))
            .connection_timeout(Duration::from_secs(2))
            .retry_on_initial_connect();
        let client = with_auth(options, &config.auth)
            .await?
            .connect(config.url.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("--nats-url {}: {e}", config.url))?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(5));
        let upper = config.prefix.to_ascii_uppercase().replace('-', "_");
        let me = Arc::new(NatsEvents {
            js,
            url: config.url.clone(),
            prefix: config.prefix.clone(),
            events_stream: format!("{upper}_EVENTS"),
            dead_stream: format!("{upper}_DEAD"),
            limits,
            shared,
            streams_ready: AtomicBool::new(false),
            ensured: Mutex::new(HashMap::new()),
            ensuring: tokio::sync::Mutex::new(()),
            depth: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        tokio::spawn(me.clone().run(inbound));
        Ok(me)
    }

    /// `nats:<url>#<P>_DEAD`: the control plane asks one sidecar per store, and replies with
    /// the same store are one answer (see the module doc).
    pub fn store(&self) -> String {
        format!("nats:{}#{}", self.url, self.dead_stream)
    }

    /// Messages and bytes in the events stream, read from the server now (the last known
    /// figures if it does not answer).
    pub async fn depth(&self) -> (u64, u64) {
        if let Ok(stream) = self.js.get_stream_no_info(&self.events_stream).await
            && let Ok(info) = stream.get_info().await
        {
            self.depth.store(info.state.messages, Ordering::Relaxed);
            self.bytes.store(info.state.bytes, Ordering::Relaxed);
        }
        (
            self.depth.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn event_subject(&self, topic: &str, part: Part) -> String {
        format!("{}.ev.{topic}.{}", self.prefix, part.token())
    }

    fn replay_subject(&self, subscription: &str, part: Part) -> String {
        format!("{}.rp.{subscription}.{}", self.prefix, part.token())
    }

    fn dead_subject(&self, subscription: &str) -> String {
        format!("{}.dead.{subscription}", self.prefix)
    }

    /// Creates both streams if they are missing (an existing stream keeps its settings).
    async fn ensure_streams(&self) -> Result<(), String> {
        if self.streams_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let limit = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let dead = self.limits.dead_letters;
        let streams = [
            (
                &self.events_stream,
                "sinew events: pending deliveries",
                vec![
                    format!("{}.ev.>", self.prefix),
                    format!("{}.rp.>", self.prefix),
                ],
                stream::RetentionPolicy::Interest,
                // Full: new publishes are refused (503 outbox-full), nothing is dropped.
                stream::DiscardPolicy::New,
                limit(self.limits.max_outbox_events),
                limit(self.limits.max_outbox_bytes),
            ),
            (
                &self.dead_stream,
                "sinew events: dead letters",
                vec![format!("{}.dead.>", self.prefix)],
                stream::RetentionPolicy::Limits,
                // Their own bound: full, the oldest go, so dead letters never block publishes.
                stream::DiscardPolicy::Old,
                limit(dead.max_events),
                limit(dead.max_bytes),
            ),
        ];
        for (name, description, subjects, retention, discard, max_messages, max_bytes) in streams {
            self.js
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    description: Some(description.into()),
                    subjects,
                    retention,
                    storage: stream::StorageType::File,
                    discard,
                    max_messages,
                    max_bytes,
                    duplicate_window: DEDUP_WINDOW,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("stream {name}: {e}"))?;
        }
        self.streams_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates or updates the consumers of `subscription` unless they already match its spec.
    ///
    /// A publisher waits for this only the first time (or after [`Self::forget`]); the
    /// background task re-checks known subscriptions every [`RECHECK`], one at a time, so
    /// many publishers never ask the server at once.
    async fn ensure_consumers(&self, subscription: &Subscription) -> Result<(), String> {
        if self.known(subscription, None) {
            return Ok(());
        }
        let _one_at_a_time = self.ensuring.lock().await;
        if self.known(subscription, None) {
            return Ok(());
        }
        self.create_consumers(subscription).await
    }

    /// Whether `subscription`'s consumers were made with its current spec (within `within`).
    fn known(&self, subscription: &Subscription, within: Option<Duration>) -> bool {
        self.ensured.lock().is_ok_and(|e| {
            e.get(&subscription.name).is_some_and(|(f, at)| {
                f == subscription.spec_json() && within.is_none_or(|w| at.elapsed() < w)
            })
        })
    }

    /// Creates (or updates) the consumers of known subscriptions last checked more than
    /// [`RECHECK`] ago.
    async fn recheck(&self) {
        let snapshot = self.shared.snapshot.load_full();
        let names: Vec<String> = self
            .ensured
            .lock()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            let Some(subscription) = snapshot.subscriptions.get(&name) else {
                continue;
            };
            if self.known(subscription, Some(RECHECK)) {
                continue;
            }
            let _one_at_a_time = self.ensuring.lock().await;
            if let Err(e) = self.create_consumers(subscription).await {
                tracing::warn!(subscription = %name, "events backend NATS: {e}");
                self.forget(&name);
            }
        }
    }

    async fn create_consumers(&self, subscription: &Subscription) -> Result<(), String> {
        let fingerprint = subscription.spec_json().to_string();
        self.ensure_streams().await?;
        let stream = self
            .js
            .get_stream_no_info(&self.events_stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.events_stream))?;
        let version = self.shared.snapshot.load().version;
        let delivery = &subscription.spec.delivery;
        for part in Part::all() {
            let name = consumer_name(&subscription.name, part);
            let config = consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "sinew subscription {} to {} ({})",
                    subscription.name,
                    subscription.spec.topic,
                    part.token()
                )),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: delivery.timeout + Duration::from_secs(10),
                max_deliver: -1,
                filter_subjects: vec![
                    self.event_subject(&subscription.spec.topic, part),
                    self.replay_subject(&subscription.name, part),
                ],
                max_ack_pending: match part {
                    Part::Keyed(_) => 1,
                    Part::Unkeyed => i64::from(delivery.max_in_flight.max(1)),
                },
                metadata: HashMap::from([
                    ("sinew-subscription".to_string(), subscription.name.clone()),
                    ("sinew-version".to_string(), version.to_string()),
                ]),
                ..Default::default()
            };
            stream
                .create_consumer(config)
                .await
                .map_err(|e| format!("consumer {name}: {e}"))?;
        }
        if let Ok(mut ensured) = self.ensured.lock() {
            ensured.insert(
                subscription.name.clone(),
                (fingerprint, std::time::Instant::now()),
            );
        }
        Ok(())
    }

    /// Stores `events` (all of one topic) for `subscriptions`; one result per event.
    pub async fn publish(
        &self,
        topic: &str,
        subscriptions: &[Arc<Subscription>],
        events: Vec<StoredEvent>,
    ) -> Vec<Result<(), PublishFailure>> {
        let ready = async {
            self.ensure_streams().await?;
            for subscription in subscriptions {
                self.ensure_consumers(subscription).await?;
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(e) = ready {
            self.forget_all();
            let failure = PublishFailure::Unavailable(format!("NATS JetStream: {e}"));
            return events.iter().map(|_| Err(failure.clone())).collect();
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let subject = self.event_subject(topic, Part::of(&event.key));
            // CloudEvents ids are unique per source; different topics may reuse them too.
            let message = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(event.encode_to_vec()))
                .message_id(format!("{topic}|{}|{}", event.source, event.id));
            acks.push(self.js.send_publish(subject, message).await);
        }
        let mut results = Vec::with_capacity(acks.len());
        for ack in acks {
            let result = match ack {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            results.push(match result {
                Ok(ack) => {
                    if ack.duplicate {
                        metrics::counter!("sinew_events_duplicates_total", "topic" => topic.to_string()).increment(1);
                    }
                    Ok(())
                }
                Err(e) => {
                    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        self.forget_all();
                    }
                    Err(publish_failure(e))
                }
            });
        }
        results
    }

    /// The background work: streams, consumers and pullers for this service's subscriptions,
    /// clean-up of deleted subscriptions' consumers, and the gauges.
    async fn run(self: Arc<Self>, inbound: Arc<Inbound>) {
        let mut updated = self.shared.updated.subscribe();
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut pullers: HashMap<String, (String, Vec<tokio::task::JoinHandle<()>>)> =
            HashMap::new();
        let mut known: Option<HashSet<String>> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = crate::state::shutdown_begun(&mut shutdown) => break,
                _ = updated.changed() => {}
                _ = tick.tick() => {}
            }
            if let Err(e) = self.ensure_streams().await {
                tracing::warn!("events backend NATS: {e}");
                continue;
            }
            let snapshot = self.shared.snapshot.load_full();
            if snapshot.version == 0 {
                continue;
            }
            // Pullers for this service's subscriptions, restarted when a spec changes.
            let mine: HashMap<&String, &Arc<Subscription>> = snapshot
                .subscriptions
                .iter()
                .filter(|(_, s)| s.spec.service == self.shared.service)
                .collect();
            pullers.retain(|name, (fingerprint, tasks)| {
                let keep = mine.get(name).is_some_and(|s| s.spec_json() == fingerprint);
                if !keep {
                    tasks.iter().for_each(tokio::task::JoinHandle::abort);
                }
                keep
            });
            for (name, subscription) in &mine {
                if pullers.contains_key(*name) {
                    continue;
                }
                if let Err(e) = self.ensure_consumers(subscription).await {
                    tracing::warn!(subscription = %name, "events backend NATS: {e}");
                    self.streams_ready.store(false, Ordering::Release);
                    continue;
                }
                let tasks = Part::all()
                    .map(|part| {
                        tokio::spawn(self.clone().pull(
                            (*subscription).clone(),
                            part,
                            inbound.clone(),
                        ))
                    })
                    .collect();
                let fingerprint = subscription.spec_json().to_string();
                pullers.insert((*name).clone(), (fingerprint, tasks));
            }
            // Consumers of subscriptions that are gone.
            let names: HashSet<String> = snapshot.subscriptions.keys().cloned().collect();
            if known.as_ref() != Some(&names) {
                if let Ok(mut ensured) = self.ensured.lock() {
                    ensured.retain(|name, _| names.contains(name));
                }
                match self.delete_stale_consumers(&names, snapshot.version).await {
                    Ok(()) => known = Some(names),
                    Err(e) => tracing::warn!("events backend NATS: cleaning up consumers: {e}"),
                }
            }
            self.recheck().await;
            self.publish_gauges().await;
        }
        for (_, (_, tasks)) in pullers {
            tasks.iter().for_each(tokio::task::JoinHandle::abort);
        }
    }

    async fn delete_stale_consumers(
        &self,
        names: &HashSet<String>,
        version: u64,
    ) -> Result<(), String> {
        let stream = self
            .js
            .get_stream_no_info(&self.events_stream)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumers = stream.consumers();
        let mut stale = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| e.to_string())?;
            let metadata = &info.config.metadata;
            let (Some(subscription), Some(created_at)) = (
                metadata.get("sinew-subscription"),
                metadata
                    .get("sinew-version")
                    .and_then(|v| v.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if !names.contains(subscription) && created_at < version {
                stale.push(info.name.clone());
            }
        }
        for name in stale {
            // Read again just before: a sidecar that has the subscription (again) refreshes
            // its consumers' version every few seconds.
            let Ok(info) = stream.consumer_info(&name).await else {
                continue;
            };
            let created_at = info
                .config
                .metadata
                .get("sinew-version")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            if created_at >= version {
                continue;
            }
            // Another sidecar may have deleted it first.
            let _ = stream.delete_consumer(&name).await;
            tracing::info!(consumer = %name, "deleted the consumer of a removed subscription");
        }
        Ok(())
    }

    async fn publish_gauges(&self) {
        let info = match self.js.get_stream_no_info(&self.events_stream).await {
            Ok(stream) => stream.get_info().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let info = match info {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("events stream info: {e}");
                if e.contains("not found") {
                    self.forget_all();
                }
                return;
            }
        };
        let state = &info.state;
        self.depth.store(state.messages, Ordering::Relaxed);
        self.bytes.store(state.bytes, Ordering::Relaxed);
        metrics::gauge!("sinew_outbox_events").set(state.messages as f64);
        metrics::gauge!("sinew_outbox_bytes").set(state.bytes as f64);
        let oldest = if state.messages == 0 {
            0.0
        } else {
            (unix_ms() / 1000 - state.first_timestamp.unix_timestamp()).max(0) as f64
        };
        metrics::gauge!("sinew_outbox_oldest_pending_seconds").set(oldest);
        if let Ok(dead) = self.js.get_stream_no_info(&self.dead_stream).await
            && let Ok(info) = dead.get_info().await
        {
            metrics::gauge!("sinew_dead_letters").set(info.state.messages as f64);
        }
    }

    /// Pulls one consumer of `subscription` until aborted, delivering to the local app.
    async fn pull(
        self: Arc<Self>,
        subscription: Arc<Subscription>,
        part: Part,
        inbound: Arc<Inbound>,
    ) {
        let name = consumer_name(&subscription.name, part);
        let in_flight = match part {
            Part::Keyed(_) => 1,
            Part::Unkeyed => subscription.spec.delivery.max_in_flight.max(1) as usize,
        };
        let permits = Arc::new(Semaphore::new(in_flight));
        let mut failures = 0u32;
        let mut healthy = self.shared.app_healthy.subscribe();
        loop {
            // An unhealthy app takes nothing: the other instances do, and a keyed partition
            // is not held by an instance that cannot deliver.
            if healthy.wait_for(|h| *h).await.is_err() {
                return;
            }
            let messages = async {
                let stream = self
                    .js
                    .get_stream_no_info(&self.events_stream)
                    .await
                    .map_err(|e| e.to_string())?;
                let consumer: consumer::PullConsumer = stream
                    .get_consumer(&name)
                    .await
                    .map_err(|e| e.to_string())?;
                consumer
                    .stream()
                    .max_messages_per_batch(in_flight)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    failures += 1;
                    tracing::debug!(consumer = %name, "pulling: {e}");
                    tokio::time::sleep(backoff(
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                        failures,
                    ))
                    .await;
                    if failures.is_multiple_of(10) {
                        // Recreated, e.g. after the server lost its state.
                        self.forget(&subscription.name);
                        if let Err(e) = self.ensure_consumers(&subscription).await {
                            tracing::warn!(consumer = %name, "{e}");
                        }
                    }
                    continue;
                }
            };
            failures = 0;
            while let Some(message) = messages.next().await {
                let message = match message {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::debug!(consumer = %name, "pulling: {e}");
                        break;
                    }
                };
                if !self.shared.is_app_healthy() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    break;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let me = self.clone();
                let inbound = inbound.clone();
                let subscription = subscription.clone();
                let handle = async move {
                    me.handle(&subscription, &inbound, message).await;
                    drop(permit);
                };
                match part {
                    // One at a time: the server holds the next until this one is settled.
                    Part::Keyed(_) => handle.await,
                    Part::Unkeyed => {
                        tokio::spawn(handle);
                    }
                }
            }
        }
    }

    fn forget(&self, subscription: &str) {
        if let Ok(mut ensured) = self.ensured.lock() {
            ensured.remove(subscription);
        }
    }

    /// The server may have lost the streams or consumers: check everything again.
    fn forget_all(&self) {
        self.streams_ready.store(false, Ordering::Release);
        if let Ok(mut ensured) = self.ensured.lock() {
            ensured.clear();
        }
    }

    /// One delivery attempt of a pulled message, and its settlement.
    async fn handle(
        &self,
        subscription: &Subscription,
        inbound: &Inbound,
        message: jetstream::Message,
    ) {
        let attempt = message
            .info()
            .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        let event = match StoredEvent::decode(message.payload.clone()) {
            Ok(event) => event,
            Err(e) => {
                // Not written by a sidecar: nothing to deliver, nothing to dead-letter.
                tracing::warn!(subscription = %subscription.name, subject = %message.subject, "dropping an undecodable message: {e}");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let spec = &subscription.spec;
        let allowed = self.admits(&event);
        let outcome = match allowed
            .and_then(|()| wire::delivery_request(&spec.service, &spec.path(), &event))
        {
            Err(error) => Outcome::Refused { error },
            Ok(request) => {
                match tokio::time::timeout(spec.delivery.timeout, inbound.deliver_event(request))
                    .await
                {
                    Err(_) => Outcome::Retry {
                        error: format!("no answer within {:?}", spec.delivery.timeout),
                        after: None,
                    },
                    Ok(Err(e)) => Outcome::Retry {
                        error: e.to_string(),
                        after: None,
                    },
                    Ok(Ok(response)) => classify(response.status(), response.headers()),
                }
            }
        };
        let topic = event.topic.clone();
        let service = spec.service.clone();
        match outcome {
            Outcome::Delivered | Outcome::Gone => {
                let _ = message.ack().await;
                metrics::counter!("sinew_events_delivered_total", "topic" => topic.clone(), "subscriber" => service.clone()).increment(1);
                let age = (unix_ms() - event.stored_unix_ms).max(0) as f64 / 1000.0;
                metrics::histogram!("sinew_event_delivery_seconds", "topic" => topic, "subscriber" => service).record(age);
            }
            Outcome::Retry { error, after } => {
                if attempt >= spec.delivery.max_attempts {
                    let error = format!(
                        "{error} (attempt {attempt} of {})",
                        spec.delivery.max_attempts
                    );
                    self.dead(subscription, &message, event, attempt, error)
                        .await;
                    return;
                }
                metrics::counter!("sinew_events_retried_total", "topic" => topic, "subscriber" => service).increment(1);
                let delay = backoff(
                    spec.delivery.backoff.base,
                    spec.delivery.backoff.max,
                    attempt,
                )
                .max(after.unwrap_or_default());
                tracing::debug!(subscription = %subscription.name, attempt, %error, ?delay, "delivery failed; retrying");
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Outcome::Refused { error } => {
                self.dead(subscription, &message, event, attempt, error)
                    .await;
            }
        }
    }

    /// Whether this service's `allow` list admits the event's publisher. Through the embedded
    /// outbox an event arrives on a mutually authenticated stream and the inbound checks the
    /// caller's certificate; through NATS it arrives from the server, so the check is made
    /// here on the publisher its sidecar recorded (`StoredEvent.publisher`). An event without
    /// one is refused wherever `allow` is set.
    fn admits(&self, event: &StoredEvent) -> Result<(), String> {
        let me = &self.shared.service;
        let snapshot = self.shared.snapshot.load();
        let Some(service) = snapshot.services.get(me) else {
            return Ok(());
        };
        let allow = &service.policy.allow;
        if allow.is_empty() || allow.contains(&event.publisher) {
            return Ok(());
        }
        let publisher = if event.publisher.is_empty() {
            "(not recorded)"
        } else {
            event.publisher.as_str()
        };
        metrics::counter!("sinew_inbound_forbidden_total", "caller" => publisher.to_string())
            .increment(1);
        Err(format!(
            "forbidden: publisher `{publisher}` may not call `{me}` (its allow list)"
        ))
    }

    /// Stores the dead letter, republishes to the dead-letter topic if there is one, and only
    /// then acknowledges; if storing fails, the event is retried later.
    async fn dead(
        &self,
        subscription: &Subscription,
        message: &jetstream::Message,
        event: StoredEvent,
        attempts: u32,
        error: String,
    ) {
        let spec = &subscription.spec;
        // Storing may take a few round trips: keep the event ours meanwhile.
        let _ = message.ack_with(AckKind::Progress).await;
        tracing::warn!(subscription = %subscription.name, topic = %event.topic, %error, "event dead-lettered");
        // The stream sequence tells a replayed event's second death from a repeat of its first.
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        let id = format!("{}@{}@{sequence}", event.id, subscription.name);
        let dead_letter_topic = spec.delivery.dead_letter_topic.clone();
        let copy = dead_letter_topic.as_ref().map(|_| event.clone());
        let mut record = DeadLetterRecord {
            event: Some(event),
            subscription: subscription.name.clone(),
            service: spec.service.clone(),
            attempts,
            last_error: error,
            dead_unix_ms: unix_ms(),
        };
        let subject = self.dead_subject(&subscription.name);
        let mut stored = self
            .publish_one(subject.clone(), Bytes::from(record.encode_to_vec()), &id)
            .await;
        if let Err(PublishFailure::TooLarge(e)) = &stored {
            // Keep the record without its data rather than retrying forever.
            record.last_error = format!(
                "{} (data dropped from the dead letter: {e})",
                record.last_error
            );
            if let Some(event) = record.event.as_mut() {
                event.data.clear();
            }
            stored = self
                .publish_one(subject, Bytes::from(record.encode_to_vec()), &id)
                .await;
        }
        if let Err(e) = stored {
            tracing::warn!(subscription = %subscription.name, "storing a dead letter: {e}; retrying later");
            let delay = backoff(
                spec.delivery.backoff.base,
                spec.delivery.backoff.max,
                attempts,
            );
            let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
            return;
        }
        metrics::counter!("sinew_events_dead_lettered_total", "topic" => record.event.as_ref().map(|e| e.topic.clone()).unwrap_or_default(), "subscriber" => spec.service.clone()).increment(1);
        if let (Some(topic), Some(mut event)) = (dead_letter_topic, copy) {
            let subscribers = self.shared.snapshot.load().subscribers(&topic);
            event.topic = topic.clone();
            event.id = format!("{}-dead-{}", event.id, subscription.name);
            let results = self.publish(&topic, &subscribers, vec![event]).await;
            if let Some(Err(e)) = results.into_iter().next() {
                tracing::warn!(%topic, "republishing a dead letter to its topic: {e}");
            }
        }
        let _ = message.ack().await;
    }

    async fn publish_one(
        &self,
        subject: String,
        payload: Bytes,
        id: &str,
    ) -> Result<(), PublishFailure> {
        let message = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        let result = match self.js.send_publish(subject, message).await {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                self.forget_all();
            }
            publish_failure(e)
        })
    }

    /// Dead letters matching `filter`, oldest first, from stream sequence `from` on: how many
    /// were seen, up to `limit` of them with their sequence numbers, and where to go on
    /// (`None`: the end of the stream). `count_all` goes on counting past `limit`.
    async fn scan(
        &self,
        filter: &Filter,
        from: u64,
        limit: usize,
        count_all: bool,
    ) -> Result<(u64, Vec<(u64, DeadLetterRecord)>, Option<u64>), String> {
        self.ensure_streams().await?;
        let stream = self
            .js
            .get_stream_no_info(&self.dead_stream)
            .await
            .map_err(|e| e.to_string())?;
        let subject = format!("{}.dead.>", self.prefix);
        let mut matched = 0u64;
        let mut out = Vec::new();
        let mut next = from.max(1);
        loop {
            let found = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await;
            let message = match found {
                Ok(message) => message,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    return Ok((matched, out, None));
                }
                Err(e) => return Err(e.to_string()),
            };
            if out.len() == limit && !count_all {
                return Ok((matched, out, Some(message.sequence)));
            }
            next = message.sequence + 1;
            let Ok(record) = DeadLetterRecord::decode(message.payload) else {
                continue;
            };
            if filter.matches(&record) {
                matched += 1;
                if out.len() < limit {
                    out.push((message.sequence, record));
                }
            }
        }
    }

    /// LIST: the dead letters as the control plane shows them.
    pub async fn dead_letters(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<(u64, Vec<DeadLetter>), String> {
        let (matched, records, _) = self.scan(filter, 1, limit, true).await?;
        Ok((
            matched,
            records
                .iter()
                .map(|(_, record)| super::outbox::summary(&record.subscription, record))
                .collect(),
        ))
    }

    /// REPLAY (send again to the subscription that dead-lettered them, attempts from zero)
    /// or PURGE, [`ADMIN_CHUNK`] at a time: how many this sidecar settled.
    pub async fn admin(&self, replay: bool, filter: &Filter) -> Result<u64, String> {
        let mut filter = filter.clone();
        filter.dead_by_unix_ms = unix_ms();
        let stream = self
            .js
            .get_stream_no_info(&self.dead_stream)
            .await
            .map_err(|e| e.to_string())?;
        let snapshot = self.shared.snapshot.load_full();
        let mut settled = 0u64;
        let mut from = 1;
        loop {
            let (_, records, next) = self.scan(&filter, from, ADMIN_CHUNK, false).await?;
            for (seq, record) in records {
                if replay {
                    let Some(subscription) = snapshot.subscriptions.get(&record.subscription)
                    else {
                        // Its subscription is gone: nothing would receive it.
                        continue;
                    };
                    let Some(event) = record.event.as_ref() else {
                        continue;
                    };
                    // Made sure of just now: a replay into a missing consumer would be dropped,
                    // and the dead letter with it.
                    self.forget(&record.subscription);
                    self.ensure_consumers(subscription).await?;
                    let subject = self.replay_subject(&record.subscription, Part::of(&event.key));
                    let id = format!("{}@{}@replay-{seq}", event.id, record.subscription);
                    self.publish_one(subject, Bytes::from(event.encode_to_vec()), &id)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                // Exactly one of the sidecars answering the same request deletes it.
                if let Ok(true) = stream.delete_message(seq).await {
                    settled += 1;
                }
            }
            match next {
                Some(next) => from = next,
                None => return Ok(settled),
            }
        }
    }
}

fn consumer_name(subscription: &str, part: Part) -> String {
    format!("{subscription}-{}", part.token())
}

/// The credentials and TLS settings of `--nats-*` on the connect options. A file that cannot
/// be read stops the start with its flag named.
async fn with_auth(
    mut options: async_nats::ConnectOptions,
    auth: &super::NatsAuth,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
    };
    if let Some(path) = &auth.token_file {
        options = options.token(read(path, "--nats-token-file")?);
    }
    #[cfg(feature = "nats-nkeys")]
    {
        if let Some(path) = &auth.nkey_file {
            options = options.nkey(read(path, "--nats-nkey-file")?);
        }
        if let Some(path) = &auth.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| anyhow::anyhow!("--nats-creds {}: {e}", path.display()))?;
        }
    }
    #[cfg(not(feature = "nats-nkeys"))]
    if auth.nkey_file.is_some() || auth.creds_file.is_some() {
        anyhow::bail!(
            "--nats-nkey-file and --nats-creds need a sidecar built with `--features nats-nkeys`"
        );
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &auth.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options.require_tls(auth.require_tls))
}

fn publish_failure(e: jetstream::context::PublishError) -> PublishFailure {
    let text = e.to_string();
    match e.kind() {
        jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
            PublishFailure::TooLarge(format!("larger than the NATS server's max_payload: {text}"))
        }
        _ if text.contains("maximum messages") || text.contains("maximum bytes") => {
            PublishFailure::Full(format!("the NATS stream holds its limit: {text}"))
        }
        _ => PublishFailure::Unavailable(format!("NATS JetStream: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_stable_partitions() {
        assert_eq!(Part::of(""), Part::Unkeyed);
        assert_eq!(Part::of("order-1"), Part::of("order-1"));
        let parts: HashSet<Part> = (0..200).map(|i| Part::of(&format!("k{i}"))).collect();
        assert_eq!(
            parts.len(),
            PARTITIONS as usize,
            "200 keys cover every partition"
        );
        assert!(
            parts
                .iter()
                .all(|p| matches!(p, Part::Keyed(n) if *n < PARTITIONS))
        );
        // Pinned: every sidecar (and release) must agree.
        assert_eq!(
            Part::of("a"),
            Part::Keyed((0xaf63_dc4c_8601_ec8c_u64 % 16) as u32)
        );
    }

    #[test]
    fn prefixes_are_checked() {
        use super::super::validate_prefix;
        assert!(validate_prefix("sinew").is_ok());
        assert!(validate_prefix("test_1-a").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a.b").is_err());
        assert!(validate_prefix("a>").is_err());
    }
}
