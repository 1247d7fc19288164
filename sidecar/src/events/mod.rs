//! Events: durable at-least-once fan-out through the sidecars, with no broker to install.
//!
//! The journey of an event (`orders` publishes `order.created`; `billing` subscribes):
//!
//! 1. The app posts it to its own sidecar: `POST http://127.0.0.1:4140/v1/events/order.created`
//!    ([`api`]; CloudEvents binary or structured mode, or a batch). The sidecar validates it,
//!    looks up the topic's subscriptions in the snapshot (`kind: Subscription` policy, pushed
//!    to every sidecar) and writes the event plus one delivery row per subscription to the
//!    outbox ([`outbox`], redb). It answers 202 only after the commit is on disk; concurrent
//!    publishes share one commit.
//! 2. The [`dispatch`]er owns the pending deliveries. It sends each to ONE instance of the
//!    subscribing service through the normal outbound path (`POST <path>` with CloudEvents
//!    binary headers, so balancing, breakers and mTLS apply): a service is a consumer group.
//!    Events with the same `sinew-key` go one at a time in publish order; others go
//!    concurrently up to `max_in_flight`.
//! 3. 2xx: delivered, the row goes. 429, 5xx, timeouts, connect failures: retried with
//!    exponential backoff and full jitter (at least `Retry-After`). Other answers, or
//!    `max_attempts` used up: the event moves to the dead letters (and to the subscription's
//!    `dead_letter_topic`, if set), where `sinewctl events` lists, replays or purges it.
//! 4. An event leaves the outbox when its last delivery row goes. A sidecar killed at any
//!    point restarts from the rows on disk: nothing acknowledged is lost, and a delivery may
//!    be made twice (same `ce-id`), which subscribers de-duplicate.
//!
//! The scale-out backend (`--events-backend nats`) keeps the events in NATS JetStream
//! instead, with the same API, delivery rules, per-key order and dead letters: see [`nats`].
//!
//! Dead letters (embedded backend) stay in the sidecar that published the event. The control plane asks every
//! connected sidecar over its control stream (`EventsRequest`/`EventsReply`) when
//! `sinewctl events` runs; the sidecar's admin port shows its own at `GET /events`. They
//! have their own bound (`--dead-letters-max-events`, `--dead-letters-max-bytes`; past it the
//! oldest go, counted), so a subscriber that refuses everything neither grows the disk nor
//! makes publishes to other topics fail with `outbox-full`.

pub mod api;
pub mod dispatch;
#[cfg(feature = "nats")]
pub mod nats;
pub mod outbox;
pub mod wire;

use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::state::Shared;
use crate::transport::Transport;
use outbox::{Filter, Outbox};
use sinew_proto::v1::{EventsReply, EventsRequest, events_request};
use std::path::Path;
use std::sync::Arc;

/// The sizes the events API and the outbox accept (sidecar flags; see `config.rs`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// One event's data. Default 1 MiB.
    pub max_event_bytes: usize,
    /// One batch request's body. Default 16 MiB.
    pub max_batch_bytes: usize,
    /// Events in one batch. Default 1000.
    pub max_batch_events: usize,
    /// Undelivered events the outbox holds before publishes get 503 `outbox-full`.
    /// Default 100,000.
    pub max_outbox_events: u64,
    /// Their stored bytes (every attribute, not only the data). Default 256 MiB.
    pub max_outbox_bytes: u64,
    /// Dead letters kept (their own bound; past it the oldest go). Default 10,000 and 64 MiB.
    pub dead_letters: outbox::DeadBound,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 1024 * 1024,
            max_batch_bytes: 16 * 1024 * 1024,
            max_batch_events: 1000,
            max_outbox_events: 100_000,
            max_outbox_bytes: 256 * 1024 * 1024,
            dead_letters: outbox::DeadBound::default(),
        }
    }
}

/// `--events-backend nats` settings.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    pub prefix: String,
    pub auth: NatsAuth,
}

/// How a sidecar proves itself to the NATS server, and how it checks the server. A token or
/// user and password may also sit in the URL (`nats://token@host:4222`).
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// A file holding the server's token (`authorization { token }`).
    pub token_file: Option<std::path::PathBuf>,
    /// A `.creds` file (JWT and nkey seed, as `nsc` writes it).
    pub creds_file: Option<std::path::PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) that sign the server's certificate; implies TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Refuse a server that does not speak TLS.
    pub require_tls: bool,
}

/// The prefix names streams and subjects: letters, digits, `_` and `-`.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{prefix}`: 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"
        ))
    }
}

/// Where the events are kept.
pub enum Backend {
    /// This sidecar's redb outbox, delivered by its dispatcher.
    Embedded(Arc<Outbox>),
    /// NATS JetStream, shared by the mesh.
    #[cfg(feature = "nats")]
    Nats(Arc<nats::NatsEvents>),
}

pub struct Events {
    pub backend: Backend,
    limits: Limits,
    shared: Arc<Shared>,
    origin: wire::Origin,
}

impl Events {
    /// Opens the outbox in `data_dir` and starts delivering what it holds, or, with `nats`
    /// set, connects to NATS JetStream and pulls this service's subscriptions.
    pub async fn start<T: Transport>(
        shared: Arc<Shared>,
        outbound: Arc<Outbound<T>>,
        inbound: Arc<Inbound>,
        data_dir: &Path,
        limits: Limits,
        nats: Option<&NatsConfig>,
    ) -> anyhow::Result<Arc<Events>> {
        let backend = match nats {
            #[cfg(feature = "nats")]
            Some(config) => Backend::Nats(
                nats::NatsEvents::start(shared.clone(), inbound, config, limits.clone()).await?,
            ),
            #[cfg(not(feature = "nats"))]
            Some(_) => {
                let _ = inbound;
                anyhow::bail!(
                    "--events-backend nats: this sidecar was built without NATS support; build it with the `nats` feature (on by default)"
                )
            }
            None => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let (outbox, recovered) =
                    Outbox::open(&data_dir.join("outbox.redb"), tx, limits.dead_letters)?;
                let outbox = Arc::new(outbox);
                tokio::spawn(dispatch::Dispatcher::run(
                    shared.clone(),
                    outbound,
                    outbox.clone(),
                    recovered,
                    rx,
                ));
                Backend::Embedded(outbox)
            }
        };
        let origin = wire::Origin {
            source: format!("/svc/{}", shared.service),
            publisher: shared.service.clone(),
        };
        Ok(Arc::new(Events {
            backend,
            limits,
            shared,
            origin,
        }))
    }

    /// Where the dead letters live (`Hello.events_store`): empty for this sidecar's outbox.
    pub fn store(&self) -> String {
        match &self.backend {
            Backend::Embedded(_) => String::new(),
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => nats.store(),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Embedded(_) => "embedded",
            #[cfg(feature = "nats")]
            Backend::Nats(_) => "nats",
        }
    }

    /// Pending events and their bytes (for NATS: the shared stream's, asked now).
    pub async fn depth(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Embedded(outbox) => (
                outbox.events.load(std::sync::atomic::Ordering::Relaxed),
                outbox.bytes.load(std::sync::atomic::Ordering::Relaxed),
            ),
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => nats.depth().await,
        }
    }

    /// Answers the control plane's question about this sidecar's dead letters.
    pub async fn answer(&self, request: EventsRequest) -> EventsReply {
        let filter = Filter {
            topic: request.topic.clone(),
            service: request.service.clone(),
            event_ids: request.event_ids.clone(),
            dead_by_unix_ms: 0,
        };
        let mut reply = EventsReply {
            id: request.id,
            ..EventsReply::default()
        };
        let limit = if request.limit == 0 {
            1000
        } else {
            request.limit as usize
        };
        let op = events_request::Op::try_from(request.op).unwrap_or(events_request::Op::List);
        let outbox = match &self.backend {
            Backend::Embedded(outbox) => outbox.clone(),
            #[cfg(feature = "nats")]
            Backend::Nats(nats) => {
                reply.store = nats.store();
                let result = match op {
                    events_request::Op::List => {
                        nats.dead_letters(&filter, limit)
                            .await
                            .map(|(matched, entries)| {
                                reply.dead_letters = entries;
                                matched
                            })
                    }
                    events_request::Op::Replay => nats.admin(true, &filter).await,
                    events_request::Op::Purge => nats.admin(false, &filter).await,
                };
                match result {
                    Ok(matched) => reply.matched = matched,
                    Err(e) => reply.error = e,
                }
                return reply;
            }
        };
        match op {
            events_request::Op::List => {
                // A scan of the whole table: off the async workers.
                let listed =
                    tokio::task::spawn_blocking(move || outbox.dead_letters(&filter, limit)).await;
                match listed
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    Ok((matched, entries)) => {
                        reply.matched = matched;
                        reply.dead_letters = entries;
                    }
                    Err(e) => reply.error = e,
                }
            }
            events_request::Op::Replay | events_request::Op::Purge => {
                let replay = op == events_request::Op::Replay;
                match outbox.admin(replay, filter).await {
                    Ok(n) => reply.matched = n,
                    Err(e) => reply.error = e,
                }
            }
        }
        reply
    }
}
